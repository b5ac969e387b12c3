import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { createServer, type Server } from 'node:http'
import { poolQueueName } from '@moe/shared'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'
import OpenAI, { toFile } from 'openai'
import { Webhook } from 'standardwebhooks'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { REDIS_URL, type RunningWorker, startGpuWorker } from '../gpu-worker.ts'
import { adminCall, createTenant, type RunningEdge, startEdge, type TestTenant } from '../wrangler-dev.ts'

// The batch path end to end: the official `openai` client against wrangler dev, the real GPU
// worker on the tiny model (its batch coordinator and webhook delivery run in `moe serve`), real
// Redis, and a local webhook receiver that checks signatures with the `standardwebhooks` package.

const PREFIX = `moebatch-${randomBytes(4).toString('hex')}`
const WORKER_ENV = {
  MOE_WEBHOOK_ALLOW_LOOPBACK: '1',
  MOE_WEBHOOK_BACKOFF_MS: '100',
  MOE_LOCK_MS: '2000',
  MOE_STALLED_INTERVAL_MS: '1000',
}
const MAX_LINES = 250

interface Received {
  path: string
  headers: Record<string, string>
  body: string
  answered: number
}

type Line = Record<string, unknown>
interface OutputLine {
  custom_id: string
  response: {
    status_code: number
    body: {
      object: string
      model: string
      choices: Array<{ message: { content: unknown }; finish_reason: string }>
      usage: { completion_tokens: number }
    }
  }
  error: { code: string } | null
}
interface Delivery {
  status: string
  endpoint_id: string
  event_id: string
  attempts: Array<{ status_code: number | null; latency_ms: number }>
}
const chatLine = (id: string, content: string, maxTokens = 4): Line => ({
  custom_id: id,
  method: 'POST',
  url: '/v1/chat/completions',
  body: { model: 'auto', max_tokens: maxTokens, messages: [{ role: 'user', content }] },
})
const jsonl = (lines: unknown[]) =>
  `${lines.map((l) => (typeof l === 'string' ? l : JSON.stringify(l))).join('\n')}\n`

