#!/usr/bin/env bash
# The third-party images the CPU stack is built on or runs — the base of
# docker/services.Dockerfile and the Redis, Prometheus and Grafana of docker-compose.yml —
# made available to the local Docker engine:
#   - pulled, wherever a registry answers: the real images, nothing stood in;
#   - else, for Python, Redis and Prometheus, a stand-in built from Debian packages
#     (docker/standin/*.Dockerfile, on a root filesystem made with debootstrap), tagged with
#     the real name so that the Dockerfiles and the compose file run unchanged, and said so;
#   - Grafana has no Debian package: it is reported missing and the caller runs without it.
# A stand-in carries the label org.rlad.stand-in-for; an image loaded by other means (e.g.
# `docker load` of a mirrored one) is used as it is. Layers stay in the engine, so a second
# run only re-tags.
#
#   scripts/base_images.sh      # one line per image: pulled | local | stand-in | missing
#
# DEBIAN_MIRROR overrides the mirror debootstrap uses (default: the one apt uses here).
set -euo pipefail
cd "$(dirname "$0")/.."

STANDIN_BASE=rlad-standin/debian:bookworm
SUITE=bookworm # the Debian release of python:3.11.13-slim-bookworm
SCRATCH="" # a root filesystem or build log being made, removed on any exit
trap 'rm -rf "$SCRATCH"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The images, read from the files that use them (the GPU image is not part of the CPU
# stack): every FROM that names neither an earlier stage nor scratch, and compose's
# `image:` lines but those of the project's own images (tagged with a variable).
third_party_images() {
  awk '$1 == "FROM" && $2 != "scratch" && !($2 in stages) { print $2 }
       $1 == "FROM" && $3 == "AS" { stages[$4] = 1 }' docker/services.Dockerfile
  sed -n 's/^    image: \([^$ ]*:[^ ]*\)$/\1/p' docker-compose.yml
}

# The stand-in Dockerfile of an image, by repository name; none for Grafana.
standin_dockerfile() {
  case "${1%%:*}" in
    python) echo docker/standin/python.Dockerfile ;;
    redis) echo docker/standin/redis.Dockerfile ;;
    prom/prometheus) echo docker/standin/prometheus.Dockerfile ;;
    *) return 1 ;;
  esac
}

# The Debian mirror this machine's apt uses, so that debootstrap works where apt does.
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then
    echo "$DEBIAN_MIRROR"
    return
  fi
  local found
  found=$(
    {
      awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2 }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
      awk '$1 == "URIs:" { print $2 }' /etc/apt/sources.list.d/*.sources 2>/dev/null
    } | grep -m1 '/debian/\?$' || true
  )
  echo "${found:-http://deb.debian.org/debian}"
}

# A minimal Debian root filesystem as an image, once per engine: the FROM of every stand-in.
ensure_standin_base() {
  if docker image inspect "$STANDIN_BASE" >/dev/null 2>&1; then
    return
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "debootstrap is missing: it makes the stand-in images (apt-get install debootstrap)" >&2
    return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "debootstrap needs root to make the stand-in images' root filesystem" >&2
    return 1
  fi
  local mirror rootfs
  mirror=$(debian_mirror)
  SCRATCH=$(mktemp -d /tmp/rlad-standin.XXXXXX)
  rootfs=$SCRATCH/rootfs
  echo "debootstrap $SUITE from $mirror (about a minute, once per engine)"
  if ! debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$SCRATCH/log" 2>&1; then
    tail -n 20 "$SCRATCH/log" >&2
    return 1
  fi
  # As in Debian's official images: no service starts while a package installs in a build.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$STANDIN_BASE" >/dev/null
  rm -rf "$SCRATCH"
}

build_standin() {
  local image=$1 dockerfile=$2 build=(docker build)
  ensure_standin_base
  # BuildKit needs the buildx plugin with a recent client; without it, the legacy builder.
  docker buildx version >/dev/null 2>&1 || build=(env DOCKER_BUILDKIT=0 docker build)
  SCRATCH=$(mktemp /tmp/rlad-standin-build.XXXXXX)
  if ! "${build[@]}" --build-arg "BASE=$STANDIN_BASE" -t "$image" -f "$dockerfile" \
    docker/standin >"$SCRATCH" 2>&1; then
    tail -n 30 "$SCRATCH" >&2
    return 1
  fi
  rm -f "$SCRATCH"
}

main() {
  local image dockerfile label
  for image in $(third_party_images); do
    if docker pull -q "$image" >/dev/null 2>&1; then
      echo "$image: pulled"
      continue
    fi
    label=$(docker image inspect -f '{{index .Config.Labels "org.rlad.stand-in-for"}}' \
      "$image" 2>/dev/null || echo absent)
    if [ "$label" != absent ] && [ -z "$label" ]; then
      echo "$image: local (no registry answered; using the image this engine already has)"
    elif dockerfile=$(standin_dockerfile "$image"); then
      build_standin "$image" "$dockerfile"
      echo "$image: stand-in (no registry answered; built from Debian packages," \
        "$dockerfile)"
    else
      echo "$image: missing (no registry answered and Debian has no package for it)"
    fi
  done
}

main "$@"
