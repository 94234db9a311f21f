# Stands in for redis:7.4.2-alpine where no image registry answers (scripts/base_images.sh):
# Debian bookworm's redis-server (7.0, with AOF as docker-compose.yml asks) and redis-cli,
# run as the `redis` user (uid 999, as in the official image) in /data.
ARG BASE=rlad-standin/debian:bookworm
FROM ${BASE}
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 redis \
    && useradd --system --uid 999 --gid redis --home-dir /data redis \
    && apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data \
    && chown redis:redis /data
USER 999:999
WORKDIR /data
EXPOSE 6379
LABEL org.rlad.stand-in-for="redis:7.4.2-alpine"
CMD ["redis-server"]
