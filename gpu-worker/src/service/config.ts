import { existsSync, readFileSync } from 'node:fs'
import { isAbsolute, join, resolve } from 'node:path'
import { type ExpertPool, PoolsFile, QUEUE_PREFIX } from '@moe/shared'
import { z } from 'zod'

export const REPO_ROOT = resolve(import.meta.dirname, '..', '..', '..')

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max)

/** The worker's settings, from the environment, validated once at start. */
const WorkerEnv = z.object({
  REDIS_URL: z
    .string()
    .regex(/^rediss?:\/\//, 'must be a redis:// or rediss:// URL')
    .default('redis://127.0.0.1:6379'),
  MOE_POOLS_FILE: z.string().default(join(REPO_ROOT, 'infra/config/pools.json')),
  MOE_POOLS: z.string().optional(),
  /** Serve every pool from this model directory instead of the one pools.json names. */
  MOE_MODEL_DIR: z.string().min(1).optional(),
  MOE_EP: z.enum(['cpu', 'cuda', 'auto']).default('auto'),
  MOE_MAX_BATCH: int(1, 1024).default(32),
  MOE_MAX_CONTEXT: int(16, 1 << 20).default(2048),
  MOE_MAX_PREFILL_TOKENS: int(1, 1 << 20).default(4096),
  MOE_THREADS: int(1, 1024).optional(),
  // Off by default: the worker shares its cores with Redis and the edge, and spinning threads starve them.
  MOE_ORT_SPIN: z.enum(['0', '1']).default('0'),
  MOE_ENGINE_THREAD: z.enum(['0', '1']).default('1'),
  MOE_METRICS_HOST: z.string().default('127.0.0.1'),
  MOE_METRICS_PORT: int(0, 65535).default(9464),
  MOE_QUEUE_PREFIX: z
    .string()
    .regex(/^[\w.-]+$/)
    .default(QUEUE_PREFIX),
  MOE_LOCK_MS: int(1000, 600_000).default(30_000),
  MOE_STALLED_INTERVAL_MS: int(500, 600_000).default(15_000),
  MOE_DRAIN_TIMEOUT_MS: int(0, 3_600_000).default(30_000),
  MOE_CANCEL_POLL_MS: int(10, 600_000).default(1000),
  MOE_LOG_LEVEL: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']).default('info'),
})

export interface WorkerConfig {
  redisUrl: string
  pools: ExpertPool[]
  ep: 'cpu' | 'cuda' | 'auto'
  maxBatch: number
  maxContext: number
  maxPrefillTokens: number
  threads: number | undefined
  spin: boolean
  engineThread: boolean
  metricsHost: string
  metricsPort: number
  queuePrefix: string
  lockMs: number
  stalledIntervalMs: number
  drainTimeoutMs: number
  cancelPollMs: number
  logLevel: string
}

export class ConfigError extends Error {
  override name = 'ConfigError'
}

/** Reads and validates the environment and the pools file; `poolsFlag` (from --pools) wins over MOE_POOLS. */
export function loadWorkerConfig(env: NodeJS.ProcessEnv = process.env, poolsFlag?: string): WorkerConfig {
  const parsed = WorkerEnv.safeParse(env)
  if (!parsed.success)
    throw new ConfigError(parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('\n'))
  const e = parsed.data
  if (!existsSync(e.MOE_POOLS_FILE))
    throw new ConfigError(`MOE_POOLS_FILE: ${e.MOE_POOLS_FILE} does not exist`)
  let file: PoolsFile
  try {
    const result = PoolsFile.safeParse(JSON.parse(readFileSync(e.MOE_POOLS_FILE, 'utf8')))
    if (!result.success)
      throw new ConfigError(
        `${e.MOE_POOLS_FILE}: ${result.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`,
      )
    file = result.data
  } catch (err) {
    if (err instanceof ConfigError) throw err
    throw new ConfigError(`${e.MOE_POOLS_FILE}: not valid JSON (${(err as Error).message})`)
  }
  const wanted = (poolsFlag ?? e.MOE_POOLS)
    ?.split(',')
    .map((s) => s.trim())
    .filter(Boolean)
  const known = new Map(file.pools.map((p) => [p.name, p]))
  const unknown = wanted?.filter((n) => !known.has(n)) ?? []
  if (unknown.length)
    throw new ConfigError(
      `unknown pool(s) ${unknown.join(', ')}; ${e.MOE_POOLS_FILE} defines ${[...known.keys()].join(', ')}`,
    )
  const pools = (wanted ?? [...known.keys()]).map((n) => {
    const p = known.get(n)!
    const dir = e.MOE_MODEL_DIR ?? p.modelDir
    return {
      ...p,
      modelDir: isAbsolute(dir) ? dir : resolve(e.MOE_MODEL_DIR ? process.cwd() : REPO_ROOT, dir),
    }
  })
  return {
    redisUrl: e.REDIS_URL,
    pools,
    ep: e.MOE_EP,
    maxBatch: e.MOE_MAX_BATCH,
    maxContext: e.MOE_MAX_CONTEXT,
    maxPrefillTokens: e.MOE_MAX_PREFILL_TOKENS,
    threads: e.MOE_THREADS,
    spin: e.MOE_ORT_SPIN === '1',
    engineThread: e.MOE_ENGINE_THREAD === '1',
    metricsHost: e.MOE_METRICS_HOST,
    metricsPort: e.MOE_METRICS_PORT,
    queuePrefix: e.MOE_QUEUE_PREFIX,
    lockMs: e.MOE_LOCK_MS,
    stalledIntervalMs: e.MOE_STALLED_INTERVAL_MS,
    drainTimeoutMs: e.MOE_DRAIN_TIMEOUT_MS,
    cancelPollMs: e.MOE_CANCEL_POLL_MS,
    logLevel: e.MOE_LOG_LEVEL,
  }
}
