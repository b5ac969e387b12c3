import type { CompiledGrammar, GrammarCompiler, GrammarMatcher } from '@mlc-ai/web-xgrammar'
import type { TokenConstraint } from '../sequence.ts'
import type { ChatTokenizer } from '../tokenizer.ts'
import { Utf8Guard } from './utf8-guard.ts'
import { loadXGrammar, type XGrammar } from './xgrammar-module.ts'

// Constrained decoding of JSON documents: xgrammar compiles a JSON Schema into a grammar over the
// model's vocabulary, and a matcher per sequence says which tokens may come next. Output is
// compact JSON with one space after `,` and `:`: no free whitespace, so a model cannot spend its
// tokens on spaces.

/** What a sequence's output must be: a JSON document valid for `schema`, or (null) any JSON object. */
export interface JsonConstraintSpec {
  schema: Record<string, unknown> | null
}

export class GrammarError extends Error {
  readonly code = 'invalid_request'
}

/** How xgrammar should read the vocabulary's strings into bytes. */
export type VocabType = 'BYTE_LEVEL' | 'BYTE_FALLBACK' | 'RAW'

/**
 * The tokenizer's strings as xgrammar wants them: id order, special tokens other than EOS empty
 * (xgrammar never allows an empty token), with the vocabulary's byte encoding.
 */
export function encodedVocabulary(
  tokenizer: ChatTokenizer,
  vocabSize: number,
): { vocab: string[]; type: VocabType } {
  const vocab: string[] = []
  let byteFallback = false
  let byteLevel = false
  for (let id = 0; id < vocabSize; id++) {
    const token = tokenizer.idToToken(id)
    if (token === undefined || (tokenizer.specialTokenIds.has(id) && !tokenizer.isEos(id))) {
      vocab.push('')
      continue
    }
    vocab.push(token)
    if (/^<0x[0-9A-F]{2}>$/.test(token)) byteFallback = true
    else if (token === 'Ġ' || token === 'Ċ') byteLevel = true
  }
  // Sentencepiece vocabularies spell bytes <0xNN>; GPT-2 style ones map bytes to printable characters.
  return { vocab, type: byteFallback ? 'BYTE_FALLBACK' : byteLevel ? 'BYTE_LEVEL' : 'RAW' }
}

/** Compiled grammars kept per model: clients send the same few schemas over and over. */
const CACHE_LIMIT = 64

/** One model's JSON grammars: the vocabulary is read once, each schema is compiled once. */
export class JsonGrammar {
  readonly vocabSize: number
  readonly #eos: number[]
  #runtime: { xgr: XGrammar; compiler: GrammarCompiler } | null = null
  /** The last failed internal check xgrammar printed (it aborts with no message of its own). */
  #lastFatal = ''
  readonly #compiled = new Map<string, CompiledGrammar>()
  readonly #guard: Utf8Guard
  readonly #vocab: { vocab: string[]; type: VocabType }

  constructor(tokenizer: ChatTokenizer, vocabSize: number) {
    if (tokenizer.eosTokenIds.length === 0)
      throw new Error('constrained decoding needs an eos_token: the document must be able to end')
    this.vocabSize = vocabSize
    this.#eos = [...tokenizer.eosTokenIds]
    this.#vocab = encodedVocabulary(tokenizer, vocabSize)
    this.#guard = new Utf8Guard(this.#vocab.vocab, this.#vocab.type, this.#eos)
  }

  async #ensureRuntime(): Promise<{ xgr: XGrammar; compiler: GrammarCompiler }> {
    if (this.#runtime) return this.#runtime
    const xgr = loadXGrammar()
    const { vocab, type } = this.#vocab
    // The module binds console.error as its stderr when it starts (on this first call): bound to
    // this sink, a failed check's text becomes the error message instead of a stray stderr line.
    const original = console.error
    console.error = (...args: unknown[]) => {
      const line = args.map(String).join(' ')
      if (line.startsWith('[FATAL]')) this.#lastFatal = line.replace(/^\[FATAL\] \S+:\d+: /, '')
      else if (line !== 'Aborted()') original(...args)
    }
    let info: Awaited<ReturnType<XGrammar['TokenizerInfo']['createTokenizerInfo']>>
    try {
      info = await xgr.TokenizerInfo.createTokenizerInfo(vocab, type, false, this.vocabSize, this.#eos)
    } finally {
      console.error = original
    }
    const compiler = await xgr.GrammarCompiler.createGrammarCompiler(info)
    this.#runtime = { xgr, compiler }
    return this.#runtime
  }

  async #compile(spec: JsonConstraintSpec): Promise<{ xgr: XGrammar; grammar: CompiledGrammar }> {
    const runtime = await this.#ensureRuntime()
    const key = spec.schema === null ? '' : JSON.stringify(spec.schema)
    const hit = this.#compiled.get(key)
    if (hit) {
      // Most recently used last.
      this.#compiled.delete(key)
      this.#compiled.set(key, hit)
      return { xgr: runtime.xgr, grammar: hit }
    }
    let grammar: CompiledGrammar
    this.#lastFatal = ''
    try {
      grammar = await runtime.compiler.compileJSONSchema(
        spec.schema === null ? '{"type": "object"}' : key,
        false,
        -1,
        [', ', ': '],
        // Strict: properties a schema does not list are not generated.
        true,
      )
    } catch (error) {
      // A failed internal check aborts the call and may leave the instance's memory inconsistent:
      // the next request starts over on a fresh one.
      this.#dropRuntime()
      throw new GrammarError(
        `The JSON schema could not be compiled into a grammar: ${this.#lastFatal || String(error)}`,
      )
    }
    this.#compiled.set(key, grammar)
    if (this.#compiled.size > CACHE_LIMIT) {
      const [oldest, old] = this.#compiled.entries().next().value!
      this.#compiled.delete(oldest)
      old.dispose()
    }
    return { xgr: runtime.xgr, grammar }
  }

