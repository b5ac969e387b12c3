import { existsSync, readFileSync } from 'node:fs'
import { isAbsolute, join, resolve } from 'node:path'
import {
  clusterPrefixProblem,
  type ExpertPool,
  PoolsFile,
  parseClusterNodes,
  QUEUE_PREFIX,
  QUEUE_PREFIX_PATTERN,
} from '@moe/shared'
import { z } from 'zod'

export const REPO_ROOT = resolve(import.meta.dirname, '..', '..', '..')

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max)
const flag = (byDefault: '0' | '1') =>
  z
    .enum(['0', '1'], { error: 'must be 0 or 1' })
    .default(byDefault)
    .transform((v) => v === '1')

const issuesText = (error: z.ZodError, sep: string) =>
  error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join(sep)

/** Every `MOE_*` setting of a worker process (and REDIS_URL), as the environment spells them. */
export const WorkerVariables = z.object({
  REDIS_URL: z
    .string()
    .regex(/^rediss?:\/\//, 'must be a redis:// or rediss:// URL')
    .default('redis://127.0.0.1:6379'),
  /** `host:port,...`: seed nodes of a Redis Cluster (REDIS_URL then gives only auth and TLS). */
  REDIS_CLUSTER_NODES: z.string().optional(),
  MOE_POOLS_FILE: z.string().default(join(REPO_ROOT, 'infra/config/pools.json')),
  /** Comma-separated pool names to serve (default: every pool in the file). */
  MOE_POOLS: z.string().optional(),
  /** Serve every pool from this model directory instead of the one pools.json names. */
  MOE_MODEL_DIR: z.string().min(1).optional(),
  MOE_EP: z.enum(['cpu', 'cuda', 'auto']).default('auto'),
  /** Where exported ONNX graphs are cached (default: beside the model, else the temp dir). */
  MOE_EXPORT_CACHE: z.string().min(1).optional(),
  MOE_MAX_BATCH: int(1, 1024).default(32),
  MOE_MAX_CONTEXT: int(16, 1 << 20).default(2048),
  MOE_MAX_PREFILL_TOKENS: int(1, 1 << 20).default(4096),
  /** While sequences decode, a longer prompt is prefilled in chunks of this many tokens between their steps. */
  MOE_PREFILL_CHUNK_TOKENS: int(16, 1 << 20).default(32),
  /** Prompt positions whose KV is kept for prompts that share a prefix (0 turns the cache off). */
  MOE_PREFIX_CACHE_TOKENS: z.coerce
    .number()
    .int()
    .min(0)
    .max(1 << 24)
    .refine((n) => n === 0 || n >= 16, 'must be 0 (off) or at least 16 (one block)')
    .default(8192),
  MOE_THREADS: int(1, 1024).optional(),
  // Off by default: the worker shares its cores with Redis and the edge, and spinning threads starve them.
  MOE_ORT_SPIN: flag('0'),
  MOE_ENGINE_THREAD: flag('1'),
  MOE_METRICS_HOST: z.string().default('127.0.0.1'),
  MOE_METRICS_PORT: int(0, 65535).default(9464),
  MOE_QUEUE_PREFIX: z
    .string()
    .regex(QUEUE_PREFIX_PATTERN, 'may hold letters, digits, _, . and - only, and one {hash tag}')
    .min(1)
    .default(QUEUE_PREFIX),
  MOE_LOCK_MS: int(1000, 600_000).default(30_000),
  MOE_STALLED_INTERVAL_MS: int(500, 600_000).default(15_000),
  /** Times a job may lose its worker (lock expired) and go back to the queue before it fails. */
  MOE_MAX_STALLED_COUNT: int(0, 100).default(2),
  MOE_DRAIN_TIMEOUT_MS: int(0, 3_600_000).default(30_000),
  MOE_CANCEL_POLL_MS: int(10, 600_000).default(1000),
  /** How often a worker publishes its dashboard counts and heartbeat to Redis (0 = never). */
  MOE_TELEMETRY_INTERVAL_MS: int(0, 600_000).default(1000),
  MOE_LOG_LEVEL: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']).default('info'),
  /** The batch coordinator and webhook delivery run beside the pool consumers unless 0. */
  MOE_BATCH_SERVICES: flag('1'),
  MOE_WEBHOOK_ATTEMPTS: int(1, 50).default(10),
  /** First retry delay; doubles per attempt, with jitter (10 attempts at 30 s span about 2-4 hours). */
  MOE_WEBHOOK_BACKOFF_MS: int(1, 86_400_000).default(30_000),
  MOE_WEBHOOK_MAX_BACKOFF_MS: int(1, 7 * 86_400_000).default(3 * 3_600_000),
  MOE_WEBHOOK_TIMEOUT_MS: int(100, 600_000).default(10_000),
  /** Dev/test only: allow http and loopback receivers (127.0.0.1, ::1, localhost). */
  MOE_WEBHOOK_ALLOW_LOOPBACK: flag('0'),
})

/**
 * The worker's configuration from its environment, validated once at start: the pools file is
 * read and resolved here too, so a bad setting of any kind is one message naming the variable.
 */
export const WorkerEnv = WorkerVariables.transform((e, ctx) => {
  const pools = resolvePools(e.MOE_POOLS_FILE, e.MOE_POOLS, e.MOE_MODEL_DIR)
  if (typeof pools === 'string') {
    ctx.addIssue({ code: 'custom', message: pools, path: ['MOE_POOLS'] })
    return z.NEVER
  }
  let redisClusterNodes: ReturnType<typeof parseClusterNodes>
  try {
    redisClusterNodes = parseClusterNodes(e.REDIS_CLUSTER_NODES)
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: (err as Error).message, path: ['REDIS_CLUSTER_NODES'] })
    return z.NEVER
  }
  const prefixProblem = redisClusterNodes ? clusterPrefixProblem(e.MOE_QUEUE_PREFIX) : null
  if (prefixProblem) {
    ctx.addIssue({ code: 'custom', message: prefixProblem, path: ['MOE_QUEUE_PREFIX'] })
    return z.NEVER
  }
  return {
    redisUrl: e.REDIS_URL,
    redisClusterNodes,
    pools,
    ep: e.MOE_EP,
    exportCacheDir: e.MOE_EXPORT_CACHE,
    maxBatch: e.MOE_MAX_BATCH,
    maxContext: e.MOE_MAX_CONTEXT,
    maxPrefillTokens: e.MOE_MAX_PREFILL_TOKENS,
    prefillChunkTokens: e.MOE_PREFILL_CHUNK_TOKENS,
    prefixCacheTokens: e.MOE_PREFIX_CACHE_TOKENS,
    threads: e.MOE_THREADS,
    spin: e.MOE_ORT_SPIN,
    engineThread: e.MOE_ENGINE_THREAD,
    metricsHost: e.MOE_METRICS_HOST,
    metricsPort: e.MOE_METRICS_PORT,
    queuePrefix: e.MOE_QUEUE_PREFIX,
    lockMs: e.MOE_LOCK_MS,
    stalledIntervalMs: e.MOE_STALLED_INTERVAL_MS,
    maxStalledCount: e.MOE_MAX_STALLED_COUNT,
    drainTimeoutMs: e.MOE_DRAIN_TIMEOUT_MS,
    cancelPollMs: e.MOE_CANCEL_POLL_MS,
    logLevel: e.MOE_LOG_LEVEL,
    telemetryIntervalMs: e.MOE_TELEMETRY_INTERVAL_MS,
    batchServices: e.MOE_BATCH_SERVICES,
    webhooks: {
      attempts: e.MOE_WEBHOOK_ATTEMPTS,
      backoffMs: e.MOE_WEBHOOK_BACKOFF_MS,
      maxBackoffMs: e.MOE_WEBHOOK_MAX_BACKOFF_MS,
      timeoutMs: e.MOE_WEBHOOK_TIMEOUT_MS,
      allowLoopback: e.MOE_WEBHOOK_ALLOW_LOOPBACK,
    },
  }
})

