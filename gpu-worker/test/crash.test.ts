import type { ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { jobEventsKey, type StreamEvent, type TokenEvent } from '@moe/shared'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { MoeEngine } from '../src/engine/engine.ts'
import { loadTinyEngine } from './fixtures.ts'
import { payload, QueueClient, spawnWorker, uniquePrefix } from './service-harness.ts'

// Worker processes killed or stopped mid-generation: nothing lost, nothing repeated.

const FAST_RECOVERY = { MOE_LOCK_MS: '2000', MOE_STALLED_INTERVAL_MS: '1000' }
const children: ChildProcess[] = []
let engine: MoeEngine
let longPrompt: number[] = []
const MAX_TOKENS = 480

beforeAll(async () => {
  engine = await loadTinyEngine(1, 512)
  // A greedy prompt that runs the full length without meeting EOS, so there is time to kill mid-way.
  for (let i = 0; i < 50 && longPrompt.length === 0; i++) {
    const p = [1, 40 + i, 60 + i, 80 + i]
    const r = await engine.generate({ inputIds: p, maxTokens: MAX_TOKENS, temperature: 0, seed: 0 })
    if (r.finishReason === 'length') longPrompt = p
  }
  expect(longPrompt.length).toBeGreaterThan(0)
})
afterAll(() => {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL')
})

async function started(child: ChildProcess): Promise<void> {
  children.push(child)
  let out = ''
  await new Promise<void>((resolve, reject) => {
    const onData = (d: Buffer) => {
      out += d
      if (out.includes('gpu worker serving')) resolve()
    }
    child.stdout!.on('data', onData)
    child.stderr!.on('data', (d) => {
      out += d
    })
    child.once('exit', (code) => reject(new Error(`worker exited with ${code}:\n${out}`)))
  })
}

async function waitForTokens(client: QueueClient, jobId: string, n: number) {
  while ((await client.redis.xlen(jobEventsKey(jobId))) < n) await new Promise((r) => setTimeout(r, 2))
}

function expectEachIndexOnce(events: StreamEvent[], want: number[]) {
  const tokens = events.filter((e): e is TokenEvent => e.type === 'token')
  expect(tokens.map((t) => t.index)).toEqual(want.map((_, i) => i))
  expect(tokens.map((t) => t.tokenId)).toEqual(want)
  expect(events[events.length - 1]!.type).toBe('done')
}

/** Starts a worker, gives it a long job, and interrupts it with `signal` once 20 tokens are out. */
async function interruptMidJob(signal: NodeJS.Signals, env: Record<string, string>) {
  const prefix = uniquePrefix()
  const client = new QueueClient(prefix)
  const a = spawnWorker(prefix, { ...FAST_RECOVERY, ...env })
  await started(a)
  const p = payload('general', {
    input: { kind: 'tokens', inputIds: longPrompt },
    sampling: { maxTokens: MAX_TOKENS, temperature: 0, topP: 1, topK: 0, seed: 0, stop: [] },
  })
  await client.add(p)
  await waitForTokens(client, p.requestId!, 20)
  a.kill(signal)
  const [code] = await once(a, 'exit')
  return { prefix, client, jobId: p.requestId!, code: code as number | null }
}

/** A second worker finishes the job: every token index once, the same ids as an uninterrupted run. */
async function resumeElsewhere(prefix: string, client: QueueClient, jobId: string) {
  const b = spawnWorker(prefix, FAST_RECOVERY)
  await started(b)
  const events = await client.events(jobId, 30_000)
  const want = await engine.generate({ inputIds: longPrompt, maxTokens: MAX_TOKENS, temperature: 0, seed: 0 })
  expectEachIndexOnce(events, want.outputIds)
  expect(await (await client.queue('general').getJob(jobId))!.getState()).toBe('completed')
  b.kill('SIGTERM')
  const [code] = await once(b, 'exit')
  expect(code).toBe(0)
}

describe('crash safety', () => {
  it('a worker killed with SIGKILL mid-generation: a second worker completes the job, each token index once', async () => {
    const { prefix, client, jobId } = await interruptMidJob('SIGKILL', {})
    try {
      expect(await client.redis.xlen(jobEventsKey(jobId))).toBeLessThan(MAX_TOKENS) // really mid-generation
      await resumeElsewhere(prefix, client, jobId)
    } finally {
      await client.close()
    }
  }, 60_000)

  it('SIGTERM drains: takes no new jobs, hands back unfinished work, exits 0; the next worker resumes it', async () => {
    const { prefix, client, jobId, code } = await interruptMidJob('SIGTERM', { MOE_DRAIN_TIMEOUT_MS: '0' })
    try {
      expect(code).toBe(0)
      expect(['wait', 'prioritized']).toContain(
        await (await client.queue('general').getJob(jobId))!.getState(),
      )
      await resumeElsewhere(prefix, client, jobId)
    } finally {
      await client.close()
    }
  }, 60_000)
})
