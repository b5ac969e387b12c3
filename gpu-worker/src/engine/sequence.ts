import { IncrementalDetokenizer, StopMatcher, type TokenDecoder } from './detokenizer.ts'
import { Sampler } from './sampling.ts'

export type FinishReason = 'stop' | 'length'

export interface GenerationParams {
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
    this.constraint?.mask(logits)
    const tokenId = this.sampler.sample(logits)
    this.constraint?.advance(tokenId)
    const index = this.outputIds.length
    this.outputIds.push(tokenId)
    this.firstTokenAt ??= performance.now()
    let text = ''
    if (this.isEos(tokenId) && !this.params.ignoreEos) {
      text = this.drain()
      this.finish('stop')
    } else {
      const { emit, stopped } = this.stopMatcher.push(this.detokenizer.push(tokenId))
      text = emit
      if (stopped) this.finish('stop')
      else if (this.outputIds.length >= this.params.maxTokens || this.pastLength + 1 >= this.maxContext) {
        const rest = this.drain()
        text += rest
        this.finish(this.finishReason ?? 'length')
      }
    }
    this.text += text
    return { index, tokenId, text }
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
