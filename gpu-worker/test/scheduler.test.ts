import { beforeAll, describe, expect, it } from 'vitest'
import type { GenerationResult, MoeEngine } from '../src/engine/engine.ts'
import type { GenerationParams } from '../src/engine/sequence.ts'
import { ThreadedEngine } from '../src/engine/threaded-engine.ts'
import {
  BatchScheduler,
  type ScheduledRequest,
  type SequenceOutcome,
} from '../src/scheduler/batch-scheduler.ts'
import { FairQueue } from '../src/scheduler/fair-queue.ts'
import { loadTinyEngine, TINY_MODEL_DIR } from './fixtures.ts'

let engine: MoeEngine
beforeAll(async () => {
  engine = await loadTinyEngine(16, 256)
})

const params = (seed: number, extra: Partial<GenerationParams> = {}): GenerationParams => ({
  maxTokens: 12,
  temperature: 0.9,
  topP: 0.95,
  topK: 40,
  seed,
  stop: [],
  allowedExperts: null,
  ...extra,
})

function request(id: string, tenantId: string, promptIds: number[], p: GenerationParams) {
  const tokens: number[] = []
  let resolve!: (o: SequenceOutcome) => void
  const done = new Promise<SequenceOutcome>((r) => {
    resolve = r
  })
  const req: ScheduledRequest = {
    id,
    tenantId,
    pool: 'general',
    promptIds,
    params: p,
    onToken: (t) => tokens.push(t.tokenId),
    onFinish: resolve,
  }
  return { req, tokens, done }
}

const prompt = (i: number) => [
  1,
  ...Array.from({ length: 3 + (i % 7) }, (_, j) => 3 + ((i * 31 + j * 17) % 250)),
]

