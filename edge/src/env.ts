/** Bindings declared in wrangler.toml. */
export interface Env {
  ENVIRONMENT: string
  REDIS_URL: string
  MAX_BODY_BYTES: string
  ADMIN_TOKEN?: string
  AUTH: KVNamespace
  RESPONSE_CACHE: KVNamespace
  FILES: R2Bucket
}