export type WorkerConfig = z.output<typeof WorkerEnv>
export type WebhookConfig = WorkerConfig['webhooks']

export class ConfigError extends Error {
  override name = 'ConfigError'
}

/** The pools to serve, with model directories made absolute; or what is wrong, as a message. */
function resolvePools(file: string, wantedList?: string, modelDir?: string): ExpertPool[] | string {
  if (!existsSync(file)) return `MOE_POOLS_FILE: ${file} does not exist`
  let json: unknown
  try {
    json = JSON.parse(readFileSync(file, 'utf8'))
  } catch (err) {
    return `MOE_POOLS_FILE: ${file} is not valid JSON (${(err as Error).message})`
  }
  const parsed = PoolsFile.safeParse(json)
  if (!parsed.success) return `MOE_POOLS_FILE: ${file}: ${issuesText(parsed.error, '; ')}`
  const known = new Map(parsed.data.pools.map((p) => [p.name, p]))
  const wanted = wantedList
    ?.split(',')
    .map((s) => s.trim())
    .filter(Boolean)
  const unknown = wanted?.filter((n) => !known.has(n)) ?? []
  if (unknown.length > 0)
    return `unknown pool(s) ${unknown.join(', ')}; ${file} defines ${[...known.keys()].join(', ')}`
  return (wanted ?? [...known.keys()]).map((n) => {
    const p = known.get(n)!
    const dir = modelDir ?? p.modelDir
    return { ...p, modelDir: isAbsolute(dir) ? dir : resolve(modelDir ? process.cwd() : REPO_ROOT, dir) }
  })
}

/** Reads and validates the environment; `poolsFlag` (from --pools) wins over MOE_POOLS. */
export function loadWorkerConfig(env: NodeJS.ProcessEnv = process.env, poolsFlag?: string): WorkerConfig {
  const parsed = WorkerEnv.safeParse(poolsFlag === undefined ? env : { ...env, MOE_POOLS: poolsFlag })
  if (!parsed.success) throw new ConfigError(issuesText(parsed.error, '\n'))
  return parsed.data
}
