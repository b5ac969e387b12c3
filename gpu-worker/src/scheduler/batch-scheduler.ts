import {
  type GenerationResult,
  type StepEngine,
  type StepOutput,
  type StepRow,
  sequenceResult,
} from '../engine/engine.ts'
import type { GenerationParams, Sequence, TokenConstraint, TokenOutput } from '../engine/sequence.ts'
import { FairQueue } from './fair-queue.ts'

/** A request the scheduler batches: prompt ids, sampling, and where its tokens go. */
export interface ScheduledRequest {
  id: string
  /** The job this sequence is one choice of (n > 1): cancelling the group cancels each of them. */
  group?: string
  tenantId: string
  pool: string
  promptIds: readonly number[]
  params: GenerationParams
  /** Restricts the tokens sampled (structured output, tool calls). */
  constraint?: TokenConstraint
  /** Each token, right after the step that produced it. */
  onToken(token: TokenOutput): void
  /** Once, when the sequence leaves the batch. */
  onFinish(outcome: SequenceOutcome): void
}

export type SequenceOutcome =
  | { kind: 'finished'; result: GenerationResult }
  | { kind: 'cancelled'; result: GenerationResult }
  | { kind: 'failed'; error: Error }

export interface StepStats {
  kind: 'prefill' | 'decode'
  rows: number
  tokens: number
  runMs: number
  stepMs: number
}

export interface SchedulerHooks {
  /**
   * Asked as each step starts, with the running and waiting ids; answers the ids to
   * cancel (e.g. those whose cancel key is set). The answer is awaited after
   * the forward pass, so its round trip overlaps the compute, and applied at
   * the next step boundary.
   */
  pollCancels?(ids: string[]): Promise<string[]>
  /** After each step's tokens were handed out, e.g. to send one pipelined write of them. */
  afterStep?(stats: StepStats): void
}

export interface SchedulerOptions {
  /** Most sequences in the running batch (at most the engine's KV slots). */
  maxBatch?: number
  /** Most padded tokens (rows x longest prompt) in one prefill pass. */
  maxPrefillTokens?: number
  hooks?: SchedulerHooks
}

interface Entry {
  request: ScheduledRequest
  seq: Sequence
  tenantId: string
}

/** What one step runs: a prefill of newly admitted sequences, or a decode of every running one. */
export interface StepPlan {
  kind: 'prefill' | 'decode'
  entries: Entry[]
  rows: StepRow[]
}

/** What one step did to one sequence: a token (and whether it ended the sequence), or a failure. */
export type SequenceOutput =
  | { entry: Entry; kind: 'token'; token: TokenOutput; finished: boolean }
  | { entry: Entry; kind: 'failed'; error: Error }

/** A waiting request joins the batch after at most this many decode steps. */
const MAX_PREFILL_DELAY_STEPS = 4

export class SchedulerError extends Error {
  readonly code: 'context_length_exceeded' | 'invalid_request'
  constructor(code: SchedulerError['code'], message: string) {
    super(message)
    this.name = 'SchedulerError'
    this.code = code
  }
}

/**
 * Continuous batching over one engine. One step is one forward pass: either a
 * prefill of newly admitted sequences or a decode of every running one. New
 * requests join at step boundaries, finished ones leave at once (their KV
 * slot is refilled by the last running sequence, so slots stay contiguous),
 * and cancellations are applied between steps, never inside one. After a
 * prefill the next step is always a decode, so a stream of arrivals cannot
 * stall the sequences already running.
 */
export class BatchScheduler {
  readonly engine: StepEngine
  readonly maxBatch: number
  readonly maxPrefillTokens: number
  private readonly hooks: SchedulerHooks
  private readonly waitingQueue = new FairQueue<Entry>()
  /** Running sequences; index = KV slot. */
  private readonly runningList: Entry[] = []
  private readonly pendingCancels = new Set<string>()
  /** Ids running or waiting here. */
  private readonly known = new Set<string>()
  private loop: Promise<void> | null = null
  private lastWasPrefill = false
  /** Decode steps since the oldest waiting request arrived. */
  private stepsWaited = 0

