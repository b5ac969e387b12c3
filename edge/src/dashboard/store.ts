import {
  bucketQuantile,
  JOB_PRIORITY,
  LATENCY_BUCKETS_SECONDS,
  type RedisClient,
  TELEMETRY_ALL,
  TELEMETRY_TTL_SECONDS,
  telemetryKey,
  telemetryMinute,
  WORKER_HEARTBEAT_STALE_MS,
  WorkerSnapshot,
  workerHeartbeatsKey,
  workerStateKey,
} from '@moe/shared'
import type { Queue } from 'bullmq'

// The dashboard's Redis side: the edge's per-minute counters (written through a Durable
// Object's warm connection) and the read that turns counters, worker heartbeats and the pools'
// queues into what the page draws. Key layout: shared/src/telemetry.ts.

/** Adds one request's counter increments to its tenant's minute and to the all-tenant minute. */
export async function recordTelemetry(
  redis: RedisClient,
  prefix: string,
  tenantId: string | null,
  fields: Record<string, number>,
  now = Date.now(),
): Promise<void> {
  const minute = telemetryMinute(now)
  const p = redis.pipeline()
  for (const scope of tenantId ? [tenantId, TELEMETRY_ALL] : [TELEMETRY_ALL]) {
    const key = telemetryKey(prefix, minute, scope)
    for (const [field, n] of Object.entries(fields)) p.hincrby(key, field, n)
    p.expire(key, TELEMETRY_TTL_SECONDS)
  }
  await p.exec()
}

export interface DashboardQuery {
  /** A tenant id, or TELEMETRY_ALL for the admin's view of everything. */
  scope: string
  /** Pools this viewer may see. */
  pools: string[]
  /** The pool of the expert-load heatmap. */
  pool: string
  /** The experts that pool may use (null: all); a layer's balance is over these. */
  poolExperts: number[] | null
  windowMinutes: number
  now: number
}

export interface Quantiles {
  p50: number | null
  p99: number | null
  count: number
}

export interface LayerBalance {
  layer: number
  tokens: number
  /** Experts the figures are over: the pool's own (a restricted pool's others are always 0). */
  experts: number
  /** Standard deviation over mean of the experts' loads (0 = perfectly even). */
  cv: number | null
  /** The busiest expert's load over the mean (1 = even; E = one expert takes everything). */
  maxOverMean: number | null
}

export interface DashboardData {
  scope: 'admin' | 'tenant'
  tenantId: string | null
  now: number
  windowMinutes: number
  pools: string[]
  pool: string
  expertLoad: {
    layers: number
    experts: number
    /** Tokens routed, [layer][expert], in the window, for `pool`. */
    tokens: number[][]
    /** The experts the pool may use (null: all). */
    allowed: number[] | null
    balance: LayerBalance[]
  }
  routing: {
    tasks: { task: string; modality: string; requests: number }[]
    decisions: { pool: string; via: string; requests: number }[]
  }
  queues: {
    pool: string
    live: number
    async: number
    batch: number
    /** BullMQ worker connections on the pool's queue (null where Redis refuses CLIENT LIST). */
    bullmqWorkers: number | null
    /** Worker processes with a fresh heartbeat that serve the pool. */
    workers: number
  }[]
  workers: {
    id: string
    status: string
    pools: string[]
    ageMs: number
    models: WorkerSnapshot['models']
  }[]
  speed: {
    /** Generated tokens per second over the last minute. */
    tokensPerSecond: number
    ttft: Quantiles
    itl: Quantiles
    perPool: { pool: string; tokens: number; tokensPerSecond: number; ttft: Quantiles; itl: Quantiles }[]
    /** One point per minute of the window: minute start (epoch seconds) and its figures. */
    series: {
      t: number[]
      tokensPerSecond: number[]
      ttftP50: (number | null)[]
      ttftP99: (number | null)[]
      itlP50: (number | null)[]
      itlP99: (number | null)[]
      requests: number[]
    }
  }
  edge: {
    requests: number
    byStatus: Record<string, number>
    byRoute: { route: string; status: number; pool: string; cache: string; requests: number }[]
    cache: { hit: number; miss: number; bypass: number; hitRate: number | null }
    admission: Quantiles
  }
  prefixCache:
    | { available: false; reason: string }
    | { available: true; hitRate: number | null; counters: Record<string, number> }
}

