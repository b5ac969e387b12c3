import OpenAI from 'openai'
import { beforeAll, describe, expect, inject, it } from 'vitest'
import { devTenant } from '../src/stack.ts'

// The response cache: a repeated deterministic request is served from the cache with the same
// body; another tenant's identical request is not.

const stack = inject('stack')
let mine: OpenAI
let theirs: OpenAI

beforeAll(async () => {
  const [a, b] = await Promise.all([devTenant(stack), devTenant(stack)])
  mine = new OpenAI({ apiKey: a.key, baseURL: `${stack.url}/v1`, maxRetries: 0, timeout: 120_000 })
  theirs = new OpenAI({ apiKey: b.key, baseURL: `${stack.url}/v1`, maxRetries: 0, timeout: 120_000 })
})

/** The answer minus what differs per response by design (id, created, request id, cache state, timings). */
function answer(r: OpenAI.ChatCompletion) {
  const { id: _i, created: _c, ...rest } = r as OpenAI.ChatCompletion & { moe: Record<string, unknown> }
  const { request_id: _r, cache: _x, ...moe } = rest.moe
  return { ...rest, moe }
}

async function waitForHit(client: OpenAI, params: OpenAI.ChatCompletionCreateParamsNonStreaming) {
  // The cache write runs after the response (waitUntil): give it a moment.
  for (let i = 0; ; i++) {
    const r = await client.chat.completions.create(params).withResponse()
    if (r.response.headers.get('x-moe-cache') === 'HIT' || i >= 20) return r
    await new Promise((res) => setTimeout(res, 100))
  }
}

describe('response cache', () => {
  it('greedy: MISS, then HIT with the same body; another tenant: MISS', async () => {
    const params = {
      model: 'auto',
      messages: [{ role: 'user' as const, content: `Cache this answer ${Date.now()}` }],
      max_tokens: 12,
      temperature: 0,
    }
    const first = await mine.chat.completions.create(params).withResponse()
    expect(first.response.headers.get('x-moe-cache')).toBe('MISS')
    const second = await waitForHit(mine, params)
    expect(second.response.headers.get('x-moe-cache')).toBe('HIT')
    expect(answer(second.data)).toEqual(answer(first.data))
    expect((second.data as unknown as { moe: { cache: string } }).moe.cache).toBe('HIT')

    // Key order and `stream`/`user` do not change the key; a streamed replay carries the same text.
    const replay = await mine.chat.completions
      .create({ temperature: 0, max_tokens: 12, messages: params.messages, model: 'auto', stream: true })
      .withResponse()
    expect(replay.response.headers.get('x-moe-cache')).toBe('HIT')
    let text = ''
    for await (const c of replay.data) text += c.choices[0]?.delta.content ?? ''
    expect(text).toBe(first.data.choices[0]!.message.content)

    const other = await theirs.chat.completions.create(params).withResponse()
    expect(other.response.headers.get('x-moe-cache')).toBe('MISS')
    expect((other.data as unknown as { moe: { request_id: string } }).moe.request_id).not.toBe(
      (first.data as unknown as { moe: { request_id: string } }).moe.request_id,
    )
  })

  it('a fixed seed is deterministic too: cached; a different seed is a different entry', async () => {
    const params = {
      model: 'auto',
      messages: [{ role: 'user' as const, content: `Seeded cache ${Date.now()}` }],
      max_tokens: 12,
      temperature: 0.9,
      seed: 5,
    }
    const first = await mine.chat.completions.create(params).withResponse()
    expect(first.response.headers.get('x-moe-cache')).toBe('MISS')
    const second = await waitForHit(mine, params)
    expect(second.response.headers.get('x-moe-cache')).toBe('HIT')
    expect(answer(second.data)).toEqual(answer(first.data))
    const other = await mine.chat.completions.create({ ...params, seed: 6 }).withResponse()
    expect(other.response.headers.get('x-moe-cache')).toBe('MISS')
  })

  it('non-deterministic requests are never cached', async () => {
    const params = {
      model: 'auto',
      messages: [{ role: 'user' as const, content: 'Random, please' }],
      max_tokens: 4,
      temperature: 1,
    }
    const r = await mine.chat.completions.create(params).withResponse()
    expect(r.response.headers.get('x-moe-cache')).toBe('BYPASS')
  })
})
