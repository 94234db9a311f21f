#!/bin/sh
# Entrypoint of every rlad image: secrets into the environment, the experiment template
# rendered, then the command (`rlad ...`, `torchrun ...`) in place of this shell.
#
# Compose mounts secrets as files (/run/secrets/NAME), so keys never sit in an image or in
# `docker inspect`; they live only in this process's environment.
set -eu

if [ -f /run/secrets/rlad_api_key ]; then
  RLAD_API_KEY=$(cat /run/secrets/rlad_api_key)
  if [ -z "$RLAD_API_KEY" ]; then
    echo "RLAD_API_KEY is empty: set it in .env (see .env.example)" >&2
    exit 64
  fi
  export RLAD_API_KEY
fi
if [ -n "${RLAD_CONFIG_TEMPLATE:-}" ]; then
  python3 /opt/rlad/docker/render_config.py "$RLAD_CONFIG_TEMPLATE" > /tmp/rlad-config.yaml
fi
exec "$@"
