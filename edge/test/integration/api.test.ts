import { randomBytes } from 'node:crypto'
import { JOB_PRIORITY, jobCancelKey, jobEventsKey, poolQueueName } from '@moe/shared'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { REDIS_URL } from '../gpu-worker.ts'
import { adminCall, createTenant, type RunningEdge, startEdge, type TestTenant } from '../wrangler-dev.ts'

// Everything that needs no generated tokens, in workerd (`wrangler dev`) against the real Redis.
// Jobs go to queues under a prefix of this run's own, which no worker consumes, and are removed
// at the end.

const PREFIX = `moetest-${randomBytes(4).toString('hex')}`
const MAX_BODY = 64 * 1024

let edge: RunningEdge
let redis: Redis
let full: TestTenant
let textOnly: TestTenant
const jobIds: string[] = []
type NewKey = { key: string; keyId: string }

const chatBody = (content: unknown = 'hello', extra: Record<string, unknown> = {}) => ({
  model: 'auto',
  messages: [{ role: 'user', content }],
  ...extra,
})

function call(
  t: TestTenant | null,
  method: string,
  path: string,
  body?: unknown,
  headers: Record<string, string> = {},
) {
  return fetch(`${edge.url}${path}`, {
    method,
    headers: {
      ...(t ? { authorization: `Bearer ${t.key}` } : {}),
      ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      ...headers,
    },
    ...(body === undefined ? {} : { body: typeof body === 'string' ? body : JSON.stringify(body) }),
  })
}
const post = (t: TestTenant | null, path: string, body: unknown, headers: Record<string, string> = {}) =>
  call(t, 'POST', path, body, headers)

async function expectError(res: Response, status: number, code: string) {
  const text = await res.text()
  expect(res.status, text).toBe(status)
  const body = JSON.parse(text) as {
    error: { code: string; message: string; type: string; param: string | null }
  }
  expect(body.error.code).toBe(code)
  expect(typeof body.error.message).toBe('string')
  expect(res.headers.get('x-request-id')).toMatch(/^req_/)
  return body.error
}

async function submit(t: TestTenant, body: unknown = chatBody(), headers: Record<string, string> = {}) {
  const res = await post(t, '/v1/chat/completions', body, { prefer: 'respond-async', ...headers })
  const json = (await res.json()) as { id: string; status: string }
  if (res.status === 202) jobIds.push(json.id)
  return { res, json }
}

beforeAll(async () => {
  edge = await startEdge({ QUEUE_PREFIX: PREFIX, MAX_BODY_BYTES: String(MAX_BODY) })
  redis = new Redis(REDIS_URL)
  full = await createTenant(edge)
  textOnly = await createTenant(edge, { allowedPools: ['general'], poolMap: {} })
}, 90_000)

afterAll(async () => {
  await edge?.stop()
  if (redis) {
    const keys = await redis.keys(`${PREFIX}:*`)
    for (const id of jobIds) keys.push(jobCancelKey(id), jobEventsKey(id))
    if (keys.length > 0) await redis.del(...keys)
    redis.disconnect()
  }
})

