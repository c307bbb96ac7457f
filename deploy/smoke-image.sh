#!/usr/bin/env bash
# Smoke-test the container image on this machine (opt-in; CI does not run it, it needs a
# Docker daemon and takes a few minutes). Builds the image with build-local-image.sh when
# it is missing, then, with --network host and fake API keys (no call is placed):
#
#   * runs the compose file's one-shot migration (`python -m crm.migrate`) when
#     DATABASE_URL is given (unset: the server's embedded Postgres and Redis in /data);
#   * starts the image's CMD with WORKERS worker processes, locked down as the Kubernetes
#     manifests run it (read-only root file system, /tmp a tmpfs, no capabilities, no
#     privilege escalation), and checks: every process runs as uid 10001, GET /health and
#     GET /ready answer 200, GET /metrics has the workers' samples, the worker count, and
#     Docker's HEALTHCHECK reports `healthy`;
#   * `docker stop` (SIGTERM): /ready turns 503 while /health stays 200, the container
#     exits 0 before the stop timeout, and the log says the drain finished.
#
#   DATABASE_URL=postgresql://postgres@127.0.0.1:5432/scratch REDIS_URL=redis://127.0.0.1:6379/9 \
#       deploy/smoke-image.sh [IMAGE_TAG]          # default voice-agent:local
#
# Other settings: WORKERS (2), DRAIN_GRACE_SECS (2), STOP_TIMEOUT (60), PORT (a free one),
# HEALTHY_WITHIN (150 s: the HEALTHCHECK's start period and one interval), and EXTRA_CA for
# the build. Prints a pass/fail table; exits 1 when a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-voice-agent:local}"
WORKERS="${WORKERS:-2}"
DRAIN_GRACE_SECS="${DRAIN_GRACE_SECS:-2}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"
HEALTHY_WITHIN="${HEALTHY_WITHIN:-150}"
PORT="${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
NAME="voice-agent-smoke-$$"
BASE="http://127.0.0.1:$PORT"

