import {
  connectRedis,
  duplicateRedis,
  JOB_CANCEL_CHANNEL,
  JOB_PRIORITY,
  poolQueueName,
  type RedisClient,
} from '@moe/shared'
import { Queue } from 'bullmq'
import pino, { type Logger } from 'pino'
import { ThreadedEngine } from '../engine/threaded-engine.ts'
import type { WorkerConfig } from './config.ts'
import { startHealthServer } from './health-server.ts'
import { WorkerMetrics } from './metrics.ts'
import { loadModelRuntimes, type ModelRuntime, runtimeKey } from './model-runtime.ts'
import { PoolConsumer } from './pool-consumer.ts'
import { TelemetryPublisher } from './telemetry.ts'
import { TokenStreamWriter } from './token-stream.ts'

/**
 * The GPU worker process: one model runtime per model directory, one pool consumer per pool,
 * the cancel subscription, and /metrics and /healthz. Start, health and graceful stop.
 */
export class WorkerService {
  readonly config: WorkerConfig
  readonly log: Logger
  readonly metrics = new WorkerMetrics()
  private runtimes = new Map<string, ModelRuntime>()
  private readonly consumers: PoolConsumer[] = []
  /** Read-only handles on the pools' queues, for the queue-depth gauge. */
  private readonly queues: Queue[] = []
  private redis!: RedisClient
  /** Per-tenant counts and the heartbeat the dashboard reads (telemetry.ts). */
  telemetry!: TelemetryPublisher
  private subscriber: RedisClient | null = null
  private draining = false
  private ready = false
  /** Set when an engine died: the process takes no more work and should exit non-zero. */
  private engineFailure: Error | null = null
  private readonly onFatal: (err: Error) => void
  healthPort = 0
  private closeHealth: (() => Promise<void>) | null = null

  /** `onFatal` hears of a failure the process cannot recover from (`moe serve` exits 1). */
  constructor(config: WorkerConfig, log?: Logger, onFatal: (err: Error) => void = () => {}) {
    this.config = config
    this.log = log ?? pino({ level: config.logLevel, base: { service: 'gpu-worker' } })
    this.onFatal = onFatal
  }

  async start(): Promise<void> {
    const c = this.config
    this.redis = connectRedis(c, { maxRetriesPerRequest: null, lazyConnect: false })
    this.redis.on('error', (err) => this.log.warn({ err: err.message }, 'redis connection error'))
    const streams = new TokenStreamWriter(this.redis)
    this.telemetry = new TelemetryPublisher({
      redis: this.redis,
      prefix: c.queuePrefix,
      snapshot: () => this.snapshot(),
      registry: this.metrics.registry,
      log: this.log,
      intervalMs: c.telemetryIntervalMs,
    })
    this.runtimes = await loadModelRuntimes(c, streams, this.metrics, this.log)
    for (const r of this.runtimes.values())
      if (r.engine instanceof ThreadedEngine) r.engine.onDeath((err) => this.engineDied(r, err))
    this.subscriber = duplicateRedis(this.redis)
    this.subscriber.on('message', (_channel: string, jobId: string) => {
      for (const r of this.runtimes.values()) r.scheduler.cancel(jobId)
    })
    await this.subscriber.subscribe(JOB_CANCEL_CHANNEL)
    for (const pool of c.pools) {
      const runtime = this.runtimes.get(runtimeKey(pool))!
      this.consumers.push(
        new PoolConsumer(pool, runtime, {
          config: c,
          streams,
          metrics: this.metrics,
          telemetry: this.telemetry,
          log: this.log,
        }),
      )
    }
    for (const pool of c.pools)
      this.queues.push(new Queue(poolQueueName(pool.name), { connection: this.redis, prefix: c.queuePrefix }))
    this.metrics.collectQueueDepth(() => this.collectQueueDepth())
    const health = await startHealthServer(c.metricsHost, c.metricsPort, this.metrics, this)
    this.healthPort = health.port
    this.closeHealth = () => new Promise((r) => health.server.close(() => r()))
    this.ready = true
    this.telemetry.start()
    this.log.info({ pools: c.pools.map((p) => p.name), metricsPort: health.port }, 'gpu worker serving')
  }

