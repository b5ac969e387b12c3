import {
  choiceSeed,
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

// Several choices per job (n, prompt arrays), logprobs and logits processing, through the worker
// service against the real Redis and the real engine.

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
const done = (events: StreamEvent[]) => events.find((e): e is DoneEvent => e.type === 'done')!

describe('choices, logprobs and logits processing in the worker service', () => {
  it('runs prompts x n sequences, each with its own derived seed, and reports every choice', async () => {
    const prompts = [
      [1, 72, 105],
      [1, 87, 111, 114, 108, 100],
    ]
    const sampling = { maxTokens: 8, temperature: 1, topP: 1, topK: 0, seed: 42, stop: [], n: 2, logprobs: 2 }
    const p = payload('general', { input: { kind: 'prompts', prompts }, sampling })
    await client.add(p)
    const events = await client.events(p.requestId!)
    const d = done(events)
    expect(d.choices?.map((c) => c.index)).toEqual([0, 1, 2, 3])
    let completion = 0
    for (const [c, choice] of d.choices!.entries()) {
      const inputIds = prompts[Math.floor(c / 2)]!
      const alone = await engine.generate({ inputIds, ...sampling, seed: choiceSeed(42, c) })
      expect(choice.text).toBe(alone.text)
      expect(choice.completionTokens).toBe(alone.outputIds.length)
      const streamed = tokens(events).filter((t) => (t.choice ?? 0) === c)
      expect(streamed.map((t) => t.tokenId)).toEqual(alone.outputIds)
      // One logprobs entry per token but an ending EOS; each lists 2 alternatives, best first.
      const eos = alone.finishReason === 'stop' ? 1 : 0
      expect(choice.logprobs).toHaveLength(alone.outputIds.length - eos)
      // The token events carry the same entries, each once.
      expect(streamed.flatMap((t) => (t.logprobs ? [t.logprobs] : []))).toEqual(choice.logprobs)
      for (const lp of choice.logprobs!) {
        expect(lp.logprob).toBeLessThanOrEqual(0)
        expect(lp.top).toHaveLength(2)
        expect(lp.top[0]!.logprob).toBeGreaterThanOrEqual(lp.top[1]!.logprob)
        expect(lp.top[0]!.logprob).toBeGreaterThanOrEqual(lp.logprob)
        expect(lp.bytes.length).toBeGreaterThan(0)
      }
      completion += alone.outputIds.length
    }
    // Distinct seeds: the two choices of one prompt differ.
    expect(new Set(d.choices!.map((c) => c.text)).size).toBeGreaterThan(2)
    expect(d.usage).toEqual({ promptTokens: 3 + 6, completionTokens: completion })
    const job = await client.queue('general').getJob(p.requestId!)
    expect(job!.returnvalue.choices).toHaveLength(4)
  })

  it('an ending EOS has no logprobs entry, in the token events or the result', async () => {
    // logit_bias +100 on EOS (id 2): every choice ends at its first token.
    const p = payload('general', {
      sampling: {
        maxTokens: 8,
        temperature: 1,
        topP: 1,
        topK: 0,
        seed: 3,
        stop: [],
        n: 2,
        logprobs: 1,
        logitBias: { '2': 100 },
      },
    })
    await client.add(p)
    const events = await client.events(p.requestId!)
    expect(tokens(events)).toHaveLength(2)
    for (const t of tokens(events)) expect(t.logprobs).toBeUndefined()
    for (const c of done(events).choices!)
      expect(c).toMatchObject({ completionTokens: 1, logprobs: [], finishReason: 'stop' })
  })

  it('applies penalties and logit_bias as engine.generate does with the same parameters', async () => {
    const sampling = {
      maxTokens: 10,
      temperature: 0,
      topP: 1,
      topK: 0,
      seed: 1,
      stop: [],
      frequencyPenalty: 1.5,
      presencePenalty: 0.5,
      repetitionPenalty: 1.3,
      logitBias: { '2': -100 },
    }
    const inputIds = [1, 72, 101, 108, 108, 111]
    const p = payload('general', { sampling })
    await client.add(p)
    const d = done(await client.events(p.requestId!))
    const want = await engine.generate({ inputIds, ...sampling })
    const plain = await engine.generate({
      inputIds,
      maxTokens: 10,
      temperature: 0,
      topP: 1,
      topK: 0,
      seed: 1,
    })
    expect(d.text).toBe(want.text)
    expect(want.outputIds).not.toEqual(plain.outputIds)
    expect(want.outputIds).not.toContain(2)
  })

  it('refuses a logit_bias outside the vocabulary', async () => {
    const p = payload('general', {
      sampling: {
        maxTokens: 4,
        temperature: 0,
        topP: 1,
        topK: 0,
        seed: 1,
        stop: [],
        logitBias: { '999999': 1 },
      },
    })
    await client.add(p)
    const end = (await client.events(p.requestId!)).at(-1)!
    expect(end).toMatchObject({ type: 'error', code: 'invalid_request' })
    expect((end as { message: string }).message).toContain('vocabulary')
  })

  it('cancels every choice of a job at once', async () => {
    const p = payload('general', {
      sampling: {
        maxTokens: 400,
        temperature: 0.8,
        topP: 1,
        topK: 0,
        seed: 5,
        stop: [],
        n: 3,
        ignoreEos: true,
      },
    })
    await client.add(p)
    while ((await client.redis.xlen(jobEventsKey(p.requestId!))) < 6)
      await new Promise((r) => setTimeout(r, 5))
    await client.redis
      .multi()
      .set(jobCancelKey(p.requestId!), '1', 'EX', 60)
      .publish(JOB_CANCEL_CHANNEL, p.requestId!)
      .exec()
    const events = await client.events(p.requestId!)
    const d = done(events)
    expect(d.finishReason).toBe('cancelled')
    expect(d.choices).toHaveLength(3)
    for (const c of d.choices!) expect(c.completionTokens).toBeLessThan(400)
  })
})