describe('hygiene', () => {
  it('puts a request id on every response', async () => {
    for (const res of [
      await fetch(`${edge.url}/healthz`),
      await fetch(`${edge.url}/v1/nope`),
      await call(null, 'GET', '/v1/models'),
      await call(full, 'GET', '/v1/models'),
    ]) {
      expect(res.headers.get('x-request-id')).toMatch(/^req_[A-Za-z0-9]{24}$/)
    }
  })

  it('answers unknown routes with 404 in the OpenAI shape', async () => {
    await expectError(await call(full, 'GET', '/v1/engines'), 404, 'not_found')
  })

  it('answers CORS preflights and exposes the moe headers', async () => {
    const pre = await fetch(`${edge.url}/v1/chat/completions`, {
      method: 'OPTIONS',
      headers: {
        origin: 'https://app.example',
        'access-control-request-method': 'POST',
        'access-control-request-headers': 'authorization, content-type',
      },
    })
    expect(pre.status).toBe(204)
    expect(pre.headers.get('access-control-allow-origin')).toBe('*')
    expect(pre.headers.get('access-control-allow-headers')?.toLowerCase()).toContain('authorization')
    const res = await call(full, 'GET', '/v1/models', undefined, { origin: 'https://app.example' })
    expect(res.headers.get('access-control-allow-origin')).toBe('*')
    expect(res.headers.get('access-control-expose-headers')).toContain('x-moe-pool')
  })

  it('refuses a wrong content type with 415', async () => {
    await expectError(
      await post(full, '/v1/chat/completions', JSON.stringify(chatBody()), { 'content-type': 'text/plain' }),
      415,
      'unsupported_media_type',
    )
  })

  it('refuses invalid JSON with 400', async () => {
    await expectError(await post(full, '/v1/chat/completions', '{"model": "auto", '), 400, 'invalid_json')
  })

  it('refuses a body over the limit with 413, with or without a Content-Length', async () => {
    const big = JSON.stringify(chatBody('x'.repeat(MAX_BODY + 10)))
    await expectError(await post(full, '/v1/chat/completions', big), 413, 'payload_too_large')
    const chunked = new ReadableStream({
      start(c) {
        c.enqueue(new TextEncoder().encode(big))
        c.close()
      },
    })
    const res = await fetch(`${edge.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${full.key}`, 'content-type': 'application/json' },
      body: chunked,
      duplex: 'half',
    } as RequestInit)
    await expectError(res, 413, 'payload_too_large')
  })

  it('names unsupported parameters in a 400', async () => {
    const e = await expectError(
      await post(
        full,
        '/v1/chat/completions',
        chatBody('hi', { functions: [{ name: 'f' }], audio: { voice: 'alloy' } }),
      ),
      400,
      'unsupported_parameter',
    )
    expect(e.message).toContain('functions')
    expect(e.message).toContain('audio')
    const n = await expectError(
      await post(full, '/v1/chat/completions', chatBody('hi', { n: 9 })),
      400,
      'invalid_request',
    )
    expect(n.param).toBe('n')
    const u = await expectError(
      await post(full, '/v1/completions', { model: 'auto', prompt: 'x', echo: true }),
      400,
      'unsupported_parameter',
    )
    expect(u.message).toContain('echo')
  })

  it('rejects invalid fields with the param named', async () => {
    const e = await expectError(
      await post(full, '/v1/chat/completions', {
        model: 'auto',
        messages: [{ role: 'user', content: 'x' }],
        temperature: 5,
      }),
      400,
      'invalid_request',
    )
    expect(e.param).toBe('temperature')
    const m = await expectError(
      await post(full, '/v1/chat/completions', chatBody('x', { max_tokens: 100_000 })),
      400,
      'max_tokens_exceeded',
    )
    expect(m.message).toContain('512')
  })

  it('never logs API keys or the admin token', () => {
    const log = edge.log()
    expect(log).toContain(full.id) // tenant ids are logged
    expect(log).not.toContain(full.key)
    expect(log).not.toContain(textOnly.key)
    expect(log).not.toContain(edge.adminToken)
  })
})