const buckets = () => new Array<number>(LATENCY_BUCKETS_SECONDS.length + 1).fill(0)

const quantiles = (counts: number[]): Quantiles => ({
  p50: bucketQuantile(counts, 0.5),
  p99: bucketQuantile(counts, 0.99),
  count: counts.reduce((a, b) => a + b, 0),
})

function addInto(target: number[], from: readonly number[]): void {
  for (let i = 0; i < from.length; i++) target[i] = (target[i] ?? 0) + (from[i] ?? 0)
}

/** Coefficient of variation and max/mean of one layer's expert loads. */
export function layerBalance(layer: number, loads: readonly number[]): LayerBalance {
  const tokens = loads.reduce((a, b) => a + b, 0)
  const experts = loads.length
  if (tokens === 0 || experts === 0) return { layer, tokens, experts, cv: null, maxOverMean: null }
  const mean = tokens / experts
  const variance = loads.reduce((s, x) => s + (x - mean) ** 2, 0) / experts
  return { layer, tokens, experts, cv: Math.sqrt(variance) / mean, maxOverMean: Math.max(...loads) / mean }
}

/** The prefix cache's hit rate: prompt tokens found cached over prompt tokens looked up. */
export function prefixCacheHitRate(counters: Record<string, number>): number | null {
  const queries = counters.moe_prefix_cache_queries_total ?? 0
  return queries > 0 ? (counters.moe_prefix_cache_hits_total ?? 0) / queries : null
}

export interface DashboardSources {
  redis: RedisClient
  prefix: string
  queue: (pool: string) => Queue
}