  constructor(engine: StepEngine, opts: SchedulerOptions = {}) {
    this.engine = engine
    this.maxBatch = opts.maxBatch ?? engine.maxBatch
    this.maxPrefillTokens = opts.maxPrefillTokens ?? 4096
    this.hooks = opts.hooks ?? {}
    if (this.maxBatch < 1 || this.maxBatch > engine.maxBatch)
      throw new Error(
        `maxBatch ${this.maxBatch} must be between 1 and the engine's ${engine.maxBatch} KV slots`,
      )
    if (this.maxPrefillTokens < 1) throw new Error('maxPrefillTokens must be positive')
  }

  get running(): number {
    return this.runningList.length
  }

  get waiting(): number {
    return this.waitingQueue.size
  }

  /** Queues a request; throws SchedulerError if it can never fit. */
  submit(request: ScheduledRequest): void {
    const { promptIds, params } = request
    if (promptIds.length === 0) throw new SchedulerError('invalid_request', 'the prompt is empty')
    const limit = this.engine.maxContext
    if (promptIds.length + params.maxTokens > limit)
      throw new SchedulerError(
        'context_length_exceeded',
        `prompt (${promptIds.length} tokens) plus max_tokens (${params.maxTokens}) exceeds the context limit of ${limit} tokens`,
      )
    const vocab = this.engine.config.vocab_size
    if (promptIds.some((id) => !Number.isInteger(id) || id < 0 || id >= vocab))
      throw new SchedulerError('invalid_request', `prompt token ids must be integers in [0, ${vocab})`)
    try {
      this.engine.validateExperts(params.allowedExperts)
    } catch (e) {
      throw new SchedulerError('invalid_request', (e as Error).message)
    }
    const seq = this.engine.createSequence(request.id, promptIds, params, request.constraint)
    this.known.add(request.id)
    this.waitingQueue.push({ request, seq, tenantId: request.tenantId })
    this.ensureLoop()
  }

  private ensureLoop(): void {
    this.loop ??= this.runLoop()
      .catch((error: Error) => {
        // Whatever broke the loop, no request may be left waiting on it.
        for (const e of [...this.runningList].reverse()) this.leave(e, { kind: 'failed', error })
        for (const e of this.waitingQueue.remove(() => true)) {
          this.known.delete(e.request.id)
          e.request.onFinish({ kind: 'failed', error })
        }
      })
      .finally(() => {
        this.loop = null
        // A submit that came while the loop was winding down found it still set: run again.
        if (this.waitingQueue.size > 0 || this.runningList.length > 0) this.ensureLoop()
      })
  }

  /** Asks for a sequence to leave; applied at the next step boundary. Unknown ids are ignored. */
  cancel(id: string): void {
    if (this.known.has(id) || this.entries().some((e) => e.request.group === id)) this.pendingCancels.add(id)
  }

  private entries(): Entry[] {
    return [...this.runningList, ...this.waitingQueue]
  }

  /** Resolves when nothing is running or waiting. */
  async idle(): Promise<void> {
    while (this.loop) await this.loop
  }

  private async runLoop(): Promise<void> {
    while (this.runningList.length > 0 || this.waitingQueue.size > 0) {
      this.applyCancels()
      const plan = this.schedule()
      if (!plan) break
      // Waiting requests too: a cancel whose publish was missed must not wait for admission.
      const poll = this.hooks.pollCancels?.([
        ...new Set(this.entries().map((e) => e.request.group ?? e.request.id)),
      ])
      let outputs: SequenceOutput[]
      try {
        const out = await this.engine.forward(plan.rows)
        outputs = this.update(plan, out)
        for (const o of outputs) if (o.kind === 'token') o.entry.request.onToken(o.token)
        this.hooks.afterStep?.({
          kind: plan.kind,
          rows: plan.rows.length,
          tokens: plan.rows.reduce((a, r) => a + r.tokens.length, 0),
          runMs: out.runMs,
          stepMs: out.stepMs,
        })
      } catch (error) {
        for (const e of [...plan.entries]) this.leave(e, { kind: 'failed', error: error as Error })
        continue
      } finally {
        for (const id of (await poll?.catch(() => [])) ?? []) this.cancel(id)
      }
      for (const o of outputs) {
        if (o.kind === 'failed') this.leave(o.entry, { kind: 'failed', error: o.error })
        else if (o.finished && this.known.has(o.entry.request.id))
          this.leave(o.entry, {
            kind: 'finished',
            result: sequenceResult(o.entry.seq, this.engine.config.num_local_experts),
          })
      }
    }
  }

