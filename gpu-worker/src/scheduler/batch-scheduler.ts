import {
  type GenerationResult,
  type StepEngine,
  type StepOutput,
  type StepRow,
  sequenceResult,
} from '../engine/engine.ts'
import type { GenerationParams, Sequence, TokenConstraint, TokenOutput } from '../engine/sequence.ts'
import { FairQueue } from './fair-queue.ts'
import { PrefixCache } from './prefix-cache.ts'

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
  /** mixed: the decode rows and a prompt chunk (or whole short prompts) in one pass. */
  kind: 'prefill' | 'decode' | 'mixed'
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
  /**
   * As each sequence is admitted: its prompt tokens, and how many of them it did not have to
   * prefill (found in the prefix cache, or shared with an identical prompt admitted with it).
   */
  prefixLookup?(queried: number, hit: number): void
}

export interface SchedulerOptions {
  /** Most sequences in the running batch (at most the engine's KV slots). */
  maxBatch?: number
  /** Most padded tokens (rows x longest prompt) in one prefill pass. */
  maxPrefillTokens?: number
  /**
   * Most prompt tokens in one pass while other sequences are decoding: a longer prompt is
   * prefilled in chunks of this size, each followed by a decode step of the running batch (or,
   * with mixedPrefill, run in the same pass as that decode step).
   */
  prefillChunkTokens?: number
  /**
   * Runs each chunk in the decode rows' pass, vLLM-style: the pass takes at most
   * prefillChunkTokens tokens, decode rows first, the chunk at least half of them. Off by default:
   * rows are padded to the longest, so each decode row attends with the chunk's length of queries
   * over the whole cache, and on the CPU a mixed pass costs more than a decode step and a chunk
   * pass apart (bench-results/prefix-cpu.md).
   */
  mixedPrefill?: boolean
  /** Prompt positions whose KV is kept for reuse by later prompts with the same prefix; 0 = off. */
  prefixCacheTokens?: number
  hooks?: SchedulerHooks
}

interface Entry {
  request: ScheduledRequest
  seq: Sequence
  tenantId: string
  /** Prefix-cache namespace: the KV of a prompt depends on the experts it may use. */
  namespace: string
  /** Sequences admitted with the identical prompt: they take this one's KV and logits. */
  followers: Entry[]
  /** The sequence whose prompt KV this one takes, while that one prefills. */
  leader: Entry | null
}

/**
 * What one step runs: a prefill of admitted prompts (or a chunk of one), a decode of every
 * sequence past its prompt, or both in one pass (the decode rows first).
 */
export interface StepPlan {
  kind: StepStats['kind']
  entries: Entry[]
  rows: StepRow[]
  /** The leading rows that decode; the rest prefill. */
  decodeRows: number
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
 *
 * Running sequences sit in KV slots 0..n-1: first those decoding, then those
 * still prefilling (admitted together, prefilled front first). While others
 * decode, a long prompt is prefilled in chunks of prefillChunkTokens, one
 * chunk between two decode steps (or, with mixedPrefill, each in the same
 * pass as a decode step). On admission a prompt takes the longest
 * prefix the prefix cache holds and prefills only the rest; identical
 * prompts admitted together are prefilled once.
 */
export class BatchScheduler {
  readonly engine: StepEngine
  readonly maxBatch: number
  readonly maxPrefillTokens: number
  readonly prefillChunkTokens: number
  readonly mixedPrefill: boolean
  readonly prefixCache: PrefixCache | null
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
  /** Running sequences past their prompt: they occupy slots 0..decoding-1. */
  private decoding = 0
  /** What the engine was last told to keep (engine.reserve). */
  private reserved = { slots: 0, length: 0 }

