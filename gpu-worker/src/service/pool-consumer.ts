import {
  type ExpertPool,
  encodeJobFailure,
  type JobPayload,
  JobPayload as JobPayloadSchema,
  poolQueueName,
  SETTLE_TOKENS_LUA,
  seedFromJobId,
  tenantQueuedKey,
  tenantTokensKey,
} from '@moe/shared'
import { type Job, UnrecoverableError, WaitingError, Worker } from 'bullmq'
import { Redis } from 'ioredis'
import type { Logger } from 'pino'
import { GrammarError, type JsonConstraint, jsonGrammarFor } from '../engine/constrained/json-grammar.ts'
import type { StepEngine } from '../engine/engine.ts'
import { encodeToolChat } from '../engine/tool-prompt.ts'
import { SchedulerError, type SequenceOutcome } from '../scheduler/batch-scheduler.ts'
import type { WorkerConfig } from './config.ts'
import { doneEvent, type JobContext, JobError, type JobResult, jobResultOf } from './job-result.ts'
import type { WorkerMetrics } from './metrics.ts'
import type { ModelRuntime } from './model-runtime.ts'
import type { TokenStreamWriter } from './token-stream.ts'

interface InFlight {
  job: Job
  token: string | undefined
  /** Set while draining: the job's sequence is cancelled and the job goes back to the queue. */
  handBack: boolean
}

/**
 * The BullMQ lifecycle of one pool's queue: takes jobs, validates them, hands each to the
 * scheduler of the pool's model, and ends it with `done` or `error` on its stream. Knows no tensors.
 */
export class PoolConsumer {
  readonly pool: ExpertPool
  private readonly runtime: ModelRuntime
  private readonly streams: TokenStreamWriter
  private readonly metrics: WorkerMetrics
  private readonly log: Logger
  private readonly worker: Worker
  private readonly queuePrefix: string
  private readonly accounting: Redis
  readonly inFlight = new Map<string, InFlight>()

  constructor(
    pool: ExpertPool,
    runtime: ModelRuntime,
    deps: { config: WorkerConfig; streams: TokenStreamWriter; metrics: WorkerMetrics; log: Logger },
  ) {
    this.pool = pool
    this.runtime = runtime
    this.streams = deps.streams
    this.metrics = deps.metrics
    this.log = deps.log
    const c = deps.config
    this.queuePrefix = c.queuePrefix
    // The tenant's queued set and token charge: small writes beside the worker's own connections.
    this.accounting = new Redis(c.redisUrl, { maxRetriesPerRequest: 2 })
    this.accounting.on('error', (e) => this.log.warn({ err: e.message }, 'accounting redis error'))
    this.worker = new Worker(poolQueueName(pool.name), (job, token) => this.process(job, token), {
      connection: new Redis(c.redisUrl, { maxRetriesPerRequest: null }),
      prefix: c.queuePrefix,
      // Enough jobs in hand to fill the batch; the rest stay in Redis for other workers.
      concurrency: c.maxBatch,
      lockDuration: c.lockMs,
      stalledInterval: c.stalledIntervalMs,
      maxStalledCount: c.maxStalledCount,
    })
    this.worker.on('error', (err) => this.log.error({ pool: pool.name, err: err.message }, 'worker error'))
    this.worker.on('failed', (job, err) => {
      if (job)
        void this.endAbandoned(job, err).catch((e) =>
          this.log.warn({ err: String(e) }, 'could not end stream'),
        )
    })
  }

  /**
   * BullMQ fails some jobs without running them here: one that stalled past the limit (its
   * worker died or hung, more than once) is failed by the next worker that takes it. Its stream
   * then has no end, and a live client would wait out its whole timeout: write one, unless the
   * job's own run already did.
   */
  private async endAbandoned(job: Job, err: Error): Promise<void> {
    if (!job.id || !(err instanceof UnrecoverableError)) return
    if ((await this.streams.resumePoint(job.id)).end) return
    this.log.warn({ jobId: job.id, err: err.message }, 'job abandoned by BullMQ: ending its stream')
    this.streams.end(job.id, {
      type: 'error',
      code: 'internal_error',
      message: 'The request was abandoned after its worker stopped responding; please retry it.',
    })
    await this.streams.flush()
  }

  /** Takes no new jobs; those in hand go on. */
  pause(): Promise<void> {
    return this.worker.pause(true)
  }

  /** Cancels every job in hand so each goes back to the queue once its last tokens are flushed. */
  handBackAll(): void {
    for (const [id, entry] of this.inFlight) {
      entry.handBack = true
      this.runtime.scheduler.cancel(id)
    }
  }

  async close(): Promise<void> {
    await this.worker.close()
    this.accounting.disconnect()
  }