describe('auth and the admin API', () => {
  it('401s a missing, unknown, revoked or expired key', async () => {
    await expectError(await call(null, 'GET', '/v1/models'), 401, 'invalid_api_key')
    await expectError(
      await call({ id: 'x', key: `sk-${'a'.repeat(48)}`, keyId: '' }, 'GET', '/v1/models'),
      401,
      'invalid_api_key',
    )
    const k = (await (
      await adminCall(edge, 'POST', `/tenants/${full.id}/keys`, { name: 'to-revoke' })
    ).json()) as NewKey
    const t = { id: full.id, key: k.key as string, keyId: k.keyId as string }
    expect((await call(t, 'GET', '/v1/models')).status).toBe(200)
    expect((await adminCall(edge, 'DELETE', `/tenants/${full.id}/keys/${t.keyId}`)).status).toBe(200)
    const revoked = await expectError(await call(t, 'GET', '/v1/models'), 401, 'invalid_api_key')
    expect(revoked.message).toContain('revoked')
    const old = (await (
      await adminCall(edge, 'POST', `/tenants/${full.id}/keys`, { expiresAt: Date.now() - 1000 })
    ).json()) as NewKey
    const expired = await expectError(
      await call({ id: full.id, key: old.key, keyId: old.keyId }, 'GET', '/v1/models'),
      401,
      'invalid_api_key',
    )
    expect(expired.message).toContain('expired')
  })

  it('guards the admin API with ADMIN_TOKEN', async () => {
    const res = await fetch(`${edge.url}/admin/tenants/${full.id}`, {
      headers: { authorization: `Bearer ${full.key}` },
    })
    await expectError(res, 401, 'invalid_api_key')
    expect((await adminCall(edge, 'GET', `/tenants/${full.id}`)).status).toBe(200)
  })

  it('creates tenants (409 on a duplicate, 400 on an unknown pool) and shows a key once', async () => {
    const dup = await adminCall(edge, 'POST', '/tenants', {
      id: full.id,
      name: 'again',
      allowedPools: ['general'],
      defaultPool: 'general',
    })
    expect(dup.status).toBe(409)
    const bad = await adminCall(edge, 'POST', '/tenants', {
      id: 'nope1',
      name: 'x',
      allowedPools: ['gpu-x'],
      defaultPool: 'gpu-x',
    })
    await expectError(bad, 400, 'invalid_request')
    const keys = (await (await adminCall(edge, 'GET', `/tenants/${full.id}/keys`)).json()) as {
      data: Record<string, unknown>[]
    }
    expect(keys.data.length).toBeGreaterThanOrEqual(1)
    for (const k of keys.data) {
      expect(k.key).toBeUndefined()
      expect(JSON.stringify(k)).not.toContain(full.key)
    }
  })
})

