#!/usr/bin/env bash
# The Docker tools scripts/compose_smoke.sh needs, installed with apt where they are missing
# (Debian, as root): the engine (docker.io, which also brings a client), a compose
# (Debian's docker-compose, unless the `docker compose` plugin is there) and debootstrap
# (for stand-in base images). Idempotent: a machine that has them is left as it is.
# `make test` runs it before the tests, so that tests/unit/services/test_compose.py validates
# the compose file with a real compose.
set -euo pipefail

# The Debian packages whose command is missing here.
missing_packages() {
  command -v dockerd >/dev/null 2>&1 || echo docker.io
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    echo docker-compose
  fi
  command -v debootstrap >/dev/null 2>&1 || echo debootstrap
  command -v curl >/dev/null 2>&1 || echo curl
}

main() {
  local packages
  packages=$(missing_packages | tr '\n' ' ')
  if [ -z "${packages// /}" ]; then
    return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: $packages— install them (Debian: apt-get install $packages), then rerun" >&2
    return 1
  fi
  echo "installing with apt: $packages"
  apt-get update -qq
  # shellcheck disable=SC2086 # a list of package names
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages \
    >/dev/null
}

main "$@"
