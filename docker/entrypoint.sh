#!/bin/sh
# Entrypoint of every rlad image: the API key from its secret into the environment, the
# experiment template rendered, then the command (`rlad ...`, `torchrun ...`) in place of
# this shell.
#
# Compose mounts secrets as files (/run/secrets/NAME), so keys never sit in an image or in
# `docker inspect`; they live only in this process's environment. Outside swarm a secret is
# a bind mount of the host path as it is, with the host's owner and mode: a key that is not
# a file this user can read, or is empty, stops the container here with what to do,
# instead of a server that runs without its key.
set -eu

SECRET=/run/secrets/rlad_api_key
if [ -e "$SECRET" ]; then
  if [ ! -f "$SECRET" ]; then
    echo "$SECRET is not a file: create secrets/rlad_api_key on the host (see .env.example)" >&2
    exit 64
  fi
  if [ ! -r "$SECRET" ]; then
    echo "$SECRET is not readable by uid $(id -u): on the host, give the file group" \
      "$(id -g) and mode 0640 (see .env.example)" >&2
    exit 64
  fi
  RLAD_API_KEY=$(cat "$SECRET")
  if [ -z "$RLAD_API_KEY" ]; then
    echo "$SECRET is empty: put a key in secrets/rlad_api_key (see .env.example)" >&2
    exit 64
  fi
  export RLAD_API_KEY
fi
if [ -n "${RLAD_CONFIG_TEMPLATE:-}" ]; then
  # shellcheck disable=SC2086 # RLAD_CONFIG_OVERLAY: zero or more paths
  python3 /opt/rlad/docker/render_config.py "$RLAD_CONFIG_TEMPLATE" ${RLAD_CONFIG_OVERLAY:-} \
    > /tmp/rlad-config.yaml
fi
exec "$@"
