#!/usr/bin/env bash
# Build deploy/Dockerfile on a machine that cannot pull base images (opt-in; CI does not
# run it). The base is a Debian bookworm root file system made with debootstrap and
# imported into the local Docker daemon, standing in for python:3.11-slim-bookworm (same
# Debian, same Python 3.11). Needs root, debootstrap and a running dockerd.
#
#   deploy/build-local-image.sh [IMAGE_TAG]      # default voice-agent:local
#   docker run --rm --network host --stop-timeout 720 -e PORT=8000 voice-agent:local
#   deploy/smoke-image.sh                        # checks the image (README, Deploying)
#
# EXTRA_CA=/path/ca.pem adds a CA to the base (a TLS-inspecting proxy in front of PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-voice-agent:local}"
BASE="voice-agent-base:bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    ROOTFS="$(mktemp -d)"
    trap 'rm -rf "$ROOTFS"' EXIT
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
        bookworm "$ROOTFS" "$MIRROR"
    if [[ -n "${EXTRA_CA:-}" ]]; then
        cat "$EXTRA_CA" >> "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
    fi
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' \
        - "$BASE"
fi
DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build --network host \
    --build-arg PYTHON_IMAGE="$BASE" \
    -f deploy/Dockerfile -t "$TAG" .
echo "built $TAG"
