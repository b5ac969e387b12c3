import type { RedisGateway } from './redis-gateway.ts'

/** Bindings declared in wrangler.toml. */
export interface Env {
  ENVIRONMENT: string
  REDIS_URL: string
  MAX_BODY_BYTES: string
  /** Secret: bearer token of the admin API (unset = admin API disabled). */
  ADMIN_TOKEN?: string
  /** BullMQ prefix override, for test isolation only; the GPU workers use QUEUE_PREFIX. */
  QUEUE_PREFIX?: string
  /** Seconds a live (synchronous) request may wait for its answer. */
  LIVE_TIMEOUT_SECONDS?: string
  /** Batch input files: most lines and bytes per file (defaults 50000 and 20 MiB). */
  FILES_MAX_LINES?: string
  FILES_MAX_BYTES?: string
  /** Dev/test only ("1", ignored when ENVIRONMENT is production): webhooks may use http://127.0.0.1. */
  WEBHOOK_ALLOW_LOOPBACK?: string
  /** DNS-over-HTTPS resolver (JSON API) used to check webhook hosts at registration. */
  WEBHOOK_DOH_URL?: string
  AUTH: KVNamespace
  RESPONSE_CACHE: KVNamespace
  FILES: R2Bucket
  REDIS_GATEWAY: DurableObjectNamespace<RedisGateway>
}
