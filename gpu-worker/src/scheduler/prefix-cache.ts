import type { StepEngine } from '../engine/engine.ts'

/** Prefixes are matched and stored in whole blocks of this many tokens. */
export const PREFIX_BLOCK_TOKENS = 16

/** A prompt prefix whose KV the engine holds (engine.savePrefix), outside the batch's slots. */
interface CachedPrefix {
  key: number
  namespace: string
  tokens: readonly number[]
  /** The chain key of each of its blocks, in order. */
  blockKeys: string[]
  lastUsed: number
}

export interface PrefixMatch {
  /** The engine's key for the stored KV (engine.loadPrefix). */
  key: number
  /** Positions of the prompt the stored KV covers. */
  length: number
}

/**
 * Which prompt prefixes have their KV stored, keyed by token-id prefixes at
 * block granularity: block i's key hashes every token up to the end of block
 * i (and the namespace, since an expert subset changes the KV), so a lookup
 * walks the prompt's blocks until one is missing. At most `capacityTokens`
 * positions are held; the least recently used prefix goes first.
 */
export class PrefixCache {
  readonly capacityTokens: number
  private readonly engine: Pick<StepEngine, 'savePrefix' | 'dropPrefix'>
  private readonly byBlock = new Map<string, Set<CachedPrefix>>()
  private readonly entries = new Set<CachedPrefix>()
  private heldTokens = 0
  private nextKey = 0
  private clock = 0

  constructor(engine: Pick<StepEngine, 'savePrefix' | 'dropPrefix'>, capacityTokens: number) {
    if (!Number.isInteger(capacityTokens) || capacityTokens < PREFIX_BLOCK_TOKENS)
      throw new Error(`the prefix cache needs at least ${PREFIX_BLOCK_TOKENS} tokens`)
    this.engine = engine
    this.capacityTokens = capacityTokens
  }

  /** Positions stored now. */
  get tokens(): number {
    return this.heldTokens
  }

  get size(): number {
    return this.entries.size
  }

  /** The longest stored prefix of `tokens`, at most `maxLength` positions, marked as just used. */
  lookup(namespace: string, tokens: readonly number[], maxLength: number): PrefixMatch | null {
    let found: CachedPrefix | null = null
    let blocks = 0
    for (const key of blockKeys(namespace, tokens)) {
      const holders = this.byBlock.get(key)
      if (!holders) break
      let best: CachedPrefix | null = null
      for (const h of holders) if (!best || h.lastUsed > best.lastUsed) best = h
      found = best
      blocks++
    }
    const length = Math.min(blocks * PREFIX_BLOCK_TOKENS, maxLength)
    if (!found || length <= 0) return null
    // Guard against a hash collision: the stored tokens must be the prompt's.
    for (let i = 0; i < length; i++) if (found.tokens[i] !== tokens[i]) return null
    found.lastUsed = ++this.clock
    return { key: found.key, length }
  }

  /**
   * Stores the whole blocks of `tokens` from the KV in `slot` (which must hold them), unless a
   * stored prefix covers them already. Stored prefixes it covers are dropped; then the least
   * recently used ones, until the cache is within its capacity.
   */
  store(namespace: string, tokens: readonly number[], slot: number): void {
    const keys = blockKeys(namespace, tokens)
    const length = keys.length * PREFIX_BLOCK_TOKENS
    if (length === 0 || length > this.capacityTokens) return
    const last = this.byBlock.get(keys[keys.length - 1]!)
    if (last && last.size > 0) {
      // Same blocks already stored (by this prompt's own hit, or an identical one).
      for (const h of last) h.lastUsed = ++this.clock
      return
    }
    const mine = new Set(keys)
    for (const e of [...this.entries])
      if (e.blockKeys.length < keys.length && mine.has(e.blockKeys[e.blockKeys.length - 1]!)) this.drop(e)
    const entry: CachedPrefix = {
      key: this.nextKey++,
      namespace,
      tokens: tokens.slice(0, length),
      blockKeys: keys,
      lastUsed: ++this.clock,
    }
    this.engine.savePrefix(entry.key, slot, length)
    this.entries.add(entry)
    this.heldTokens += length
    for (const k of keys) {
      const set = this.byBlock.get(k)
      if (set) set.add(entry)
      else this.byBlock.set(k, new Set([entry]))
    }
    while (this.heldTokens > this.capacityTokens) {
      let oldest: CachedPrefix | null = null
      for (const e of this.entries) if (e !== entry && (!oldest || e.lastUsed < oldest.lastUsed)) oldest = e
      if (!oldest) break
      this.drop(oldest)
    }
  }

  private drop(e: CachedPrefix): void {
    this.entries.delete(e)
    this.heldTokens -= e.tokens.length
    for (const k of e.blockKeys) {
      const set = this.byBlock.get(k)
      set?.delete(e)
      if (set?.size === 0) this.byBlock.delete(k)
    }
    this.engine.dropPrefix(e.key)
  }
}

/** Chain keys of each whole block of `tokens`: two 32-bit FNV-1a lanes over the namespace and every token so far. */
function blockKeys(namespace: string, tokens: readonly number[]): string[] {
  let a = 0x811c9dc5
  let b = 0x01000193 ^ 0x5bd1e995
  for (let i = 0; i < namespace.length; i++) {
    a = Math.imul(a ^ namespace.charCodeAt(i), 0x01000193)
    b = Math.imul(b ^ namespace.charCodeAt(i), 0x5bd1e995)
  }
  const keys: string[] = []
  const whole = Math.floor(tokens.length / PREFIX_BLOCK_TOKENS) * PREFIX_BLOCK_TOKENS
  for (let i = 0; i < whole; i++) {
    const t = tokens[i]!
    a = Math.imul(a ^ t, 0x01000193)
    b = Math.imul(b ^ (t + 0x9e3779b9), 0x5bd1e995)
    b ^= b >>> 15
    if ((i + 1) % PREFIX_BLOCK_TOKENS === 0) keys.push(`${(a >>> 0).toString(36)}.${(b >>> 0).toString(36)}`)
  }
  return keys
}
