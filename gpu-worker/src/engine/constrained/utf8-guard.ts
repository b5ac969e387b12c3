import type { VocabType } from './json-grammar.ts'

// xgrammar reads UTF-8 leniently: over a byte-level vocabulary it lets through bytes that no valid
// UTF-8 text holds (0xC0, 0xF5..0xFF, surrogates, overlong forms), which decode to U+FFFD and
// break length limits. This guard tracks the UTF-8 state of the output and forbids any token that
// would make it invalid, and any raw control character (JSON strings must escape them).

/**
 * UTF-8 decoder states: 0 between characters; 1..3 continuation bytes still due; 4..7 the first
 * continuation byte of a sequence with a narrower range (after E0, ED, F0, F4).
 */
const STATES = 8
const DEAD = -1

function step(state: number, b: number): number {
  switch (state) {
    case 0:
      if (b < 0x20) return DEAD
      if (b < 0x80) return 0
      if (b >= 0xc2 && b <= 0xdf) return 1
      if (b === 0xe0) return 4
      if (b === 0xed) return 5
      if (b >= 0xe1 && b <= 0xef) return 2
      if (b === 0xf0) return 6
      if (b === 0xf4) return 7
      if (b >= 0xf1 && b <= 0xf3) return 3
      return DEAD
    case 1:
    case 2:
    case 3:
      return b >= 0x80 && b <= 0xbf ? state - 1 : DEAD
    case 4:
      return b >= 0xa0 && b <= 0xbf ? 1 : DEAD
    case 5:
      return b >= 0x80 && b <= 0x9f ? 1 : DEAD
    case 6:
      return b >= 0x90 && b <= 0xbf ? 2 : DEAD
    default:
      return b >= 0x80 && b <= 0x8f ? 2 : DEAD
  }
}

/** GPT-2's byte-to-character map, inverted: the byte each printable stand-in character spells. */
function byteLevelDecoder(): Map<string, number> {
  const bytes: number[] = []
  for (let b = 0x21; b <= 0x7e; b++) bytes.push(b)
  for (let b = 0xa1; b <= 0xac; b++) bytes.push(b)
  for (let b = 0xae; b <= 0xff; b++) bytes.push(b)
  const chars = [...bytes]
  let n = 0
  for (let b = 0; b < 256; b++)
    if (!bytes.includes(b)) {
      bytes.push(b)
      chars.push(256 + n++)
    }
  return new Map(bytes.map((b, i) => [String.fromCodePoint(chars[i]!), b]))
}

const utf8 = new TextEncoder()

/** The bytes a vocabulary entry stands for, or null for one that is not text (blanked specials). */
export function tokenBytes(token: string, type: VocabType, decoder = BYTE_LEVEL): Uint8Array | null {
  if (token === '') return null
  if (type === 'BYTE_LEVEL') {
    const out: number[] = []
    for (const ch of token) {
      const b = decoder.get(ch)
      if (b === undefined) return utf8.encode(token) // an added token, spelt as itself
      out.push(b)
    }
    return Uint8Array.from(out)
  }
  if (type === 'BYTE_FALLBACK') {
    const m = /^<0x([0-9A-F]{2})>$/.exec(token)
    if (m) return Uint8Array.of(Number.parseInt(m[1]!, 16))
    return utf8.encode(token.replaceAll('\u2581', ' '))
  }
  return utf8.encode(token)
}

const BYTE_LEVEL = byteLevelDecoder()

/** Per token, the UTF-8 state after it from each state (DEAD where it would be invalid). */
export class Utf8Guard {
  readonly #next: Int8Array
  /** Per state, a bitmask over the vocabulary of the tokens that may follow it. */
  readonly #allowed: Int32Array[]
  readonly vocabSize: number

  constructor(vocab: readonly string[], type: VocabType, eosIds: readonly number[]) {
    this.vocabSize = vocab.length
    this.#next = new Int8Array(vocab.length * STATES).fill(DEAD)
    for (let t = 0; t < vocab.length; t++) {
      const base = t * STATES
      if (eosIds.includes(t)) {
        // EOS adds no bytes; the grammar allows it only once the document is complete.
        for (let s = 0; s < STATES; s++) this.#next[base + s] = s
        continue
      }
      const bytes = tokenBytes(vocab[t]!, type)
      if (bytes === null || bytes.length === 0) continue
      for (let s = 0; s < STATES; s++) {
        let state = s
        for (const b of bytes) {
          state = step(state, b)
          if (state === DEAD) break
        }
        this.#next[base + s] = state
      }
    }
    const words = Math.ceil(vocab.length / 32)
    this.#allowed = Array.from({ length: STATES }, (_, s) => {
      const mask = new Int32Array(words)
      for (let t = 0; t < vocab.length; t++)
        if (this.#next[t * STATES + s] !== DEAD) mask[t >> 5]! |= 1 << (t & 31)
      return mask
    })
  }

  /** Clears, in a bitmask over the vocabulary, the tokens that cannot follow `state`. */
  restrict(words: Int32Array, state: number): void {
    const allowed = this.#allowed[state]!
    const n = Math.min(words.length, allowed.length)
    for (let w = 0; w < n; w++) words[w]! &= allowed[w]!
    // Bits past the guard's vocabulary name no token.
    for (let w = n; w < words.length; w++) words[w] = 0
  }

  /** The state after `token`; DEAD if it cannot follow. */
  after(state: number, token: number): number {
    if (token >= this.vocabSize) return DEAD
    return this.#next[token * STATES + state]!
  }
}
