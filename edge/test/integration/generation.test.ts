import { randomBytes } from 'node:crypto'
import { jobCancelKey } from '@moe/shared'
import { Redis } from 'ioredis'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { REDIS_URL, type RunningWorker, startGpuWorker } from '../gpu-worker.ts'
import { createTenant, type RunningEdge, startEdge, type TestTenant } from '../wrangler-dev.ts'

// The happy paths need generated tokens: the real GPU worker (`npx moe serve`) on the tiny model,
// the edge in workerd, the real Redis, and the official `openai` client. A worker that cannot be
// started fails these tests; it never skips them.

const PREFIX = `moegen-${randomBytes(4).toString('hex')}`

describe('generation through the real GPU worker', () => {
  let edge: RunningEdge
  let worker: RunningWorker
  let redis: Redis
  let tenant: TestTenant
  let other: TestTenant
  let client: OpenAI
  const question = [{ role: 'user' as const, content: 'Say hello to the edge.' }]

  beforeAll(async () => {
    // Started side by side; whichever comes up is stopped in afterAll even if the other fails.
    const [e, w] = await Promise.allSettled([startEdge({ QUEUE_PREFIX: PREFIX }), startGpuWorker(PREFIX)])
    if (e.status === 'fulfilled') edge = e.value
    if (w.status === 'fulfilled') worker = w.value
    if (e.status === 'rejected') throw e.reason
    if (w.status === 'rejected') throw w.reason
    redis = new Redis(REDIS_URL)
    tenant = await createTenant(edge)
    other = await createTenant(edge)
    client = new OpenAI({ apiKey: tenant.key, baseURL: `${edge.url}/v1`, maxRetries: 0, timeout: 120_000 })
  }, 180_000)

  afterAll(async () => {
    await Promise.all([edge?.stop(), worker?.stop()])
    if (redis) {
      const keys = await redis.keys(`${PREFIX}:*`)
      if (keys.length > 0) await redis.del(...keys)
      redis.disconnect()
    }
  })

  it('creates a chat completion with the openai client (usage, headers, moe summary)', async () => {
    const { data, response } = await client.chat.completions
      .create(
        { model: 'auto', messages: question, max_tokens: 16, temperature: 0 },
        { headers: { 'cache-control': 'no-store' } },
      )
      .withResponse()
    expect(data.object).toBe('chat.completion')
    expect(data.model).toBe('moe-demo')
    const choice = data.choices[0]!
    expect(typeof choice.message.content).toBe('string')
    expect(['stop', 'length']).toContain(choice.finish_reason)
    expect(data.usage!.completion_tokens).toBeGreaterThan(0)
    expect(data.usage!.completion_tokens).toBeLessThanOrEqual(16)
    expect(data.usage!.total_tokens).toBe(data.usage!.prompt_tokens + data.usage!.completion_tokens)
    expect(response.headers.get('x-moe-pool')).toBe('general')
    expect(response.headers.get('x-moe-cache')).toBe('BYPASS')
    const moe = (data as unknown as { moe: { pool: string; expert_load: number[] } }).moe
    expect(moe.pool).toBe('general')
    expect(moe.expert_load.reduce((a, b) => a + b, 0)).toBeGreaterThan(0)
  })

  it('charges the tenant the tokens a request really used, not the estimate it was admitted with', async () => {
    const t = await createTenant(edge)
    const c = new OpenAI({ apiKey: t.key, baseURL: `${edge.url}/v1`, maxRetries: 0, timeout: 120_000 })
    const r = await c.chat.completions.create(
      { model: 'auto', messages: question, max_tokens: 300, temperature: 0, stop: ['e'] },
      { headers: { 'cache-control': 'no-store' } },
    )
    // The settlement runs after the answer (waitUntil): poll briefly for it.
    const keys = async () => redis.keys(`${PREFIX}:rl:${t.id}:t:*`)
    let charged = Number.NaN
    for (let i = 0; i < 50; i++) {
      const k = await keys()
      charged = k.length ? Number(await redis.get(k[0]!)) : Number.NaN
      if (charged === r.usage!.total_tokens) break
      await new Promise((res) => setTimeout(res, 50))
    }
    expect(r.usage!.completion_tokens).toBeLessThan(300)
    expect(charged).toBe(r.usage!.total_tokens)
  })

  it('streams chunks and a usage chunk that match the non-streamed answer', async () => {
    const params = { model: 'auto', messages: question, max_tokens: 16, temperature: 0 }
    const whole = await client.chat.completions.create(params, { headers: { 'cache-control': 'no-store' } })
    const stream = await client.chat.completions.create(
      { ...params, stream: true, stream_options: { include_usage: true } },
      { headers: { 'cache-control': 'no-store' } },
    )
    let text = ''
    let usage: OpenAI.CompletionUsage | null | undefined
    let finish: string | null = null
    for await (const chunk of stream) {
      expect(chunk.object).toBe('chat.completion.chunk')
      text += chunk.choices[0]?.delta.content ?? ''
      finish = chunk.choices[0]?.finish_reason ?? finish
      if (chunk.usage) usage = chunk.usage
    }
    expect(text).toBe(whole.choices[0]!.message.content)
    expect(finish).toBe(whole.choices[0]!.finish_reason)
    expect(usage).toEqual(whole.usage)
  })

  it('serves /v1/completions as text_completion', async () => {
    const res = await client.completions.create({
      model: 'general',
      prompt: 'Once upon a time',
      max_tokens: 8,
      seed: 7,
    })
    expect(res.object).toBe('text_completion')
    expect(typeof res.choices[0]!.text).toBe('string')
  })

  it('replays a cached deterministic answer (JSON and SSE), per tenant only', async () => {
    const params = {
      model: 'auto',
      messages: [{ role: 'user' as const, content: 'Cache me, please.' }],
      max_tokens: 12,
      temperature: 0,
    }
    const first = await client.chat.completions.create(params).withResponse()
    expect(first.response.headers.get('x-moe-cache')).toBe('MISS')
    await new Promise((r) => setTimeout(r, 300)) // the cache write runs after the response
    const second = await client.chat.completions.create(params).withResponse()
    expect(second.response.headers.get('x-moe-cache')).toBe('HIT')
    expect(second.data.choices[0]!.message.content).toBe(first.data.choices[0]!.message.content)
    const replay = await client.chat.completions.create({ ...params, stream: true }).withResponse()
    expect(replay.response.headers.get('x-moe-cache')).toBe('HIT')
    let text = ''
    for await (const chunk of replay.data) text += chunk.choices[0]?.delta.content ?? ''
    expect(text).toBe(first.data.choices[0]!.message.content)
    const otherClient = new OpenAI({ apiKey: other.key, baseURL: `${edge.url}/v1`, maxRetries: 0 })
    const theirs = await otherClient.chat.completions.create(params).withResponse()
    expect(theirs.response.headers.get('x-moe-cache')).toBe('MISS')
    const bypass = await client.chat.completions
      .create(params, { headers: { 'cache-control': 'no-cache' } })
      .withResponse()
    expect(bypass.response.headers.get('x-moe-cache')).toBe('BYPASS')
  })

  it('completes an async job and reports its result', async () => {
    const res = await fetch(`${edge.url}/v1/chat/completions`, {
      method: 'POST',
      headers: {
        authorization: `Bearer ${tenant.key}`,
        'content-type': 'application/json',
        prefer: 'respond-async',
      },
      body: JSON.stringify({ model: 'auto', messages: question, max_tokens: 8 }),
    })
    expect(res.status).toBe(202)
    const { id } = (await res.json()) as { id: string }
    let status: { status: string; result?: { object: string; choices: unknown[] } } = { status: 'queued' }
    const deadline = Date.now() + 60_000
    while (!['completed', 'failed'].includes(status.status) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 200))
      const s = await fetch(`${edge.url}/v1/jobs/${id}`, {
        headers: { authorization: `Bearer ${tenant.key}` },
      })
      status = (await s.json()) as typeof status
    }
    expect(status.status).toBe('completed')
    expect(status.result?.object).toBe('chat.completion')
  })

  it('sets the cancel key when a streaming client disconnects mid-generation', async () => {
    const ctrl = new AbortController()
    const res = await fetch(`${edge.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${tenant.key}`, 'content-type': 'application/json' },
      // The pool's longest answers, eight of them, so the job is still generating when the
      // disconnect is noticed (one 512-token answer on the tiny model can end within half a second).
      body: JSON.stringify({ model: 'general', messages: question, max_tokens: 512, n: 8, stream: true }),
      signal: ctrl.signal,
    })
    const id = res.headers.get('x-request-id')!
    const reader = res.body!.getReader()
    let seen = ''
    while (!seen.includes('"content"')) seen += new TextDecoder().decode((await reader.read()).value)
    ctrl.abort()
    const deadline = Date.now() + 10_000
    while ((await redis.get(jobCancelKey(id))) === null && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 100))
    expect(await redis.get(jobCancelKey(id))).toBe('1')
  })
})
