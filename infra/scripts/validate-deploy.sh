#!/usr/bin/env bash
# Offline checks of the deployment files (Dockerfiles, compose.yaml, Kubernetes manifests, Grafana
# dashboard, Prometheus config); exits non-zero if any fails. Needs `npm ci` first.
#
#   bash infra/scripts/validate-deploy.sh               # the checks (a few seconds)
#   bash infra/scripts/validate-deploy.sh --self-test   # also prove each check catches a broken file (~1 min)
#   bash infra/scripts/validate-deploy.sh --image       # also build the CPU image and run it (podman; minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/node_modules/.bin:$PATH"   # the pinned Node 24 first

for arg in "$@"; do
  case "$arg" in --self-test|--image) ;; *) echo "validate-deploy: unknown option $arg" >&2; exit 2 ;; esac
done

if ! command -v kubectl >/dev/null 2>&1; then
  echo "note kubectl is not installed: overlays are rendered by the script's own kustomize subset"
fi
node infra/scripts/validate-deploy.ts
for arg in "$@"; do
  case "$arg" in
    --self-test) node infra/scripts/validate-deploy-selftest.ts ;;
    --image) bash infra/scripts/build-worker-image-offline.sh ;;
  esac
done
