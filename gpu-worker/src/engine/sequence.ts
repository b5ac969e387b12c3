import { IncrementalDetokenizer, StopMatcher, type TokenDecoder } from './detokenizer.ts'
import { type LogitsProcessingParams, LogitsProcessor } from './logits-processor.ts'
import { Sampler, StepLogprobs, type TokenLogprobValue } from './sampling.ts'

export type FinishReason = 'stop' | 'length'

export interface GenerationParams extends LogitsProcessingParams {
  maxTokens: number
  temperature: number
  topP: number
  topK: number
  seed: number
  stop: readonly string[]
  /** Experts this sequence may route to (its pool's subset); null = all. */
  allowedExperts: readonly number[] | null
  /** Keep generating past EOS (vLLM's ignore_eos): for benchmarks that need fixed lengths. */
  ignoreEos?: boolean
  /**
   * Tokens an earlier attempt of this job already streamed: taken in order instead of the sampled
   * ones (each still spends its seeded draw), so a retried job continues the text its client has.
   */
  resumeIds?: readonly number[]
  /** Drop tokens less likely than minP times the most likely one (0 = off). */
  minP?: number
  /** Report each token's log-probability with this many most likely alternatives (absent = none). */
  logprobs?: number
}

/**
 * Restricts which tokens may come next (structured output, tool-call arguments). The sequence asks
 * it to mask each step's logits before sampling, then tells it which token was sampled.
 */
export interface TokenConstraint {
  /** Sets the logits of tokens that cannot come next to -Infinity, in place. */
  mask(logits: Float32Array): void
  /** Moves past a sampled token. */
  advance(tokenId: number): void
}

export interface TokenOutput {
  index: number
  tokenId: number
  /** Text this token completes (may be empty while a character or stop string is pending). */
  text: string
  /** When asked for (params.logprobs), and the token is not the EOS that ends the sequence. */
  logprobs?: { logprob: number; top: TokenLogprobValue[] }
}

/**
 * One request's decoding state: its tokens, sampler, detokeniser and stop
 * matcher, and what it has cost. The engine's step API fills its KV slot;
 * generate() and the scheduler both drive sequences through it.
 */
export class Sequence {
  readonly id: string
  readonly promptIds: readonly number[]
  readonly params: GenerationParams
  readonly outputIds: number[] = []
  /** Tokens already in this sequence's KV slot. */
  pastLength = 0
  /** KV slot, assigned by whoever batches the sequence. */
  slot = -1
  finishReason: FinishReason | null = null
  text = ''
  /** expertLoad[layer * experts + expert] = tokens routed there. */
  readonly expertLoad: Uint32Array
  readonly startedAt = performance.now()
  firstTokenAt: number | null = null
  finishedAt: number | null = null
  private readonly sampler: Sampler
  private readonly detokenizer: IncrementalDetokenizer
  private readonly stopMatcher: StopMatcher
  private readonly isEos: (id: number) => boolean
  private readonly maxContext: number
  private readonly constraint: TokenConstraint | null
  private readonly processor: LogitsProcessor | null

  constructor(opts: {
    id: string
    promptIds: readonly number[]
    params: GenerationParams
    tokenizer: TokenDecoder & { isEos(id: number): boolean }
    layers: number
    experts: number
    maxContext: number
    constraint?: TokenConstraint
  }) {
    if (opts.promptIds.length === 0) throw new Error('a sequence needs at least one prompt token')
    this.id = opts.id
    this.promptIds = opts.promptIds
    this.params = opts.params
    this.maxContext = opts.maxContext
    this.sampler = new Sampler(opts.params)
    this.detokenizer = new IncrementalDetokenizer(opts.tokenizer)
    this.stopMatcher = new StopMatcher([...opts.params.stop])
    this.isEos = (id) => opts.tokenizer.isEos(id)
    this.expertLoad = new Uint32Array(opts.layers * opts.experts)
    this.constraint = opts.constraint ?? null
    this.processor = LogitsProcessor.create(opts.params, opts.promptIds)
  }

  get finished(): boolean {
    return this.finishReason !== null
  }

  /** The tokens the next forward pass feeds: the prompt first, then the last sampled token. */
  nextInput(): number[] {
    return this.pastLength === 0 ? [...this.promptIds] : [this.outputIds[this.outputIds.length - 1]!]
  }

  /**
   * Takes the logits of this sequence's last position after a forward pass
   * that consumed nextInput(); samples one token and applies stop rules.
   */
  accept(logits: Float32Array, consumed: number): TokenOutput {
    this.pastLength += consumed
    // Penalties and biases first, then the constraint's mask: logprobs describe what is sampled from.
    this.processor?.apply(logits)
    this.constraint?.mask(logits)
    const step =
      this.params.logprobs === undefined
        ? null
        : new StepLogprobs(logits, this.params.temperature, this.params.logprobs)
    const sampled = this.sampler.sample(logits)
    const tokenId = this.params.resumeIds?.[this.outputIds.length] ?? sampled
    this.processor?.accept(tokenId)
    this.constraint?.advance(tokenId)
    // Truncation (top-k, top-p, min-p) never touches the sampled token's logit.
    const logprobs = step ? { logprob: step.of(logits[tokenId]!), top: step.top } : undefined
    const index = this.outputIds.length
    this.outputIds.push(tokenId)
    this.firstTokenAt ??= performance.now()
    if (this.isEos(tokenId) && !this.params.ignoreEos) {
      // The EOS that ends the sequence is no part of the answer: no text, no logprobs entry.
      const text = this.drain()
      this.finish('stop')
      this.text += text
      return { index, tokenId, text }
    }
    const { emit, stopped } = this.stopMatcher.push(this.detokenizer.push(tokenId))
    let text = emit
    if (stopped) this.finish('stop')
    else if (this.outputIds.length >= this.params.maxTokens || this.pastLength + 1 >= this.maxContext) {
      text += this.drain()
      this.finish(this.finishReason ?? 'length')
    }
    this.text += text
    return logprobs ? { index, tokenId, text, logprobs } : { index, tokenId, text }
  }

  /** Emits what the detokeniser and stop matcher still hold; a stop string completed here ends as 'stop'. */
  private drain(): string {
    const { emit, stopped } = this.stopMatcher.push(this.detokenizer.flush())
    if (stopped) {
      this.finishReason = 'stop'
      return emit
    }
    return emit + this.stopMatcher.flush()
  }

  private finish(reason: FinishReason): void {
    this.finishReason = reason
    this.finishedAt = performance.now()
  }

  /** Expert load as [layer][expert]. */
  expertLoadMatrix(experts: number): number[][] {
    const rows: number[][] = []
    for (let i = 0; i < this.expertLoad.length; i += experts)
      rows.push(Array.from(this.expertLoad.subarray(i, i + experts)))
    return rows
  }
}
