import { beforeAll, describe, expect, it } from 'vitest'
import type { MoeEngine } from '../src/engine/engine.ts'
import type { GenerationParams } from '../src/engine/sequence.ts'
import { ThreadedEngine } from '../src/engine/threaded-engine.ts'
import {
  BatchScheduler,
  type ScheduledRequest,
  type SequenceOutcome,
  type StepStats,
} from '../src/scheduler/batch-scheduler.ts'
import { loadTinyEngine, maxAbsDiff, TINY_MODEL_DIR } from './fixtures.ts'

let engine: MoeEngine
beforeAll(async () => {
  engine = await loadTinyEngine(8, 512)
})

const greedy = (maxTokens: number, extra: Partial<GenerationParams> = {}): GenerationParams => ({
  maxTokens,
  temperature: 0,
  topP: 1,
  topK: 0,
  seed: 0,
  stop: [],
  allowedExperts: null,
  ignoreEos: true,
  ...extra,
})

/** Deterministic token ids in [3, 253), distinct per seed. */
const tokens = (seed: number, n: number) =>
  Array.from({ length: n }, (_, j) => 3 + ((seed * 131 + j * 37 + j * j) % 250))

function request(id: string, promptIds: number[], params: GenerationParams, tenantId = 't') {
  const out: number[] = []
  let resolve!: (o: SequenceOutcome) => void
  const done = new Promise<SequenceOutcome>((r) => {
    resolve = r
  })
  const req: ScheduledRequest = {
    id,
    tenantId,
    pool: 'general',
    promptIds,
    params,
    onToken: (t) => out.push(t.tokenId),
    onFinish: resolve,
  }
  return { req, out, done }
}

async function outputIds(done: Promise<SequenceOutcome>): Promise<number[]> {
  const o = await done
  if (o.kind === 'failed') throw o.error
  return o.result.outputIds
}

/** A scheduler on the shared engine that records its steps and its prefix lookups. */
function recorded(
  opts: ConstructorParameters<typeof BatchScheduler>[1] = {},
  on: MoeEngine | ThreadedEngine = engine,
) {
  const steps: StepStats[] = []
  const lookups = { queried: 0, hit: 0 }
  const scheduler = new BatchScheduler(on, {
    ...opts,
    hooks: {
      afterStep: (s) => steps.push(s),
      prefixLookup: (q, h) => {
        lookups.queried += q
        lookups.hit += h
      },
    },
  })
  return { scheduler, steps, lookups }
}

describe('forward passes that extend a non-empty cache', () => {
  const row = (slot: number, tokens: number[], pastLength: number) => ({
    slot,
    tokens,
    pastLength,
    allowedExperts: null,
  })
  const a = tokens(1, 40)
  const b = tokens(2, 56)
  /** The logits of a and b prefilled whole, then their first `heldA` / `heldB` tokens prefilled alone. */
  async function wholeThenStarts(heldA: number, heldB: number): Promise<Float32Array> {
    const whole = (await engine.forward([row(0, a, 0), row(1, b, 0)])).logits.slice()
    await engine.forward([row(0, a.slice(0, heldA), 0), row(1, b.slice(0, heldB), 0)])
    return whole
  }

  it('give the logits of one whole prefill', async () => {
    // Row 0 holds 24 positions, row 1 holds 40; each then feeds the rest of its prompt alone.
    const whole = await wholeThenStarts(24, 40)
    const la = (await engine.forward([row(0, a.slice(24), 24)])).logits.slice()
    const rb = await engine.forward([row(1, b.slice(40), 40)])
    const V = engine.config.vocab_size
    expect(maxAbsDiff(la, whole.subarray(0, V))).toBeLessThan(1e-4)
    expect(maxAbsDiff(rb.logits, whole.subarray(V))).toBeLessThan(1e-4)
  })

  it('extend several rows of different lengths in one pass', async () => {
    // 16 and 26 new tokens on caches of 24 and 30: the shorter row is padded.
    const whole = await wholeThenStarts(24, 30)
    const both = await engine.forward([row(0, a.slice(24), 24), row(1, b.slice(30), 30)])
    expect(maxAbsDiff(both.logits, whole)).toBeLessThan(1e-4)
  })
})

