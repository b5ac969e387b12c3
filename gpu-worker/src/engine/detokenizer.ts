// Generated ids to the text a client sees: incremental detokenizing, then stop strings.
import type { DecodeOptions } from './tokenizer.ts'

/** What the detokenizer needs from a tokenizer. */
export interface TokenDecoder {
  decode(ids: readonly number[], options?: DecodeOptions): string
}

/**
 * Turns one sequence's generated ids into text deltas as they arrive, for any tokenizer: it decodes a
 * short window of recent ids and emits only the text the newest id added (the prefix/read offset
 * scheme of text-generation-inference and vLLM). A trailing U+FFFD means a character's bytes are still
 * arriving, so nothing is emitted until the next id completes it. Special tokens produce no text.
 */
export class IncrementalDetokenizer {
  readonly #tokenizer: TokenDecoder
  // The window: ids[0, readOffset) were already emitted and are kept only as context (a decoder such as
  // SentencePiece's strips a leading space, so a token's text depends on what precedes it); the rest wait.
  #ids: number[] = []
  #readOffset = 0

  constructor(tokenizer: TokenDecoder) {
    this.#tokenizer = tokenizer
  }

  push(tokenId: number): string {
    this.#ids.push(tokenId)
    const prefixText = this.#decode(this.#ids.slice(0, this.#readOffset))
    const newText = this.#decode(this.#ids)
    if (newText.length <= prefixText.length || newText.endsWith('\uFFFD')) return ''
    // The ids before the old read offset are settled and never decoded again.
    this.#ids = this.#ids.slice(this.#readOffset)
    this.#readOffset = this.#ids.length
    return newText.slice(prefixText.length)
  }

  /** The text still held back at the end of the sequence; incomplete bytes come out as U+FFFD. */
  flush(): string {
    const prefixText = this.#decode(this.#ids.slice(0, this.#readOffset))
    const newText = this.#decode(this.#ids)
    this.#ids = []
    this.#readOffset = 0
    return newText.slice(prefixText.length)
  }

  #decode(ids: readonly number[]): string {
    return this.#tokenizer.decode(ids, { skipSpecialTokens: true })
  }
}

/**
 * Applies stop strings to streamed text as OpenAI does: the output ends just before the first stop
 * string, which is never emitted. Stop strings may span deltas, so text that could be the start of one
 * is held back until the next delta settles it.
 */
export class StopMatcher {
  readonly #stops: string[]
  #pending = ''
  #stopped = false

  constructor(stops: readonly string[]) {
    // An empty stop string would match everywhere; OpenAI ignores it, and so do we.
    this.#stops = stops.filter((s) => s.length > 0)
  }

  get stopped(): boolean {
    return this.#stopped
  }

  push(textDelta: string): { emit: string; stopped: boolean } {
    if (this.#stopped) return { emit: '', stopped: true }
    if (this.#stops.length === 0) return { emit: textDelta, stopped: false }
    const text = this.#pending + textDelta
    let first = -1
    for (const stop of this.#stops) {
      const at = text.indexOf(stop)
      if (at >= 0 && (first < 0 || at < first)) first = at
    }
    if (first >= 0) {
      this.#stopped = true
      this.#pending = ''
      return { emit: text.slice(0, first), stopped: true }
    }
    const hold = this.#heldSuffixLength(text)
    this.#pending = text.slice(text.length - hold)
    return { emit: text.slice(0, text.length - hold), stopped: false }
  }

  /** The held-back text once the sequence ends without a stop. */
  flush(): string {
    const rest = this.#pending
    this.#pending = ''
    return rest
  }

  /** Length of the longest suffix of `text` that is a proper prefix of some stop string. */
  #heldSuffixLength(text: string): number {
    let longest = 0
    for (const stop of this.#stops) {
      for (let n = Math.min(stop.length - 1, text.length); n > longest; n--) {
        if (text.endsWith(stop.slice(0, n))) {
          longest = n
          break
        }
      }
    }
    return longest
  }
}
