import { z } from 'zod'

// What the dashboard reads, in Redis: per-minute counters written by the edge (requests) and the
// workers (tokens, expert load, latency histograms), and a heartbeat snapshot of each worker.
// Redis is the one store every edge location and every worker already shares, and it answers
// within a second; Prometheus and Workers Analytics Engine keep the long history.
//
//   <prefix>:tm:<minute>:<scope>   hash, field -> count   (scope: a tenant id, or '*' for all)
//   <prefix>:tm:workers            sorted set, worker id -> last heartbeat (epoch ms)
//   <prefix>:tm:worker-state       hash, worker id -> WorkerSnapshot JSON

/** The scope that sums every tenant (tenant ids never contain '*'). */
export const TELEMETRY_ALL = '*'

/** The longest window the dashboard shows, in minutes; counters live a little longer. */
export const TELEMETRY_MAX_WINDOW_MINUTES = 60
export const TELEMETRY_TTL_SECONDS = (TELEMETRY_MAX_WINDOW_MINUTES + 5) * 60

/** A worker whose heartbeat is older than this is no longer shown. */
export const WORKER_HEARTBEAT_STALE_MS = 15_000

export const telemetryMinute = (epochMs: number): number => Math.floor(epochMs / 60_000)

export const telemetryKey = (prefix: string, minute: number, scope: string): string =>
  `${prefix}:tm:${minute}:${scope}`

export const workerHeartbeatsKey = (prefix: string): string => `${prefix}:tm:workers`
export const workerStateKey = (prefix: string): string => `${prefix}:tm:worker-state`

/** Upper bounds (seconds) of the latency histograms' buckets; a last bucket takes the rest. */
export const LATENCY_BUCKETS_SECONDS = [
  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
] as const

/** The bucket an observation falls in (LATENCY_BUCKETS_SECONDS.length for the overflow bucket). */
export function latencyBucket(seconds: number): number {
  const i = LATENCY_BUCKETS_SECONDS.findIndex((le) => seconds <= le)
  return i === -1 ? LATENCY_BUCKETS_SECONDS.length : i
}

/**
 * The q-quantile of a bucketed histogram, interpolated linearly inside its bucket (Prometheus'
 * histogram_quantile); the overflow bucket answers its lower bound. Null when it is empty.
 */
export function bucketQuantile(counts: readonly number[], q: number): number | null {
  const total = counts.reduce((a, b) => a + b, 0)
  if (total === 0) return null
  const rank = q * total
  let seen = 0
  for (let i = 0; i < counts.length; i++) {
    const n = counts[i] ?? 0
    if (n > 0 && seen + n >= rank) {
      const lower = i === 0 ? 0 : LATENCY_BUCKETS_SECONDS[i - 1]!
      const upper = LATENCY_BUCKETS_SECONDS[i]
      if (upper === undefined) return lower
      return lower + (upper - lower) * ((rank - seen) / n)
    }
    seen += n
  }
  return LATENCY_BUCKETS_SECONDS.at(-1)!
}

/** Hash fields of the per-minute counters. Parts never contain '|' (pool and tenant names cannot). */
export const TelemetryField = {
  /** Tokens (prompt and generated) the router sent to one expert of one layer. */
  expertTokens: (pool: string, layer: number, expert: number) => `x|${pool}|${layer}|${expert}`,
  generatedTokens: (pool: string) => `gen|${pool}`,
  promptTokens: (pool: string) => `prompt|${pool}`,
  /** Jobs a worker finished, by outcome (stop, length, cancelled, or an error code). */
  finished: (pool: string, outcome: string) => `done|${pool}|${outcome}`,
  timeToFirstToken: (pool: string, bucket: number) => `ttft|${pool}|${bucket}`,
  interTokenLatency: (pool: string, bucket: number) => `itl|${pool}|${bucket}`,
  /** Edge: one request, by route pattern, status, pool ('-' if none) and cache result. */
  request: (route: string, status: number, pool: string, cache: string) =>
    `req|${route}|${status}|${pool}|${cache}`,
  /** Edge: the tenant's Durable Object admitting (rate limits, depth, enqueue) one request. */
  admission: (bucket: number) => `adm|${bucket}`,
  /** Edge: a routed request's task and modality. */
  task: (task: string, modality: string) => `task|${task}|${modality}`,
  /** Edge: the router's pool choice and how it was made (model, poolMap, default, modality). */
  decision: (pool: string, via: string) => `route|${pool}|${via}`,
  /** Worker: the increase of a `moe_prefix_cache_*` counter (summed over its labels). */
  prefixCache: (metric: string) => `pc|${metric}`,
} as const

/** What a worker says of itself at each heartbeat (its running batch, per model). */
export const WorkerSnapshot = z.object({
  id: z.string(),
  host: z.string(),
  pid: z.number().int(),
  startedAt: z.number(),
  at: z.number(),
  status: z.string(),
  pools: z.array(z.string()),
  models: z.array(
    z.object({
      model: z.string(),
      pools: z.array(z.string()),
      layers: z.number().int(),
      experts: z.number().int(),
      running: z.number().int(),
      waiting: z.number().int(),
      maxBatch: z.number().int(),
      /** running / maxBatch */
      occupancy: z.number(),
    }),
  ),
})
export type WorkerSnapshot = z.infer<typeof WorkerSnapshot>
