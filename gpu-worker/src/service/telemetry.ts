import { randomBytes } from 'node:crypto'
import { hostname } from 'node:os'
import type { RedisClient } from '@moe/shared'
import {
  latencyBucket,
  TELEMETRY_ALL,
  TELEMETRY_TTL_SECONDS,
  TelemetryField,
  telemetryKey,
  telemetryMinute,
  WORKER_HEARTBEAT_STALE_MS,
  type WorkerSnapshot,
  workerHeartbeatsKey,
  workerStateKey,
} from '@moe/shared'
import type { Logger } from 'pino'
import type { Registry } from 'prom-client'

/**
 * The worker's share of the dashboard's data (shared/src/telemetry.ts): the edge cannot scrape a
 * worker's /metrics in production, so each worker adds its per-tenant counts and latency buckets
 * to per-minute hashes in Redis, and its heartbeat snapshot beside them. Counts gather in memory
 * and go out once per interval in one pipeline, so Redis sees a few commands a second per
 * worker however many tokens flow.
 */
export class TelemetryPublisher {
  readonly workerId: string
  private readonly startedAt = Date.now()
  /** `<minute>\u0000<scope>` -> field -> count, since the last flush. */
  private pending = new Map<string, Map<string, number>>()
  /** Last values of the `moe_prefix_cache_*` counters, to publish their increase. */
  private readonly prefixCacheSeen = new Map<string, number>()
  private timer: NodeJS.Timeout | null = null
  private sending: Promise<void> | null = null

  private readonly redis: RedisClient
  private readonly prefix: string
  private readonly snapshot: () => Omit<WorkerSnapshot, 'id' | 'host' | 'pid' | 'startedAt' | 'at'>
  private readonly registry: Registry
  private readonly log: Logger
  private readonly intervalMs: number

  constructor(opts: {
    redis: RedisClient
    prefix: string
    /** The worker's batch per model, for the heartbeat. */
    snapshot: () => Omit<WorkerSnapshot, 'id' | 'host' | 'pid' | 'startedAt' | 'at'>
    /** The worker's Prometheus registry: its `moe_prefix_cache_*` counters are published too. */
    registry: Registry
    log: Logger
    /** How often to flush (MOE_TELEMETRY_INTERVAL_MS); 0 publishes nothing on its own. */
    intervalMs: number
  }) {
    this.redis = opts.redis
    this.prefix = opts.prefix
    this.snapshot = opts.snapshot
    this.registry = opts.registry
    this.log = opts.log
    this.intervalMs = opts.intervalMs
    this.workerId = `${hostname()}:${process.pid}:${randomBytes(3).toString('hex')}`
  }

  start(): void {
    if (this.intervalMs <= 0 || this.timer) return
    // A flush still under way (Redis slow or away) is not queued behind: counts keep gathering.
    this.timer = setInterval(() => {
      if (!this.sending) void this.flush()
    }, this.intervalMs)
    this.timer.unref()
    void this.flush()
  }

  private add(tenantId: string, field: string, n: number, now = Date.now()): void {
    const minute = telemetryMinute(now)
    for (const scope of tenantId === TELEMETRY_ALL ? [TELEMETRY_ALL] : [tenantId, TELEMETRY_ALL]) {
      const k = `${minute}\u0000${scope}`
      const fields = this.pending.get(k) ?? new Map<string, number>()
      this.pending.set(k, fields)
      fields.set(field, (fields.get(field) ?? 0) + n)
    }
  }

  firstToken(tenantId: string, pool: string, seconds: number): void {
    this.add(tenantId, TelemetryField.timeToFirstToken(pool, latencyBucket(seconds)), 1)
  }

  interToken(tenantId: string, pool: string, seconds: number): void {
    this.add(tenantId, TelemetryField.interTokenLatency(pool, latencyBucket(seconds)), 1)
  }

  generated(tenantId: string, pool: string, tokens = 1): void {
    this.add(tenantId, TelemetryField.generatedTokens(pool), tokens)
  }