/** Everything the page shows, for one viewer, pool and window. */
export async function readDashboard(src: DashboardSources, q: DashboardQuery): Promise<DashboardData> {
  const { redis, prefix } = src
  const last = telemetryMinute(q.now)
  const minutes = Array.from({ length: q.windowMinutes }, (_, i) => last - q.windowMinutes + 1 + i)
  const p = redis.pipeline()
  for (const m of minutes) p.hgetall(telemetryKey(prefix, m, q.scope))
  const results = (await p.exec()) ?? []
  const perMinute = results.map(([err, v]) => {
    if (err) throw err
    return v as Record<string, string>
  })

  const [workers, queues] = await Promise.all([
    readWorkers(redis, prefix, q.now),
    Promise.all(q.pools.map((pool) => readQueue(src.queue(pool)))),
  ])

  const visible = new Set(q.pools)
  const expert = new Map<string, number>() // `${layer}|${expert}` for q.pool
  let maxLayer = -1
  let maxExpert = -1
  const tasks = new Map<string, number>()
  const decisions = new Map<string, number>()
  const routes = new Map<string, number>()
  const byStatus: Record<string, number> = {}
  const cache = { hit: 0, miss: 0, bypass: 0 }
  const admission = buckets()
  const prefixCounters: Record<string, number> = {}
  const pool = new Map<string, { tokens: number; lastMinuteTokens: number; ttft: number[]; itl: number[] }>()
  const poolOf = (name: string) => {
    const s = pool.get(name) ?? { tokens: 0, lastMinuteTokens: 0, ttft: buckets(), itl: buckets() }
    pool.set(name, s)
    return s
  }
  const series: DashboardData['speed']['series'] = {
    t: [],
    tokensPerSecond: [],
    ttftP50: [],
    ttftP99: [],
    itlP50: [],
    itlP99: [],
    requests: [],
  }
  // The last minute's rate: the current minute so far plus the overlapping part of the previous.
  const intoMinute = (q.now % 60_000) / 60_000
  let lastMinuteTokens = 0

  perMinute.forEach((fields, i) => {
    const minute = minutes[i]!
    const weight = minute === last ? 1 : minute === last - 1 ? 1 - intoMinute : 0
    let minuteTokens = 0
    let minuteRequests = 0
    const minuteTtft = buckets()
    const minuteItl = buckets()
    for (const [field, raw] of Object.entries(fields)) {
      const n = Number(raw)
      const parts = field.split('|')
      switch (parts[0]) {
        case 'x': {
          const [, name, layer, e] = parts
          if (name !== q.pool) break
          const l = Number(layer)
          const x = Number(e)
          maxLayer = Math.max(maxLayer, l)
          maxExpert = Math.max(maxExpert, x)
          expert.set(`${l}|${x}`, (expert.get(`${l}|${x}`) ?? 0) + n)
          break
        }
        case 'gen': {
          if (!visible.has(parts[1]!)) break
          const s = poolOf(parts[1]!)
          s.tokens += n
          s.lastMinuteTokens += n * weight
          minuteTokens += n
          lastMinuteTokens += n * weight
          break
        }
        case 'ttft':
        case 'itl': {
          if (!visible.has(parts[1]!)) break
          const b = Number(parts[2])
          const s = poolOf(parts[1]!)
          ;(parts[0] === 'ttft' ? s.ttft : s.itl)[b]! += n
          ;(parts[0] === 'ttft' ? minuteTtft : minuteItl)[b]! += n
          break
        }
        case 'req': {
          const [, route, status, name, c] = parts
          routes.set(
            `${route}|${status}|${name}|${c}`,
            (routes.get(`${route}|${status}|${name}|${c}`) ?? 0) + n,
          )
          byStatus[status!] = (byStatus[status!] ?? 0) + n
          minuteRequests += n
          if (c === 'HIT') cache.hit += n
          else if (c === 'MISS') cache.miss += n
          else if (c === 'BYPASS') cache.bypass += n
          break
        }
        case 'adm':
          admission[Number(parts[1])]! += n
          break
        case 'task':
          tasks.set(`${parts[1]}|${parts[2]}`, (tasks.get(`${parts[1]}|${parts[2]}`) ?? 0) + n)
          break
        case 'route':
          decisions.set(`${parts[1]}|${parts[2]}`, (decisions.get(`${parts[1]}|${parts[2]}`) ?? 0) + n)
          break
        case 'pc':
          prefixCounters[parts[1]!] = (prefixCounters[parts[1]!] ?? 0) + n
          break
      }
    }
    const elapsed = minute === last ? Math.max(1, intoMinute * 60) : 60
    series.t.push(minute * 60)
    series.tokensPerSecond.push(minuteTokens / elapsed)
    series.requests.push(minuteRequests)
    series.ttftP50.push(bucketQuantile(minuteTtft, 0.5))
    series.ttftP99.push(bucketQuantile(minuteTtft, 0.99))
    series.itlP50.push(bucketQuantile(minuteItl, 0.5))
    series.itlP99.push(bucketQuantile(minuteItl, 0.99))
  })

  // The heatmap's shape is the model's (from a worker serving the pool), so unused experts show.
  const served = workers.flatMap((w) => w.models).find((m) => m.pools.includes(q.pool))
  const layers = Math.max(served?.layers ?? 0, maxLayer + 1)
  const experts = Math.max(served?.experts ?? 0, maxExpert + 1)
  const tokens = Array.from({ length: layers }, (_, l) =>
    Array.from({ length: experts }, (_, e) => expert.get(`${l}|${e}`) ?? 0),
  )

  const allTtft = buckets()
  const allItl = buckets()
  for (const s of pool.values()) {
    addInto(allTtft, s.ttft)
    addInto(allItl, s.itl)
  }
  const split = <T>(m: Map<string, number>, f: (parts: string[], n: number) => T) =>
    [...m.entries()].sort((a, b) => b[1] - a[1]).map(([k, n]) => f(k.split('|'), n))

  return {
    scope: q.scope === TELEMETRY_ALL ? 'admin' : 'tenant',
    tenantId: q.scope === TELEMETRY_ALL ? null : q.scope,
    now: q.now,
    windowMinutes: q.windowMinutes,
    pools: q.pools,
    pool: q.pool,
    expertLoad: {
      layers,
      experts,
      tokens,
      allowed: q.poolExperts,
      balance: tokens.map((row, l) =>
        layerBalance(l, q.poolExperts ? row.filter((_, e) => q.poolExperts!.includes(e)) : row),
      ),
    },
    routing: {
      tasks: split(tasks, ([task, modality], requests) => ({ task: task!, modality: modality!, requests })),
      decisions: split(decisions, ([p, via], requests) => ({ pool: p!, via: via!, requests })),
    },
    queues: q.pools.map((name, i) => ({
      pool: name,
      ...queues[i]!,
      workers: workers.filter((w) => w.pools.includes(name)).length,
    })),
    workers: workers.filter((w) => w.pools.some((x) => visible.has(x))),
    speed: {
      tokensPerSecond: lastMinuteTokens / 60,
      ttft: quantiles(allTtft),
      itl: quantiles(allItl),
      perPool: q.pools.map((name) => {
        const s = poolOf(name)
        return {
          pool: name,
          tokens: s.tokens,
          tokensPerSecond: s.lastMinuteTokens / 60,
          ttft: quantiles(s.ttft),
          itl: quantiles(s.itl),
        }
      }),
      series,
    },
    edge: {
      requests: Object.values(byStatus).reduce((a, b) => a + b, 0),
      byStatus,
      byRoute: split(routes, ([route, status, p, c], requests) => ({
        route: route!,
        status: Number(status),
        pool: p!,
        cache: c!,
        requests,
      })),
      cache: {
        ...cache,
        hitRate: cache.hit + cache.miss > 0 ? cache.hit / (cache.hit + cache.miss) : null,
      },
      admission: quantiles(admission),
    },
    prefixCache:
      q.scope !== TELEMETRY_ALL
        ? { available: false, reason: 'shown in the admin view only (the cache is shared by tenants)' }
        : Object.keys(prefixCounters).length === 0
          ? { available: false, reason: 'no worker reports moe_prefix_cache_* counters' }
          : { available: true, hitRate: prefixCacheHitRate(prefixCounters), counters: prefixCounters },
  }
}

