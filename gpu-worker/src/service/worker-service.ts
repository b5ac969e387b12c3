import { JOB_CANCEL_CHANNEL } from '@moe/shared'
import { Redis } from 'ioredis'
import pino, { type Logger } from 'pino'
import type { WorkerConfig } from './config.ts'
import { startHealthServer } from './health-server.ts'
import { WorkerMetrics } from './metrics.ts'
import { loadModelRuntimes, type ModelRuntime } from './model-runtime.ts'
import { PoolConsumer } from './pool-consumer.ts'
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
  private redis!: Redis
  private subscriber: Redis | null = null
  private draining = false
  private ready = false
  healthPort = 0
  private closeHealth: (() => Promise<void>) | null = null

  constructor(config: WorkerConfig, log?: Logger) {
    this.config = config
    this.log = log ?? pino({ level: config.logLevel, base: { service: 'gpu-worker' } })
  }

  async start(): Promise<void> {
    const c = this.config
    this.redis = new Redis(c.redisUrl, { maxRetriesPerRequest: null, lazyConnect: false })
    this.redis.on('error', (err) => this.log.warn({ err: err.message }, 'redis connection error'))
    const streams = new TokenStreamWriter(this.redis)
    this.runtimes = await loadModelRuntimes(c, streams, this.metrics, this.log)
    this.subscriber = this.redis.duplicate()
    this.subscriber.on('message', (_channel: string, jobId: string) => {
      for (const r of this.runtimes.values()) r.scheduler.cancel(jobId)
    })
    await this.subscriber.subscribe(JOB_CANCEL_CHANNEL)
    for (const pool of c.pools) {
      const runtime = this.runtimes.get(pool.modelDir)!
      this.consumers.push(
        new PoolConsumer(pool, runtime, { config: c, streams, metrics: this.metrics, log: this.log }),
      )
    }
    const health = await startHealthServer(c.metricsHost, c.metricsPort, this.metrics, this)
    this.healthPort = health.port
    this.closeHealth = () => new Promise((r) => health.server.close(() => r()))
    this.ready = true
    this.log.info({ pools: c.pools.map((p) => p.name), metricsPort: health.port }, 'gpu worker serving')
  }

  health() {
    return {
      ok: this.ready && !this.draining,
      status: this.draining ? 'draining' : this.ready ? 'ok' : 'starting',
      pools: this.config.pools.map((p) => p.name),
      models: [...this.runtimes.values()].map((r) => ({
        modelDir: r.modelDir,
        ep: r.engine.ep,
        running: r.scheduler.running,
        waiting: r.scheduler.waiting,
      })),
    }
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
    await this.closeHealth?.()
    for (const r of this.runtimes.values()) await r.engine.close().catch(() => {})
    await this.subscriber?.quit().catch(() => {})
    await this.redis.quit().catch(() => {})
    this.log.info('stopped')
  }
}