  #dropRuntime(): void {
    this.#runtime = null
    this.#compiled.clear()
  }

  /** A fresh constraint for one sequence (dispose it when the sequence ends). */
  async constraint(spec: JsonConstraintSpec): Promise<JsonConstraint> {
    const { xgr, grammar } = await this.#compile(spec)
    const matcher = await xgr.GrammarMatcher.createGrammarMatcher(grammar, this.#eos)
    return new JsonConstraint(matcher, this.vocabSize, this.#guard)
  }
}

const grammars = new WeakMap<ChatTokenizer, JsonGrammar>()

/** The JSON grammars of a model's tokenizer, made once per tokenizer. */
export function jsonGrammarFor(tokenizer: ChatTokenizer, vocabSize: number): JsonGrammar {
  let grammar = grammars.get(tokenizer)
  if (!grammar) {
    grammar = new JsonGrammar(tokenizer, vocabSize)
    grammars.set(tokenizer, grammar)
  }
  return grammar
}

/** The embind vector GrammarMatcher's handle returns; read word by word, then deleted. */
interface IntVector {
  size(): number
  get(i: number): number
  delete(): void
}

interface MatcherHandle {
  GetNextTokenBitmask(vocabSize: number): IntVector
}

/**
 * One sequence's grammar state. The matcher's own getNextTokenBitmask() is async only to load the
 * module, which is loaded already; its handle answers synchronously, as a sampling step must.
 */
export class JsonConstraint implements TokenConstraint {
  readonly #matcher: GrammarMatcher
  readonly #vocabSize: number
  readonly #words: Int32Array
  readonly #guard: Utf8Guard
  /** UTF-8 decoder state of the output so far. */
  #utf8 = 0
  #disposed = false

  constructor(matcher: GrammarMatcher, vocabSize: number, guard: Utf8Guard) {
    this.#matcher = matcher
    this.#vocabSize = vocabSize
    this.#guard = guard
    this.#words = new Int32Array(Math.ceil(vocabSize / 32))
  }

  /** The document is complete (EOS was accepted). */
  get terminated(): boolean {
    return this.#matcher.isTerminated()
  }

  /** Fills `#words` with the next step's allowed-token bitmask. */
  #bitmask(): Int32Array {
    const handle = (this.#matcher as unknown as { handle: MatcherHandle }).handle
    const vector = handle.GetNextTokenBitmask(this.#vocabSize)
    try {
      const n = Math.min(vector.size(), this.#words.length)
      for (let i = 0; i < n; i++) this.#words[i] = vector.get(i)
    } finally {
      vector.delete()
    }
    this.#guard.restrict(this.#words, this.#utf8)
    return this.#words
  }

  /** The ids allowed next (for tests and diagnostics). */
  allowed(): number[] {
    const words = this.#bitmask()
    const ids: number[] = []
    for (let t = 0; t < this.#vocabSize; t++) if ((words[t >> 5]! >>> (t & 31)) & 1) ids.push(t)
    return ids
  }

  mask(logits: Float32Array): void {
    if (this.#disposed) throw new Error('the constraint was released')
    const words = this.#bitmask()
    const n = Math.min(logits.length, this.#vocabSize)
    for (let w = 0; w < words.length; w++) {
      const bits = words[w]!
      if (bits === -1) continue
      const start = w * 32
      const end = Math.min(n, start + 32)
      if (bits === 0) logits.fill(Number.NEGATIVE_INFINITY, start, end)
      else
        for (let t = start; t < end; t++)
          if (((bits >>> (t & 31)) & 1) === 0) logits[t] = Number.NEGATIVE_INFINITY
    }
    // Logit rows padded past the grammar's vocabulary hold no real token.
    if (logits.length > n) logits.fill(Number.NEGATIVE_INFINITY, n)
  }

  advance(tokenId: number): void {
    if (this.#disposed) throw new Error('the constraint was released')
    const utf8 = this.#guard.after(this.#utf8, tokenId)
    if (utf8 < 0 || !this.#matcher.acceptToken(tokenId))
      throw new Error(`token ${tokenId} does not continue the constrained document`)
    this.#utf8 = utf8
  }

  /** Frees the matcher's WebAssembly memory; call once the sequence has ended. */
  dispose(): void {
    if (this.#disposed) return
    this.#disposed = true
    this.#matcher.dispose()
  }
}
