# syntax=docker/dockerfile:1.7
# GPU worker (`moe serve`) on ONNX Runtime's CUDA execution provider (CUDA 12, cuDNN 9).
#
#   docker build -f infra/docker/worker-cuda.Dockerfile -t moe-worker:cuda .   # from the repository root
#   docker run --rm --gpus all -e REDIS_URL=redis://redis:6379 moe-worker:cuda serve --pools general
#
# UNTESTED ON A GPU: the CUDA path of the worker (fp16 export, CUDA execution provider) has never run
# on a GPU in this project, and this image has not been built here (no registry access). Treat the
# first deployment as a trial: check the log line that names the execution provider, and /healthz.
#
# The build fetches ONNX Runtime's CUDA provider libraries (the install step the README describes),
# so the build host needs network access to ONNX Runtime's package feed.
ARG NODE_IMAGE=node:24.21.0-bookworm-slim
# onnxruntime-node 1.30's CUDA 12 build needs the CUDA 12 runtime, cuBLAS and cuDNN 9.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${NODE_IMAGE} AS node

FROM ${NODE_IMAGE} AS deps
WORKDIR /app
ENV ONNXRUNTIME_NODE_INSTALL=skip \
    npm_config_update_notifier=false \
    npm_config_fund=false \
    npm_config_audit=false
RUN npm install -g npm@11.19.1
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
# The CUDA build of onnxruntime-node, as the README installs it; fail the build if it did not land.
RUN ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules/onnxruntime-node/script/install.js \
 && test -f node_modules/onnxruntime-node/bin/napi-v6/linux/x64/libonnxruntime_providers_cuda.so

FROM ${CUDA_IMAGE} AS runtime
# Node from the official image: the binary needs glibc >= 2.28 and libstdc++, both in the Ubuntu base.
COPY --from=node /usr/local/bin/node /usr/local/bin/node
RUN groupadd --gid 10001 moe \
 && useradd --uid 10001 --gid moe --home-dir /app --no-create-home --shell /usr/sbin/nologin moe \
 && mkdir -p /models /var/cache/moe \
 && chown moe:moe /models /var/cache/moe
WORKDIR /app
COPY --from=deps /app ./
COPY shared/ shared/
COPY gpu-worker/bin/ gpu-worker/bin/
COPY gpu-worker/src/ gpu-worker/src/
COPY gpu-worker/models/ gpu-worker/models/
COPY infra/config/ infra/config/

# MOE_EP=cuda fails loudly when the GPU or libraries are missing; `auto` would fall back to the CPU.
ENV NODE_ENV=production \
    MOE_EP=cuda \
    MOE_METRICS_HOST=0.0.0.0 \
    MOE_METRICS_PORT=9464 \
    MOE_EXPORT_CACHE=/var/cache/moe/onnx \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/models", "/var/cache/moe"]
EXPOSE 9464
USER 10001:10001

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.MOE_METRICS_PORT || 9464) + '/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["node", "gpu-worker/bin/moe.js"]
CMD ["serve"]
