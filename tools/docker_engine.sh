#!/usr/bin/env bash
# A private Docker engine and the local base images the kit's Dockerfiles need, for machines that
# reach no registry (this project's CI and dev machines). On a machine with a normal Docker and
# registry, none of this is needed: `python -m deploy image build` uses the official base images.
#
#   eval "$(bash tools/docker_engine.sh)"   # start (idempotent); prints export lines
#   bash tools/docker_engine.sh stop        # stop the daemon this script started (by its pid)
#
# It installs Debian's docker.io and debootstrap when missing, starts dockerd with its own socket,
# data root and pid file under $XLAB_DOCKER_DIR (default /tmp/xlab-docker), then makes:
#   local/bookworm:base     debootstrap'd Debian bookworm that trusts this host's CAs
#   local/python:3.11       the stand-in for python:3.11-slim-bookworm (docker/standins/)
#   local/nginx:stand-in    Debian's nginx, the compose file's proxy for the CPU image
# stdout carries only export lines (DOCKER_HOST, XLAB_DEPLOY_BASE_IMAGE, XLAB_DEPLOY_PROXY_IMAGE);
# progress goes to stderr.
set -euo pipefail

D=${XLAB_DOCKER_DIR:-/tmp/xlab-docker}
SOCK=$D/docker.sock
PIDFILE=$D/docker.pid
TARBALL=$D/bookworm-base.tar
BASE=local/bookworm:base
PYTHON_IMAGE=local/python:3.11
NGINX_IMAGE=local/nginx:stand-in
HERE=$(cd "$(dirname "$0")/.." && pwd)
export DOCKER_HOST=unix://$SOCK
log() { echo "[docker-engine] $*" >&2; }
mkdir -p "$D"

if [ "${1:-}" = stop ]; then
  if [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    pid=$(cat "$PIDFILE")
    docker ps -aq --filter label=xlab-deploy.recipe | xargs -r docker rm -f >/dev/null 2>&1 || true
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "dockerd $pid did not exit"; exit 1; }
    log "stopped dockerd $pid"
  else
    log "no dockerd running from $PIDFILE"
  fi
  exit 0
fi

# ---- 1. packages: the engine, compose, debootstrap for the base image -------------------------
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
[ -f "$TARBALL" ] || command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# ---- 2. the daemon ------------------------------------------------------------------------------
engine_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
try_start() {  # $@: extra dockerd flags; 0 once the API answers
  log "starting dockerd $*"
  setsid -f dockerd --host "unix://$SOCK" --data-root "$D/data" --exec-root "$D/exec" \
    --pidfile "$PIDFILE" "$@" >>"$D/dockerd.log" 2>&1 </dev/null
  for _ in $(seq 60); do
    engine_up && return 0
    sleep 0.5
    if [ -s "$PIDFILE" ] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then return 1; fi
  done
  [ -s "$PIDFILE" ] && kill -TERM "$(cat "$PIDFILE")" 2>/dev/null || true
  sleep 2; return 1
}
if ! engine_up && [ -s "$PIDFILE" ] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  rm -f "$PIDFILE"  # stale
fi
if engine_up; then
  log "engine already running"
else
  try_start --storage-driver=overlay2 || try_start --storage-driver=vfs ||
    { log "dockerd failed to start, see $D/dockerd.log"; tail -20 "$D/dockerd.log" >&2; exit 1; }
fi

# ---- 3. base images -------------------------------------------------------------------------------
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if [ ! -f "$TARBALL" ]; then
    MIRROR=$(grep -hoE '^URIs:[[:space:]]*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null |
             awk '{print $2}' | grep -v security | head -1 || true)
    [ -n "$MIRROR" ] || MIRROR=$(grep -hoE '^deb\s+\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    R=$D/rootfs.build; rm -rf "$R"
    log "debootstrap --variant=minbase bookworm from $MIRROR"
    debootstrap --variant=minbase bookworm "$R" "$MIRROR" >"$D/debootstrap.log" 2>&1 ||
      { log "debootstrap failed, see $D/debootstrap.log"; exit 1; }
    rm -rf "$R"/var/cache/apt/*.bin "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*
    mkdir -p "$R"/var/lib/apt/lists/partial "$R"/usr/local/share/ca-certificates "$R"/etc/ssl/certs
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" >"$R"/etc/apt/sources.list
    # HTTPS from containers here goes through an intercepting proxy: trust the host's CAs.
    cp /usr/local/share/ca-certificates/*.crt "$R"/usr/local/share/ca-certificates/ 2>/dev/null || true
    cp /etc/ssl/certs/ca-certificates.crt "$R"/etc/ssl/certs/ca-certificates.crt
    tar -C "$R" --numeric-owner -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$R"
  fi
  log "importing $BASE"
  docker import --change 'CMD ["/bin/bash"]' \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8" \
    "$TARBALL" "$BASE" >/dev/null
fi
if ! docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
  log "building $PYTHON_IMAGE (Debian's Python 3.11)"
  docker build -q -t "$PYTHON_IMAGE" --build-arg BASE="$BASE" -f "$HERE/docker/standins/Dockerfile.python" \
    "$HERE/docker/standins" >&2
fi

if ! docker image inspect "$NGINX_IMAGE" >/dev/null 2>&1; then
  log "building $NGINX_IMAGE (Debian's nginx)"
  docker build -q -t "$NGINX_IMAGE" --build-arg BASE="$BASE" -f "$HERE/docker/standins/Dockerfile.nginx" \
    "$HERE/docker/standins" >&2
fi

echo "export DOCKER_HOST=$DOCKER_HOST"
echo "export XLAB_DEPLOY_BASE_IMAGE=$PYTHON_IMAGE"
echo "export XLAB_DEPLOY_PROXY_IMAGE=$NGINX_IMAGE"
