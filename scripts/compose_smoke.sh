#!/usr/bin/env bash
# The CPU stack of docker-compose.yml built and run end to end with docker compose, and
# checked from the host as a user would check it (docs/operations.md#the-compose-smoke-run):
#   - the project's images build; third-party bases are pulled, or stood in for from Debian
#     packages where no registry answers (scripts/base_images.sh says which);
#   - Redis (AOF), two teacher replicas, rollout server, scorer, rollout worker, trainer,
#     monitor exporter and Prometheus come up healthy; a teacher of a second compose project,
#     published on another address, serves as a remote teacher through TEACHER_URLS;
#   - the scoring API answers curl with the key of the compose secret, and 401 without it;
#   - Prometheus has every target up and its alarm rules loaded; `rlad monitor --once
#     --json` shows the streams, lag and throughput;
#   - every teacher (both replicas, the remote one) serves the scorer;
#   - `docker compose restart redis` mid-run: the AOF brings the streams and counters back
#     and the run continues; a teacher replica stopped mid-run: the scorer goes on;
#   - the trainer trains its 10 steps (docker/config/smoke.yaml), metrics.jsonl is on the
#     volume, every group is accounted for and none was lost (no dead letter);
#   - Grafana: live where its image could be had, else its provisioning checked statically
#     against the metrics the stack exported (scripts/check_dashboard.py);
#   - `docker compose down` leaves no container, `down -v` no volume.
# Prints each stage's time and `compose_smoke_ok: 1`; exits non-zero at the first failure
# with the failing container's last log lines. Cleans up on any exit (trap), so it can run
# again at once; a Docker engine it had to start is stopped again, its layers kept.
#
#   scripts/compose_smoke.sh            # or: make compose-smoke
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PROJECT=rlad-smoke
REMOTE_PROJECT=rlad-smoke-remote
OVERLAY=docker/config/smoke.yaml
RUN_NAME=$(sed -n 's/^name: //p' "$OVERLAY")
STEPS=$(sed -n 's/^  steps: //p' "$OVERLAY")
TAG=$(sed -n 's/^RLAD_VERSION=//p' .env.example)
# Host ports, apart from those of a stack on the defaults (6379, 9090, 3000, 8000-8007).
REDIS_PORT=16379
PROMETHEUS_PORT=19090
GRAFANA_PORT=13000
TEACHER_PORTS=18000-18007
REMOTE_TEACHER_PORT=18100
# The CPU profile and what always runs, Grafana too where its image exists. The trainer
# starts once the checks that need no training are done: then a Redis restart and a
# stopped replica meet the run in its first steps rather than after its end.
STACK=(redis bootstrap teacher-cpu rollout-cpu scorer-cpu rollout-worker-cpu monitor prometheus)
TRAINER=trainer-cpu
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
TORCH_INDEX=https://download.pytorch.org/whl/cpu
DOCKERD_LOG=/tmp/rlad-compose-smoke-dockerd.log

WORK=$(mktemp -d /tmp/rlad-compose-smoke.XXXXXX)
REMOTE_TEACHER=""
STARTED_DOCKERD=""
STACK_STARTED=""
CURRENT_STAGE=""
STAGE_TIMES=()
COMPOSE=()
BUILD=()
BUILD_ARGS=()

# ------------------------------------------------------------------ reporting and cleanup

log() { printf '[compose-smoke %s] %s\n' "$(date +%T)" "$*"; }

# The last log lines of a service of the stack (or of another project).
show_logs() {
  printf '\n--- %s, last log lines ---\n' "$1" >&2
  in_project "${2:-$PROJECT}" logs --no-color --tail 40 "$1" >&2 2>&1 || true
}

# Stop at the first failure: say what failed, in which stage, and show the service's logs.
fail() {
  local service=$1
  shift
  printf '\nFAILED in stage %s: %s\n' "$CURRENT_STAGE" "$*" >&2
  if [ -n "$service" ]; then
    show_logs "$service"
  fi
  exit 1
}

