# syntax=docker/dockerfile:1.7
# GPU worker (`moe serve`) on ONNX Runtime's CPU execution provider.
#
#   docker build -f infra/docker/worker.Dockerfile -t moe-worker:cpu .      # from the repository root
#   docker run --rm -e REDIS_URL=redis://redis:6379 moe-worker:cpu serve --pools general
#
# The image holds only the shared and gpu-worker workspaces and their production dependencies.
# Pin NODE_IMAGE by digest in your registry mirror; the tag follows the `node` devDependency.
ARG NODE_IMAGE=node:24.21.0-bookworm-slim

FROM ${NODE_IMAGE} AS deps
WORKDIR /app
# onnxruntime-node's install script would fetch the CUDA libraries; the CPU binaries ship in the package.
ENV ONNXRUNTIME_NODE_INSTALL=skip \
    npm_config_update_notifier=false \
    npm_config_fund=false \
    npm_config_audit=false
# The npm the lock file was written with (packageManager in package.json), so `allowScripts` holds.
RUN npm install -g npm@11.19.1
# Every workspace manifest, so `npm ci` can check the lock file; only two workspaces get installed.
COPY package.json package-lock.json ./
COPY shared/package.json shared/
COPY gpu-worker/package.json gpu-worker/
COPY edge/package.json edge/
COPY tests/package.json tests/
RUN --mount=type=cache,target=/root/.npm \
    npm ci --omit=dev --workspace=@moe/shared --workspace=@moe/gpu-worker
# onnxruntime-node ships binaries for every OS and CPU (about 290 MB); keep this platform's only.
RUN cd node_modules/onnxruntime-node/bin/napi-v6 \
 && find . -mindepth 2 -maxdepth 2 -type d ! -path "./linux/$(node -p process.arch)" -exec rm -rf {} +

FROM ${NODE_IMAGE} AS runtime
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --gid 10001 moe \
 && useradd --uid 10001 --gid moe --home-dir /app --no-create-home --shell /usr/sbin/nologin moe \
 && mkdir -p /models /var/cache/moe \
 && chown moe:moe /models /var/cache/moe
WORKDIR /app
# Dependencies and sources stay root-owned: the worker cannot rewrite its own code.
COPY --from=deps /app ./
COPY shared/ shared/
COPY gpu-worker/bin/ gpu-worker/bin/
COPY gpu-worker/src/ gpu-worker/src/
# The tiny model, so the image serves the default pools.json without any volume (smoke tests, compose).
COPY gpu-worker/models/ gpu-worker/models/
# The same pools.json the edge bundles; MOE_POOLS_FILE points elsewhere to override it.
COPY infra/config/ infra/config/

ENV NODE_ENV=production \
    MOE_EP=cpu \
    MOE_METRICS_HOST=0.0.0.0 \
    MOE_METRICS_PORT=9464 \
    MOE_EXPORT_CACHE=/var/cache/moe/onnx
# MOE_MODEL_DIR: mount a checkpoint under /models and set MOE_MODEL_DIR=/models/<name> (read-only is fine:
# the ONNX export then goes to MOE_EXPORT_CACHE, which should be its own volume).
VOLUME ["/models", "/var/cache/moe"]
EXPOSE 9464
USER 10001:10001

# /healthz is 503 while starting, draining, or after the engine died.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.MOE_METRICS_PORT || 9464) + '/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]

# SIGTERM drains (in-flight jobs finish for up to MOE_DRAIN_TIMEOUT_MS, the rest go back to the queue).
STOPSIGNAL SIGTERM
# Exec form with node as PID 1, not npx: npm would stand between the signal and the worker.
ENTRYPOINT ["node", "gpu-worker/bin/moe.js"]
CMD ["serve"]
