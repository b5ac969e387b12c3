import { Hono } from 'hono'
import { describe, expect, it } from 'vitest'
import { awaitAnswer, type LiveJob, relaySse } from '../../src/completions/relay.ts'

// A client that goes away while its request is being admitted aborts the request before the
// relay starts: the job must be cancelled at once, not run for nobody.

function liveJob() {
  const calls = { cancelled: [] as string[], released: 0, disconnected: 0 }
  const job: LiveJob = {
    jobId: 'job-left',
    deadline: Date.now() + 60_000,
    // Never read: the relay must stop before it touches the stream.
    reader: { disconnect: () => calls.disconnected++ } as unknown as LiveJob['reader'],
    summary: () => ({}) as ReturnType<LiveJob['summary']>,
    finished: () => {
      throw new Error('a job nobody waits for cannot finish here')
    },
    cancel: (why) => calls.cancelled.push(why),
    released: () => calls.released++,
  }
  return { job, calls }
}

const gone = () => new Request('http://edge.test/', { signal: AbortSignal.abort() })

describe('a client that left during admission', () => {
  it('cancels a non-streamed job at once', async () => {
    const { job, calls } = liveJob()
    const app = new Hono()
    app.get('/', async (c) => c.json(await awaitAnswer(c as never, job)))
    app.onError((e) => new Response((e as Error).message, { status: 499 }))
    const res = await app.request(gone())
    expect(res.status).toBe(499)
    expect(calls.cancelled).toEqual(['client disconnected'])
    expect(calls.released).toBe(1)
    expect(calls.disconnected).toBe(1)
  })

  it('cancels a streamed job at once', async () => {
    const { job, calls } = liveJob()
    const app = new Hono()
    const frame = { endpoint: 'chat' as const, id: 'chatcmpl-x', created: 1, model: 'm', includeUsage: false }
    app.get('/', (c) => relaySse(c as never, frame, job))
    const res = await app.request(gone())
    await res.text().catch(() => '')
    for (let i = 0; i < 50 && calls.released === 0; i++) await new Promise((r) => setTimeout(r, 10))
    expect(calls.cancelled).toEqual(['client disconnected'])
    expect(calls.released).toBe(1)
  })
})