  /** Runs one job: validate, tokenise, batch, stream. */
  private async process(job: Job, token: string | undefined): Promise<JobResult> {
    const pool = this.pool
    const jobId = job.id ?? 'unknown'
    const takenAt = Date.now()
    const log = this.log.child({ jobId, pool: pool.name })
    try {
      const payload = this.validate(job)
      this.metrics.queueWait.observe({ pool: pool.name }, Math.max(0, takenAt - payload.createdAt) / 1000)
      // Taken: no longer one of the tenant's queued jobs (its share of the pool's depth).
      void this.dequeued(payload, jobId)
      const ctx: JobContext = {
        pool,
        createdAt: payload.createdAt,
        takenAt,
        seed: payload.sampling.seed ?? seedFromJobId(payload.requestId),
      }
      const promptIds = tokenize(this.runtime.engine, payload)
      const resume = await this.streams.resumePoint(jobId)
      if (resume.end?.type === 'done') {
        // A previous run finished the stream but died before BullMQ heard: report, don't redo.
        log.info('stream already complete from an earlier attempt')
        return jobResultOf(resume.end)
      }
      if (resume.end?.type === 'error')
        throw new UnrecoverableError(encodeJobFailure({ code: resume.end.code, message: resume.end.message }))
      if (resume.cancelled) {
        const done = doneEvent(ctx, null, promptIds.length)
        this.streams.end(jobId, done)
        await this.streams.flush()
        this.metrics.requests.inc({ pool: pool.name, outcome: 'cancelled' })
        return jobResultOf(done)
      }
      if (resume.lastIndex >= 0)
        log.info(
          { lastIndex: resume.lastIndex },
          'resuming a retried job: known tokens are not streamed again',
        )
      const constraint = await outputConstraint(this.runtime.engine, payload)
      const entry: InFlight = { job, token, handBack: false }
      this.inFlight.set(jobId, entry)
      try {
        const outcome = await this.generate(payload, ctx, promptIds, resume.lastIndex, constraint)
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
        const done = doneEvent(ctx, r)
        this.streams.end(jobId, done)
        await this.streams.flush()
        if (payload.charge) void this.settle(payload, r.usage.promptTokens + r.usage.completionTokens)
        this.metrics.requests.inc({ pool: pool.name, outcome: r.finishReason })
        this.metrics.addExpertLoad(pool.name, r.expertLoad)
        this.metrics.promptTokens.inc({ pool: pool.name }, r.usage.promptTokens)
        this.metrics.requestDuration.observe(
          { pool: pool.name },
          Math.max(0, Date.now() - payload.createdAt) / 1000,
        )
        log.info(
          { finishReason: r.finishReason, usage: r.usage, ttftMs: Math.round(r.timings.timeToFirstTokenMs) },
          'job done',
        )
        return jobResultOf(done)
      } finally {
        constraint?.dispose()
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

  private async dequeued(p: JobPayload, jobId: string): Promise<void> {
    try {
      const redis = this.accounting
      await redis.zrem(tenantQueuedKey(this.queuePrefix, p.pool, p.tenantId), jobId)
    } catch (e) {
      this.log.warn({ jobId, err: String(e) }, 'could not mark the job taken')
    }
  }

  /** Settles the tokens-per-minute charge the edge admitted an async job with to its real usage. */
  private async settle(p: JobPayload, used: number): Promise<void> {
    const charge = p.charge
    if (!charge || used === charge.tokens) return
    try {
      const redis = this.accounting
      await redis.eval(
        SETTLE_TOKENS_LUA,
        1,
        tenantTokensKey(this.queuePrefix, p.tenantId, charge.window),
        used - charge.tokens,
      )
    } catch (e) {
      this.log.warn({ jobId: p.requestId, err: String(e) }, 'could not settle the token charge')
    }
  }

  private validate(job: Job): JobPayload {
    const pool = this.pool
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

  /** Submits the sequence and streams its tokens; resolves when it leaves the batch. */
  private generate(
    p: JobPayload,
    ctx: JobContext,
    promptIds: number[],
    lastIndex: number,
    constraint: JsonConstraint | undefined,
  ): Promise<SequenceOutcome> {
    return new Promise((resolve, reject) => {
      let last = 0
      const labels = { pool: this.pool.name }
      try {
        this.runtime.scheduler.submit({
          id: p.requestId,
          tenantId: p.tenantId,
          pool: this.pool.name,
          promptIds,
          params: {
            maxTokens: p.sampling.maxTokens,
            temperature: p.sampling.temperature,
            topP: p.sampling.topP,
            topK: p.sampling.topK,
            seed: ctx.seed,
            stop: p.sampling.stop,
            ignoreEos: p.sampling.ignoreEos ?? false,
            allowedExperts: this.pool.experts,
          },
          constraint,
          onToken: (t) => {
            const now = performance.now()
            if (t.index === 0)
              this.metrics.timeToFirstToken.observe(labels, (Date.now() - ctx.takenAt) / 1000)
            else this.metrics.interTokenLatency.observe(labels, (now - last) / 1000)
            last = now
            this.metrics.generatedTokens.inc(labels)
            // A retried job skips the indices its stream already holds.
            if (p.streamTokens && t.index > lastIndex)
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
}

function tokenize(engine: StepEngine, p: JobPayload): number[] {
  switch (p.input.kind) {
    case 'chat':
      return encodeToolChat(engine.tokenizer, p.input.messages, p.tools)
    case 'text':
      return engine.tokenizer.encodePrompt(p.input.prompt)
    case 'tokens':
      return p.input.inputIds
  }
}

/** The grammar a job's output is held to (structured output, forced tool calls), if any. */
async function outputConstraint(engine: StepEngine, p: JobPayload): Promise<JsonConstraint | undefined> {
  if (!p.jsonOutput) return undefined
  try {
    return await jsonGrammarFor(engine.tokenizer, engine.config.vocab_size).constraint(p.jsonOutput)
  } catch (e) {
    if (e instanceof GrammarError) throw new JobError('invalid_request', e.message)
    throw e
  }
}
