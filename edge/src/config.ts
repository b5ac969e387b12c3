import { clusterPrefixProblem, parseClusterNodes, QUEUE_PREFIX, QUEUE_PREFIX_PATTERN } from '@moe/shared'
import type { MiddlewareHandler } from 'hono'
import { z } from 'zod'

// Every var and secret the edge reads, parsed once per isolate from the Worker's env (wrangler
// passes them as strings). Unset or empty means the default; anything else must be valid, so a
// typo fails loudly rather than silently running on the default.

const DEFAULT_DOH_URL = 'https://cloudflare-dns.com/dns-query'

const unsetOr = <T extends z.ZodType>(schema: T) =>
  z.preprocess((v) => (v === '' || v === null ? undefined : v), schema)

const positiveInt = (fallback: number) =>
  unsetOr(
    z
      .string()
      .regex(/^\s*\d+\s*$/, { error: (i) => `must be a positive whole number (got '${String(i.input)}')` })
      .transform(Number)
      .refine((n) => Number.isSafeInteger(n) && n > 0, {
        error: (i) => `must be a positive whole number (got ${String(i.input)})`,
      })
      .optional()
      .transform((n) => n ?? fallback),
  )

const Vars = z.object({
  ENVIRONMENT: z.string().min(1, { error: 'must be set (development, test, production, ...)' }),
  REDIS_URL: z.string().regex(/^rediss?:\/\/\S+$/, { error: 'must be a redis:// or rediss:// URL' }),
  /** `host:port,...`: seed nodes of a Redis Cluster (REDIS_URL then gives only auth and TLS). */
  REDIS_CLUSTER_NODES: unsetOr(z.string().optional()),
  /** Largest request body the API accepts. */
  MAX_BODY_BYTES: positiveInt(1_048_576),
  /** Seconds a live (synchronous) request may wait for its answer. */
  LIVE_TIMEOUT_SECONDS: positiveInt(300),
  /** Batch input files: most requests and bytes per file. */
  FILES_MAX_LINES: positiveInt(50_000),
  FILES_MAX_BYTES: positiveInt(20 * 1024 * 1024),
  /** Dev/test only: webhooks may use http://127.0.0.1 (ignored when ENVIRONMENT is production). */
  WEBHOOK_ALLOW_LOOPBACK: unsetOr(z.enum(['0', '1'], { error: "must be '0' or '1'" }).optional()),
  /** DNS-over-HTTPS resolver (JSON API) used to check webhook hosts at registration. */
  WEBHOOK_DOH_URL: unsetOr(z.url({ protocol: /^https?$/, error: 'must be an http(s) URL' }).optional()),
  /** BullMQ prefix override, for test isolation only; the GPU workers use MOE_QUEUE_PREFIX. */
  QUEUE_PREFIX: unsetOr(
    z
      .string()
      .regex(QUEUE_PREFIX_PATTERN, { error: 'may hold letters, digits, _, . and - only, and one {hash tag}' })
      .optional(),
  ),
  /** Secret: bearer token of the admin API (unset = admin API disabled). */
  ADMIN_TOKEN: unsetOr(z.string().optional()),
})

export const EdgeConfig = Vars.transform((v, ctx) => {
  let redisClusterNodes: ReturnType<typeof parseClusterNodes>
  try {
    redisClusterNodes = parseClusterNodes(v.REDIS_CLUSTER_NODES)
  } catch (e) {
    ctx.addIssue({ code: 'custom', message: (e as Error).message, path: ['REDIS_CLUSTER_NODES'] })
    return z.NEVER
  }
  const queuePrefix = v.QUEUE_PREFIX ?? QUEUE_PREFIX
  const prefixProblem = redisClusterNodes ? clusterPrefixProblem(queuePrefix) : null
  if (prefixProblem) {
    ctx.addIssue({ code: 'custom', message: prefixProblem, path: ['QUEUE_PREFIX'] })
    return z.NEVER
  }
  return {
    environment: v.ENVIRONMENT,
    redisUrl: v.REDIS_URL,
    redisClusterNodes,
    maxBodyBytes: v.MAX_BODY_BYTES,
    liveTimeoutMs: v.LIVE_TIMEOUT_SECONDS * 1000,
    filesMaxLines: v.FILES_MAX_LINES,
    filesMaxBytes: v.FILES_MAX_BYTES,
    webhookAllowLoopback: v.WEBHOOK_ALLOW_LOOPBACK === '1' && v.ENVIRONMENT !== 'production',
    webhookDohUrl: v.WEBHOOK_DOH_URL ?? DEFAULT_DOH_URL,
    queuePrefix,
    adminToken: v.ADMIN_TOKEN ?? null,
  }
})
export type EdgeConfig = z.output<typeof EdgeConfig>

// The env object of an isolate does not change, so it is parsed once, not per request.
const parsed = new WeakMap<object, EdgeConfig>()

/** The edge's configuration from a Worker env; throws naming every invalid var. */
export function edgeConfigOf(env: object): EdgeConfig {
  let config = parsed.get(env)
  if (config) return config
  const result = EdgeConfig.safeParse(env)
  if (!result.success) {
    const problems = result.error.issues.map((i) => `${i.path.join('.')} ${i.message}`)
    throw new Error(`Invalid edge configuration: ${problems.join('; ')}`)
  }
  config = result.data
  parsed.set(env, config)
  return config
}

/** Puts the parsed configuration on the context as `config`. */
export const withConfig: MiddlewareHandler<{ Variables: { config: EdgeConfig } }> = async (c, next) => {
  c.set('config', edgeConfigOf(c.env as object))
  await next()
}
