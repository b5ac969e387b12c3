import { connect } from 'node:net'
import { beforeAll, describe, expect, inject, it } from 'vitest'
import { type FuzzCase, generate } from '../src/fuzz.ts'
import { isOpenAiError } from '../src/sse.ts'
import { adminCall, devTenant, type TestTenant } from '../src/stack.ts'

// Hostile input: a seeded fuzz pass of malformed requests and a set of auth bypass attempts.
// Nothing may answer 5xx, hang or crash a process; every error is in the OpenAI shape.

const stack = inject('stack')
const SEED = Number(process.env.MOE_FUZZ_SEED ?? 7_070_707)
const COUNT = Number(process.env.MOE_FUZZ_COUNT ?? 1200)
let me: TestTenant
let other: TestTenant
let otherJobId: string

const call = (path: string, init: RequestInit = {}, timeoutMs = 60_000) =>
  fetch(`${stack.url}${path}`, { ...init, signal: AbortSignal.timeout(timeoutMs) })

/** A fuzz case with no answer by then has hung: it is reported by number, and the pass goes on. */
const CASE_TIMEOUT_MS = 20_000

async function submitAsync(key: string): Promise<string> {
  const res = await call('/v1/chat/completions', {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', prefer: 'respond-async' },
    body: JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: 'mine' }], max_tokens: 4 }),
  })
  expect(res.status).toBe(202)
  return ((await res.json()) as { id: string }).id
}

async function jobState(key: string, id: string): Promise<string> {
  const deadline = Date.now() + 60_000
  for (;;) {
    const res = await call(`/v1/jobs/${id}`, { headers: { authorization: `Bearer ${key}` } })
    const s = ((await res.json()) as { status: string }).status
    if (!['queued', 'running'].includes(s) || Date.now() > deadline) return s
    await new Promise((r) => setTimeout(r, 200))
  }
}

function processesAlive(): void {
  for (const pid of stack.workerPids) expect(() => process.kill(pid, 0), `worker ${pid}`).not.toThrow()
}