declare -a RESULTS=()
FAILED=0
record() {  # record NAME OK(0/1) DETAIL
    local status=PASS
    if [[ "$2" != 0 ]]; then status=FAIL; FAILED=1; fi
    RESULTS+=("$(printf '%-4s  %-34s %s' "$status" "$1" "$3")")
}
code() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$BASE$1" || true; }
cleanup() { docker rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

if ! docker image inspect "$TAG" >/dev/null 2>&1; then
    start=$(date +%s)
    deploy/build-local-image.sh "$TAG"
    record "build" 0 "$(($(date +%s) - start)) s"
fi
size=$(docker image inspect --format '{{.Size}}' "$TAG")
record "image size" 0 "$((size / 1000000)) MB"

# As deploy/k8s/deployment.yaml's securityContext (/data stays the image's volume).
lockdown=(--read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges)
env_args=(
    -e "PORT=$PORT" -e "WORKERS=$WORKERS" -e "DRAIN_GRACE_SECS=$DRAIN_GRACE_SECS"
    -e OPENAI_API_KEY=smoke -e DEEPGRAM_API_KEY=smoke
    -e TWILIO_ACCOUNT_SID=ACsmoke -e TWILIO_AUTH_TOKEN=smoke
    -e TWILIO_PHONE_NUMBER=+15550000000 -e PUBLIC_BASE_URL=https://smoke.invalid
    -e ADMIN_TOKEN=smoke-admin-token
)
if [[ -n "${DATABASE_URL:-}" ]]; then env_args+=(-e "DATABASE_URL=$DATABASE_URL"); fi
if [[ -n "${REDIS_URL:-}" ]]; then env_args+=(-e "REDIS_URL=$REDIS_URL"); fi

if [[ -n "${DATABASE_URL:-}" ]]; then
    if out=$(docker run --rm --network host "${lockdown[@]}" "${env_args[@]}" "$TAG" \
        python -m crm.migrate 2>&1); then
        record "migrate (compose's one-shot)" 0 "$(tail -n 1 <<<"$out" | cut -c1-60)"
    else
        record "migrate (compose's one-shot)" 1 "$(tail -n 1 <<<"$out" | cut -c1-60)"
    fi
fi

docker run -d --name "$NAME" --network host --stop-timeout "$STOP_TIMEOUT" \
    "${lockdown[@]}" "${env_args[@]}" "$TAG" >/dev/null
start=$(date +%s)
health=000
while (($(date +%s) - start < 120)); do
    health=$(code /health)
    [[ "$health" == 200 ]] && break
    [[ "$(docker inspect --format '{{.State.Running}}' "$NAME")" == true ]] || break
    sleep 1
done
record "GET /health" "$([[ "$health" == 200 ]]; echo $?)" "$health after $(($(date +%s) - start)) s"
ready=000
for _ in $(seq 1 30); do
    ready=$(code /ready)
    [[ "$ready" == 200 ]] && break
    sleep 1
done
record "GET /ready" "$([[ "$ready" == 200 ]]; echo $?)" "$ready"

series=$(curl -s --max-time 5 "$BASE/metrics" | grep -c '^voice_agent_' || true)
record "GET /metrics (all workers)" "$( ((series > 0)); echo $?)" "$series voice_agent_ samples"

uid=$(docker exec "$NAME" id -u 2>/dev/null || echo "?")
uids=$(docker top "$NAME" -eo pid,uid | awk 'NR > 1 {print $2}' | sort -u | paste -sd,)
record "non-root (uid 10001)" "$([[ "$uid" == 10001 && "$uids" == 10001 ]]; echo $?)" \
    "exec: $uid, processes: $uids"
workers=$(docker top "$NAME" -eo pid,args | grep -c 'spawn_main' || true)
record "worker processes" "$([[ "$workers" == "$WORKERS" ]]; echo $?)" \
    "$workers (WORKERS=$WORKERS)"

state=starting
while (($(date +%s) - start < HEALTHY_WITHIN)); do
    state=$(docker inspect --format '{{.State.Health.Status}}' "$NAME")
    [[ "$state" == healthy || "$state" == unhealthy ]] && break
    sleep 1
done
record "HEALTHCHECK" "$([[ "$state" == healthy ]]; echo $?)" \
    "$state after $(($(date +%s) - start)) s"

stop_start=$(date +%s.%N)
docker stop -t "$STOP_TIMEOUT" "$NAME" >/dev/null &
stopper=$!
seen_503=no
health_while_draining=none
while kill -0 "$stopper" 2>/dev/null; do
    r=$(code /ready)
    if [[ "$r" == 503 ]]; then
        seen_503=yes
        # 200 once is enough: the last poll may find the server already gone
        [[ "$health_while_draining" == 200 ]] || health_while_draining=$(code /health)
    fi
    [[ "$r" == 000 && "$seen_503" == yes ]] && break
    sleep 0.2
done
wait "$stopper"
elapsed=$(python3 -c "import time; print(f'{time.time() - $stop_start:.1f}')")
exit_code=$(docker inspect --format '{{.State.ExitCode}}' "$NAME")
record "SIGTERM: /ready 503, /health 200" \
    "$([[ "$seen_503" == yes && "$health_while_draining" == 200 ]]; echo $?)" \
    "503 seen: $seen_503, /health meanwhile: $health_while_draining"
record "SIGTERM: exit code 0" "$([[ "$exit_code" == 0 ]]; echo $?)" \
    "exit $exit_code after $elapsed s (timeout $STOP_TIMEOUT s)"
drained=$(docker logs "$NAME" 2>&1 | grep -c 'drained: no live call left' || true)
record "SIGTERM: every worker drained" "$([[ "$drained" == "$WORKERS" ]]; echo $?)" \
    "$drained of $WORKERS logged 'drained'"

printf '\n%s on port %s\n' "$TAG" "$PORT"
printf '%s\n' "${RESULTS[@]}"
if ((FAILED)); then
    echo "container log (last 30 lines):"
    docker logs "$NAME" 2>&1 | tail -n 30
    exit 1
fi