async function until<T>(
  what: string,
  fn: () => Promise<T | null | undefined | false>,
  ms = 90_000,
): Promise<T> {
  const deadline = Date.now() + ms
  for (;;) {
    const v = await fn()
    if (v) return v
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

describe('batches, files and webhooks', () => {
  let edge: RunningEdge
  let worker: RunningWorker
  let redis: Redis
  let receiver: Server
  let hookBase = ''
  const received: Received[] = []
  /** Scripted answers per path; the last one repeats. */
  const script: Record<string, number[]> = {
    '/flaky': [500, 500, 200],
    '/gone': [410],
    '/bad': [400],
    '/ok': [200],
  }

  const clientFor = (t: TestTenant) =>
    new OpenAI({ apiKey: t.key, baseURL: `${edge.url}/v1`, maxRetries: 0, timeout: 60_000 })

  async function addWebhook(t: TestTenant, path: string, events = ['batch.completed', 'batch.cancelled']) {
    const res = await adminCall(edge, 'POST', `/tenants/${t.id}/webhooks`, {
      url: `${hookBase}${path}`,
      events,
    })
    expect(res.status).toBe(201)
    return (await res.json()) as { id: string; secret: string }
  }

  async function upload(client: OpenAI, lines: unknown[]) {
    return client.files.create({
      file: await toFile(Buffer.from(jsonl(lines)), 'in.jsonl'),
      purpose: 'batch',
    })
  }

  async function runBatch(client: OpenAI, lines: unknown[]) {
    const file = await upload(client, lines)
    return client.batches.create({
      input_file_id: file.id,
      endpoint: '/v1/chat/completions',
      completion_window: '24h',
    })
  }

  const settled = (client: OpenAI, id: string) =>
    until(`batch ${id} to settle`, async () => {
      const b = await client.batches.retrieve(id)
      return ['completed', 'cancelled', 'expired', 'failed'].includes(b.status) ? b : null
    })

  const readLines = async (client: OpenAI, fileId: string | null | undefined) =>
    fileId
      ? (await (await client.files.content(fileId)).text())
          .split('\n')
          .filter(Boolean)
          .map((l) => JSON.parse(l) as OutputLine)
      : []

  async function deliveries(t: TestTenant, batchId: string) {
    const res = await fetch(`${edge.url}/v1/webhooks/deliveries?batch_id=${batchId}`, {
      headers: { authorization: `Bearer ${t.key}` },
    })
    return ((await res.json()) as { data: Delivery[] }).data
  }

  beforeAll(async () => {
    receiver = createServer((req, res) => {
      let body = ''
      req.on('data', (d) => {
        body += d
      })
      req.on('end', () => {
        const path = req.url ?? '/'
        const seen = received.filter((r) => r.path === path).length
        const answers = script[path] ?? [404]
        const status = answers[Math.min(seen, answers.length - 1)]!
        received.push({ path, headers: req.headers as Record<string, string>, body, answered: status })
        res.writeHead(status).end()
      })
    })
    receiver.listen(0, '127.0.0.1')
    await once(receiver, 'listening')
    hookBase = `http://127.0.0.1:${(receiver.address() as { port: number }).port}`
    const [e, w] = await Promise.allSettled([
      startEdge({
        QUEUE_PREFIX: PREFIX,
        WEBHOOK_ALLOW_LOOPBACK: '1',
        FILES_MAX_LINES: String(MAX_LINES),
        FILES_MAX_BYTES: '200000',
      }),
      startGpuWorker(PREFIX, ['general', 'code', 'vision'], { env: WORKER_ENV }),
    ])
    if (e.status === 'fulfilled') edge = e.value
    if (w.status === 'fulfilled') worker = w.value
    if (e.status === 'rejected') throw e.reason
    if (w.status === 'rejected') throw w.reason
    redis = new Redis(REDIS_URL)
  }, 180_000)

  afterAll(async () => {
    await Promise.all([edge?.stop(), worker?.stop()])
    receiver?.close()
    if (redis) {
      const keys = await redis.keys(`${PREFIX}:*`)
      if (keys.length > 0) await redis.del(...keys)
      redis.disconnect()
    }
  })

  it('refuses malformed files with a 400 naming the line, and enqueues nothing', async () => {
    const t = await createTenant(edge)
    const client = clientFor(t)
    const ok = (i: number) => chatLine(`r${i}`, 'hello')
    const cases: Array<[string, unknown[], RegExp]> = [
      ['bad JSON', [ok(1), '{"custom_id": "r2", "method": ', ok(3)], /^Line 2: not valid JSON/],
      [
        'duplicate custom_id',
        [ok(1), ok(2), ok(1)],
        /^Line 3: duplicate custom_id 'r1' \(first used on line 1\)/,
      ],
      ['wrong url', [{ ...ok(1), url: '/v1/embeddings' }], /^Line 1: url must be one of/],
      ['wrong method', [ok(1), { ...ok(2), method: 'GET' }], /^Line 2: method must be 'POST'/],
      [
        'invalid body',
        [
          ok(1),
          { ...ok(2), body: { model: 'auto', temperature: 5, messages: [{ role: 'user', content: 'x' }] } },
        ],
        /^Line 2: Invalid value for 'temperature'/,
      ],
      [
        'unsupported parameter',
        [
          ok(1),
          ok(2),
          { ...ok(3), body: { model: 'auto', functions: [{}], messages: [{ role: 'user', content: 'x' }] } },
        ],
        /^Line 3: Unsupported parameter: functions/,
      ],
      [
        'max_tokens over the pool limit',
        [
          {
            ...ok(1),
            body: { model: 'auto', max_tokens: 100_000, messages: [{ role: 'user', content: 'x' }] },
          },
        ],
        /^Line 1: max_tokens is too large/,
      ],
      [
        'too many lines',
        Array.from({ length: MAX_LINES + 1 }, (_, i) => ok(i)),
        new RegExp(`^Line ${MAX_LINES + 1}: the file has more than ${MAX_LINES} requests`),
      ],
      [
        'too many bytes',
        [ok(1), chatLine('big', 'x'.repeat(210_000))],
        /^Line 2: the file is larger than the limit of 200000 bytes/,
      ],
    ]
    for (const [name, lines, want] of cases) {
      const err = await upload(client, lines).then(
        () => null,
        (e: unknown) => e,
      )
      expect(err, name).toBeInstanceOf(OpenAI.BadRequestError)
      expect((err as InstanceType<typeof OpenAI.BadRequestError>).message, name).toMatch(
        new RegExp(`^400 ${want.source.slice(1)}`),
      )
    }
    // No file was stored, so there is nothing to create a batch from; no job reached any pool.
    await expect(
      client.batches.create({
        input_file_id: 'file-nope',
        endpoint: '/v1/chat/completions',
        completion_window: '24h',
      }),
    ).rejects.toBeInstanceOf(OpenAI.NotFoundError)
    expect((await client.batches.list()).data).toEqual([])
    for (const pool of ['general', 'code', 'vision']) {
      const q = new Queue(poolQueueName(pool), { connection: redis, prefix: PREFIX })
      const counts = await q.getJobCounts('waiting', 'prioritized', 'active', 'completed', 'failed')
      expect(
        Object.values(counts).reduce((a, b) => a + b, 0),
        pool,
      ).toBe(0)
    }
  })

  let flakyBatch = ''
  let flakyTenant: TestTenant
  let flakySecret = ''

  it('runs a 50-line batch with the openai client: every custom_id once, each a valid completion', async () => {
    flakyTenant = await createTenant(edge)
    flakySecret = (await addWebhook(flakyTenant, '/flaky')).secret
    const client = clientFor(flakyTenant)
    const topics = [
      'Write a function in Python',
      'Translate hello to French',
      'Summarise this text',
      'Solve 2x+3=7',
    ]
    const lines = Array.from({ length: 50 }, (_, i) => chatLine(`req-${i}`, `${topics[i % 4]} #${i}`))
    const file = await upload(client, lines)
    expect(file).toMatchObject({ object: 'file', purpose: 'batch', filename: 'in.jsonl' })
    expect((await client.files.retrieve(file.id)).id).toBe(file.id)
    const created = await client.batches.create({
      input_file_id: file.id,
      endpoint: '/v1/chat/completions',
      completion_window: '24h',
      metadata: { job: 'nightly' },
    })
    flakyBatch = created.id
    expect(created.object).toBe('batch')
    expect(['validating', 'in_progress', 'finalizing', 'completed']).toContain(created.status)
    expect(created.request_counts?.total).toBe(50)
    expect(created.metadata).toEqual({ job: 'nightly' })
    const done = await settled(client, created.id)
    expect(done.status).toBe('completed')
    expect(done.request_counts).toEqual({ total: 50, completed: 50, failed: 0 })
    expect(done.completed_at).toBeGreaterThanOrEqual(done.created_at)
    const out = await readLines(client, done.output_file_id)
    expect(out).toHaveLength(50)
    expect(new Set(out.map((l) => l.custom_id))).toEqual(new Set(lines.map((l) => l.custom_id)))
    for (const l of out) {
      expect(l.error).toBeNull()
      expect(l.response.status_code).toBe(200)
      const body = l.response.body
      expect(body.object).toBe('chat.completion')
      expect(typeof body.choices[0]!.message.content).toBe('string')
      expect(['stop', 'length']).toContain(body.choices[0]!.finish_reason)
      expect(body.usage.completion_tokens).toBeGreaterThan(0)
      expect(body.usage.completion_tokens).toBeLessThanOrEqual(4)
    }
    // Pools were chosen per line by the tenant's router (code lines on the code pool's model).
    expect(new Set(out.map((l) => l.response.body.model))).toContain('moe-demo-code')
    expect(done.error_file_id).toBeNull()
    expect((await client.batches.list({ limit: 10 })).data.map((b) => b.id)).toEqual([created.id])
  })

  it('delivers the signed batch.completed event on the third attempt after two 500s, one event id', async () => {
    const hits = await until('three webhook attempts', async () => {
      const h = received.filter((r) => r.path === '/flaky')
      return h.length >= 3 ? h : null
    })
    const ids = new Set(hits.map((h) => h.headers['webhook-id']))
    expect(ids.size).toBe(1)
    expect(hits.map((h) => h.answered)).toEqual([500, 500, 200])
    const wh = new Webhook(flakySecret.slice('whsec_'.length))
    for (const h of hits) {
      const event = wh.verify(h.body, {
        'webhook-id': h.headers['webhook-id']!,
        'webhook-timestamp': h.headers['webhook-timestamp']!,
        'webhook-signature': h.headers['webhook-signature']!,
      }) as Record<string, unknown> & { id: string }
      expect(event).toMatchObject({ object: 'event', type: 'batch.completed', data: { id: flakyBatch } })
      expect(event.id).toBe(h.headers['webhook-id'])
    }
    expect(() => wh.verify(`${hits[2]!.body} `, hits[2]!.headers)).toThrow()
    const [d] = await until('the delivery record', async () => {
      const ds = await deliveries(flakyTenant, flakyBatch)
      return ds[0]?.status === 'succeeded' ? ds : null
    })
    expect(d!.event_id).toBe([...ids][0])
    expect(d!.attempts.map((a) => a.status_code)).toEqual([500, 500, 200])
    for (const a of d!.attempts) expect(a.latency_ms).toBeGreaterThanOrEqual(0)
    // Nothing more is sent once it succeeded.
    expect(received.filter((r) => r.path === '/flaky')).toHaveLength(3)
  })

  it('disables an endpoint that answers 410 and does not retry one that answers 400', async () => {
    const t = await createTenant(edge)
    const gone = await addWebhook(t, '/gone')
    const bad = await addWebhook(t, '/bad')
    const client = clientFor(t)
    const b = await runBatch(client, [chatLine('a', 'hi'), chatLine('b', 'there')])
    expect((await settled(client, b.id)).status).toBe('completed')
    const ds = await until('both deliveries to stop', async () => {
      const list = await deliveries(t, b.id)
      return list.length === 2 && list.every((d) => d.status !== 'pending') ? list : null
    })
    const byEndpoint = Object.fromEntries(ds.map((d) => [d.endpoint_id, d]))
    expect(byEndpoint[gone.id]!.status).toBe('disabled')
    expect(byEndpoint[gone.id]!.attempts.map((a) => a.status_code)).toEqual([410])
    expect(byEndpoint[bad.id]!.status).toBe('failed')
    expect(byEndpoint[bad.id]!.attempts.map((a) => a.status_code)).toEqual([400])
    expect(received.filter((r) => r.path === '/bad')).toHaveLength(1)
    expect(received.filter((r) => r.path === '/gone')).toHaveLength(1)
    const hooks = (await (await adminCall(edge, 'GET', `/tenants/${t.id}/webhooks`)).json()) as {
      data: Array<{ id: string; disabled: boolean }>
    }
    expect(hooks.data.find((h) => h.id === gone.id)?.disabled).toBe(true)
    expect(hooks.data.find((h) => h.id === bad.id)?.disabled).toBe(false)
  })

  it('refuses private and metadata webhook URLs even with loopback allowed for tests', async () => {
    const t = await createTenant(edge)
    for (const url of [
      'https://10.0.0.7/hook',
      'https://169.254.169.254/latest/meta-data',
      'https://192.168.1.1/x',
    ]) {
      const res = await adminCall(edge, 'POST', `/tenants/${t.id}/webhooks`, { url })
      expect(res.status, url).toBe(400)
    }
  })

  it('cancels a running batch: waiting children never run, cancelling -> cancelled, output holds what finished', async () => {
    const t = await createTenant(edge)
    await addWebhook(t, '/ok', ['batch.cancelled'])
    const client = clientFor(t)
    const n = 200
    const lines = Array.from({ length: n }, (_, i) => chatLine(`c${i}`, `Tell a long story number ${i}`, 256))
    const b = await runBatch(client, lines)
    await until('a first finished line', async () => {
      const cur = await client.batches.retrieve(b.id)
      return (cur.request_counts?.completed ?? 0) > 0
    })
    const cancelling = await client.batches.cancel(b.id)
    expect(['cancelling', 'cancelled']).toContain(cancelling.status)
    expect(cancelling.cancelling_at).not.toBeNull()
    const done = await settled(client, b.id)
    expect(done.status).toBe('cancelled')
    expect(done.cancelled_at).not.toBeNull()
    const out = await readLines(client, done.output_file_id)
    const errs = await readLines(client, done.error_file_id)
    expect(out.length).toBeGreaterThan(0)
    expect(out.length).toBeLessThan(n)
    for (const l of out) expect(l.response.status_code).toBe(200)
    expect(errs.length).toBe(n - out.length)
    for (const e of errs) expect(e.error?.code).toBe('batch_cancelled')
    expect(new Set([...out, ...errs].map((l) => l.custom_id)).size).toBe(n)
    expect(done.request_counts).toEqual({ total: n, completed: out.length, failed: errs.length })
    // The children still waiting were removed from the queue, so no worker ran them.
    const q = new Queue(poolQueueName('general'), { connection: redis, prefix: PREFIX })
    const notRun = errs.map((e) => e.custom_id as string)
    const jobIds = notRun.map((c) => `${b.id}-${lines.findIndex((l) => l.custom_id === c)}`)
    const leftovers = await Promise.all(jobIds.map((id) => q.getJob(id)))
    expect(leftovers.filter((j) => j && j.finishedOn === undefined)).toHaveLength(0)
    const hook = await until('the batch.cancelled event', async () =>
      received.find((r) => r.path === '/ok' && JSON.parse(r.body).data.id === b.id),
    )
    expect(JSON.parse(hook.body).type).toBe('batch.cancelled')
  })

  it('completes every line when the worker is killed mid-batch and another takes over', async () => {
    const t = await createTenant(edge)
    const client = clientFor(t)
    const n = 40
    // A few short lines finish first; the long ones are mid-generation (or waiting) at the kill.
    const lines = Array.from({ length: n }, (_, i) =>
      chatLine(`k${i}`, `Describe the sea, part ${i}`, i < 4 ? 2 : 256),
    )
    const b = await runBatch(client, lines)
    const before = await until('a first finished line', async () => {
      const cur = await client.batches.retrieve(b.id)
      return (cur.request_counts?.completed ?? 0) > 0 ? cur : null
    })
    expect(before.request_counts!.completed).toBeLessThan(n)
    await worker.kill('SIGKILL')
    // Redis notices the dead connections a moment later; the new worker is counted after that.
    const queues = ['general', 'code', 'vision'].map(
      (p) => new Queue(poolQueueName(p), { connection: redis, prefix: PREFIX }),
    )
    await until('the killed worker to leave', async () =>
      (await Promise.all(queues.map((q) => q.getWorkersCount()))).every((c) => c === 0),
    )
    worker = await startGpuWorker(PREFIX, ['general', 'code', 'vision'], { env: WORKER_ENV })
    const done = await settled(client, b.id).catch(async (e) => {
      console.log(JSON.stringify(await client.batches.retrieve(b.id)), worker.log().slice(-5000))
      throw e
    })
    expect(done.status).toBe('completed')
    expect(done.request_counts).toEqual({ total: n, completed: n, failed: 0 })
    // The replacement process ran the rest and finalised the batch.
    expect(worker.log()).toContain(b.id)
    const out = await readLines(client, done.output_file_id)
    expect(out.map((l) => l.custom_id).sort()).toEqual(lines.map((l) => l.custom_id as string).sort())
  }, 120_000)
})