# An unexpected failure: reported once, by the main shell (a failing command substitution
# trips the trap in its subshell too, which leaves the report to its parent).
on_error() {
  [ "$BASH_SUBSHELL" = 0 ] || return 0
  fail "" "command failed (line $1): $2"
}

# After a failure: the logs of every container that is neither running healthy nor done.
show_broken_containers() {
  local id state
  for id in $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT") \
    $(docker ps -aq --filter "label=com.docker.compose.project=$REMOTE_PROJECT"); do
    state=$(docker inspect -f '{{.Name}} {{.State.Status}} {{.State.ExitCode}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
    case "$state" in
      *" running 0 healthy" | *" running 0 " | *" exited 0 "*) ;;
      *)
        printf '\n--- %s, last log lines ---\n' "$state" >&2
        docker logs --tail 40 "$id" >&2 2>&1 || true
        ;;
    esac
  done
}

cleanup() {
  local status=$?
  if [ "$status" != 0 ] && [ -n "$STACK_STARTED" ]; then
    show_broken_containers
  fi
  if [ ${#COMPOSE[@]} -gt 0 ]; then
    stack down -v --remove-orphans >/dev/null 2>&1 || true
    remote down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  if [ -n "$STARTED_DOCKERD" ]; then
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    # Let it stop its containerd and shims, so that the next start finds a clean state.
    timeout 60 tail --pid="$STARTED_DOCKERD" -f /dev/null || true
  fi
  if [ "$status" != 0 ]; then
    echo "compose_smoke_ok: 0"
  fi
}
trap cleanup EXIT
trap 'on_error "$LINENO" "$BASH_COMMAND"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

stage() {
  local name=$1 started elapsed
  shift
  CURRENT_STAGE=$name
  log "stage $name"
  started=$(date +%s)
  "$@"
  elapsed=$(($(date +%s) - started))
  STAGE_TIMES+=("$name $elapsed")
  log "stage $name: ${elapsed} s"
}

# Run a command every `interval` seconds until it succeeds, for at most `timeout` seconds.
eventually() {
  local timeout=$1 interval=$2 deadline
  shift 2
  deadline=$(($(date +%s) + timeout))
  until "$@"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      return 1
    fi
    sleep "$interval"
  done
}

# ------------------------------------------------------------------ compose and docker

in_project() {
  local project=$1
  shift
  "${COMPOSE[@]}" --env-file "$WORK/$project.env" -p "$project" --profile cpu "$@"
}
stack() { in_project "$PROJECT" "$@"; }
remote() { in_project "$REMOTE_PROJECT" "$@"; }

# Ids of a service's running containers (all_containers: stopped ones too), found by the
# labels both compose implementations set, whatever they name the containers.
containers() {
  docker ps -q --filter "label=com.docker.compose.project=${2:-$PROJECT}" \
    --filter "label=com.docker.compose.service=$1"
}
all_containers() {
  docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1"
}

# Every container of the service running, and healthy where it has a healthcheck.
healthy() {
  local id state ids
  ids=$(containers "$1" "${2:-$PROJECT}")
  [ -n "$ids" ] || return 1
  for id in $ids; do
    state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
    [ "$state" = "running healthy" ] || [ "$state" = "running " ] || return 1
  done
}

# With the password of the secret (REDISCLI_AUTH: not on a command line).
redis_cli() {
  # shellcheck disable=SC2016 # expanded by the container's shell
  stack exec -T redis sh -c 'REDISCLI_AUTH=$(cat /run/secrets/redis_password) exec redis-cli "$@"' \
    redis-cli "$@" | tr -d '\r'
}

# JSON on stdin, a Python expression of it (`d`) as argument: the value, printed.
json_get() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

monitor_json() { stack exec -T monitor rlad monitor --once --json "$@"; }

# The trainer's last step, and the run counters `produced scored`, where they live in Redis
# (cheap enough to poll): the keys of the run, scoped by its name.
RUN_KEYS=rlad:$RUN_NAME
trainer_step() {
  local step
  step=$(redis_cli HGET $RUN_KEYS:trainer step 2>/dev/null) || true
  echo "${step:-0}"
}
counters() { redis_cli HMGET $RUN_KEYS:stats produced scored | sed 's/^$/0/' | paste -sd ' '; }
produced_above() { [ "$(counters | cut -d ' ' -f 1)" -gt "$1" ]; }
step_above() { [ "$(trainer_step)" -gt "$1" ]; }
scored_above() { [ "$(counters | cut -d ' ' -f 2)" -gt "$1" ]; }

# ------------------------------------------------------------------ stages

prerequisites() {
  scripts/docker_tools.sh
  command -v python3 >/dev/null || fail "" "python3 is needed on the host to read JSON answers"
  if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "" "no Docker engine answers, and starting dockerd needs root"
    log "no Docker engine answers: starting dockerd (log: $DOCKERD_LOG)"
    # In its own session, so that a Ctrl-C meant for this script does not reach it.
    setsid dockerd >"$DOCKERD_LOG" 2>&1 &
    STARTED_DOCKERD=$!
    eventually 60 1 docker info >/dev/null 2>&1 \
      || fail "" "dockerd did not answer within 60 s: $(tail -n 5 "$DOCKERD_LOG")"
  fi
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  else
    COMPOSE=(docker-compose)
  fi
  # BuildKit needs the buildx plugin with a recent client; without it, the legacy builder.
  if docker buildx version >/dev/null 2>&1; then
    BUILD=(docker build)
  else
    BUILD=(env DOCKER_BUILDKIT=0 docker build)
  fi
  log "engine $(docker version -f '{{.Server.Version}}'), compose" \
    "$("${COMPOSE[@]}" version --short), builder: ${BUILD[*]}"
  write_env_files
  # Leftovers of an interrupted run would hold the ports and volumes.
  stack down -v --remove-orphans >/dev/null 2>&1 || true
  remote down -v --remove-orphans >/dev/null 2>&1 || true
}

# Both projects' settings, and the keys as compose secrets, in the work folder.
write_env_files() {
  local gateway
  # As a user makes them (.env.example): readable by the containers' users, gid 10001 (rlad,
  # Redis), gid 0 (grafana).
  scripts/secrets.sh "$WORK/secrets" >/dev/null
  chmod 0755 "$WORK" "$WORK/secrets"
  # The remote teacher listens on the host's address on Docker's default bridge: reachable
  # from the stack's containers as another host's teacher would be, from nowhere else.
  gateway=$(ip -4 -o addr show docker0 2>/dev/null | awk '{ split($4, a, "/"); print a[1] }')
  [ -n "$gateway" ] || fail "" "docker0 has no address, where the remote teacher would listen"
  REMOTE_TEACHER=$gateway:$REMOTE_TEACHER_PORT
  cat >"$WORK/$PROJECT.env" <<EOF
RLAD_VERSION=$TAG
RLAD_SECRETS=$WORK/secrets
CPU_CONFIG_OVERLAY=/opt/rlad/$OVERLAY
TEACHER_URLS=http://teacher:8000,http://$REMOTE_TEACHER
TEACHER_HOST_PORTS=$TEACHER_PORTS
REDIS_PORT=$REDIS_PORT
PROMETHEUS_PORT=$PROMETHEUS_PORT
GRAFANA_PORT=$GRAFANA_PORT
EOF
  cat >"$WORK/$REMOTE_PROJECT.env" <<EOF
RLAD_VERSION=$TAG
RLAD_SECRETS=$WORK/secrets
TEACHER_BIND=$gateway
TEACHER_HOST_PORTS=$REMOTE_TEACHER_PORT
EOF
}

base_images() {
  scripts/base_images.sh | tee "$WORK/base_images.txt"
  if docker image inspect "$(sed -n 's/^    image: \(grafana[^ ]*\)$/\1/p' docker-compose.yml)" \
    >/dev/null 2>&1; then
    STACK+=(grafana)
  else
    log "Grafana runs nowhere here: its provisioning is checked statically instead"
  fi
}

# Folders pip on this host takes wheels from: RLAD_WHEELS, PIP_FIND_LINKS, pip's config.
wheel_folders() {
  local config
  config=$(python3 -m pip config list 2>/dev/null || true)
  # shellcheck disable=SC2046,SC2086 # each of these holds a space-separated list
  printf '%s\n' ${RLAD_WHEELS:-} ${PIP_FIND_LINKS:-} \
    $(sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" <<<"$config") | sed 's#^file://##' | sort -u
}

# Machine-local build inputs in docker/local/ (never committed): the torch wheel where
# PyTorch's index is out of reach, and this host's CA bundle for pip (TLS interception).
build_inputs() {
  local torch wheel="" folder
  torch=$(sed -n 's/^ARG TORCH_VERSION=//p' docker/services.Dockerfile)
  if curl -fsS -m 15 -o /dev/null "$TORCH_INDEX/torch/" 2>/dev/null; then
    log "torch $torch from $TORCH_INDEX"
  else
    for folder in $(wheel_folders); do
      wheel=$(find "$folder" -maxdepth 1 -name "torch-$torch-cp311-cp311-*x86_64.whl" \
        2>/dev/null | head -n 1)
      [ -z "$wheel" ] || break
    done
    [ -n "$wheel" ] || fail "" "$TORCH_INDEX is out of reach and no torch-$torch wheel for" \
      "CPython 3.11 is in any wheel folder of this host ($(wheel_folders | tr '\n' ' '))." \
      "Put one in docker/local/, or name its folder in RLAD_WHEELS."
    cmp -s "$wheel" "docker/local/$(basename "$wheel")" || cp "$wheel" docker/local/
    BUILD_ARGS+=(--build-arg TORCH_SOURCE=docker/local)
    log "torch from $wheel ($TORCH_INDEX is out of reach)"
  fi
  if [ -f "$HOST_CA_BUNDLE" ]; then
    cmp -s "$HOST_CA_BUNDLE" docker/local/ca-certificates.crt \
      || cp "$HOST_CA_BUNDLE" docker/local/ca-certificates.crt
    BUILD_ARGS+=(--build-arg PIP_CERT=/opt/rlad/local/ca-certificates.crt)
    log "pip in the builds trusts this host's CA bundle ($HOST_CA_BUNDLE)"
  else
    log "no CA bundle at $HOST_CA_BUNDLE: pip in the builds trusts the base image's own" \
      "(set HOST_CA_BUNDLE where TLS is intercepted)"
  fi
}

build_image() {
  local target=$1 output=$WORK/build-$1.log
  if ! "${BUILD[@]}" "${BUILD_ARGS[@]}" -f docker/services.Dockerfile --target "$target" \
    -t "rlad-$target:$TAG" . >"$output" 2>&1; then
    tail -n 40 "$output" >&2
    fail "" "docker build of rlad-$target failed"
  fi
  log "rlad-$target:$TAG built"
}

build() {
  build_inputs
  build_image services
  build_image cpu
}

up() {
  local service remote_up
  STACK_STARTED=1
  # A teacher outside the stack, as on another host: its own project, network and volume;
  # started beside the stack, which finds it through TEACHER_URLS once it answers.
  remote up -d --no-build teacher-cpu >"$WORK/remote-up.log" 2>&1 &
  remote_up=$!
  # Compose waits for each health-gated dependency before it starts what depends on it.
  stack up -d --no-build --scale teacher-cpu=2 "${STACK[@]}" >"$WORK/up.log" 2>&1 \
    || fail "" "docker compose up failed: $(cat "$WORK/up.log")"
  wait "$remote_up" || fail "" "the remote teacher did not start: $(cat "$WORK/remote-up.log")"
  if ! eventually 120 2 healthy teacher-cpu "$REMOTE_PROJECT"; then
    show_logs teacher-cpu "$REMOTE_PROJECT"
    fail "" "the remote teacher did not turn healthy"
  fi
  for service in "${STACK[@]}"; do
    if [ "$service" != bootstrap ]; then # one-shot
      eventually 120 2 healthy "$service" || fail "$service" "$service is not healthy"
    fi
  done
  log "up: ${STACK[*]}; teacher-cpu x2; a remote teacher at $REMOTE_TEACHER"
}

trainer() {
  stack up -d --no-build "$TRAINER" >"$WORK/trainer-up.log" 2>&1 \
    || fail "" "docker compose up $TRAINER failed: $(cat "$WORK/trainer-up.log")"
  eventually 120 2 healthy "$TRAINER" || fail "$TRAINER" "the trainer is not healthy"
  log "$TRAINER up"
}

# The host address of a teacher replica's published port (the n-th running container).
teacher_address() { docker port "$(containers teacher-cpu | sed -n "${1}p")" 8000 | head -n 1; }

api() {
  local address key body status
  address=$(teacher_address 1)
  key=$(cat "$WORK/secrets/rlad_api_key")
  body='{"sequences": [{"token_ids": [5, 6, 7, 8], "start": 2}], "top_k": 2}'
  status=$(curl -s -o "$WORK/score.json" -w '%{http_code}' -H "Authorization: Bearer $key" \
    -H 'content-type: application/json' -d "$body" "http://$address/v1/score")
  if [ "$status" != 200 ] || ! grep -q '"logprobs"' "$WORK/score.json"; then
    fail teacher-cpu "POST /v1/score with the key: HTTP $status $(cat "$WORK/score.json")"
  fi
  status=$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
    -d "$body" "http://$address/v1/score")
  [ "$status" = 401 ] || fail teacher-cpu "POST /v1/score without a key: HTTP $status, not 401"
  log "http://$address/v1/score: 200 with the secret's key, 401 without"
}

# Every target up, and as many teacher targets as replicas (found through Docker's DNS).
targets_up() {
  curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/targets" >"$WORK/targets.json" \
    && json_get '
all(t["health"] == "up" for t in d["data"]["activeTargets"])
and sorted(t["labels"]["job"] for t in d["data"]["activeTargets"])
== ["monitor", "prometheus", "rollout", "teacher", "teacher"]' <"$WORK/targets.json" \
    | grep -qx True
}

prometheus() {
  eventually 120 5 targets_up || fail prometheus "not every Prometheus target is up:
$(json_get '"\n".join(" ".join([t["scrapeUrl"], t["health"], t["lastError"]])
for t in d["data"]["activeTargets"])' <"$WORK/targets.json")"
  curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/rules" >"$WORK/rules.json"
  [ "$(json_get '{r["health"] for g in d["data"]["groups"] for r in g["rules"]}' \
    <"$WORK/rules.json")" = "{'ok'}" ] || fail prometheus "an alarm rule does not evaluate"
  log "Prometheus: 5 targets up (monitor, prometheus, rollout, 2 teachers);" \
    "$(json_get 'sum(len(g["rules"]) for g in d["data"]["groups"])' <"$WORK/rules.json")" \
    "alarm rules evaluate"
}

# Once groups flow: a reading with rates over 5 seconds.
monitor() {
  eventually 300 5 produced_above 0 || fail rollout-worker-cpu "no group was produced"
  monitor_json --window 5 >"$WORK/monitor.json" || fail monitor "rlad monitor --once failed"
  json_get '
sorted(d["streams"]) == ["dead", "rollouts", "scored"]
and {g["stream"] for g in d["groups"]} == {"rollouts", "scored"}
and all("lag" in g for g in d["groups"])
and d["rates"] is not None and d["counters"]["produced"] > 0' <"$WORK/monitor.json" \
    | grep -qx True || fail monitor "rlad monitor --once --json: $(cat "$WORK/monitor.json")"
  log "rlad monitor: $(json_get '", ".join("%s %d" % kv for kv in d["streams"].items())
+ "; lag " + ", ".join("%s %d" % (g["stream"], g["lag"]) for g in d["groups"])
+ "; scored/s %.2f" % d["rates"]["scored"]' <"$WORK/monitor.json")"
}

# Score requests a teacher answered with 200, from its /metrics (0 while it answers none).
served() {
  local count
  count=$(curl -fsS "http://$1/metrics" 2>/dev/null \
    | sed -n 's/^rlad_teacher_requests_total{status="200"} \([0-9]*\).*/\1/p') || true
  echo "${count:-0}"
}

# Every teacher in TEACHERS has answered score requests.
all_served() {
  local teacher
  for teacher in "${TEACHERS[@]}"; do
    [ "$(served "$teacher")" -gt 0 ] || return 1
  done
}

served_now() {
  local teacher
  for teacher in "${TEACHERS[@]}"; do
    served "$teacher"
  done | paste -sd ' '
}

# Each teacher's request counter grows from 0 as the scorer uses it (before the API check,
# whose own request would count).
replicas() {
  TEACHERS=("$(teacher_address 1)" "$(teacher_address 2)" "$REMOTE_TEACHER")
  eventually 300 5 all_served || fail scorer-cpu "not every teacher served the scorer:" \
    "${TEACHERS[*]} answered $(served_now) score requests"
  log "score requests answered by replica 1, replica 2 and the remote teacher: $(served_now)"
}

# How often each queue process was restarted by its restart policy.
WORKERS=(rollout-worker-cpu scorer-cpu trainer-cpu)
restart_counts() {
  local service
  for service in "${WORKERS[@]}"; do
    docker inspect -f '{{.RestartCount}}' "$(containers "$service" | head -n 1)"
  done | paste -sd ' '
}

redis_restart() {
  local before after step produced scored produced_after scored_after restarts
  eventually 600 1 step_above 0 || fail trainer-cpu "the trainer made no step"
  step=$(trainer_step)
  [ "$step" -lt "$STEPS" ] || fail "" "the run ended (step $step) before Redis was restarted"
  before=$(counters)
  restarts=$(restart_counts)
  stack restart redis >/dev/null 2>&1
  eventually 60 2 healthy redis || fail redis "Redis did not come back"
  [ "$(redis_cli CONFIG GET appendonly | tail -n 1)" = yes ] \
    || fail redis "Redis runs without its append-only file"
  [ "$(redis_cli EXISTS $RUN_KEYS:rollouts $RUN_KEYS:scored)" = 2 ] \
    || fail redis "the streams did not come back"
  redis_cli XINFO GROUPS $RUN_KEYS:scored | grep -qx trainers \
    || fail redis "the trainers' consumer group did not come back"
  after=$(counters)
  read -r produced scored <<<"$before"
  read -r produced_after scored_after <<<"$after"
  if [ "$produced_after" -lt "$produced" ] || [ "$scored_after" -lt "$scored" ]; then
    fail redis "counters went back: produced, scored $before before, $after after"
  fi
  # The clients see dropped connections and retry each call until Redis is back: the run
  # goes on with no process restarted.
  eventually 600 5 step_above "$step" \
    || fail trainer-cpu "the run did not go on after Redis restarted"
  [ "$(restart_counts)" = "$restarts" ] || fail "" "a process had to be restarted after" \
    "Redis restarted (restarts of ${WORKERS[*]}: $restarts before, $(restart_counts) after)"
  log "Redis restarted at step $step: produced, scored $before -> $after; the trainer went" \
    "on to step $(trainer_step), no process restarted"
}

replica_stop() {
  local scored
  docker stop "$(containers teacher-cpu | sed -n 2p)" >/dev/null
  scored=$(counters | cut -d ' ' -f 2)
  eventually 300 5 scored_above "$scored" \
    || fail scorer-cpu "nothing was scored after a teacher replica stopped"
  log "a teacher replica stopped: the scorer went on ($scored -> $(counters | cut -d ' ' -f 2)" \
    "groups scored)"
}

# Exited with status 0 (a crash is followed by a restart, under its restart policy).
trainer_done() {
  [ "$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' \
    "$(all_containers trainer-cpu)")" = "exited 0" ]
}

training() {
  local steps
  eventually 900 5 trainer_done || fail trainer-cpu "the trainer did not finish its $STEPS steps"
  # As a user reads it: the run folder on the volume, through the image. Distinct steps,
  # since a trainer resumed from a checkpoint logs the steps after it again.
  steps=$(docker run --rm -v "${PROJECT}_rlad-data:/data:ro" --entrypoint cat "rlad-cpu:$TAG" \
    "/data/runs/$RUN_NAME/metrics.jsonl" \
    | python3 -c 'import json, sys; print(*sorted({json.loads(l)["step"] for l in sys.stdin}))')
  [ "$steps" = "$(seq -s ' ' 1 "$STEPS")" ] \
    || fail trainer-cpu "runs/$RUN_NAME/metrics.jsonl has the steps '$steps', not 1 to $STEPS"
  log "the trainer trained $STEPS steps; runs/$RUN_NAME/metrics.jsonl is on ${PROJECT}_rlad-data"
}

accounts() {
  # Nothing moves once the producers stop, so the figures are exact.
  stack stop rollout-worker-cpu scorer-cpu >/dev/null 2>&1
  monitor_json >"$WORK/accounts.json"
  log "accounts: $(json_get '
"produced %(produced)d, trained %(trained)d, stale %(stale)d, dead %(dead)d" % d["counters"]
+ ", queued %d" % (d["streams"]["rollouts"] + d["streams"]["scored"])' \
    <"$WORK/accounts.json")"
  # produced = trained + stale + dead + still queued, and no group was dead-lettered.
  json_get '
d["counters"]["produced"] == sum(d["counters"][k] for k in ("trained", "stale", "dead"))
+ d["streams"]["rollouts"] + d["streams"]["scored"]
and d["counters"]["dead"] == 0 and d["counters"]["trained"] > 0' <"$WORK/accounts.json" \
    | grep -qx True || fail scorer-cpu "the queue accounts do not add up, or a group was lost"
}

grafana() {
  docker run --rm --network host -v "$ROOT:/rlad:ro" --entrypoint python3 "rlad-services:$TAG" \
    /rlad/scripts/check_dashboard.py --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" /rlad \
    || fail "" "Grafana's provisioning does not match the stack"
  if [[ " ${STACK[*]} " == *" grafana "* ]]; then
    local uid password
    uid=$(json_get 'd["uid"]' <docker/grafana/dashboards/rlad.json)
    password=$(cat "$WORK/secrets/grafana_admin_password")
    curl -fsS -u "admin:$password" "http://127.0.0.1:$GRAFANA_PORT/api/dashboards/uid/$uid" \
      >/dev/null || fail grafana "Grafana did not provision the dashboard $uid"
    log "Grafana serves the provisioned dashboard $uid"
  fi
}

# Nothing of the given kind (container, network, volume) is left of either project.
nothing_left() {
  local kind=$1 project all=()
  if [ "$kind" = container ]; then
    all=(--all)
  fi
  for project in "$PROJECT" "$REMOTE_PROJECT"; do
    [ -z "$(docker "$kind" ls -q "${all[@]}" --filter "label=com.docker.compose.project=$project")" ] \
      || return 1
  done
}

down() {
  stack down >/dev/null 2>&1
  remote down >/dev/null 2>&1
  nothing_left container || fail "" "containers are left after docker compose down"
  nothing_left network || fail "" "networks are left after docker compose down"
  ! nothing_left volume || fail "" "docker compose down (without -v) removed the volumes"
  stack down -v >/dev/null 2>&1
  remote down -v >/dev/null 2>&1
  nothing_left volume || fail "" "volumes are left after docker compose down -v"
  STACK_STARTED=""
  log "down: no container or network left, the volumes kept; down -v: no volume left"
}

main() {
  local started entry
  started=$(date +%s)
  stage prerequisites prerequisites
  stage base_images base_images
  stage build build
  stage up up
  stage prometheus prometheus
  stage monitor monitor
  stage trainer trainer
  stage replicas replicas
  stage api api
  stage redis_restart redis_restart
  stage replica_stop replica_stop
  stage training training
  stage accounts accounts
  stage grafana grafana
  stage down down
  echo
  echo "compose smoke, seconds per stage:"
  for entry in "${STAGE_TIMES[@]}" "total $(($(date +%s) - started))"; do
    printf '  %-14s %5s\n' "${entry% *}" "${entry#* }"
  done
  sed -n '/: stand-in \|: missing /s/^/  note: /p' "$WORK/base_images.txt"
  echo "compose_smoke_ok: 1"
}

main "$@"
