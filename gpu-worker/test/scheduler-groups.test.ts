import { beforeAll, describe, expect, it } from 'vitest'
import type { MoeEngine } from '../src/engine/engine.ts'
import type { GenerationParams } from '../src/engine/sequence.ts'
import {
  BatchScheduler,
  type ScheduledRequest,
  type SequenceOutcome,
} from '../src/scheduler/batch-scheduler.ts'
import { loadTinyEngine } from './fixtures.ts'

// The sequences of one job's choices (n > 1) share a group: cancelling the job's id cancels each,
// running or waiting, and cancel polling asks about the job, not about each choice.

let engine: MoeEngine
beforeAll(async () => {
  engine = await loadTinyEngine(4, 256)
})

const params = (seed: number): GenerationParams => ({
  maxTokens: 60,
  temperature: 0.9,
  topP: 1,
  topK: 0,
  seed,
  stop: [],
  allowedExperts: null,
  ignoreEos: true,
})

function request(id: string, group: string | undefined, seed: number) {
  const tokens: number[] = []
  let resolve!: (o: SequenceOutcome) => void
  const done = new Promise<SequenceOutcome>((r) => {
    resolve = r
  })
  const req: ScheduledRequest = {
    id,
    ...(group ? { group } : {}),
    tenantId: 't',
    pool: 'general',
    promptIds: [1, 10 + seed, 20 + seed],
    params: params(seed),
    onToken: (t) => tokens.push(t.tokenId),
    onFinish: resolve,
  }
  return { req, tokens, done }
}

describe('sequence groups', () => {
  it('cancelling the group cancels every choice, running or waiting, and nothing else', async () => {
    const scheduler = new BatchScheduler(engine, { maxBatch: 2 })
    const choices = [0, 1, 2].map((c) => request(`job:${c}`, 'job', c))
    const other = request('other', undefined, 9)
    for (const r of [...choices, other]) scheduler.submit(r.req)
    while (choices[0]!.tokens.length < 3) await new Promise((res) => setImmediate(res))
    scheduler.cancel('job')
    for (const r of choices) expect((await r.done).kind).toBe('cancelled')
    expect(choices[2]!.tokens.length).toBe(0)
    expect((await other.done).kind).toBe('finished')
    expect(other.tokens).toHaveLength(60)
  })

  it('polls cancels by group id', async () => {
    const polled = new Set<string>()
    const scheduler = new BatchScheduler(engine, {
      maxBatch: 4,
      hooks: {
        pollCancels: async (ids) => {
          for (const id of ids) polled.add(id)
          return ids.includes('job2') ? ['job2'] : []
        },
      },
    })
    const choices = [0, 1].map((c) => request(`job2:${c}`, 'job2', c))
    for (const r of choices) scheduler.submit(r.req)
    for (const r of choices) expect((await r.done).kind).toBe('cancelled')
    expect([...polled]).toEqual(['job2'])
  })
})
