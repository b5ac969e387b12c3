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
  AUTH: KVNamespace
  RESPONSE_CACHE: KVNamespace
  FILES: R2Bucket
  REDIS_GATEWAY: DurableObjectNamespace<RedisGateway>
}
