#!/usr/bin/env bash
# Build deploy/Dockerfile and run docker-compose's server + Prometheus on a machine with no image registry, then
# check the stack end to end: the container turns healthy, answers the OpenAI API and gRPC, and Prometheus scrapes
# it over the compose network with the alert rules loaded. Grafana is not run: its image comes only from a registry.
#
#   sudo deploy/offline/verify.sh CHECKPOINT_DIR        # any lmforge checkpoint, e.g. runs/small/final
#
# Needs root, Debian's docker.io, docker-compose and debootstrap (apt-get install docker.io docker-compose
# debootstrap), a Debian mirror and PyPI. Environment:
#   WHEELS=/opt/wheels   a folder holding the torch CPU wheel, served to the build as PIP_FIND_LINKS (else the
#                        build takes PyPI's CUDA torch, several GB)
#   CA=/etc/ssl/certs/ca-certificates.crt   the CA bundle pip trusts inside the build
#   KEEP=1               leave the stack running
set -euo pipefail
CHECKPOINT=$(realpath "${1:?usage: $0 CHECKPOINT_DIR}")
[ -f "$CHECKPOINT/config.json" ] || { echo "error: $CHECKPOINT: not a checkpoint (no config.json)"; exit 2; }
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/deploy/offline
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
WORK=$(mktemp -d /tmp/lmforge-offline.XXXXXX)
WHEEL_PORT=8765
export DOCKER_BUILDKIT=0  # the classic builder: no buildx plugin needed (it ignores Dockerfile.dockerignore, so the
                          # context is a `git archive` of the sources)
cleanup() {
  [ -n "${WHEEL_PID:-}" ] && kill "$WHEEL_PID" 2>/dev/null || true
  if [ -z "${KEEP:-}" ]; then
    (cd "$WORK/src" 2>/dev/null && LMFORGE_MODEL=$CHECKPOINT docker-compose -p lmforge-offline \
      -f deploy/docker-compose.yml -f "$HERE/compose.offline.yml" down -v >/dev/null 2>&1) || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

if ! docker info >/dev/null 2>&1; then
  step "starting dockerd (no iptables: containers use the host's network for builds, the bridge for compose)"
  dockerd --iptables=false --ip-masq=false >/tmp/lmforge-dockerd.log 2>&1 &
  for _ in $(seq 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi

if ! docker image inspect local/debian:bookworm >/dev/null 2>&1; then
  step "Debian 12 base image from debootstrap"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$WORK/rootfs" -c . | docker import - local/debian:bookworm >/dev/null
  rm -rf "$WORK/rootfs"
fi

step "stand-in images: local/python:3.11-slim, local/prometheus:debian"
mkdir -p "$WORK/base"
cp "$CA" "$WORK/base/ca.crt"
docker build -q --network host -f "$HERE/base.Dockerfile" -t local/python:3.11-slim "$WORK/base" >/dev/null
docker build -q --network host -f "$HERE/prometheus.Dockerfile" -t local/prometheus:debian "$WORK/base" >/dev/null

step "lmforge image from deploy/Dockerfile (sources of $(git -C "$ROOT" rev-parse --short HEAD) + uncommitted changes)"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar -c) | tar -x -C "$WORK/src"
FIND_LINKS=""
if [ -n "${WHEELS:-}" ]; then
  python3 -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$WHEELS" >/dev/null 2>&1 &
  WHEEL_PID=$!
  FIND_LINKS=http://127.0.0.1:$WHEEL_PORT/
  sleep 1
fi
docker build -q --network host -f "$WORK/src/deploy/Dockerfile" --build-arg BASE_IMAGE=local/python:3.11-slim \
  --build-arg PIP_FIND_LINKS="$FIND_LINKS" -t lmforge:latest "$WORK/src" >/dev/null
docker run --rm --entrypoint python lmforge:latest -c \
  "import torch, lifecycle; print('image: torch', torch.__version__, '| lmforge', lifecycle.__version__)"

step "docker-compose up server prometheus (checkpoint $CHECKPOINT)"
cd "$WORK/src"
export LMFORGE_MODEL=$CHECKPOINT
docker-compose -p lmforge-offline -f deploy/docker-compose.yml -f "$HERE/compose.offline.yml" \
  up -d --no-build server prometheus
for i in $(seq 120); do
  status=$(docker inspect -f '{{.State.Health.Status}}' lmforge-offline_server_1 2>/dev/null || echo none)
  [ "$status" = healthy ] && break
  [ "$i" = 120 ] && { docker logs lmforge-offline_server_1 | tail -20; echo "FAIL: server not healthy"; exit 1; }
  sleep 2
done
echo "PASS: server container healthy (its HEALTHCHECK: GET /health)"

N=3; MAX=20
for _ in $(seq $N); do
  curl -sf -m 120 http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
    -d "{\"model\": \"current\", \"prompt\": \"Hello\", \"max_tokens\": $MAX, \"temperature\": 0, \"ignore_eos\": true}" \
    >/dev/null
done
echo "PASS: $N completions through the published OpenAI port 8000"
docker run --rm --network host --entrypoint python lmforge:latest -c "
from serve.client import Client
c = Client('127.0.0.1:50051')
assert c.health() == 'SERVING'
print('PASS: gRPC on the published port 50051: health SERVING, model', c.model_info().name or '(unnamed)',
      '| tokenize(Hello) =', c.tokenize('Hello'))"

expected=$((N * MAX))
for i in $(seq 30); do
  got=$(curl -s http://127.0.0.1:9090/api/v1/query --data-urlencode 'query=sum(lmforge:generation_tokens_total)' |
        python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(int(float(r[0]["value"][1])) if r else -1)')
  [ "$got" = "$expected" ] && break
  [ "$i" = 30 ] && { echo "FAIL: Prometheus reads $got generated tokens, expected $expected"; exit 1; }
  sleep 2
done
echo "PASS: Prometheus scraped server:9400 over the compose network: $got generated tokens = $N x $MAX"
rules=$(curl -s http://127.0.0.1:9090/api/v1/rules |
        python3 -c 'import json, sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')
[ "$rules" -gt 0 ] || { echo "FAIL: no alert rules loaded"; exit 1; }
echo "PASS: Prometheus loaded $rules alert rules from deploy/prometheus/alerts.yml"
echo "not run: Grafana (grafana/grafana comes only from an image registry)"
