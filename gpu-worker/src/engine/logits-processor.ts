// Edits one sequence's logits before sampling, from what the sequence has seen: repetition,
// frequency and presence penalties, then logit_bias. Runs before any token constraint's mask, so
// a constraint always has the last word on which tokens may come next.

export interface LogitsProcessingParams {
  /** OpenAI: subtracted once from the logit of every token generated so far (-2..2, 0 = off). */
  presencePenalty?: number
  /** OpenAI: subtracted from a token's logit once per time it was generated (-2..2, 0 = off). */
  frequencyPenalty?: number
  /**
   * Hugging Face / vLLM: the logit of a token seen in the prompt or the output is divided by it when
   * positive, multiplied by it when negative (> 0, 1 = off).
   */
  repetitionPenalty?: number
  /** Token id to a value added to its logit (-100..100). */
  logitBias?: Readonly<Record<string, number>>
}

export class LogitsProcessor {
  readonly #presence: number
  readonly #frequency: number
  readonly #repetition: number
  readonly #bias: ReadonlyArray<readonly [number, number]>
  /** Generated tokens and how often each came. */
  readonly #counts = new Map<number, number>()
  /** Prompt and generated tokens (repetition penalty). */
  readonly #seen = new Set<number>()

  /** A processor for these parameters, or null when they ask for nothing. */
  static create(params: LogitsProcessingParams, promptIds: readonly number[]): LogitsProcessor | null {
    const p = new LogitsProcessor(params, promptIds)
    return p.#presence === 0 && p.#frequency === 0 && p.#repetition === 1 && p.#bias.length === 0 ? null : p
  }

  constructor(params: LogitsProcessingParams, promptIds: readonly number[]) {
    this.#presence = params.presencePenalty ?? 0
    this.#frequency = params.frequencyPenalty ?? 0
    this.#repetition = params.repetitionPenalty ?? 1
    if (!(Number.isFinite(this.#presence) && Math.abs(this.#presence) <= 2))
      throw new Error(`presencePenalty must be from -2 to 2 (got ${this.#presence})`)
    if (!(Number.isFinite(this.#frequency) && Math.abs(this.#frequency) <= 2))
      throw new Error(`frequencyPenalty must be from -2 to 2 (got ${this.#frequency})`)
    if (!(Number.isFinite(this.#repetition) && this.#repetition > 0))
      throw new Error(`repetitionPenalty must be a finite number > 0 (got ${this.#repetition})`)
    this.#bias = Object.entries(params.logitBias ?? {}).map(([id, bias]) => {
      const tokenId = Number(id)
      if (!(Number.isInteger(tokenId) && tokenId >= 0))
        throw new Error(`logitBias key ${id} is not a token id`)
      if (!(Number.isFinite(bias) && Math.abs(bias) <= 100))
        throw new Error(`logitBias for token ${id} must be from -100 to 100 (got ${bias})`)
      return [tokenId, bias] as const
    })
    if (this.#repetition !== 1) for (const id of promptIds) this.#seen.add(id)
  }

  /** Applies the penalties and biases to this step's logits, in place. */
  apply(logits: Float32Array): void {
    if (this.#repetition !== 1) {
      const r = this.#repetition
      for (const id of this.#seen) {
        if (id >= logits.length) continue
        const x = logits[id]!
        logits[id] = x > 0 ? x / r : x * r
      }
    }
    if (this.#presence !== 0 || this.#frequency !== 0) {
      for (const [id, count] of this.#counts) {
        if (id >= logits.length) continue
        logits[id] = logits[id]! - this.#frequency * count - this.#presence
      }
    }
    for (const [id, bias] of this.#bias) if (id < logits.length) logits[id] = logits[id]! + bias
  }

  /** Records a sampled token. */
  accept(tokenId: number): void {
    this.#counts.set(tokenId, (this.#counts.get(tokenId) ?? 0) + 1)
    if (this.#repetition !== 1) this.#seen.add(tokenId)
  }
}