describe('prefix cache', () => {
  it('gives a request sharing a cached prefix the tokens of a cold run, prefilling only its suffix', async () => {
    const shared = tokens(3, 100)
    const first = [...shared, ...tokens(4, 9)]
    const second = [...shared, ...tokens(5, 13)]
    const cold = await engine.generate({ inputIds: second, ...greedy(10) })
    const { scheduler, steps, lookups } = recorded({ prefixCacheTokens: 1024 })
    const a = request('a', first, greedy(4))
    scheduler.submit(a.req)
    await outputIds(a.done)
    steps.length = 0
    const b = request('b', second, greedy(10))
    scheduler.submit(b.req)
    expect(await outputIds(b.done)).toEqual(cold.outputIds)
    // 96 of the shared 100 tokens are whole 16-token blocks: only the rest is prefilled.
    expect(lookups.hit).toBe(96)
    expect(lookups.queried).toBe(first.length + second.length)
    expect(steps.filter((s) => s.kind === 'prefill').map((s) => s.tokens)).toEqual([second.length - 96])
  })

  it('continues a conversation from the KV of the earlier turn, prompt and reply', async () => {
    const turn1 = tokens(6, 50)
    const { scheduler, lookups } = recorded({ prefixCacheTokens: 1024 })
    const a = request('a', turn1, greedy(30))
    scheduler.submit(a.req)
    const reply = await outputIds(a.done)
    const turn2 = [...turn1, ...reply, ...tokens(7, 11)]
    const cold = await engine.generate({ inputIds: turn2, ...greedy(8) })
    const b = request('b', turn2, greedy(8))
    scheduler.submit(b.req)
    expect(await outputIds(b.done)).toEqual(cold.outputIds)
    // The first turn held 50 + 29 positions when it finished: 64 of them in whole blocks.
    expect(lookups.hit).toBe(64)
  })

  it('keeps within its token bound, evicting the least recently used prefix', async () => {
    const { scheduler, steps, lookups } = recorded({ prefixCacheTokens: 96 })
    const cache = scheduler.prefixCache!
    let most = 0
    const seen: number[] = []
    const check = () => {
      most = Math.max(most, cache.tokens)
      seen.push(cache.size)
    }
    const prompts = [0, 1, 2, 3].map((i) => tokens(20 + i, 40))
    for (const p of prompts) {
      const r = request(`p${p[0]}`, p, greedy(2))
      scheduler.submit(r.req)
      await outputIds(r.done)
      check()
    }
    expect(most).toBeLessThanOrEqual(96)
    expect(cache.tokens).toBe(96) // three 32-token prefixes: the oldest went
    // The first prompt was evicted, the last is still there.
    const before = lookups.hit
    const again = request('again-last', [...prompts[3]!, 9], greedy(2))
    scheduler.submit(again.req)
    await outputIds(again.done)
    expect(lookups.hit - before).toBe(32)
    const evicted = request('again-first', [...prompts[0]!, 9], greedy(2))
    const hitBefore = lookups.hit
    scheduler.submit(evicted.req)
    await outputIds(evicted.done)
    expect(lookups.hit - hitBefore).toBe(0)
    expect(steps.length).toBeGreaterThan(0)
    expect(cache.tokens).toBeLessThanOrEqual(96)
  })

  it('keeps prompts restricted to different experts apart', async () => {
    const p = tokens(30, 48)
    const { scheduler, lookups } = recorded({ prefixCacheTokens: 1024 })
    const a = request('a', p, greedy(2, { allowedExperts: [0, 1, 2, 3] }))
    scheduler.submit(a.req)
    await outputIds(a.done)
    const cold = await engine.generate({ inputIds: [...p, 7], ...greedy(6) })
    const b = request('b', [...p, 7], greedy(6))
    scheduler.submit(b.req)
    expect(await outputIds(b.done)).toEqual(cold.outputIds)
    expect(lookups.hit).toBe(0)
  })

  it('prefills identical prompts admitted together once, each sampling with its own seed', async () => {
    const p = tokens(8, 37)
    const sampled = (seed: number) => ({ ...greedy(8), temperature: 0.9, topK: 40, seed })
    const alone = []
    for (const seed of [11, 12, 13])
      alone.push((await engine.generate({ inputIds: p, ...sampled(seed) })).outputIds)
    const { scheduler, steps, lookups } = recorded()
    const reqs = [11, 12, 13].map((seed) => request(`n${seed}`, p, sampled(seed)))
    for (const r of reqs) scheduler.submit(r.req)
    const outs = await Promise.all(reqs.map((r) => outputIds(r.done)))
    expect(outs).toEqual(alone)
    expect(steps.filter((s) => s.kind === 'prefill')).toMatchObject([{ rows: 1, tokens: 37 }])
    expect(lookups).toEqual({ queried: 3 * 37, hit: 2 * 37 })
  })

  it('hands the partly prefilled prompt of a cancelled leader to the identical prompts that followed it', async () => {
    const p = tokens(13, 90)
    const alone = []
    for (const seed of [21, 22])
      alone.push((await engine.generate({ inputIds: p, ...greedy(6), seed })).outputIds)
    const steps: StepStats[] = []
    const scheduler = new BatchScheduler(engine, {
      maxPrefillTokens: 32,
      hooks: {
        afterStep: (s) => {
          steps.push(s)
          if (steps.length === 1) scheduler.cancel('leader')
        },
      },
    })
    const leader = request('leader', p, greedy(6))
    const reqs = [21, 22].map((seed) => request(`f${seed}`, p, greedy(6, { seed })))
    for (const r of [leader, ...reqs]) scheduler.submit(r.req)
    expect((await leader.done).kind).toBe('cancelled')
    expect(await Promise.all(reqs.map((r) => outputIds(r.done)))).toEqual(alone)
    // 32 tokens by the leader, the other 58 by its heir; the last follower prefilled nothing.
    expect(steps.filter((s) => s.kind === 'prefill').map((s) => s.tokens)).toEqual([32, 32, 26])
  })

  it('works the same with the forward passes on a worker thread', async () => {
    const threaded = await ThreadedEngine.load({
      modelDir: TINY_MODEL_DIR,
      ep: 'cpu',
      maxBatch: 4,
      maxContext: 256,
      log: () => {},
    })
    try {
      const shared = tokens(9, 64)
      const second = [...shared, ...tokens(10, 5)]
      const cold = await engine.generate({ inputIds: second, ...greedy(6) })
      const { scheduler, lookups } = recorded({ prefixCacheTokens: 256, prefillChunkTokens: 16 }, threaded)
      const a = request('a', [...shared, 3], greedy(20))
      scheduler.submit(a.req)
      const b = request('b', second, greedy(6))
      // b arrives while a decodes, so a is cached by then and b joins mid-stream.
      await new Promise((r) => setTimeout(r, 0))
      while (scheduler.running === 0) await new Promise((r) => setTimeout(r, 1))
      scheduler.submit(b.req)
      expect(await outputIds(b.done)).toEqual(cold.outputIds)
      await outputIds(a.done)
      expect(lookups.hit).toBe(64)
    } finally {
      await threaded.close()
    }
  })
})

