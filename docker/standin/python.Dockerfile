# Stands in for python:3.11.13-slim-bookworm where no image registry answers
# (scripts/base_images.sh builds it, from the Debian root filesystem in BASE): Debian
# bookworm's Python 3.11 and pip, laid out as the official image is: `python3` on
# /usr/local/bin, pip installing into the system (no EXTERNALLY-MANAGED marker), and the C
# headers that extensions (DeepSpeed's CPU op) compile against.
ARG BASE=rlad-standin/debian:bookworm
FROM ${BASE}
ENV LANG=C.UTF-8
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-dev python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3 /usr/local/bin/python3 \
    && ln -s /usr/bin/python3 /usr/local/bin/python
LABEL org.rlad.stand-in-for="python:3.11.13-slim-bookworm"
CMD ["python3"]