  constructor(engine: StepEngine, opts: SchedulerOptions = {}) {
    this.engine = engine
    this.maxBatch = opts.maxBatch ?? engine.maxBatch
    this.maxPrefillTokens = opts.maxPrefillTokens ?? 4096
    this.prefillChunkTokens = opts.prefillChunkTokens ?? 32
    this.mixedPrefill = opts.mixedPrefill ?? false
    const cacheTokens = opts.prefixCacheTokens ?? 0
    this.prefixCache = cacheTokens > 0 ? new PrefixCache(engine, cacheTokens) : null
    this.hooks = opts.hooks ?? {}
    if (this.maxBatch < 1 || this.maxBatch > engine.maxBatch)
      throw new Error(
        `maxBatch ${this.maxBatch} must be between 1 and the engine's ${engine.maxBatch} KV slots`,
      )
    if (this.maxPrefillTokens < 1) throw new Error('maxPrefillTokens must be positive')
    if (!Number.isInteger(this.prefillChunkTokens) || this.prefillChunkTokens < 1)
      throw new Error('prefillChunkTokens must be a positive integer')
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
    const namespace = params.allowedExperts === null ? '*' : [...params.allowedExperts].sort().join(',')
    this.waitingQueue.push({
      request,
      seq,
      tenantId: request.tenantId,
      namespace,
      followers: [],
      leader: null,
    })
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
    // Requests submitted in the same tick are admitted together (e.g. the n sequences of one request).
    await Promise.resolve()
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
        this.reserveLive()
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
   * The next step: a prefill of admitted sequences when one is due, else a decode of every
   * sequence past its prompt; null when there is nothing to run.
   */
  private schedule(): StepPlan | null {
    if (this.runningList.length === 0 && this.waitingQueue.size === 0) return null
    // New sequences are admitted once the last admitted ones have finished prefilling.
    if (this.decoding === this.runningList.length && this.prefillDue()) this.admit()
    const prefilling = this.runningList.length > this.decoding
    const kind =
      prefilling && this.decoding > 0 && this.mixedPrefill
        ? 'mixed'
        : prefilling && (this.decoding === 0 || !this.lastWasPrefill)
          ? 'prefill'
          : 'decode'
    this.lastWasPrefill = kind === 'prefill'
    this.stepsWaited = kind !== 'prefill' && this.waitingQueue.size > 0 ? this.stepsWaited + 1 : 0
    if (kind === 'prefill') return this.prefillPlan(this.prefillBudget())
    const entries = this.runningList.slice(0, this.decoding)
    const rows = entries.map((e) => ({
      slot: e.seq.slot,
      tokens: e.seq.nextInput(),
      pastLength: e.seq.pastLength,
      allowedExperts: e.seq.params.allowedExperts,
    }))
    if (kind === 'decode') return { kind, entries, rows, decodeRows: rows.length }
    // The decode rows sit in the slots just before the prefilling ones, so one pass takes both.
    const budget = this.prefillBudget()
    const chunk = this.prefillPlan(Math.max(budget - rows.length, Math.ceil(budget / 2)))
    return {
      kind,
      entries: [...entries, ...chunk.entries],
      rows: [...rows, ...chunk.rows],
      decodeRows: rows.length,
    }
  }

  /** Prompt tokens one pass may take: the chunk size while others decode, so they wait at most one chunk. */
  private prefillBudget(): number {
    return this.decoding > 0
      ? Math.min(this.prefillChunkTokens, this.maxPrefillTokens)
      : this.maxPrefillTokens
  }

  /**
   * A pass over the prefilling sequences from the front: as many whole prompts as the budget
   * holds when they start from an empty cache (right-padded rows), else the next chunk of the
   * front one.
   */
  private prefillPlan(budget: number): StepPlan {
    const left = (e: Entry) => e.seq.promptIds.length - e.seq.pastLength
    const front = this.runningList[this.decoding]!
    const entries = [front]
    if (front.seq.pastLength === 0 && left(front) <= budget) {
      let longest = left(front)
      // Rows after a sequence with followers would not be contiguous: its followers sit between.
      for (let i = this.decoding + 1; i < this.runningList.length; i++) {
        const prev = entries[entries.length - 1]!
        const next = this.runningList[i]!
        if (prev.followers.length > 0 || next.leader || next.seq.pastLength > 0) break
        const len = left(next)
        if ((entries.length + 1) * Math.max(longest, len) > budget) break
        longest = Math.max(longest, len)
        entries.push(next)
      }
    }
    const rows = entries.map((e) => ({
      slot: e.seq.slot,
      tokens: e.seq.promptIds.slice(e.seq.pastLength, e.seq.pastLength + Math.min(left(e), budget)),
      pastLength: e.seq.pastLength,
      allowedExperts: e.seq.params.allowedExperts,
    }))
    return { kind: 'prefill', entries, rows, decodeRows: 0 }
  }

  /**
   * Tells the engine which slots hold live KV beyond this pass's rows (sequences still prefilling),
   * and how long they will grow: the whole prompt, so the cache is re-laid once as a long prompt is
   * admitted, not at every few chunks (each re-layout copies every live slot and stalls every stream).
   */
  private reserveLive(): void {
    let length = 0
    for (let i = this.decoding; i < this.runningList.length; i++)
      length = Math.max(length, this.runningList[i]!.seq.promptIds.length)
    // Followers' slots too: their leader's KV is copied there after its last pass.
    const slots = this.runningList.length > this.decoding ? this.runningList.length : 0
    if (slots === this.reserved.slots && length === this.reserved.length) return
    this.reserved = { slots, length }
    this.engine.reserve(slots, length)
  }

  /** Takes each row's token from the step's logits: what the step did to each sequence. */
  private update(plan: StepPlan, out: StepOutput): SequenceOutput[] {
    const V = this.engine.config.vocab_size
    const outputs: SequenceOutput[] = []
    plan.entries.forEach((entry, i) => {
      const row = plan.rows[i]!
      const seq = entry.seq
      let joined = false
      const prefilling = i >= plan.decodeRows
      try {
        if (prefilling && row.pastLength + row.tokens.length < seq.promptIds.length) {
          this.engine.acceptChunk(seq, row, out, i)
          return
        }
        // Followers sample from the same logits, which sampling may change in place.
        const logits = entry.followers.length > 0 ? out.logits.slice(i * V, (i + 1) * V) : null
        const token = this.engine.acceptRow(seq, row, out, i)
        outputs.push({ entry, kind: 'token', token, finished: seq.finished })
        if (!prefilling) return
        this.decoding++
        joined = true
        this.prefixCache?.store(entry.namespace, seq.promptIds, seq.slot)
        for (const f of entry.followers) {
          this.engine.moveSlot(seq.slot, f.seq.slot, seq.promptIds.length)
          f.leader = null
          f.seq.pastLength = seq.promptIds.length
          this.decoding++
          try {
            const t = f.seq.accept(logits!.slice(), 0)
            outputs.push({ entry: f, kind: 'token', token: t, finished: f.seq.finished })
          } catch (error) {
            outputs.push({ entry: f, kind: 'failed', error: error as Error })
          }
        }
        entry.followers = []
      } catch (error) {
        // One row's failure (e.g. logits it cannot sample from) ends that sequence only.
        // Past its prompt, it sits among the decoding slots until it leaves.
        if (prefilling && !joined && seq.pastLength >= seq.promptIds.length) this.decoding++
        outputs.push({ entry, kind: 'failed', error: error as Error })
      }
    })
    return outputs
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

  /**
   * Takes waiting sequences (tenant round-robin) into free slots, within the prefill token
   * budget. Each takes the longest cached prefix of its prompt (its KV copied into the slot);
   * a prompt identical to one admitted with it follows that one instead of being prefilled.
   */
  private admit(): void {
    const admitted: Entry[] = []
    const leaders = new Map<string, Entry>()
    const hits = new Map<Entry, { key: number; length: number }>()
    let rows = 0
    let longest = 0
    while (this.runningList.length + admitted.length < this.maxBatch && this.waitingQueue.size > 0) {
      const next = this.waitingQueue.peek()!
      const prompt = next.seq.promptIds
      const same = `${next.namespace}|${prompt.join(',')}`
      const leader = leaders.get(same)
      if (!leader) {
        const hit = this.prefixCache?.lookup(next.namespace, prompt, prompt.length - 1) ?? null
        const len = prompt.length - (hit?.length ?? 0)
        // Padded rows cost like the longest one; the first admission is always allowed.
        if (rows > 0 && (rows + 1) * Math.max(longest, len) > this.maxPrefillTokens) break
        rows++
        longest = Math.max(longest, len)
        leaders.set(same, next)
        if (hit) hits.set(next, hit)
      } else {
        next.leader = leader
        leader.followers.push(next)
      }
      this.waitingQueue.shift()
      admitted.push(next)
    }
    // Followers sit right after their leader, so they join the decoding slots together.
    const order = admitted.filter((e) => !e.leader).flatMap((e) => [e, ...e.followers])
    for (const e of order) {
      e.seq.slot = this.runningList.length
      this.runningList.push(e)
    }
    let loadLength = 0
    for (const h of hits.values()) loadLength = Math.max(loadLength, h.length)
    if (loadLength > 0) {
      this.reserved = { slots: this.runningList.length, length: loadLength }
      this.engine.reserve(this.reserved.slots, loadLength)
    }
    for (const e of order) {
      const hit = hits.get(e)
      if (hit) {
        this.engine.loadPrefix(hit.key, e.seq.slot, hit.length)
        e.seq.pastLength = hit.length
      }
      const saved = e.leader ? e.seq.promptIds.length : (hit?.length ?? 0)
      this.hooks.prefixLookup?.(e.seq.promptIds.length, saved)
    }
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

  /**
   * Removes a running sequence. A decoding one's slot takes the last decoding sequence, and the
   * prefilling ones each move down a slot, so the live slots stay contiguous in their order.
   */
  private leave(e: Entry, outcome: SequenceOutcome): void {
    const i = this.runningList.indexOf(e)
    if (i >= 0) {
      if (outcome.kind !== 'failed' && !e.leader && e.seq.pastLength > 0) {
        // Its prompt and the tokens it generated so far: the start of a conversation's next turn.
        const held = [...e.seq.promptIds, ...e.seq.outputIds].slice(0, e.seq.pastLength)
        this.prefixCache?.store(e.namespace, held, e.seq.slot)
      }
      this.handOverFollowers(e)
      if (e.leader) e.leader.followers = e.leader.followers.filter((f) => f !== e)
      const order = [...this.runningList]
      if (i < this.decoding) {
        order[i] = order[this.decoding - 1]!
        order.splice(this.decoding - 1, 1)
        this.decoding--
      } else order.splice(i, 1)
      this.runningList.length = 0
      order.forEach((x, slot) => {
        if (x.seq.slot !== slot && x.seq.pastLength > 0)
          this.engine.moveSlot(x.seq.slot, slot, x.seq.pastLength)
        x.seq.slot = slot
        this.runningList.push(x)
      })
    }
    this.known.delete(e.request.id)
    e.request.onFinish(outcome)
  }

  /** A leader leaving before its prompt is prefilled: its first follower takes over, with what is cached. */
  private handOverFollowers(e: Entry): void {
    const [heir, ...rest] = e.followers
    if (!heir) return
    e.followers = []
    const keep = Math.min(e.seq.pastLength, heir.seq.promptIds.length - 1)
    if (keep > 0) this.engine.moveSlot(e.seq.slot, heir.seq.slot, keep)
    heir.seq.pastLength = keep
    heir.leader = null
    heir.followers = rest
    for (const f of rest) f.leader = heir
  }
}