async function stillServes(): Promise<void> {
  const res = await call('/v1/chat/completions', {
    method: 'POST',
    headers: { authorization: `Bearer ${me.key}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model: 'auto',
      messages: [{ role: 'user', content: 'still there?' }],
      max_tokens: 4,
    }),
  })
  expect(res.status).toBe(200)
  expect(((await res.json()) as { object: string }).object).toBe('chat.completion')
}

beforeAll(async () => {
  ;[me, other] = await Promise.all([devTenant(stack), devTenant(stack)])
  otherJobId = await submitAsync(other.key)
  expect(await jobState(other.key, otherJobId)).toBe('completed')
})

describe('fuzz', () => {
  it(`${COUNT} generated malformed requests (seed ${SEED}): no 5xx, no hang, OpenAI error shape`, async () => {
    const cases = generate(SEED, COUNT, { key: me.key, otherKey: other.key, otherJobId })
    const failures: string[] = []
    const kinds: Record<string, Record<string, number>> = {}
    let clientRejected = 0
    const one = async (c: FuzzCase, i: number) => {
      const tag = `case ${i} (${c.kind}, seed ${SEED}): ${c.method} ${c.path.slice(0, 80)}`
      let res: Response
      const started = Date.now()
      try {
        res = await call(
          c.path,
          { method: c.method, headers: c.headers, ...(c.body === undefined ? {} : { body: c.body }) },
          CASE_TIMEOUT_MS,
        )
      } catch (e) {
        const err = e as Error & { cause?: Error }
        if (err.name === 'TimeoutError') {
          failures.push(`${tag}: hung, no answer in ${Date.now() - started} ms`)
          return
        }
        // fetch itself refuses some header values before sending: not the server's doing.
        if (err.name === 'TypeError' && err.message !== 'fetch failed') {
          clientRejected++
          return
        }
        failures.push(`${tag}: ${err.name} ${err.message} ${err.cause?.message ?? ''}`)
        return
      }
      const byKind = kinds[c.kind] ?? {}
      kinds[c.kind] = byKind
      byKind[res.status] = (byKind[res.status] ?? 0) + 1
      if (res.headers.get('x-request-id') === otherJobId)
        failures.push(`${tag}: took the client's request id`)
      const text = await res.text().catch((e: Error) => `<body failed: ${e.name} ${e.message}>`)
      if (text.startsWith('<body failed: TimeoutError')) failures.push(`${tag}: hung while sending its body`)
      if (res.status >= 500) failures.push(`${tag}: ${res.status} ${text.slice(0, 300)}`)
      else if (res.status >= 400 && c.method !== 'HEAD') {
        let body: unknown = null
        try {
          body = JSON.parse(text)
        } catch {}
        if (!isOpenAiError(body))
          failures.push(`${tag}: ${res.status} not an OpenAI error: ${text.slice(0, 200)}`)
      }
    }
    // Eight at a time: enough to overlap, bounded on a 2-core machine.
    let next = 0
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < cases.length) {
          const i = next++
          await one(cases[i]!, i)
        }
      }),
    )
    console.log(
      `fuzz: ${cases.length} requests (seed ${SEED}), ${clientRejected} refused by fetch itself; statuses by kind ${JSON.stringify(kinds)}`,
    )
    expect(failures).toEqual([])
    expect(cases.length - clientRejected).toBeGreaterThanOrEqual(1000)
    processesAlive()
    await stillServes()
    // DELETEs with our key on the other tenant's job id changed nothing there.
    expect(await jobState(other.key, otherJobId)).toBe('completed')
  })

  it('raw HTTP: header injection and smuggling attempts get a 4xx or a closed connection, never a 5xx', async () => {
    const body = JSON.stringify({ model: 'auto', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 })
    const { port } = new URL(stack.url)
    const head = (extra: string, len = body.length) =>
      `POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n${extra}Content-Length: ${len}\r\nConnection: close\r\n\r\n${body}`
    const attempts = [
      head(`Authorization: Bearer ${me.key}\r\nX-Moe-Task: code\rInjected: 1\r\n`),
      head(`Authorization: Bearer ${me.key}\r\nX-Moe-Task: code\nAuthorization: Bearer ${other.key}\r\n`),
      head(`Authorization: Bearer ${me.key}\r\n Bearer ${other.key}\r\n`),
      head(`Authorization: Bearer ${me.key}\r\nAuthorization: Bearer ${other.key}\r\n`),
      head(`Authorization: Bearer ${me.key}\r\nTransfer-Encoding: chunked\r\n`),
      head(`Authorization: Bearer ${me.key}\r\nContent-Length: 5\r\n`),
      head(`Authorization: Bearer ${me.key}\r\n`, body.length + 50),
      `GET /v1/jobs/..%2f..%2fadmin%2ftenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${me.key}\r\nConnection: close\r\n\r\n`,
      `GET /v1/../admin/tenants/dev HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${me.key}\r\nConnection: close\r\n\r\n`,
      `GET http://evil.example/admin/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${me.key}\r\nConnection: close\r\n\r\n`,
    ]
    for (const [i, raw] of attempts.entries()) {
      const answer = await new Promise<string>((resolve, reject) => {
        const sock = connect(Number(port), '127.0.0.1')
        let out = ''
        const timer = setTimeout(() => {
          sock.destroy()
          reject(new Error(`attempt ${i}: no answer in 15 s`))
        }, 15_000)
        sock.on('data', (d) => {
          out += d
        })
        sock.on('error', () => {})
        sock.on('close', () => {
          clearTimeout(timer)
          resolve(out)
        })
        sock.end(raw)
      })
      const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(answer)?.[1] ?? 0)
      // Broken framing (attempts 4-6: Transfer-Encoding beside Content-Length, or a Content-Length
      // that disagrees with the body) can be refused by wrangler dev's local HTTP proxy (miniflare)
      // before the Worker runs, as a text/plain 500 "Network connection lost": a dev-server quirk,
      // not the edge's code (Cloudflare's front end rejects such requests in production).
      const devProxy =
        i >= 4 &&
        i <= 6 &&
        status === 500 &&
        answer.includes('Network connection lost') &&
        !answer.includes('"error"')
      if (!devProxy) expect(status, `attempt ${i}: ${answer.slice(0, 300)}`).toBeLessThan(500)
      // Whatever got through never reached the admin API or another tenant.
      expect(answer).not.toMatch(/"allowedPools"/)
      if (status === 200) expect(answer).toMatch(/chat\.completion/)
    }
    processesAlive()
  })
})

