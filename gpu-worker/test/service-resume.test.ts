import {
  type DoneEvent,
  jobEventsKey,
  type StreamEvent,
  streamEntryFields,
  type TokenEvent,
} from '@moe/shared'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { MoeEngine } from '../src/engine/engine.ts'
import type { WorkerService } from '../src/service/worker-service.ts'
import { loadTinyEngine } from './fixtures.ts'
import { payload, QueueClient, startService, uniquePrefix } from './service-harness.ts'

// A job retried after its worker died mid-stream continues the tokens its stream already holds:
// regenerating from the seed is not enough, because another batch can round differently and
// sample other tokens, and the client would get the start of one answer and the rest of another.

const prefix = uniquePrefix()
let service: WorkerService
let client: QueueClient
let engine: MoeEngine

beforeAll(async () => {
  service = await startService(prefix)
  client = new QueueClient(prefix)
  engine = await loadTinyEngine(1, 512)
})
afterAll(async () => {
  await service?.close()
  await client?.close()
  await engine?.close()
})

const tokens = (events: StreamEvent[]) => events.filter((e): e is TokenEvent => e.type === 'token')

describe('a retried job', () => {
  it('continues the tokens an earlier attempt streamed, each index once, and answers their text', async () => {
    const sampling = { maxTokens: 10, temperature: 0.9, topP: 1, topK: 0, seed: 7, stop: [], ignoreEos: true }
    const p = payload('general', { sampling })
    const inputIds = (p.input as { inputIds: number[] }).inputIds
    // What a fresh run samples, and three tokens it does not: the earlier attempt's, as streamed.
    const fresh = await engine.generate({ inputIds, ...sampling, allowedExperts: null })
    const V = engine.config.vocab_size
    const earlier = fresh.outputIds.slice(0, 3).map((t) => (t + 1) % V)
    expect(fresh.outputIds.slice(0, 3)).not.toEqual(earlier)
    for (const [index, tokenId] of earlier.entries())
      await client.redis.xadd(
        jobEventsKey(p.requestId!),
        '*',
        ...streamEntryFields({ type: 'token', index, text: engine.tokenizer.decode([tokenId]), tokenId }),
      )
    await client.add(p)
    const events = await client.events(p.requestId!)
    const streamed = tokens(events)
    expect(streamed.map((t) => t.index)).toEqual([...Array(sampling.maxTokens).keys()])
    expect(streamed.slice(0, 3).map((t) => t.tokenId)).toEqual(earlier)
    const done = events.at(-1) as DoneEvent
    expect(done.type).toBe('done')
    expect(done.usage.completionTokens).toBe(sampling.maxTokens)
    expect(done.text).toBe(engine.tokenizer.decode(streamed.map((t) => t.tokenId)))
  })
})