describe('continuous batching scheduler', () => {
  it('gives 16 concurrent requests of different lengths the outputs they get alone', async () => {
    const alone: GenerationResult[] = []
    for (let i = 0; i < 16; i++)
      alone.push(await engine.generate({ inputIds: prompt(i), ...params(i, { maxTokens: 6 + (i % 5) }) }))
    const scheduler = new BatchScheduler(engine, { maxBatch: 16 })
    const reqs = Array.from({ length: 16 }, (_, i) =>
      request(`r${i}`, `t${i % 3}`, prompt(i), params(i, { maxTokens: 6 + (i % 5) })),
    )
    for (const r of reqs) scheduler.submit(r.req)
    const outcomes = await Promise.all(reqs.map((r) => r.done))
    outcomes.forEach((o, i) => {
      expect(o.kind).toBe('finished')
      if (o.kind !== 'finished') return
      expect(o.result.outputIds).toEqual(alone[i]!.outputIds)
      expect(reqs[i]!.tokens).toEqual(alone[i]!.outputIds)
    })
    expect(scheduler.running).toBe(0)
  })

  it('batches the same way with the forward passes on a worker thread', async () => {
    const threaded = await ThreadedEngine.load({
      modelDir: TINY_MODEL_DIR,
      ep: 'cpu',
      maxBatch: 16,
      maxContext: 256,
      log: () => {},
    })
    try {
      const scheduler = new BatchScheduler(threaded, { maxBatch: 16 })
      const reqs = Array.from({ length: 12 }, (_, i) =>
        request(`t${i}`, `t${i % 3}`, prompt(i), params(i, { maxTokens: 5 + (i % 6) })),
      )
      for (const r of reqs) scheduler.submit(r.req)
      const outcomes = await Promise.all(reqs.map((r) => r.done))
      for (let i = 0; i < reqs.length; i++) {
        const alone = await engine.generate({ inputIds: prompt(i), ...params(i, { maxTokens: 5 + (i % 6) }) })
        const o = outcomes[i]!
        expect(o.kind === 'finished' && o.result.outputIds).toEqual(alone.outputIds)
      }
    } finally {
      await threaded.close()
    }
  })

  it('lets late arrivals join a running batch at a step boundary', async () => {
    const scheduler = new BatchScheduler(engine, { maxBatch: 8 })
    const first = request('a', 't', prompt(1), params(1, { maxTokens: 30 }))
    scheduler.submit(first.req)
    while (first.tokens.length < 3) await new Promise((r) => setImmediate(r))
    const late = request('b', 't', prompt(2), params(2, { maxTokens: 5 }))
    scheduler.submit(late.req)
    const lateOutcome = await late.done
    expect(lateOutcome.kind).toBe('finished')
    // The long request was still running when the late one finished: they shared steps.
    expect(first.tokens.length).toBeLessThan(30)
    const firstOutcome = await first.done
    const solo = await engine.generate({ inputIds: prompt(1), ...params(1, { maxTokens: 30 }) })
    expect(firstOutcome.kind === 'finished' && firstOutcome.result.outputIds).toEqual(solo.outputIds)
  })

  it('serves tenants round-robin: a burst from one tenant does not starve another', async () => {
    const scheduler = new BatchScheduler(engine, { maxBatch: 2 })
    const order: string[] = []
    const burst = Array.from({ length: 10 }, (_, i) =>
      request(`burst${i}`, 'big', prompt(i), params(i, { maxTokens: 3 })),
    )
    const single = request('single', 'small', prompt(99), params(99, { maxTokens: 3 }))
    for (const r of burst) {
      scheduler.submit(r.req)
      r.done.then(() => order.push(r.req.id))
    }
    scheduler.submit(single.req)
    single.done.then(() => order.push('single'))
    await Promise.all([...burst.map((r) => r.done), single.done])
    // With FIFO it would finish last; round-robin admits it with the burst's second request.
    expect(order.indexOf('single')).toBeLessThan(3)
  })

  it('applies a cancellation at the next step boundary', async () => {
    const scheduler = new BatchScheduler(engine, { maxBatch: 4 })
    const r = request('c', 't', prompt(3), params(3, { maxTokens: 100 }))
    const other = request('d', 't', prompt(4), params(4, { maxTokens: 20 }))
    scheduler.submit(r.req)
    scheduler.submit(other.req)
    while (r.tokens.length < 4) await new Promise((res) => setImmediate(res))
    const before = r.tokens.length
    scheduler.cancel('c')
    const outcome = await r.done
    expect(outcome.kind).toBe('cancelled')
    expect(r.tokens.length).toBeLessThanOrEqual(before + 1)
    // The survivor, moved to the freed KV slot, still decodes exactly as alone.
    const o = await other.done
    const solo = await engine.generate({ inputIds: prompt(4), ...params(4, { maxTokens: 20 }) })
    expect(o.kind === 'finished' && o.result.outputIds).toEqual(solo.outputIds)
  })

  it('polls the cancel keys of waiting requests too, not only running ones', async () => {
    const polled = new Set<string>()
    const scheduler = new BatchScheduler(engine, {
      maxBatch: 1,
      hooks: {
        pollCancels: async (ids) => {
          for (const id of ids) polled.add(id)
          return ids.filter((id) => id === 'queued')
        },
      },
    })
    const running = request('running', 't', prompt(5), params(5, { maxTokens: 40, ignoreEos: true }))
    const queued = request('queued', 'u', prompt(6), params(6))
    scheduler.submit(running.req)
    scheduler.submit(queued.req)
    const outcome = await queued.done
    expect(outcome.kind).toBe('cancelled')
    expect(queued.tokens).toHaveLength(0)
    expect(polled.has('queued')).toBe(true)
    // It left while the one slot was still busy with the running request.
    expect(running.tokens.length).toBeLessThan(40)
    expect((await running.done).kind).toBe('finished')
  })

  it('refuses requests that cannot fit the context, saying why', () => {
    const scheduler = new BatchScheduler(engine, { maxBatch: 4 })
    const r = request('long', 't', Array(250).fill(5), params(1, { maxTokens: 10 }))
    expect(() => scheduler.submit(r.req)).toThrow(/exceeds the context limit of 256/)
    const bad = request('bad', 't', [1, 999], params(1))
    expect(() => scheduler.submit(bad.req)).toThrow(/token ids/)
  })
})

describe('fair queue', () => {
  it('alternates tenants and keeps each tenant FIFO', () => {
    const q = new FairQueue<{ tenantId: string; n: number }>()
    for (let n = 0; n < 3; n++) q.push({ tenantId: 'a', n })
    q.push({ tenantId: 'b', n: 0 })
    const got = [q.shift(), q.shift(), q.shift(), q.shift()].map((x) => `${x!.tenantId}${x!.n}`)
    expect(got).toEqual(['a0', 'b0', 'a1', 'a2'])
    expect(q.size).toBe(0)
  })
})