  /**
   * The next step: a prefill of waiting sequences admitted into free slots when one is due,
   * else a decode of every running sequence; null when there is nothing to run.
   */
  private schedule(): StepPlan | null {
    if (this.runningList.length === 0 && this.waitingQueue.size === 0) return null
    const admitted = this.prefillDue() ? this.admit() : []
    const kind = admitted.length > 0 ? 'prefill' : 'decode'
    const entries = kind === 'prefill' ? admitted : [...this.runningList]
    this.lastWasPrefill = kind === 'prefill'
    this.stepsWaited = kind === 'decode' && this.waitingQueue.size > 0 ? this.stepsWaited + 1 : 0
    const rows = entries.map((e) => ({
      slot: e.seq.slot,
      tokens: e.seq.nextInput(),
      pastLength: e.seq.pastLength,
      allowedExperts: e.seq.params.allowedExperts,
    }))
    return { kind, entries, rows }
  }

  /** Takes each row's token from the step's logits: what the step did to each sequence. */
  private update(plan: StepPlan, out: StepOutput): SequenceOutput[] {
    return plan.entries.map((entry, i): SequenceOutput => {
      try {
        const token = this.engine.acceptRow(entry.seq, plan.rows[i]!, out, i)
        return { entry, kind: 'token', token, finished: entry.seq.finished }
      } catch (error) {
        // One row's failure (e.g. logits it cannot sample from) ends that sequence only.
        return { entry, kind: 'failed', error: error as Error }
      }
    })
  }

  /**
   * Whether this step should prefill the waiting sequences. A prefill pass
   * reads (nearly) every expert's weights whatever its row count, so while a
   * batch is decoding, arrivals are gathered until they are worth a pass: at
   * least half the running batch, or waiting for MAX_PREFILL_DELAY_STEPS
   * decode steps - and never two prefills in a row while sequences wait to decode.
   */
  private prefillDue(): boolean {
    const waiting = this.waitingQueue.size
    const running = this.runningList.length
    if (waiting === 0 || running >= this.maxBatch) return false
    if (running === 0) return true
    if (this.lastWasPrefill) return false
    return waiting * 2 >= running || this.stepsWaited >= MAX_PREFILL_DELAY_STEPS
  }

  /** Takes waiting sequences (tenant round-robin) into free slots, within the prefill token budget. */
  private admit(): Entry[] {
    const admitted: Entry[] = []
    let longest = 0
    while (this.runningList.length < this.maxBatch && this.waitingQueue.size > 0) {
      const len = this.waitingQueue.peek()!.seq.promptIds.length
      // Padded rows cost like the longest one; the first admission is always allowed.
      if (admitted.length > 0 && (admitted.length + 1) * Math.max(longest, len) > this.maxPrefillTokens) break
      const next = this.waitingQueue.shift()!
      longest = Math.max(longest, len)
      next.seq.slot = this.runningList.length
      this.runningList.push(next)
      admitted.push(next)
    }
    return admitted
  }

  private applyCancels(): void {
    if (this.pendingCancels.size === 0) return
    const cancelled = (e: Entry) =>
      this.pendingCancels.has(e.request.id) ||
      (e.request.group !== undefined && this.pendingCancels.has(e.request.group))
    for (const e of this.waitingQueue.remove(cancelled)) this.finishCancelled(e)
    for (const e of this.runningList.filter(cancelled)) {
      this.leave(e, { kind: 'cancelled', result: this.cancelledResult(e) })
    }
    this.pendingCancels.clear()
  }

  private cancelledResult(e: Entry): GenerationResult {
    return { ...sequenceResult(e.seq, this.engine.config.num_local_experts), finishReason: 'cancelled' }
  }

  private finishCancelled(e: Entry): void {
    this.known.delete(e.request.id)
    e.request.onFinish({ kind: 'cancelled', result: this.cancelledResult(e) })
  }

  /** Removes a running sequence; the last running one moves into its KV slot. */
  private leave(e: Entry, outcome: SequenceOutcome): void {
    const slot = e.seq.slot
    const last = this.runningList[this.runningList.length - 1]!
    if (this.runningList[slot] === e) {
      if (last !== e) {
        if (last.seq.pastLength > 0) this.engine.moveSlot(last.seq.slot, slot, last.seq.pastLength)
        last.seq.slot = slot
        this.runningList[slot] = last
      }
      this.runningList.pop()
    }
    this.known.delete(e.request.id)
    e.request.onFinish(outcome)
  }
}