describe('auth bypass attempts are refused', () => {
  let revokedKey: string

  beforeAll(async () => {
    const t = await devTenant(stack)
    const res = await adminCall(stack, 'DELETE', `/tenants/${t.id}/keys/${t.keyId}`)
    expect(res.status).toBe(200)
    revokedKey = t.key
  })

  const chat = (headers: Record<string, string>, path = '/v1/chat/completions') =>
    call(path, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...headers },
      body: JSON.stringify({
        model: 'auto',
        messages: [{ role: 'user', content: 'let me in' }],
        max_tokens: 2,
      }),
    })

  it.each([
    ['no key', () => ({})],
    ['empty bearer', () => ({ authorization: 'Bearer ' })],
    ['Basic scheme', () => ({ authorization: `Basic ${Buffer.from(`x:${me.key}`).toString('base64')}` })],
    ['Token scheme', () => ({ authorization: `Token ${me.key}` })],
    ['key without scheme', () => ({ authorization: me.key })],
    ['x-api-key header', () => ({ 'x-api-key': me.key })],
    ['two keys', () => ({ authorization: `Bearer ${me.key} ${other.key}` })],
    ['truncated key', () => ({ authorization: `Bearer ${me.key.slice(0, -1)}` })],
    ['case-changed key', () => ({ authorization: `Bearer ${me.key.toUpperCase()}` })],
    ['key hint', () => ({ authorization: `Bearer ${me.key.slice(0, 7)}...` })],
    ['revoked key', () => ({ authorization: `Bearer ${revokedKey}` })],
    ['admin token as API key', () => ({ authorization: `Bearer ${stack.adminToken}` })],
    ['key in a cookie', () => ({ cookie: `api_key=${me.key}` })],
  ])('%s -> 401 invalid_api_key', async (_name, headers) => {
    const res = await chat(headers())
    expect(res.status).toBe(401)
    const body = await res.json()
    expect(isOpenAiError(body)).toBe(true)
    expect((body as { error: { code: string } }).error.code).toBe('invalid_api_key')
  })

  it('the key as a query parameter is ignored -> 401', async () => {
    const res = await chat({}, `/v1/chat/completions?api_key=${me.key}`)
    expect(res.status).toBe(401)
  })

  it('an API key on the admin API -> 401', async () => {
    const res = await call('/admin/tenants/dev', { headers: { authorization: `Bearer ${me.key}` } })
    expect(res.status).toBe(401)
    expect(isOpenAiError(await res.json())).toBe(true)
  })

  it("another tenant's job id: not found, not cancellable, and untouched", async () => {
    const auth = { authorization: `Bearer ${me.key}` }
    const get = await call(`/v1/jobs/${otherJobId}`, { headers: auth })
    expect(get.status).toBe(404)
    expect(isOpenAiError(await get.json())).toBe(true)
    const del = await call(`/v1/jobs/${otherJobId}`, { method: 'DELETE', headers: auth })
    expect(del.status).toBe(404)
    // A queued job of theirs cannot be cancelled by us either.
    const theirs = await submitAsync(other.key)
    const del2 = await call(`/v1/jobs/${theirs}`, { method: 'DELETE', headers: auth })
    expect(del2.status).toBe(404)
    expect(await jobState(other.key, theirs)).toBe('completed')
    // Their Idempotency-Key is theirs: the same key from us runs our own job.
    const idem = { 'idempotency-key': 'shared-key-1', prefer: 'respond-async' }
    const a = await chat({ authorization: `Bearer ${other.key}`, ...idem })
    const b = await chat({ ...auth, ...idem })
    expect([a.status, b.status]).toEqual([202, 202])
    const [ja, jb] = (await Promise.all([a.json(), b.json()])) as Array<{ id: string }>
    expect(jb!.id).not.toBe(ja!.id)
    expect((await call(`/v1/jobs/${ja!.id}`, { headers: auth })).status).toBe(404)
  })
})
