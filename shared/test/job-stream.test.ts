import { Redis } from 'ioredis'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  cancelJobs,
  JOB_CANCEL_CHANNEL,
  jobCancelKey,
  jobEventsKey,
  lastJobEvent,
  readJobStream,
  type StreamEvent,
  streamEntryFields,
} from '../src/index.ts'

// Against the real Redis (REDIS_URL, default 127.0.0.1:6379), with job ids unique to this run.
const redis = new Redis(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', { maxRetriesPerRequest: 1 })
const run = `shared-test-${process.pid}-${Date.now()}`
const ids: string[] = []
const jobId = (name: string) => {
  const id = `${run}-${name}`
  ids.push(id)
  return id
}

const token = (index: number, text: string): StreamEvent => ({ type: 'token', index, text, tokenId: index })
const append = (id: string, ...events: StreamEvent[]) =>
  Promise.all(events.map((e) => redis.xadd(jobEventsKey(id), '*', ...streamEntryFields(e))))

async function collect(gen: AsyncGenerator<StreamEvent>): Promise<StreamEvent[]> {
  const out: StreamEvent[] = []
  for await (const e of gen) out.push(e)
  return out
}

beforeAll(async () => {
  await redis.ping()
})
afterAll(async () => {
  if (ids.length > 0) await redis.del(...ids.flatMap((id) => [jobEventsKey(id), jobCancelKey(id)]))
  await redis.quit()
})

describe('readJobStream', () => {
  it('yields each token index once when a retried job wrote some twice, and stops at the end', async () => {
    const id = jobId('retried')
    await append(id, token(0, 'a'), token(1, 'b'), token(1, 'b'), token(0, 'a'), token(2, 'c'))
    await append(id, { type: 'error', code: 'cancelled', message: 'stopped' }, token(3, 'late'))
    const events = await collect(readJobStream(redis, id, { blockMs: 200 }))
    expect(events.map((e) => (e.type === 'token' ? e.text : e.type))).toEqual(['a', 'b', 'c', 'error'])
    expect(await lastJobEvent(redis, id)).toEqual(token(3, 'late'))
  })

  it('waits for events written after it started', async () => {
    const id = jobId('live')
    const reading = collect(readJobStream(redis, id, { blockMs: 100 }))
    await new Promise((r) => setTimeout(r, 150))
    await append(id, token(0, 'x'))
    await append(id, {
      type: 'done',
      finishReason: 'stop',
      text: 'x',
      usage: { promptTokens: 1, completionTokens: 1 },
      timings: { queueWaitMs: 0, timeToFirstTokenMs: 1, totalMs: 1, tokensPerSecond: 1 },
      routing: { expertLoad: [], allowedExperts: null },
      seed: 7,
    })
    expect((await reading).map((e) => e.type)).toEqual(['token', 'done'])
  })

  it('throws deadline_exceeded when the job does not finish in time', async () => {
    const id = jobId('slow')
    await append(id, token(0, 'x'))
    const started = Date.now()
    await expect(collect(readJobStream(redis, id, { deadline: Date.now() + 300 }))).rejects.toMatchObject({
      code: 'deadline_exceeded',
    })
    expect(Date.now() - started).toBeLessThan(5000)
  })

  it('is null for a stream that does not exist', async () => {
    expect(await lastJobEvent(redis, jobId('none'))).toBeNull()
  })
})

describe('cancelJobs', () => {
  it('sets each cancel key with a TTL and publishes each id', async () => {
    const a = jobId('cancel-a')
    const b = jobId('cancel-b')
    const sub = redis.duplicate()
    const heard: string[] = []
    sub.on('message', (_channel: string, id: string) => heard.push(id))
    await sub.subscribe(JOB_CANCEL_CHANNEL)
    await cancelJobs(redis, [a, b])
    await cancelJobs(redis, [])
    for (let i = 0; i < 50 && heard.filter((id) => id.startsWith(run)).length < 2; i++)
      await new Promise((r) => setTimeout(r, 10))
    await sub.quit()
    expect(heard.filter((id) => id.startsWith(run)).sort()).toEqual([a, b].sort())
    expect(await redis.get(jobCancelKey(a))).toBe('1')
    expect(await redis.ttl(jobCancelKey(b))).toBeGreaterThan(0)
  })
})