describe('models and routing', () => {
  it('lists only the pools and models the tenant may use', async () => {
    const ids = async (t: TestTenant) =>
      ((await (await call(t, 'GET', '/v1/models')).json()) as { data: { id: string }[] }).data.map(
        (m) => m.id,
      )
    expect(await ids(full)).toEqual(
      expect.arrayContaining([
        'auto',
        'general',
        'moe-demo',
        'code',
        'moe-demo-code',
        'vision',
        'moe-demo-vision',
      ]),
    )
    const limited = await ids(textOnly)
    expect(limited).toEqual(expect.arrayContaining(['auto', 'general', 'moe-demo']))
    expect(limited).not.toContain('code')
    expect(limited).not.toContain('moe-demo-vision')
  })

  it('dry-runs the router without enqueuing', async () => {
    const before = await redis.keys(`${PREFIX}:*`)
    const res = await post(full, '/v1/route', chatBody('write a python function that parses a CSV file'))
    expect(res.status).toBe(200)
    const body = (await res.json()) as {
      task: string
      pool: string
      modality: string
      scores: { task: string }[]
    }
    expect(body).toMatchObject({ task: 'code', pool: 'code', modality: 'text', task_source: 'router' })
    expect(body.scores[0]!.task).toBe('code')
    expect(res.headers.get('x-moe-pool')).toBe('code')
    expect(res.headers.get('x-moe-task')).toBe('code')
    expect(await redis.keys(`${PREFIX}:*`)).toEqual(before)
  })

  it('takes a task hint from a header or metadata.task', async () => {
    const h = await (await post(full, '/v1/route', chatBody('hello'), { 'x-moe-task': 'math' })).json()
    expect(h).toMatchObject({ task: 'math', task_source: 'hint', pool: 'code' })
    const m = await (
      await post(full, '/v1/route', chatBody('hello', { metadata: { task: 'translate' } }))
    ).json()
    expect(m).toMatchObject({ task: 'translate', pool: 'general' })
  })

  it('400s images (no shipped pool reads them) and a modality no pool of the tenant accepts', async () => {
    const img = [
      { type: 'text', text: 'what is in this picture?' },
      { type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=' } },
    ]
    const routed = await expectError(await post(full, '/v1/route', chatBody(img)), 400, 'invalid_request')
    expect(routed.message).toContain('can read them')
    const e = await expectError(
      await post(textOnly, '/v1/chat/completions', chatBody(img)),
      400,
      'invalid_request',
    )
    expect(e.message).toContain('image')
    const audio = [{ type: 'input_audio', input_audio: { data: 'UklGRg==', format: 'wav' } }]
    expect(
      (await expectError(await post(full, '/v1/chat/completions', chatBody(audio)), 400, 'invalid_request'))
        .message,
    ).toContain('audio')
  })

  it('403s a pool the tenant may not use and 404s an unknown model', async () => {
    await expectError(
      await post(textOnly, '/v1/chat/completions', chatBody('hi', { model: 'code' })),
      403,
      'pool_not_allowed',
    )
    await expectError(
      await post(textOnly, '/v1/chat/completions', chatBody('hi', { model: 'moe-demo-vision' })),
      403,
      'pool_not_allowed',
    )
    await expectError(
      await post(full, '/v1/chat/completions', chatBody('hi', { model: 'gpt-4o' })),
      404,
      'unknown_pool',
    )
  })
})

describe('async jobs', () => {
  it('submits with Prefer: respond-async -> 202, and the job is queued on the pool queue', async () => {
    const { res, json } = await submit(full, chatBody('solve 3x + 1 = 10'))
    expect(res.status).toBe(202)
    expect(json).toMatchObject({ object: 'job', status: 'queued', model: 'moe-demo-code' })
    expect(res.headers.get('location')).toBe(`/v1/jobs/${json.id}`)
    expect(res.headers.get('x-request-id')).toBe(json.id)
    for (const h of ['x-moe-pool', 'x-moe-task', 'x-moe-modality', 'x-moe-cache'])
      expect(res.headers.get(h)).toBeTruthy()
    const q = new Queue(poolQueueName('code'), { connection: redis, prefix: PREFIX })
    const job = await q.getJob(json.id)
    expect(job?.data).toMatchObject({
      version: 1,
      requestId: json.id,
      tenantId: full.id,
      pool: 'code',
      priority: 'async',
    })
    expect(job?.opts.priority).toBe(JOB_PRIORITY.async)
    expect(Number.isInteger(job?.data.sampling.seed)).toBe(true)
    expect(job?.data.deadline).toBeGreaterThan(Date.now())
    const status = await call(full, 'GET', `/v1/jobs/${json.id}`)
    expect(status.status).toBe(200)
    expect(await status.json()).toMatchObject({
      id: json.id,
      object: 'job',
      status: 'queued',
      endpoint: '/v1/chat/completions',
    })
  })

  it('also takes POST /v1/jobs with an endpoint and a body', async () => {
    const res = await post(full, '/v1/jobs', {
      endpoint: '/v1/completions',
      body: { model: 'general', prompt: 'Once upon a time' },
    })
    expect(res.status).toBe(202)
    const json = (await res.json()) as { id: string }
    jobIds.push(json.id)
    expect(await (await call(full, 'GET', `/v1/jobs/${json.id}`)).json()).toMatchObject({
      status: 'queued',
      endpoint: '/v1/completions',
      model: 'moe-demo',
    })
  })

  it("hides one tenant's jobs from another (404)", async () => {
    const { json } = await submit(full)
    await expectError(await call(textOnly, 'GET', `/v1/jobs/${json.id}`), 404, 'not_found')
    await expectError(await call(textOnly, 'DELETE', `/v1/jobs/${json.id}`), 404, 'not_found')
    await expectError(await call(full, 'GET', '/v1/jobs/req_doesnotexist'), 404, 'not_found')
  })

  it('runs a retried submission with the same Idempotency-Key once', async () => {
    const key = `idem-${randomBytes(4).toString('hex')}`
    const a = await submit(full, chatBody('hello'), { 'idempotency-key': key })
    const b = await submit(full, chatBody('hello'), { 'idempotency-key': key })
    expect(a.res.status).toBe(202)
    expect(b.json.id).toBe(a.json.id)
    const other = await submit(textOnly, chatBody('hello'), { 'idempotency-key': key })
    expect(other.json.id).not.toBe(a.json.id)
  })

  it('cancels a job on DELETE by setting its cancel key', async () => {
    const { json } = await submit(full)
    const res = await call(full, 'DELETE', `/v1/jobs/${json.id}`)
    expect(await res.json()).toMatchObject({ status: 'cancelling' })
    expect(await redis.get(jobCancelKey(json.id))).toBe('1')
  })
})

describe('rate limits and backpressure', () => {
  it('429s over requests per minute, with Retry-After, across the tenant only', async () => {
    const t = await createTenant(edge, { rateLimits: { requestsPerMinute: 3, tokensPerMinute: 1_000_000 } })
    for (let i = 0; i < 3; i++) expect((await submit(t)).res.status).toBe(202)
    const { res } = await submit(t)
    expect(res.status).toBe(429)
    const retry = Number(res.headers.get('retry-after'))
    expect(retry).toBeGreaterThanOrEqual(1)
    expect(retry).toBeLessThanOrEqual(60)
    expect((await submit(full)).res.status).toBe(202)
  })

  it('429s over tokens per minute (prompt estimate + max_tokens)', async () => {
    const t = await createTenant(edge, { rateLimits: { requestsPerMinute: 100, tokensPerMinute: 300 } })
    expect((await submit(t, chatBody('hi', { max_tokens: 200 }))).res.status).toBe(202)
    const { res, json } = await submit(t, chatBody('hi', { max_tokens: 200 }))
    expect(res.status).toBe(429)
    expect((json as unknown as { error: { message: string } }).error.message).toContain('tokens per minute')
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1)
  })

  it("503s with Retry-After when the pool's queue is deeper than its limit", async () => {
    const q = new Queue(poolQueueName('vision'), { connection: redis, prefix: PREFIX })
    const depth = 200 // vision's maxQueueDepth in infra/config/pools.json
    await q.addBulk(
      Array.from({ length: depth }, (_, i) => ({
        name: 'filler',
        data: { i },
        opts: { jobId: `fill_${i}` },
      })),
    )
    const { res, json } = await submit(full, chatBody('describe this', { model: 'vision' }))
    expect(res.status, JSON.stringify(json)).toBe(503)
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1)
    expect((json as unknown as { error: { code: string } }).error.code).toBe('overloaded')
    // Other pools are unaffected.
    expect((await submit(full, chatBody('hello'))).res.status).toBe(202)
  })
})

describe('streaming', () => {
  it('sets the job cancel key when the client disconnects', async () => {
    const ctrl = new AbortController()
    const streamRes = await fetch(`${edge.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${full.key}`, 'content-type': 'application/json' },
      body: JSON.stringify(chatBody('tell me a long story', { stream: true })),
      signal: ctrl.signal,
    })
    expect(streamRes.status).toBe(200)
    expect(streamRes.headers.get('content-type')).toContain('text/event-stream')
    const id = streamRes.headers.get('x-request-id')!
    jobIds.push(id)
    const reader = streamRes.body!.getReader()
    const first = new TextDecoder().decode((await reader.read()).value)
    expect(first).toContain(': queued')
    ctrl.abort()
    const deadline = Date.now() + 10_000
    while ((await redis.get(jobCancelKey(id))) === null && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 100))
    expect(await redis.get(jobCancelKey(id))).toBe('1')
    expect(await redis.ttl(jobCancelKey(id))).toBeGreaterThan(0)
  })
})
