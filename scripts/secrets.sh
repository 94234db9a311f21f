#!/usr/bin/env bash
# The keys docker-compose.yml mounts as secrets, made where they are missing and never
# replaced (a key in use stays as it is):
#   rlad_api_key            the bearer token every server demands
#   redis_password          Redis's password (requirepass), read by Redis and every queue process
#   grafana_admin_password  Grafana's `admin` password
# in the folder given, else RLAD_SECRETS, else ./secrets (git and .dockerignore keep it out).
# Compose outside swarm mounts each file with its host owner and mode, so each must be
# readable by the users of its containers (.env.example): as root, group 10001 (the rlad
# images, and Redis, which runs as 999:10001) or 0 (Grafana) and mode 0640; as another user,
# who cannot give a file to those groups, mode 0644 in a folder only that user may enter.
#
#   scripts/secrets.sh                 # before `docker compose up`
#   scripts/secrets.sh /srv/rlad/keys  # another folder (then RLAD_SECRETS=/srv/rlad/keys in .env)
set -euo pipefail

FOLDER=${1:-${RLAD_SECRETS:-./secrets}}

# name, random bytes (written as hex), group that reads it
KEYS=(
  "rlad_api_key 32 10001"
  "redis_password 32 10001"
  "grafana_admin_password 16 0"
)

mkdir -p "$FOLDER"
if [ "$(id -u)" != 0 ]; then
  chmod 0700 "$FOLDER"
fi
for entry in "${KEYS[@]}"; do
  read -r name bytes group <<<"$entry"
  path=$FOLDER/$name
  if [ -s "$path" ]; then
    echo "$path: kept"
    continue
  fi
  (umask 077 && od -An -tx1 -N"$bytes" /dev/urandom | tr -d ' \n' >"$path")
  if [ "$(id -u)" = 0 ]; then
    chgrp "$group" "$path"
    chmod 0640 "$path"
  else
    chmod 0644 "$path"
  fi
  echo "$path: made"
done