describe('chunked prefill', () => {
  it('gives a prompt prefilled in chunks the tokens of one whole prefill', async () => {
    const p = tokens(11, 150)
    const whole = await engine.generate({ inputIds: p, ...greedy(10) })
    const { scheduler, steps } = recorded({ maxPrefillTokens: 32 })
    const r = request('long', p, greedy(10))
    scheduler.submit(r.req)
    expect(await outputIds(r.done)).toEqual(whole.outputIds)
    expect(steps.filter((s) => s.kind === 'prefill').map((s) => s.tokens)).toEqual([32, 32, 32, 32, 22])
  })

  /** 3 streams decode; a 120-token prompt arrives after 3 of their tokens. */
  async function admitLongPrompt(opts: ConstructorParameters<typeof BatchScheduler>[1]) {
    const streams = [0, 1, 2].map((i) => tokens(40 + i, 6 + i))
    const long = tokens(12, 120)
    const alone = []
    for (const p of [...streams, long])
      alone.push((await engine.generate({ inputIds: p, ...greedy(30) })).outputIds)
    const { scheduler, steps } = recorded(opts)
    const reqs = streams.map((p, i) => request(`s${i}`, p, greedy(30), `t${i}`))
    for (const r of reqs) scheduler.submit(r.req)
    while (reqs.some((r) => r.out.length < 3)) await new Promise((r) => setTimeout(r, 1))
    const late = request('late', long, greedy(30), 'late')
    scheduler.submit(late.req)
    const outs = await Promise.all([...reqs, late].map((r) => outputIds(r.done)))
    expect(outs).toEqual(alone)
    return steps
  }

  it('runs each chunk in the same pass as a decode of the running streams when mixing is on', async () => {
    const steps = await admitLongPrompt({ prefillChunkTokens: 24, mixedPrefill: true })
    // A pass takes 24 tokens: the 3 decode rows and a 21-token chunk; the last 15 join the streams.
    const first = steps.findIndex((s) => s.kind === 'mixed')
    const during = steps.slice(first, first + 7).map((s) => `${s.kind}:${s.rows}:${s.tokens}`)
    expect(during).toEqual([
      'mixed:4:24',
      'mixed:4:24',
      'mixed:4:24',
      'mixed:4:24',
      'mixed:4:24',
      'mixed:4:18',
      'decode:4:4',
    ])
    expect(steps.slice(first).filter((s) => s.kind === 'prefill')).toEqual([])
  })

  it('interleaves a decode step of the running streams between chunks of a long prompt', async () => {
    const steps = await admitLongPrompt({ prefillChunkTokens: 24 })
    // From the long prompt's first chunk to its last: chunk, decode of the 3 streams, chunk, ...
    const firstChunk = steps.findIndex((s) => s.kind === 'prefill' && s.tokens === 24)
    const during = steps.slice(firstChunk, firstChunk + 10).map((s) => `${s.kind}:${s.rows}:${s.tokens}`)
    expect(during).toEqual([
      'prefill:1:24',
      'decode:3:3',
      'prefill:1:24',
      'decode:3:3',
      'prefill:1:24',
      'decode:3:3',
      'prefill:1:24',
      'decode:3:3',
      'prefill:1:24',
      'decode:4:4',
    ])
  })

  it('keeps a prompt mid-prefill intact when a running stream leaves and the slots compact', async () => {
    const short = tokens(50, 8)
    const long = tokens(51, 100)
    const alone = [
      (await engine.generate({ inputIds: short, ...greedy(2) })).outputIds,
      (await engine.generate({ inputIds: long, ...greedy(12) })).outputIds,
    ]
    const { scheduler } = recorded({ prefillChunkTokens: 16 })
    const first = request('first', short, greedy(2), 'a')
    const keep = request('keep', tokens(52, 8), greedy(40), 'b')
    scheduler.submit(first.req)
    scheduler.submit(keep.req)
    while (first.out.length < 1) await new Promise((r) => setTimeout(r, 1))
    const late = request('late', long, greedy(12), 'c')
    scheduler.submit(late.req)
    expect(await outputIds(first.done)).toEqual(alone[0])
    expect(await outputIds(late.done)).toEqual(alone[1])
    await outputIds(keep.done)
  })
})
