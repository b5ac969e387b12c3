import {
  type DoneEvent,
  type ErrorCode,
  type ExpertPool,
  encodeJobFailure,
  JOB_CANCEL_CHANNEL,
  type JobPayload,
  JobPayload as JobPayloadSchema,
  poolQueueName,
  seedFromJobId,
} from '@moe/shared'
import { type Job, UnrecoverableError, WaitingError, Worker } from 'bullmq'
import { Redis } from 'ioredis'
import pino, { type Logger } from 'pino'
import { MoeEngine, type StepEngine } from '../engine/engine.ts'
import { ThreadedEngine } from '../engine/threaded-engine.ts'
import { BatchScheduler, SchedulerError, type SequenceOutcome } from '../scheduler/batch-scheduler.ts'
import type { WorkerConfig } from './config.ts'
import { startHealthServer } from './health-server.ts'
import { WorkerMetrics } from './metrics.ts'
import { TokenStreamWriter } from './token-stream.ts'

/** What a completed job returns to BullMQ (the stream's `done` event carries the rest). */
export interface JobResult {
  finishReason: DoneEvent['finishReason']
  text: string
  usage: { promptTokens: number; completionTokens: number }
}

/** One engine (one model) and the scheduler that batches every pool on it. */
interface ModelRuntime {
  modelDir: string
  engine: StepEngine
  scheduler: BatchScheduler
}

/** A job failure with a stable code; permanent ones are never retried. */
class JobError extends Error {
  readonly code: ErrorCode
  readonly permanent: boolean
  constructor(code: ErrorCode, message: string, permanent = true) {
    super(message)
    this.code = code
    this.permanent = permanent
  }
}

/**
 * The GPU worker process: consumes each pool's BullMQ queue, feeds jobs to the
 * scheduler of the pool's model (pools on the same model share one engine and
 * batch together), streams tokens to Redis, and exposes metrics and health.
 */
export class WorkerService {
  readonly config: WorkerConfig
  readonly log: Logger
  readonly metrics = new WorkerMetrics()
  private readonly runtimes = new Map<string, ModelRuntime>()
  private readonly workers: Worker[] = []
  private readonly inFlight = new Map<string, { job: Job; token: string | undefined; handBack: boolean }>()
  private redis!: Redis
  private subscriber: Redis | null = null
  private streams!: TokenStreamWriter
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
    this.streams = new TokenStreamWriter(this.redis)