async function readWorkers(
  redis: RedisClient,
  prefix: string,
  now: number,
): Promise<DashboardData['workers']> {
  const ids = await redis.zrangebyscore(workerHeartbeatsKey(prefix), now - WORKER_HEARTBEAT_STALE_MS, '+inf')
  if (ids.length === 0) return []
  const raw = await redis.hmget(workerStateKey(prefix), ...ids)
  const out: DashboardData['workers'] = []
  for (const json of raw) {
    if (json === null) continue
    const parsed = WorkerSnapshot.safeParse(JSON.parse(json))
    if (!parsed.success) continue
    const s = parsed.data
    out.push({ id: s.id, status: s.status, pools: s.pools, ageMs: Math.max(0, now - s.at), models: s.models })
  }
  return out.sort((a, b) => a.id.localeCompare(b.id))
}

/** Queued jobs by priority class, as the workers' moe_queue_depth gauge counts them. */
async function readQueue(queue: Queue): Promise<Omit<DashboardData['queues'][number], 'pool' | 'workers'>> {
  const [exact, total, bullmqWorkers] = await Promise.all([
    queue.getCountsPerPriority([JOB_PRIORITY.live, JOB_PRIORITY.async]),
    queue.getJobCountByTypes('prioritized', 'waiting'),
    queue.getWorkersCount().catch(() => null),
  ])
  const live = exact[JOB_PRIORITY.live] ?? 0
  const async = exact[JOB_PRIORITY.async] ?? 0
  return { live, async, batch: Math.max(0, total - live - async), bullmqWorkers }
}