  /**
   * An engine thread died: every job this process took would now fail at once, faster than
   * healthy workers could take them. Stop taking jobs, report unhealthy, and let the
   * supervisor restart the process; jobs in flight fail retryably and run elsewhere.
   */
  private engineDied(runtime: ModelRuntime, err: Error): void {
    if (this.engineFailure) return
    this.engineFailure = err
    this.log.fatal({ model: runtime.modelDir, err: err.message }, 'engine thread died; taking no more jobs')
    for (const c of this.consumers) void c.pause().catch(() => {})
    this.onFatal(err)
  }

  /** The runtime serving a pool (for health reports and tests). */
  runtimeFor(pool: string): ModelRuntime | undefined {
    const p = this.config.pools.find((x) => x.name === pool)
    return p && this.runtimes.get(runtimeKey(p))
  }

  health() {
    const status = this.engineFailure
      ? 'engine_failed'
      : this.draining
        ? 'draining'
        : this.ready
          ? 'ok'
          : 'starting'
    return {
      ok: status === 'ok',
      status,
      ...(this.engineFailure && { error: this.engineFailure.message }),
      pools: this.config.pools.map((p) => p.name),
      models: [...this.runtimes.values()].map((r) => ({
        modelDir: r.modelDir,
        ep: r.engine.ep,
        running: r.scheduler.running,
        waiting: r.scheduler.waiting,
      })),
    }
  }

  /** The heartbeat's picture of this worker: its batch per model. */
  private snapshot() {
    const pools = this.config.pools
    return {
      status: this.health().status,
      pools: pools.map((p) => p.name),
      models: [...this.runtimes.entries()].map(([key, r]) => {
        const served = pools.filter((p) => runtimeKey(p) === key)
        return {
          model: served[0]?.modelId ?? r.modelDir,
          pools: served.map((p) => p.name),
          layers: r.engine.config.num_hidden_layers,
          experts: r.engine.config.num_local_experts,
          running: r.scheduler.running,
          waiting: r.scheduler.waiting,
          maxBatch: r.scheduler.maxBatch,
          occupancy: r.scheduler.running / r.scheduler.maxBatch,
        }
      }),
    }
  }

  /**
   * Queued jobs per pool and priority class. Every job the edge enqueues has a BullMQ priority:
   * live and async jobs exactly theirs, batch lines their class's plus an offset that interleaves
   * tenants (up to 2^21 - 1), so batch is what remains of the prioritized set.
   */
  private async collectQueueDepth(): Promise<void> {
    await Promise.all(
      this.queues.map(async (q, i) => {
        const [exact, total] = await Promise.all([
          q.getCountsPerPriority([JOB_PRIORITY.live, JOB_PRIORITY.async]),
          q.getJobCountByTypes('prioritized', 'waiting'),
        ])
        const live = exact[JOB_PRIORITY.live] ?? 0
        const async = exact[JOB_PRIORITY.async] ?? 0
        const pool = this.config.pools[i]!.name
        this.metrics.queueDepth.set({ pool, priority: 'live' }, live)
        this.metrics.queueDepth.set({ pool, priority: 'async' }, async)
        this.metrics.queueDepth.set({ pool, priority: 'batch' }, Math.max(0, total - live - async))
      }),
    )
  }

  private get inFlight(): number {
    return this.consumers.reduce((n, c) => n + c.inFlight.size, 0)
  }

  /**
   * Graceful stop: take no new jobs, let those in flight finish for up to
   * `drainTimeoutMs`, then hand the rest back to the queue (another worker
   * resumes them; the seeded retry repeats the same tokens, and the stream
   * skips the ones already sent).
   */
  async close(): Promise<void> {
    if (this.draining) return
    this.draining = true
    this.log.info({ inFlight: this.inFlight, timeoutMs: this.config.drainTimeoutMs }, 'draining')
    await Promise.all(this.consumers.map((c) => c.pause()))
    const deadline = Date.now() + this.config.drainTimeoutMs
    while (this.inFlight > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    for (const c of this.consumers) c.handBackAll()
    for (const r of this.runtimes.values()) await r.scheduler.idle()
    while (this.inFlight > 0) await new Promise((r) => setTimeout(r, 10))
    await Promise.all(this.consumers.map((c) => c.close()))
    await this.telemetry.close()
    await Promise.all(this.queues.map((q) => q.close()))
    await this.closeHealth?.()
    for (const r of this.runtimes.values()) await r.engine.close().catch(() => {})
    await this.subscriber?.quit().catch(() => {})
    await this.redis.quit().catch(() => {})
    this.log.info('stopped')
  }
}
