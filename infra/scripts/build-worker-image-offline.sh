#!/usr/bin/env bash
# Builds infra/docker/worker.Dockerfile with podman and runs the image's smoke test
# (smoke-worker-image.ts), on a machine that reaches the npm registry and Debian's mirrors but no
# container registry: the node:24 base image is stood in for by a Debian bookworm root made with
# debootstrap plus the Node 24 binary of the `node` devDependency. Everything after FROM is the
# real Dockerfile. Installs podman, runc and debootstrap from Debian when they are missing (root).
#
#   bash infra/scripts/build-worker-image-offline.sh      # needs Redis at REDIS_URL for the smoke test
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/node_modules/.bin:$PATH"

need=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "build-worker-image-offline: skipped, ${need[*]} missing and cannot be installed here (needs root and apt-get)"
    exit 0
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

node_version="$(node -p "require('./package.json').devDependencies.node")"
base="localhost/node-standin:${node_version}-bookworm-slim"
image="localhost/moe-worker:cpu-offline"
# Hosts without systemd or with hybrid cgroups: runc and cgroupfs work where crun does not.
podman_cmd=(podman --runtime runc --cgroup-manager cgroupfs)

if ! "${podman_cmd[@]}" image exists "$base"; then
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  cp node_modules/node/bin/node "$rootfs/usr/local/bin/node"
  mkdir -p "$rootfs/usr/local/lib/node_modules"
  cp -a "$(dirname "$(dirname "$(readlink -f "$(command -v npm)")")")" "$rootfs/usr/local/lib/node_modules/npm"
  ln -sf ../lib/node_modules/npm/bin/npm-cli.js "$rootfs/usr/local/bin/npm"
  ln -sf ../lib/node_modules/npm/bin/npx-cli.js "$rootfs/usr/local/bin/npx"
  changes=(--change 'CMD ["node"]')
  # A TLS-inspecting proxy's CA, where the host trusts one, so npm inside the build trusts it too.
  if [ -n "${NODE_EXTRA_CA_CERTS:-}" ] && [ -f "$NODE_EXTRA_CA_CERTS" ]; then
    mkdir -p "$rootfs/etc/ssl/certs"
    cp "$NODE_EXTRA_CA_CERTS" "$rootfs/etc/ssl/certs/host-extra-ca.crt"
    changes+=(--change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/host-extra-ca.crt'
      --change 'ENV npm_config_cafile=/etc/ssl/certs/host-extra-ca.crt')
  fi
  tar -C "$rootfs" -c . | "${podman_cmd[@]}" import "${changes[@]}" - "$base" >/dev/null
fi

# --format docker keeps HEALTHCHECK (the OCI format has no such field); chroot isolation needs no cgroups.
"${podman_cmd[@]}" build --format docker --isolation chroot --build-arg "NODE_IMAGE=$base" \
  -f infra/docker/worker.Dockerfile -t "$image" .
echo "build-worker-image-offline: built $image ($("${podman_cmd[@]}" image inspect "$image" --format '{{.Size}}') bytes)"

status=0
CONTAINER=podman CONTAINER_GLOBAL_ARGS="--runtime runc --cgroup-manager cgroupfs" \
  CONTAINER_RUN_ARGS="--ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --read-only --tmpfs /tmp \
    -v moe-offline-export-cache:/var/cache/moe -v $PWD/gpu-worker/models/tiny-mixtral:/models/tiny:ro \
    -e MOE_MODEL_DIR=/models/tiny" \
  node infra/scripts/smoke-worker-image.ts "$image" || status=$?
"${podman_cmd[@]}" volume rm -f moe-offline-export-cache >/dev/null 2>&1 || true
exit $status
