import { describe, expect, it } from 'vitest'
import {
  cacheKey,
  cacheModeOf,
  canonicalRequest,
  type EffectiveSampling,
  isDeterministic,
  stableStringify,
} from '../../src/cache.ts'
import { effectiveSampling } from '../../src/completions/submit.ts'
import { POOLS } from '../../src/pools.ts'
import { validateBody } from '../../src/validate.ts'

// As the edge does it: validate, apply the pool's defaults, canonicalise, hash.
async function keyOf(body: unknown, tenant = 't1', pool = 'general') {
  const req = validateBody('chat', body)
  const sampling = effectiveSampling({ req, pool: POOLS.get(pool)! })
  return cacheKey(tenant, pool, 'moe-demo', canonicalRequest('chat', req, sampling))
}

const base = { model: 'auto', temperature: 0, messages: [{ role: 'user', content: 'Hello' }] }

describe('canonical cache key', () => {
  it('ignores key order, at every level', async () => {
    const a = await keyOf(base)
    const b = await keyOf({ messages: [{ content: 'Hello', role: 'user' }], temperature: 0, model: 'auto' })
    expect(b).toBe(a)
  })

  it('ignores defaults, stream settings, user and metadata', async () => {
    const a = await keyOf(base)
    for (const extra of [
      { max_tokens: 256 },
      { max_completion_tokens: 256 },
      { n: 1 },
      { stream: true, stream_options: { include_usage: true } },
      { user: 'alice', metadata: { trace: 'x' } },
      { top_p: 0.5, seed: 7 }, // greedy decoding ignores both
      { stop: null },
    ]) {
      expect(await keyOf({ ...base, ...extra }), JSON.stringify(extra)).toBe(a)
    }
  })

  it('treats equivalent forms alike: one text part = a string; stop as a set', async () => {
    expect(
      await keyOf({ ...base, messages: [{ role: 'user', content: [{ type: 'text', text: 'Hello' }] }] }),
    ).toBe(await keyOf(base))
    expect(await keyOf({ ...base, stop: 'END' })).toBe(await keyOf({ ...base, stop: ['END'] }))
    expect(await keyOf({ ...base, stop: ['a', 'b'] })).toBe(await keyOf({ ...base, stop: ['b', 'a', 'a'] }))
  })

  it('changes with anything that changes the answer', async () => {
    const a = await keyOf(base)
    expect(await keyOf({ ...base, messages: [{ role: 'user', content: 'Hello!' }] })).not.toBe(a)
    expect(await keyOf({ ...base, max_tokens: 10 })).not.toBe(a)
    expect(await keyOf({ ...base, temperature: 0.7, seed: 1 })).not.toBe(
      await keyOf({ ...base, temperature: 0.7, seed: 2 }),
    )
    expect(await keyOf(base, 't1', 'code')).not.toBe(a)
  })

  it('is scoped by tenant: one tenant can never address another tenant entry', async () => {
    const a = await keyOf(base, 'tenant-a')
    const b = await keyOf(base, 'tenant-b')
    expect(a).not.toBe(b)
    expect(a.startsWith('c:tenant-a:')).toBe(true)
    expect(b.startsWith('c:tenant-b:')).toBe(true)
    expect(a.split(':')[2]).toMatch(/^[0-9a-f]{64}$/)
  })

  it('caches only deterministic requests, and honours Cache-Control', () => {
    const s: EffectiveSampling = { maxTokens: 1, temperature: 1, topP: 1, topK: 0, seed: null, stop: [] }
    expect(isDeterministic(s)).toBe(false)
    expect(isDeterministic({ ...s, temperature: 0 })).toBe(true)
    expect(isDeterministic({ ...s, seed: 3 })).toBe(true)
    expect(cacheModeOf(undefined)).toBe('use')
    expect(cacheModeOf('no-cache')).toBe('refresh')
    expect(cacheModeOf('max-age=0, no-store')).toBe('off')
  })

  it('stable-stringifies like JSON with sorted keys', () => {
    expect(stableStringify({ b: 1, a: [{ d: 2, c: undefined, e: null }] })).toBe(
      '{"a":[{"d":2,"e":null}],"b":1}',
    )
  })
})
