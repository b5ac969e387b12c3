import {
  type DoneEvent,
  JOB_CANCEL_CHANNEL,
  jobCancelKey,
  jobEventsKey,
  type StreamEvent,
  type TokenEvent,
} from '@moe/shared'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { MoeEngine } from '../src/engine/engine.ts'
import type { WorkerService } from '../src/service/worker-service.ts'
import { loadTinyEngine } from './fixtures.ts'
import { payload, QueueClient, startService, uniquePrefix } from './service-harness.ts'

// The worker service against the real Redis on 127.0.0.1:6379 and the real engine.

const prefix = uniquePrefix()
let service: WorkerService
let client: QueueClient
let engine: MoeEngine

beforeAll(async () => {
  service = await startService(prefix, { MOE_CANCEL_POLL_MS: '100' })
  client = new QueueClient(prefix)
  engine = await loadTinyEngine(1, 512)
})
afterAll(async () => {
  await service?.close()
  await client?.close()
})

const tokens = (events: StreamEvent[]) => events.filter((e): e is TokenEvent => e.type === 'token')
const done = (events: StreamEvent[]) => events.find((e): e is DoneEvent => e.type === 'done')

describe('GPU worker service', () => {
  it('streams the same tokens as engine.generate() for the same seed, in order, then done', async () => {
    const p = payload('general')
    await client.add(p)
    const events = await client.events(p.requestId!)
    const want = await engine.generate({
      inputIds: [1, 72, 101, 108, 108, 111],
      maxTokens: 12,
      temperature: 0.8,
      topP: 0.95,
      topK: 40,
      seed: 42,
    })
    expect(tokens(events).map((t) => t.tokenId)).toEqual(want.outputIds)
    expect(tokens(events).map((t) => t.index)).toEqual(want.outputIds.map((_, i) => i))
    const d = done(events)!
    expect(d).toMatchObject({
      finishReason: want.finishReason,
      usage: { promptTokens: 6, completionTokens: want.outputIds.length },
      seed: 42,
    })
    expect(d.text).toBe(want.text)
    expect(events[events.length - 1]!.type).toBe('done')
    const ttl = await client.redis.ttl(jobEventsKey(p.requestId))
    expect(ttl).toBeGreaterThan(0)
  })

  it('completes 16 concurrent jobs, each with the output it gets alone', async () => {
    const jobs = Array.from({ length: 16 }, (_, i) =>
      payload('general', {
        tenantId: `tenant-${i % 4}`,
        input: {
          kind: 'tokens',
          inputIds: [1, ...Array.from({ length: 2 + (i % 6) }, (_, j) => 10 + i * 7 + j)],
        },
        sampling: { maxTokens: 8 + (i % 4), temperature: 0.7, topP: 0.9, topK: 0, seed: 1000 + i, stop: [] },
      }),
    )
    await Promise.all(jobs.map((p) => client.add(p)))
    const results = await Promise.all(jobs.map((p) => client.events(p.requestId!)))
    for (let i = 0; i < jobs.length; i++) {
      const p = jobs[i]!
      const input = p.input as { inputIds: number[] }
      const alone = await engine.generate({ inputIds: input.inputIds, ...p.sampling, seed: 1000 + i })
      expect(tokens(results[i]!).map((t) => t.tokenId)).toEqual(alone.outputIds)
    }
  })

  it('derives and records a seed when the payload has none, so a retry repeats itself', async () => {
    const p = payload('general', { sampling: { maxTokens: 6, temperature: 1, topP: 1, topK: 0, stop: [] } })
    await client.add(p)
    const d = done(await client.events(p.requestId!))!
    expect(Number.isInteger(d.seed)).toBe(true)
    const q = payload('general', {
      sampling: { maxTokens: 6, temperature: 1, topP: 1, topK: 0, stop: [], seed: d.seed },
    })
    await client.add(q)
    expect(done(await client.events(q.requestId!))!.text).toBe(d.text)
  })

  it('ends a cancelled job within one step', async () => {
    const p = payload('general', {
      sampling: { maxTokens: 400, temperature: 0.8, topP: 1, topK: 0, seed: 5, stop: [] },
    })
    await client.add(p)
    // Wait for a few tokens, then set the cancel key as the edge does.
    for (;;) {
      const n = await client.redis.xlen(jobEventsKey(p.requestId))
      if (n >= 3) break
      await new Promise((r) => setTimeout(r, 5))
    }
    // As the edge does: set the key and publish the id.
    await client.redis
      .multi()
      .set(jobCancelKey(p.requestId!), '1', 'EX', 60)
      .publish(JOB_CANCEL_CHANNEL, p.requestId!)
      .exec()
    const atCancel = await client.redis.xlen(jobEventsKey(p.requestId))
    const events = await client.events(p.requestId!)
    const d = done(events)!
    expect(d.finishReason).toBe('cancelled')
    // Steps already flushed when the key was read, plus at most the one in flight.
    expect(tokens(events).length).toBeLessThanOrEqual(atCancel + 2)
    expect(tokens(events).length).toBeLessThan(400)
    const job = await client.queue('general').getJob(p.requestId!)
    expect(await job!.getState()).toBe('completed')
    expect(job!.returnvalue.finishReason).toBe('cancelled')
  })

  it('also notices a cancel key set without a publish (polling fallback), and one set before the job starts', async () => {
    const p = payload('general', {
      sampling: { maxTokens: 480, temperature: 0.8, topP: 1, topK: 0, seed: 6, stop: [], ignoreEos: true },
    })
    await client.add(p)
    while ((await client.redis.xlen(jobEventsKey(p.requestId))) < 3)
      await new Promise((r) => setTimeout(r, 5))
    await client.redis.set(jobCancelKey(p.requestId!), '1', 'EX', 60)
    const d = done(await client.events(p.requestId!))!
    expect(d.finishReason).toBe('cancelled')
    expect(d.usage.completionTokens).toBeLessThan(480)

    const early = payload('general')
    await client.redis.set(jobCancelKey(early.requestId!), '1', 'EX', 60)
    await client.add(early)
    const events = await client.events(early.requestId!)
    expect(tokens(events)).toHaveLength(0)
    expect(done(events)).toMatchObject({ finishReason: 'cancelled', usage: { completionTokens: 0 } })
  })

  it('fails malformed payloads permanently without stopping, then serves the next good job', async () => {
    const q = client.queue('general')
    const bad = [
      { id: 'bad-1', data: { hello: 'world' }, code: 'invalid_request' },
      {
        id: 'bad-2',
        data: { ...payload('general', { requestId: 'bad-2' }), pool: 'code' },
        code: 'unknown_pool',
      },
      {
        id: 'bad-3',
        data: payload('general', {
          requestId: 'bad-3',
          input: { kind: 'tokens', inputIds: Array(600).fill(5) },
        }),
        code: 'context_length_exceeded',
      },
      {
        id: 'bad-4',
        data: payload('general', {
          requestId: 'bad-4',
          sampling: { maxTokens: 100_000, temperature: 0, topP: 1, topK: 0, seed: 1, stop: [] },
        }),
        code: 'max_tokens_exceeded',
      },
      {
        id: 'bad-5',
        data: payload('general', { requestId: 'bad-5', input: { kind: 'tokens', inputIds: [1, 99999] } }),
        code: 'invalid_request',
      },
    ]
    for (const b of bad) {
      const id = `${b.id}-${prefix}`
      const data = 'requestId' in b.data ? { ...b.data, requestId: id } : b.data
      await q.add('generate', data, { jobId: id, attempts: 3 })
      const events = await client.events(id)
      const err = events[events.length - 1]!
      expect(err).toMatchObject({ type: 'error', code: b.code })
      const job = await q.getJob(id)
      for (let i = 0; i < 50 && (await job!.getState()) !== 'failed'; i++)
        await new Promise((r) => setTimeout(r, 20))
      expect(await job!.getState()).toBe('failed')
      expect((await q.getJob(id))!.attemptsMade).toBeLessThanOrEqual(1) // permanent: not retried
    }
    const good = payload('general')
    await client.add(good)
    expect(done(await client.events(good.requestId!))!.type).toBe('done')
    expect(service.health().ok).toBe(true)
  })

  it("never routes a restricted pool's tokens outside its experts", async () => {
    const p = payload('code', {
      sampling: { maxTokens: 20, temperature: 1, topP: 1, topK: 0, seed: 9, stop: [] },
    })
    await client.add(p)
    const d = done(await client.events(p.requestId!))!
    expect(d.routing.allowedExperts).toEqual([0, 1, 5, 6])
    for (const layer of d.routing.expertLoad)
      layer.forEach((n, expert) => {
        if (![0, 1, 5, 6].includes(expert)) expect(n).toBe(0)
      })
    const total = d.routing.expertLoad[0]!.reduce((a, b) => a + b, 0)
    expect(total).toBe((d.usage.promptTokens + d.usage.completionTokens - 1) * 2)
  })

  it('writes no token events for a job that asks for none (batch lines), only the final event', async () => {
    const p = payload('general', { streamTokens: false })
    await client.add(p)
    const events = await client.events(p.requestId!)
    expect(events).toHaveLength(1)
    const d = done(events)!
    expect(d.usage.completionTokens).toBeGreaterThan(0)
    const streamed = payload('general', { requestId: `${p.requestId}-streamed`, streamTokens: true })
    await client.add(streamed)
    const withTokens = await client.events(streamed.requestId!)
    expect(done(withTokens)!.text).toBe(d.text)
    expect(
      tokens(withTokens)
        .map((t) => t.text)
        .join(''),
    ).toBe(d.text)
  })

  it('exposes /healthz and Prometheus /metrics with expert load', async () => {
    const base = `http://127.0.0.1:${service.healthPort}`
    const health = await (await fetch(`${base}/healthz`)).json()
    expect(health).toMatchObject({ ok: true, status: 'ok' })
    const text = await (await fetch(`${base}/metrics`)).text()
    for (const name of [
      'moe_requests_running',
      'moe_requests_waiting',
      'moe_batch_size_bucket',
      'moe_time_to_first_token_seconds_bucket',
      'moe_inter_token_latency_seconds_bucket',
      'moe_generated_tokens_total',
      'moe_queue_wait_seconds_bucket',
      'moe_batch_occupancy',
    ])
      expect(text).toContain(name)
    expect(text).toMatch(/moe_request_duration_seconds_count\{pool="general"\} [1-9]/)
    expect(text).toMatch(/moe_queue_depth\{pool="general",priority="live"\} 0/)
    expect(text).toMatch(/moe_expert_tokens_total\{pool="code",layer="0",expert="(0|1|5|6)"\} \d+/)
    expect(text).not.toMatch(/moe_expert_tokens_total\{pool="code",layer="\d",expert="(2|3|4|7)"\}/)
  })

  it('counts prefix-cache queries and hits in /metrics, in tokens, as prompts share a prefix', async () => {
    const metric = async (name: string) => {
      const text = await (await fetch(`http://127.0.0.1:${service.healthPort}/metrics`)).text()
      return [...text.matchAll(new RegExp(`^${name}\\{[^}]*\\} (\\d+)`, 'gm'))].reduce(
        (a, m) => a + Number(m[1]),
        0,
      )
    }
    const shared = Array.from({ length: 40 }, (_, i) => 3 + ((i * 37) % 250))
    const [queries, hits] = [
      await metric('moe_prefix_cache_queries_total'),
      await metric('moe_prefix_cache_hits_total'),
    ]
    for (const tail of [
      [5, 6],
      [7, 8, 9],
    ]) {
      const p = payload('general', { input: { kind: 'tokens', inputIds: [...shared, ...tail] } })
      await client.add(p)
      expect(done(await client.events(p.requestId!))).toBeDefined()
    }
    expect((await metric('moe_prefix_cache_queries_total')) - queries).toBe(42 + 43)
    // The second prompt found the first's 32 tokens of whole blocks (2 x 16) in the cache.
    expect((await metric('moe_prefix_cache_hits_total')) - hits).toBe(32)
    expect(await metric('moe_prefix_cache_tokens')).toBeGreaterThanOrEqual(32)
  })
})
