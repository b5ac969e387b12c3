import {
  type ChoiceResult,
  choiceCount,
  choiceSeed,
  connectRedis,
  type ExpertPool,
  encodeJobFailure,
  type JobPayload,
  JobPayload as JobPayloadSchema,
  poolQueueName,
  type RedisClient,
  type SampledLogprob,
  SETTLE_TOKENS_LUA,
  seedFromJobId,
  TOKENIZE_JOB,
  TOKENIZE_RESULT_TTL_SECONDS,
  TokenizeJobPayload,
  type TokenizeResult,
  tenantQueuedKey,
  tenantTokensKey,
  tokenizeResultKey,
} from '@moe/shared'
import { type Job, UnrecoverableError, WaitingError, Worker } from 'bullmq'
import type { Logger } from 'pino'
import { GrammarError, type JsonConstraint, jsonGrammarFor } from '../engine/constrained/json-grammar.ts'
import type { GenerationResult, StepEngine } from '../engine/engine.ts'
import type { TokenOutput } from '../engine/sequence.ts'
import { encodeToolChat, toolChat } from '../engine/tool-prompt.ts'
import { SchedulerError, type SequenceOutcome } from '../scheduler/batch-scheduler.ts'
import type { WorkerConfig } from './config.ts'
import { doneEvent, type JobContext, JobError, type JobResult, jobResultOf } from './job-result.ts'
import type { WorkerMetrics } from './metrics.ts'
import type { ModelRuntime } from './model-runtime.ts'
import type { TelemetryPublisher } from './telemetry.ts'
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
  private readonly telemetry: TelemetryPublisher | null
  private readonly log: Logger
  private readonly worker: Worker
  private readonly queuePrefix: string
  private readonly accounting: RedisClient
  readonly inFlight = new Map<string, InFlight>()
  /** When each running job's latest token came (inter-token latency). */
  readonly #lastTokenAt = new Map<string, number>()

  constructor(
    pool: ExpertPool,
    runtime: ModelRuntime,
    deps: {
      config: WorkerConfig
      streams: TokenStreamWriter
      metrics: WorkerMetrics
      telemetry?: TelemetryPublisher
      log: Logger
    },
  ) {
    this.pool = pool
    this.runtime = runtime
    this.streams = deps.streams
    this.metrics = deps.metrics
    this.telemetry = deps.telemetry ?? null
    this.log = deps.log
    const c = deps.config
    this.queuePrefix = c.queuePrefix
    // The tenant's queued set and token charge: small writes beside the worker's own connections.
    this.accounting = connectRedis(c, { maxRetriesPerRequest: 2 })
    this.accounting.on('error', (e) => this.log.warn({ err: e.message }, 'accounting redis error'))
    this.worker = new Worker(
      poolQueueName(pool.name),
      (job, token) => (job.name === TOKENIZE_JOB ? this.tokenizeJob(job) : this.process(job, token)),
      {
        connection: connectRedis(c, { maxRetriesPerRequest: null }),
        prefix: c.queuePrefix,
        // Enough jobs in hand to fill the batch; the rest stay in Redis for other workers.
        concurrency: c.maxBatch,
        lockDuration: c.lockMs,
        stalledInterval: c.stalledIntervalMs,
        maxStalledCount: c.maxStalledCount,
      },
    )
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
      const prompts = tokenizePrompts(this.runtime.engine, payload)
      const promptIds = prompts[0]!
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
        this.telemetry?.ended(payload.tenantId, pool.name, 'cancelled')
        return jobResultOf(done)
      }
      // A retried job continues the tokens its stream already holds rather than sampling anew: a
      // different batch can round differently and sample other tokens from the same seed.
      const streamed =
        resume.lastIndex >= 0 ? await this.streams.streamedTokens(jobId) : new Map<number, number[]>()
      if (resume.lastIndex >= 0)
        log.info(
          { lastIndex: resume.lastIndex },
          'resuming a retried job: known tokens are not streamed again',
        )
      // One grammar state per choice: each sequence walks its own document.
      const constraints: JsonConstraint[] = []
      const nextConstraint = payload.jsonOutput
        ? async () => {
            const c = await outputConstraint(this.runtime.engine, payload)
            if (c) constraints.push(c)
            return c
          }
        : undefined
      const entry: InFlight = { job, token, handBack: false }
      this.inFlight.set(jobId, entry)
      try {
        const choices = choiceCount(payload)
        const outcome =
          choices === 1 && payload.sampling.logprobs === undefined
            ? await this.generate(payload, ctx, promptIds, streamed, await nextConstraint?.())
            : await this.generateChoices(payload, ctx, prompts, streamed, nextConstraint)
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
        const done = doneEvent(ctx, r, 0, outcome.choices)
        this.streams.end(jobId, done)
        await this.streams.flush()
        if (payload.charge) void this.settle(payload, r.usage.promptTokens + r.usage.completionTokens)
        this.metrics.requests.inc({ pool: pool.name, outcome: r.finishReason })
        this.metrics.addExpertLoad(pool.name, r.expertLoad)
        this.telemetry?.finished(
          payload.tenantId,
          pool.name,
          r.finishReason,
          r.usage.promptTokens,
          r.expertLoad,
        )
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
        for (const c of constraints) c.dispose()
        this.inFlight.delete(jobId)
        this.#lastTokenAt.delete(jobId)
        this.streams.forget(jobId)
      }
    } catch (err) {
      if (err instanceof WaitingError || err instanceof UnrecoverableError) throw err
      const e = err instanceof JobError ? err : new JobError('internal_error', (err as Error).message, false)
      this.metrics.requests.inc({ pool: pool.name, outcome: e.code })
      const tenantId = (job.data as { tenantId?: unknown } | undefined)?.tenantId
      if (typeof tenantId === 'string') this.telemetry?.ended(tenantId, pool.name, e.code)
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

  /**
   * A tokenizer request (POST /tokenize, /detokenize): answered with the model's tokenizer and
   * pushed to the list the edge waits on. A malformed request is answered too, so the edge never
   * waits out its timeout.
   */
  private async tokenizeJob(job: Job): Promise<void> {
    const jobId = job.id ?? 'unknown'
    let result: TokenizeResult
    const parsed = TokenizeJobPayload.safeParse(job.data)
    if (!parsed.success) {
      result = {
        ok: false,
        code: 'invalid_request',
        message: `invalid tokenizer job: ${parsed.error.message}`,
      }
    } else if (parsed.data.deadline < Date.now()) {
      // Nobody waits for it any more.
      return
    } else {
      try {
        result = tokenizerAnswer(this.runtime.engine, parsed.data)
      } catch (e) {
        result = { ok: false, code: 'invalid_request', message: (e as Error).message }
      }
    }
    const key = tokenizeResultKey(jobId)
    await this.accounting
      .multi()
      .rpush(key, JSON.stringify(result))
      .expire(key, TOKENIZE_RESULT_TTL_SECONDS)
      .exec()
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
    streamed: Map<number, number[]>,
    constraint: JsonConstraint | undefined,
  ): Promise<SequenceOutcome & { choices?: ChoiceResult[] }> {
    const resumeIds = streamed.get(0) ?? []
    try {
      return this.submit(p, { id: p.requestId, promptIds, seed: ctx.seed, constraint, resumeIds }, (t) =>
        this.streamToken(p, ctx, t, resumeIds.length - 1),
      )
    } catch (e) {
      return Promise.reject(e instanceof SchedulerError ? new JobError(e.code, e.message) : e)
    }
  }

  /**
   * Several choices (n > 1, several prompts) or logprobs: one sequence per choice, each with its own
   * seed, all cancelled together under the job's id. Resolves when the last one leaves the batch.
   */
  private async generateChoices(
    p: JobPayload,
    ctx: JobContext,
    prompts: number[][],
    streamed: Map<number, number[]>,
    nextConstraint: (() => Promise<JsonConstraint | undefined>) | undefined,
  ): Promise<SequenceOutcome & { choices?: ChoiceResult[] }> {
    const n = p.sampling.n ?? 1
    const count = prompts.length * n
    const multi = count > 1
    const logprobs: SampledLogprob[][] = Array.from({ length: count }, () => [])
    const outcomes: Array<Promise<SequenceOutcome>> = []
    const tokenizer = this.runtime.engine.tokenizer
    const piece = (id: number, logprob: number) => ({ ...tokenizer.tokenPiece(id), logprob })
    try {
      for (let c = 0; c < count; c++) {
        const seq = {
          id: multi ? `${p.requestId}:${c}` : p.requestId,
          group: multi ? p.requestId : undefined,
          promptIds: prompts[Math.floor(c / n)]!,
          seed: choiceSeed(ctx.seed, c),
          constraint: await nextConstraint?.(),
          resumeIds: streamed.get(c) ?? [],
        }
        outcomes.push(
          this.submit(p, seq, (t) => {
            // The ending EOS has no logprobs entry.
            const entry = t.logprobs && {
              ...piece(t.tokenId, t.logprobs.logprob),
              top: t.logprobs.top.map((x) => piece(x.tokenId, x.logprob)),
            }
            if (entry) logprobs[c]!.push(entry)
            this.streamToken(p, ctx, t, seq.resumeIds.length - 1, multi ? c : undefined, entry)
          }),
        )
      }
    } catch (e) {
      this.runtime.scheduler.cancel(p.requestId)
      await Promise.all(outcomes)
      throw e instanceof SchedulerError ? new JobError(e.code, e.message) : e
    }
    const results = await Promise.all(outcomes)
    const failed = results.find((o) => o.kind === 'failed')
    if (failed) return failed
    const finished = results as Array<Exclude<SequenceOutcome, { kind: 'failed' }>>
    const choices: ChoiceResult[] = finished.map((o, c) => ({
      index: c,
      text: o.result.text,
      finishReason: o.result.finishReason,
      completionTokens: o.result.usage.completionTokens,
      ...(p.sampling.logprobs !== undefined ? { logprobs: logprobs[c]! } : {}),
    }))
    // Each prompt's tokens count once, however many choices it has (OpenAI's usage).
    const promptTokens = prompts.reduce((a, ids) => a + ids.length, 0)
    const result = combineResults(
      finished.map((o) => o.result),
      promptTokens,
    )
    // Choices are cancelled together: a job with any cancelled choice is a cancelled job (not cached).
    const cancelled = finished.some((o) => o.kind === 'cancelled')
    if (cancelled) result.finishReason = 'cancelled'
    return { kind: cancelled ? 'cancelled' : 'finished', result, choices }
  }

  /** Hands one sequence to the scheduler; resolves with its outcome. Throws SchedulerError. */
  private submit(
    p: JobPayload,
    seq: {
      id: string
      group?: string | undefined
      promptIds: number[]
      seed: number
      constraint?: JsonConstraint | undefined
      resumeIds?: number[]
    },
    onToken: (t: TokenOutput) => void,
  ): Promise<SequenceOutcome> {
    const s = p.sampling
    for (const id of Object.keys(s.logitBias ?? {}))
      if (Number(id) >= this.runtime.engine.config.vocab_size)
        throw new SchedulerError(
          'invalid_request',
          `logit_bias names token ${id}, but the model's vocabulary has ${this.runtime.engine.config.vocab_size} tokens`,
        )
    // Submitted synchronously, so a request the scheduler refuses throws here.
    let resolve!: (o: SequenceOutcome) => void
    const promise = new Promise<SequenceOutcome>((r) => {
      resolve = r
    })
    this.runtime.scheduler.submit({
      id: seq.id,
      ...(seq.group ? { group: seq.group } : {}),
      tenantId: p.tenantId,
      pool: this.pool.name,
      promptIds: seq.promptIds,
      ...(seq.constraint ? { constraint: seq.constraint } : {}),
      params: {
        maxTokens: s.maxTokens,
        temperature: s.temperature,
        topP: s.topP,
        topK: s.topK,
        seed: seq.seed,
        stop: s.stop,
        ignoreEos: s.ignoreEos ?? false,
        allowedExperts: this.pool.experts,
        presencePenalty: s.presencePenalty,
        frequencyPenalty: s.frequencyPenalty,
        repetitionPenalty: s.repetitionPenalty,
        minP: s.minP,
        logitBias: s.logitBias,
        ...(seq.resumeIds?.length ? { resumeIds: seq.resumeIds } : {}),
        logprobs: s.logprobs,
      },
      onToken: (t) => onToken(t),
      onFinish: resolve,
    })
    return promise
  }

  /** Metrics for one token, and its stream event unless a retried job's stream already holds it. */
  private streamToken(
    p: JobPayload,
    ctx: JobContext,
    t: TokenOutput,
    lastIndex: number,
    choice?: number,
    logprobs?: SampledLogprob,
  ): void {
    const labels = { pool: this.pool.name }
    const now = performance.now()
    const last = this.#lastTokenAt.get(p.requestId)
    if (t.index === 0 && !choice) {
      const ttft = (Date.now() - ctx.takenAt) / 1000
      this.metrics.timeToFirstToken.observe(labels, ttft)
      this.telemetry?.firstToken(p.tenantId, labels.pool, ttft)
    } else if (last !== undefined) {
      this.metrics.interTokenLatency.observe(labels, (now - last) / 1000)
      this.telemetry?.interToken(p.tenantId, labels.pool, (now - last) / 1000)
    }
    this.#lastTokenAt.set(p.requestId, now)
    this.metrics.generatedTokens.inc(labels)
    this.telemetry?.generated(p.tenantId, labels.pool)
    if (p.streamTokens && t.index > lastIndex)
      this.streams.token(p.requestId, {
        type: 'token',
        index: t.index,
        text: t.text,
        tokenId: t.tokenId,
        ...(choice !== undefined ? { choice } : {}),
        ...(logprobs ? { logprobs } : {}),
      })
  }
}