  /** A job that ran to its end: outcome, prompt size and its expert-load matrix [layer][expert]. */
  finished(tenantId: string, pool: string, outcome: string, promptTokens: number, load: number[][]): void {
    this.add(tenantId, TelemetryField.finished(pool, outcome), 1)
    if (promptTokens > 0) this.add(tenantId, TelemetryField.promptTokens(pool), promptTokens)
    load.forEach((row, layer) => {
      row.forEach((n, expert) => {
        if (n > 0) this.add(tenantId, TelemetryField.expertTokens(pool, layer, expert), n)
      })
    })
  }

  /** A job that ended without a result (an error code, cancelled, handed back). */
  ended(tenantId: string, pool: string, outcome: string): void {
    this.add(tenantId, TelemetryField.finished(pool, outcome), 1)
  }

  /** Sends what gathered since the last flush, and the heartbeat; one flush at a time. */
  async flush(): Promise<void> {
    while (this.sending) await this.sending
    this.sending = this.send()
      .catch(() => {})
      .finally(() => {
        this.sending = null
      })
    return this.sending
  }

  private async send(): Promise<void> {
    await this.prefixCacheDeltas()
    const batch = this.pending
    this.pending = new Map()
    const now = Date.now()
    const p = this.redis.pipeline()
    for (const [k, fields] of batch) {
      const [minute, scope] = k.split('\u0000') as [string, string]
      const key = telemetryKey(this.prefix, Number(minute), scope)
      for (const [field, n] of fields) p.hincrby(key, field, n)
      p.expire(key, TELEMETRY_TTL_SECONDS)
    }
    const snap: WorkerSnapshot = {
      id: this.workerId,
      host: hostname(),
      pid: process.pid,
      startedAt: this.startedAt,
      at: now,
      ...this.snapshot(),
    }
    p.zadd(workerHeartbeatsKey(this.prefix), now, this.workerId)
    p.hset(workerStateKey(this.prefix), this.workerId, JSON.stringify(snap))
    // Workers that died without saying goodbye drop out of the set after an hour.
    p.zremrangebyscore(workerHeartbeatsKey(this.prefix), 0, now - 3_600_000)
    try {
      const results = (await p.exec()) ?? []
      const failed = results.find(([err]) => err)
      if (failed) throw failed[0]
    } catch (err) {
      // Counts are lost rather than retried: the dashboard is a picture, Prometheus the record.
      this.log.warn({ err: String(err) }, 'could not publish telemetry')
    }
    if (Math.random() < 0.01) void this.pruneStates(now).catch(() => {})
  }

  /** Removes snapshots of workers whose heartbeat is gone. */
  private async pruneStates(now: number): Promise<void> {
    const live = new Set(
      await this.redis.zrangebyscore(
        workerHeartbeatsKey(this.prefix),
        now - WORKER_HEARTBEAT_STALE_MS,
        '+inf',
      ),
    )
    const ids = await this.redis.hkeys(workerStateKey(this.prefix))
    const stale = ids.filter((id) => !live.has(id))
    if (stale.length > 0) await this.redis.hdel(workerStateKey(this.prefix), ...stale)
  }

  /** The prefix cache's counters, if this worker has one: their increase since the last flush. */
  private async prefixCacheDeltas(): Promise<void> {
    // Only these metrics are read: others may query Redis when collected (moe_queue_depth).
    const names = this.registry.getMetricsAsArray().map((m) => m.name)
    for (const name of names.filter((n) => n.startsWith('moe_prefix_cache_'))) {
      const metric = this.registry.getSingleMetric(name)
      if (!metric) continue
      const { type, values } = await metric.get()
      if (String(type) !== 'counter') continue
      const total = values.reduce((s, v) => s + v.value, 0)
      const delta = total - (this.prefixCacheSeen.get(name) ?? 0)
      this.prefixCacheSeen.set(name, total)
      if (delta > 0) this.add(TELEMETRY_ALL, TelemetryField.prefixCache(name), delta)
    }
  }

  /** Stops the heartbeat after a last flush, and says goodbye so the worker drops off at once. */
  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer)
    this.timer = null
    await this.flush()
    await this.redis
      .multi()
      .zrem(workerHeartbeatsKey(this.prefix), this.workerId)
      .hdel(workerStateKey(this.prefix), this.workerId)
      .exec()
      .catch(() => {})
  }
}
