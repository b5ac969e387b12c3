import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { isOpenAiError, streamRequest } from '../src/sse.ts'
import {
  adminCall,
  devTenant,
  type PrivateRedis,
  type Stack,
  startPrivateRedis,
  startStack,
  type TestTenant,
} from '../src/stack.ts'
import { FAST_RECOVERY, jobOf, streamsSurviveWorkerKill } from '../src/worker-kill.ts'

// Faults, on a stack of its own with a private Redis (AOF, fsync always) that may be killed and
// restarted; the shared 127.0.0.1:6379 is never touched. Workers take a crashed worker's jobs
// back after a short lock (FAST_RECOVERY, see worker-kill.ts).
let redis: PrivateRedis
let stack: Stack
let tenant: TestTenant

const auth = () => ({ authorization: `Bearer ${tenant.key}`, 'content-type': 'application/json' })
const call = (path: string, init: RequestInit = {}) =>
  fetch(`${stack.url}${path}`, { ...init, signal: AbortSignal.timeout(60_000) })

const job = (id: string) => jobOf(stack, tenant, id)

async function settled(id: string, timeoutMs = 90_000) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const j = await job(id)
    if (!['queued', 'running'].includes(j.status) || Date.now() > deadline) return j
    await new Promise((r) => setTimeout(r, 250))
  }
}

beforeAll(async () => {
  redis = await startPrivateRedis()
  stack = await startStack({ redisUrl: redis.url, workers: 2, workerEnv: FAST_RECOVERY })
  tenant = await devTenant(stack, {
    rateLimits: { requestsPerMinute: 100_000, tokensPerMinute: 100_000_000 },
  })
})

afterAll(async () => {
  await stack?.stop()
  await redis?.stop()
})

describe('a worker killed with SIGKILL mid-generation', () => {
  it('20 streaming requests all complete, each stream without a duplicated or missing token', async () => {
    await streamsSurviveWorkerKill(stack, tenant)
  })
})

describe('Redis down', () => {
  it('the edge answers 503 with Retry-After while Redis is down, and recovers by itself', async () => {
    // Bring the pool back to two workers first (the killed one replaced).
    if (stack.workers.length < 3) await stack.addWorker()
    await redis.kill()
    const body = JSON.stringify({
      model: 'auto',
      messages: [{ role: 'user', content: 'anyone?' }],
      max_tokens: 4,
    })
    for (const [path, init] of [
      ['/v1/chat/completions', { method: 'POST', body }],
      ['/v1/chat/completions', { method: 'POST', body: body.replace('{', '{"stream":true,') }],
      ['/v1/chat/completions', { method: 'POST', body, headers: { ...auth(), prefer: 'respond-async' } }],
      ['/v1/jobs/req_doesnotmatter', { method: 'GET' }],
    ] as const) {
      const res = await call(path, { headers: auth(), ...init })
      const text = await res.text()
      const what = `${init.method} ${path}: ${res.status} ${text.slice(0, 300)}`
      expect(res.status, what).toBe(503)
      expect(Number(res.headers.get('retry-after')), what).toBeGreaterThan(0)
      expect(isOpenAiError(JSON.parse(text)), what).toBe(true)
    }
    await redis.start()
    // No restart of edge or workers: the first requests after Redis is back may still see the
    // old connections fail over; within a bounded time it answers again.
    const deadline = Date.now() + 60_000
    let status = 0
    while (Date.now() < deadline) {
      const res = await call('/v1/chat/completions', { method: 'POST', headers: auth(), body })
      status = res.status
      await res.text()
      if (status === 200) break
      expect(status).toBe(503)
      await new Promise((r) => setTimeout(r, 500))
    }
    expect(status).toBe(200)
    const s = await streamRequest(`${stack.url}/v1/chat/completions`, tenant.key, JSON.parse(body), {})
    expect(s.done).toBe(true)
  })
})

describe('Redis down: webhook endpoints', () => {
  it('deleting an endpoint while Redis is down changes nothing (503), so the worker never signs for a deleted one', async () => {
    const t = await devTenant(stack)
    const created = await adminCall(stack, 'POST', `/tenants/${t.id}/webhooks`, {
      url: 'https://93.184.216.34/hooks/moe',
    })
    expect(created.status).toBe(201)
    const { id } = (await created.json()) as { id: string }
    const listed = async () =>
      (
        (await (await adminCall(stack, 'GET', `/tenants/${t.id}`)).json()) as {
          webhooks: Array<{ id: string }>
        }
      ).webhooks.map((w) => w.id)
    await redis.kill()
    try {
      const del = await adminCall(stack, 'DELETE', `/tenants/${t.id}/webhooks/${id}`)
      expect(del.status).toBe(503)
      // The config still has it, as Redis (the delivery worker's copy) does: nothing half-done.
      expect(await listed()).toEqual([id])
    } finally {
      await redis.start()
    }
    let status = 0
    for (let i = 0; i < 60 && status !== 200; i++) {
      status = (await adminCall(stack, 'DELETE', `/tenants/${t.id}/webhooks/${id}`)).status
      if (status !== 200) await new Promise((r) => setTimeout(r, 500))
    }
    expect(status).toBe(200)
    expect(await listed()).toEqual([])
  })
})

describe('Redis restarted between submission and processing', () => {
  it('accepted jobs still complete (the AOF keeps them)', async () => {
    // No consumer while the jobs wait.
    await Promise.all(stack.workers.map((w) => w.stop()))
    const ids: string[] = []
    for (let i = 0; i < 6; i++) {
      const res = await call('/v1/chat/completions', {
        method: 'POST',
        headers: { ...auth(), prefer: 'respond-async' },
        body: JSON.stringify({
          model: i % 2 ? 'code' : 'auto',
          messages: [{ role: 'user', content: `durable job ${i}` }],
          max_tokens: 8,
        }),
      })
      expect(res.status).toBe(202)
      ids.push(((await res.json()) as { id: string }).id)
    }
    for (const id of ids) expect((await job(id)).status).toBe('queued')
    await redis.kill()
    await redis.start()
    await stack.addWorker()
    for (const id of ids) {
      const j = await settled(id)
      expect(j.status, id).toBe('completed')
      expect(j.result!.usage.completion_tokens).toBeGreaterThan(0)
    }
  })
})