/** One result for a job's choices: choice 0's text, usage and timings over all of them. */
function combineResults(results: GenerationResult[], promptTokens: number): GenerationResult {
  const first = results[0]!
  const completionTokens = results.reduce((a, r) => a + r.usage.completionTokens, 0)
  const totalMs = Math.max(...results.map((r) => r.timings.totalMs))
  const expertLoad = first.expertLoad.map((layer, l) =>
    layer.map((_, e) => results.reduce((a, r) => a + (r.expertLoad[l]?.[e] ?? 0), 0)),
  )
  return {
    ...first,
    usage: { promptTokens, completionTokens },
    timings: {
      timeToFirstTokenMs: Math.min(...results.map((r) => r.timings.timeToFirstTokenMs)),
      totalMs,
      tokensPerSecond: totalMs > 0 ? (completionTokens * 1000) / totalMs : 0,
      decodeTokensPerSecond: results.reduce((a, r) => a + r.timings.decodeTokensPerSecond, 0),
    },
    expertLoad,
  }
}

/** The prompt of each choice group: one, or one per prompt of a `prompts` input. */
function tokenizePrompts(engine: StepEngine, p: JobPayload): number[][] {
  if (p.input.kind !== 'prompts') return [tokenize(engine, p)]
  return p.input.prompts.map((prompt) =>
    typeof prompt === 'string' ? engine.tokenizer.encodePrompt(prompt) : prompt,
  )
}

