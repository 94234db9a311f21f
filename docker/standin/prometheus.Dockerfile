# Stands in for prom/prometheus:v3.1.0 where no image registry answers
# (scripts/base_images.sh): Debian bookworm's Prometheus (2.x) with the official image's
# entrypoint, user (nobody), storage folder and `wget`, which the healthcheck uses.
ARG BASE=rlad-standin/debian:bookworm
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /prometheus \
    && chown nobody:nogroup /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
LABEL org.rlad.stand-in-for="prom/prometheus:v3.1.0"
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
