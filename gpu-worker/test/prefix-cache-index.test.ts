import { describe, expect, it } from 'vitest'
import { PrefixCache } from '../src/scheduler/prefix-cache.ts'

/** The engine side of the cache, recorded: which stored prefixes exist and their lengths. */
function fakeEngine() {
  const stored = new Map<number, number>()
  return {
    stored,
    savePrefix: (key: number, _slot: number, length: number) => void stored.set(key, length),
    dropPrefix: (key: number) => void stored.delete(key),
  }
}

const seq = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i)

describe('prefix cache index', () => {
  it('matches whole blocks only, and never the last prompt token', () => {
    const engine = fakeEngine()
    const cache = new PrefixCache(engine, 1000)
    cache.store('*', seq(0, 40), 0)
    expect(engine.stored.get(0)).toBe(32)
    expect(cache.lookup('*', seq(0, 50), 49)).toEqual({ key: 0, length: 32 })
    expect(cache.lookup('*', seq(0, 20), 19)).toEqual({ key: 0, length: 16 })
    // The same 32 tokens as the whole prompt: one is left to compute the first token's logits.
    expect(cache.lookup('*', seq(0, 32), 31)).toEqual({ key: 0, length: 31 })
    expect(cache.lookup('*', [99, ...seq(1, 40)], 40)).toBeNull()
    expect(cache.lookup('0,1', seq(0, 40), 39)).toBeNull()
  })

  it('drops a stored prefix that a longer one covers, and skips one already covered', () => {
    const engine = fakeEngine()
    const cache = new PrefixCache(engine, 1000)
    cache.store('*', seq(0, 32), 0)
    cache.store('*', seq(0, 64), 1)
    expect([...engine.stored]).toEqual([[1, 64]])
    cache.store('*', seq(0, 48), 2)
    expect([...engine.stored]).toEqual([[1, 64]])
    expect(cache.tokens).toBe(64)
  })

  it('holds at most its capacity, evicting the least recently used', () => {
    const engine = fakeEngine()
    const cache = new PrefixCache(engine, 64)
    cache.store('*', seq(0, 32), 0) // key 0
    cache.store('*', seq(100, 32), 0) // key 1
    expect(cache.lookup('*', seq(0, 33), 32)).not.toBeNull() // key 0 is now the most recent
    cache.store('*', seq(200, 32), 0) // key 2: evicts key 1
    expect([...engine.stored.keys()].sort()).toEqual([0, 2])
    expect(cache.tokens).toBe(64)
    expect(cache.lookup('*', seq(100, 33), 32)).toBeNull()
    // A prefix longer than the whole cache is not stored.
    cache.store('*', seq(300, 80), 0)
    expect(cache.tokens).toBe(64)
    expect(engine.stored.size).toBe(2)
  })
})