function tokenize(engine: StepEngine, p: JobPayload): number[] {
  switch (p.input.kind) {
    case 'prompts':
      return tokenizePrompts(engine, p)[0]!
    case 'chat':
      return encodeToolChat(engine.tokenizer, p.input.messages, p.tools)
    case 'text':
      return engine.tokenizer.encodePrompt(p.input.prompt)
    case 'tokens':
      return p.input.inputIds
  }
}

/** What a tokenizer job asks of the model's tokenizer (vLLM's /tokenize and /detokenize). */
function tokenizerAnswer(engine: StepEngine, p: TokenizeJobPayload): TokenizeResult {
  const tokenizer = engine.tokenizer
  const base = { ok: true as const, maxModelLen: engine.maxContext }
  const r = p.request
  switch (r.op) {
    case 'tokenize':
      return {
        ...base,
        tokens: r.addSpecialTokens ? tokenizer.encodePrompt(r.prompt) : tokenizer.encode(r.prompt),
      }
    case 'tokenize_chat': {
      // The prompt a chat job would get (same template, same handling of user-written specials).
      const chat = toolChat(tokenizer, r.messages, undefined)
      return {
        ...base,
        tokens: tokenizer.encodeChat(chat.messages, {
          ...chat.options,
          addGenerationPrompt: r.addGenerationPrompt,
        }),
      }
    }
    case 'detokenize': {
      const vocab = engine.config.vocab_size
      const bad = r.tokens.find((id) => id >= vocab)
      if (bad !== undefined)
        throw new Error(`token ${bad} is not in the model's vocabulary of ${vocab} tokens`)
      return { ...base, prompt: tokenizer.decode(r.tokens) }
    }
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