    for (const pool of c.pools) {
      if (this.runtimes.has(pool.modelDir)) continue
      // Forward passes on a worker thread by default, so queue and stream I/O run during them.
      const engine = await (c.engineThread ? ThreadedEngine : MoeEngine).load({
        modelDir: pool.modelDir,
        ep: c.ep,
        intraOpThreads: c.threads,
        spin: c.spin,
        maxBatch: c.maxBatch,
        maxContext: c.maxContext,
        log: (msg, fields) => this.log.info({ model: pool.modelDir, ...fields }, msg),
      })
      const model = pool.modelId
      let lastPoll = 0
      const scheduler = new BatchScheduler(engine, {
        maxBatch: c.maxBatch,
        maxPrefillTokens: c.maxPrefillTokens,
        hooks: {
          // Cancels arrive by pub/sub (see start()); polling the keys is only the fallback.
          pollCancels: (ids) => {
            if (Date.now() - lastPoll < c.cancelPollMs) return Promise.resolve([])
            lastPoll = Date.now()
            return this.streams.cancelled(ids)
          },
          afterStep: (s) => {
            this.metrics.batchSize.observe({ model, kind: s.kind }, s.rows)
            this.metrics.stepSeconds.observe({ model, kind: s.kind }, s.stepMs / 1000)
            this.metrics.requestsRunning.set({ model }, scheduler.running)
            this.metrics.requestsWaiting.set({ model }, scheduler.waiting)
            this.metrics.kvCacheBytes.set({ model }, engine.kvBytes)
            this.metrics.kvCacheUsage.set({ model }, scheduler.running / engine.maxBatch)
            // Sent behind the next step; the job awaits the chain before it completes.
            this.streams
              .flush()
              .catch((err) => this.log.error({ err: String(err) }, 'writing token events failed'))
          },
        },
      })
      this.runtimes.set(pool.modelDir, { modelDir: pool.modelDir, engine, scheduler })
      this.log.info(
        { model: pool.modelDir, ep: engine.ep, maxBatch: c.maxBatch, maxContext: engine.maxContext },
        'engine ready',
      )
    }
    this.subscriber = this.redis.duplicate()
    this.subscriber.on('message', (_channel: string, jobId: string) => {
      for (const r of this.runtimes.values()) r.scheduler.cancel(jobId)
    })
    await this.subscriber.subscribe(JOB_CANCEL_CHANNEL)
    for (const pool of c.pools) {
      const runtime = this.runtimes.get(pool.modelDir)!
      runtime.engine.validateExperts(pool.experts)
      const worker = new Worker(
        poolQueueName(pool.name),
        (job, token) => this.process(pool, runtime, job, token),
        {
          connection: new Redis(c.redisUrl, { maxRetriesPerRequest: null }),
          prefix: c.queuePrefix,
          // Enough jobs in hand to fill the batch; the rest stay in Redis for other workers.
          concurrency: c.maxBatch,
          lockDuration: c.lockMs,
          stalledInterval: c.stalledIntervalMs,
          maxStalledCount: 2,
        },
      )
      worker.on('error', (err) => this.log.error({ pool: pool.name, err: err.message }, 'worker error'))
      this.workers.push(worker)
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

  /** Runs one job: validate, tokenise, batch, stream. */
  private async process(
    pool: ExpertPool,
    runtime: ModelRuntime,
    job: Job,
    token: string | undefined,
  ): Promise<JobResult> {
    const jobId = job.id ?? 'unknown'
    const takenAt = Date.now()
    const log = this.log.child({ jobId, pool: pool.name })
    try {
      const payload = this.validate(pool, job)
      this.metrics.queueWait.observe({ pool: pool.name }, Math.max(0, takenAt - payload.createdAt) / 1000)
      const seed = payload.sampling.seed ?? seedFromJobId(payload.requestId)
      const promptIds = this.tokenize(runtime.engine, payload)
      const resume = await this.streams.resumePoint(jobId)
      if (resume.end?.type === 'done') {
        // A previous run finished the stream but died before BullMQ heard: report, don't redo.
        log.info('stream already complete from an earlier attempt')
        return { finishReason: resume.end.finishReason, text: resume.end.text, usage: resume.end.usage }
      }
      if (resume.end?.type === 'error')
        throw new UnrecoverableError(encodeJobFailure({ code: resume.end.code, message: resume.end.message }))
      if (resume.cancelled) {
        const usage = { promptTokens: promptIds.length, completionTokens: 0 }
        this.streams.end(jobId, {
          type: 'done',
          finishReason: 'cancelled',
          text: '',
          usage,
          timings: {
            queueWaitMs: Math.max(0, takenAt - payload.createdAt),
            timeToFirstTokenMs: 0,
            totalMs: 0,
            tokensPerSecond: 0,
          },
          routing: { expertLoad: [], allowedExperts: pool.experts },
          seed,
        })
        await this.streams.flush()
        this.metrics.requests.inc({ pool: pool.name, outcome: 'cancelled' })
        return { finishReason: 'cancelled', text: '', usage }
      }
      if (resume.lastIndex >= 0)
        log.info(
          { lastIndex: resume.lastIndex },
          'resuming a retried job: known tokens are not streamed again',
        )
      const entry = { job, token, handBack: false }
      this.inFlight.set(jobId, entry)
      try {
        const outcome = await this.generate(
          pool,
          runtime,
          payload,
          seed,
          promptIds,
          resume.lastIndex,
          takenAt,
        )
        if (outcome.kind === 'failed') throw new JobError('internal_error', outcome.error.message, false)
        if (outcome.kind === 'cancelled' && entry.handBack) {
          // The last step's tokens must be in Redis before another worker reads where to resume.
          await this.streams.flush()
          await job.moveToWait(token)
          this.metrics.requests.inc({ pool: pool.name, outcome: 'handed_back' })
          log.info('handed back to the queue while draining')
          throw new WaitingError()
        }
        const r = outcome.result
        const done: DoneEvent = {
          type: 'done',
          finishReason: r.finishReason,
          text: r.text,
          usage: r.usage,
          timings: {
            queueWaitMs: Math.max(0, takenAt - payload.createdAt),
            timeToFirstTokenMs: r.timings.timeToFirstTokenMs,
            totalMs: r.timings.totalMs,
            tokensPerSecond: r.timings.tokensPerSecond,
          },
          routing: { expertLoad: r.expertLoad, allowedExperts: pool.experts },
          seed,
        }
        this.streams.end(jobId, done)
        await this.streams.flush()
        this.metrics.requests.inc({ pool: pool.name, outcome: r.finishReason })
        this.metrics.addExpertLoad(pool.name, r.expertLoad)
        this.metrics.promptTokens.inc({ pool: pool.name }, r.usage.promptTokens)
        log.info(
          { finishReason: r.finishReason, usage: r.usage, ttftMs: Math.round(r.timings.timeToFirstTokenMs) },
          'job done',
        )
        return { finishReason: r.finishReason, text: r.text, usage: r.usage }
      } finally {
        this.inFlight.delete(jobId)
        this.streams.forget(jobId)
      }
    } catch (err) {
      if (err instanceof WaitingError || err instanceof UnrecoverableError) throw err
      const e = err instanceof JobError ? err : new JobError('internal_error', (err as Error).message, false)
      this.metrics.requests.inc({ pool: pool.name, outcome: e.code })
      // A retryable failure with attempts left is not the end of the stream.
      const willRetry = !e.permanent && job.attemptsMade + 1 < (job.opts.attempts ?? 1)
      if (!willRetry && job.id) {
        this.streams.end(job.id, { type: 'error', code: e.code, message: e.message })
        await this.streams.flush().catch(() => {})
      }
      log.warn({ code: e.code, err: e.message, willRetry }, 'job failed')
      const reason = encodeJobFailure({ code: e.code, message: e.message })
      throw e.permanent ? new UnrecoverableError(reason) : new Error(reason)
    }
  }

  private validate(pool: ExpertPool, job: Job): JobPayload {
    const parsed = JobPayloadSchema.safeParse(job.data)
    if (!parsed.success) {
      const issues = parsed.error.issues
        .map((i) => `${i.path.join('.') || '(payload)'}: ${i.message}`)
        .join('; ')
      throw new JobError('invalid_request', `invalid job payload: ${issues}`)
    }
    const p = parsed.data
    if (p.requestId !== job.id)
      throw new JobError('invalid_request', `job id ${job.id} does not match requestId ${p.requestId}`)
    if (p.pool !== pool.name)
      throw new JobError('unknown_pool', `job names pool ${p.pool} but was queued on ${pool.name}`)
    if (p.deadline < Date.now())
      throw new JobError('deadline_exceeded', 'the request passed its deadline before a worker took it')
    if (p.sampling.maxTokens > pool.maxTokensLimit)
      throw new JobError(
        'max_tokens_exceeded',
        `max_tokens ${p.sampling.maxTokens} exceeds pool ${pool.name}'s limit of ${pool.maxTokensLimit}`,
      )
    return p
  }

  private tokenize(engine: StepEngine, p: JobPayload): number[] {
    switch (p.input.kind) {
      case 'chat':
        return engine.tokenizer.encodeChat(p.input.messages)
      case 'text':
        return engine.tokenizer.encodePrompt(p.input.prompt)
      case 'tokens':
        return p.input.inputIds
    }
  }

  private generate(
    pool: ExpertPool,
    runtime: ModelRuntime,
    p: JobPayload,
    seed: number,
    promptIds: number[],
    lastIndex: number,
    takenAt: number,
  ): Promise<SequenceOutcome> {
    return new Promise((resolve, reject) => {
      let last = 0
      const labels = { pool: pool.name }
      try {
        runtime.scheduler.submit({
          id: p.requestId,
          tenantId: p.tenantId,
          pool: pool.name,
          promptIds,
          params: {
            maxTokens: p.sampling.maxTokens,
            temperature: p.sampling.temperature,
            topP: p.sampling.topP,
            topK: p.sampling.topK,
            seed,
            stop: p.sampling.stop,
            ignoreEos: p.sampling.ignoreEos ?? false,
            allowedExperts: pool.experts,
          },
          onToken: (t) => {
            const now = performance.now()
            if (t.index === 0) this.metrics.timeToFirstToken.observe(labels, (Date.now() - takenAt) / 1000)
            else this.metrics.interTokenLatency.observe(labels, (now - last) / 1000)
            last = now
            this.metrics.generatedTokens.inc(labels)
            if (t.index > lastIndex)
              this.streams.token(p.requestId, {
                type: 'token',
                index: t.index,
                text: t.text,
                tokenId: t.tokenId,
              })
          },
          onFinish: resolve,
        })
      } catch (e) {
        if (e instanceof SchedulerError) reject(new JobError(e.code, e.message))
        else reject(e)
      }
    })
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
    this.log.info({ inFlight: this.inFlight.size, timeoutMs: this.config.drainTimeoutMs }, 'draining')
    await Promise.all(this.workers.map((w) => w.pause(true)))
    const deadline = Date.now() + this.config.drainTimeoutMs
    while (this.inFlight.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    for (const [id, entry] of this.inFlight) {
      entry.handBack = true
      for (const r of this.runtimes.values()) r.scheduler.cancel(id)
    }
    for (const r of this.runtimes.values()) await r.scheduler.idle()
    while (this.inFlight.size > 0) await new Promise((r) => setTimeout(r, 10))
    await Promise.all(this.workers.map((w) => w.close()))
    await this.closeHealth?.()
    for (const r of this.runtimes.values()) await r.engine.close().catch(() => {})
    await this.subscriber?.quit().catch(() => {})
    await this.redis.quit().catch(() => {})
    this.log.info('stopped')
  }
}
