import { Redis } from 'ioredis'
import { afterAll, describe, expect, it } from 'vitest'
import {
  answerChoices,
  choiceCount,
  choiceSeed,
  completionLogprobs,
  JobPayload,
  jobEventsKey,
  readJobStream,
  type StreamEvent,
  streamEntryFields,
} from '../src/index.ts'

// Jobs with several choices: their seeds, their stream (token indices per choice), their shapes.

const redis = new Redis(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', { maxRetriesPerRequest: 1 })
const id = `shared-choices-${process.pid}-${Date.now()}`
afterAll(async () => {
  await redis.del(jobEventsKey(id))
  await redis.quit()
})

describe('choices', () => {
  it('choice 0 keeps the job seed; the others get distinct, stable, safe-integer seeds', () => {
    expect(choiceSeed(42, 0)).toBe(42)
    const seeds = Array.from({ length: 8 }, (_, i) => choiceSeed(42, i))
    expect(new Set(seeds).size).toBe(8)
    expect(seeds).toEqual(Array.from({ length: 8 }, (_, i) => choiceSeed(42, i)))
    for (const s of seeds) expect(Number.isSafeInteger(s) && s >= 0).toBe(true)
    expect(choiceSeed(Number.MAX_SAFE_INTEGER, 7)).toBeLessThanOrEqual(Number.MAX_SAFE_INTEGER)
  })

  it('a job payload takes prompts and n, and counts prompts x n choices', () => {
    const p = JobPayload.parse({
      version: 1,
      requestId: 'r',
      tenantId: 't',
      pool: 'general',
      model: 'm',
      input: { kind: 'prompts', prompts: ['a', [1, 2]] },
      sampling: { maxTokens: 4, temperature: 1, topP: 1, topK: 0, stop: [], n: 3, logprobs: 2 },
      deadline: 1,
      createdAt: 1,
    })
    expect(choiceCount(p)).toBe(6)
    expect(() => JobPayload.parse({ ...p, sampling: { ...p.sampling, logitBias: { x: 1 } } })).toThrow()
  })

  it('readJobStream keeps each index once per choice', async () => {
    const token = (choice: number, index: number): StreamEvent => ({
      type: 'token',
      index,
      text: `${choice}:${index}`,
      tokenId: 1,
      choice,
    })
    for (const e of [token(0, 0), token(1, 0), token(1, 1), token(0, 1), token(1, 1), token(0, 0)])
      await redis.xadd(jobEventsKey(id), '*', ...streamEntryFields(e))
    await redis.xadd(
      jobEventsKey(id),
      '*',
      'e',
      JSON.stringify({ type: 'error', code: 'cancelled', message: 'x' }),
    )
    const seen: string[] = []
    for await (const e of readJobStream(redis, id, { blockMs: 200 }))
      if (e.type === 'token') seen.push(e.text)
    expect(seen).toEqual(['0:0', '1:0', '1:1', '0:1'])
  })

  it("a job without choices reads as its one choice; legacy logprobs' offsets follow the text", () => {
    expect(answerChoices({ text: 'hi', finishReason: 'stop', usage: { completionTokens: 2 } })).toEqual([
      { index: 0, text: 'hi', finishReason: 'stop', completionTokens: 2 },
    ])
    const lp = (token: string) => ({ token, bytes: [], logprob: -1, top: [] })
    expect(completionLogprobs([lp('ab'), lp('c')], 5)?.text_offset).toEqual([5, 7])
    expect(completionLogprobs(undefined)).toBeNull()
    // logprobs 0 still lists the sampled token, as OpenAI does.
    expect(completionLogprobs([lp('ab')])?.top_logprobs).toEqual([{ ab: -1 }])
  })
})
