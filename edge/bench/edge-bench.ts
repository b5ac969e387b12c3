// Edge benchmark: autocannon against `wrangler dev` (workerd) on 127.0.0.1, plus the router's CPU
// time in-process. Run from the repo root: `npx node edge/bench/edge-bench.ts` (about a minute).
//
// Cases, each for BENCH_SECONDS (default 4) at 1 connection (latency) and 8 (throughput):
//   trivial  GET /healthz - the baseline: what `wrangler dev` itself costs per request
//   auth     GET /v1/models - API key lookup only
//   cache    POST /v1/chat/completions answered from the response cache (HIT)
//   enqueue  POST /v1/chat/completions with Prefer: respond-async - auth + route + rate limits +
//            queue depth + BullMQ enqueue, up to the 202
// Jobs go to queues under a prefix of their own, drained while the bench runs (so the pool's
// depth limit is not what gets measured), and removed at the end.
import { spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { poolQueueName } from '@moe/shared'
import autocannon from 'autocannon'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'
import { createApiKey, kvTenant } from '../src/auth.ts'
import { type CachedAnswer, cacheKey, canonicalRequest } from '../src/cache.ts'
import { POOLS } from '../src/pools.ts'
import { choosePool, decideTask, modalitiesOf, routerFor } from '../src/router/index.ts'
import { classify, compileRoutes } from '../src/router/ngram.ts'
import { BUILTIN_ROUTES } from '../src/router/routes.ts'
import { validateBody } from '../src/validate.ts'
import { repoRoot, startEdge } from '../test/wrangler-dev.ts'

const SECONDS = Number(process.env.BENCH_SECONDS ?? 4)
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const PREFIX = `moebench-${randomBytes(4).toString('hex')}`
const TENANT = 'bench'

// ---- router CPU, in-process
function routerCpu() {
  const compiled = compileRoutes(BUILTIN_ROUTES)
  const prompt =
    `Summarize the following meeting notes for the team. ${'We agreed to ship the new billing page next sprint, after the security review. '.repeat(30)}`.slice(
      0,
      2048,
    )
  const n = 20_000
  for (let i = 0; i < 2000; i++) classify(compiled, prompt, 0.09)
  let t0 = performance.now()
  for (let i = 0; i < n; i++) classify(compiled, prompt, 0.09)
  const classifyUs = ((performance.now() - t0) / n) * 1000
  const tenant = {
    id: TENANT,
    name: 'bench',
    allowedPools: ['general', 'code', 'vision'],
    defaultPool: 'general',
    poolMap: { code: 'code' },
    routes: [],
    rateLimits: { requestsPerMinute: 1e9, tokensPerMinute: 1e12 },
    cacheTtlSeconds: 3600,
    maxLiveStreams: 1_000_000,
    batchQueueTokens: 1_000_000_000,
    queueShare: 1,
    webhooks: [],
  }
  const body = { model: 'auto', messages: [{ role: 'user', content: prompt }] }
  t0 = performance.now()
  for (let i = 0; i < n; i++) {
    const req = validateBody('chat', body)
    const router = routerFor(tenant)
    const task = decideTask(router, { messages: req.messages })
    const m = modalitiesOf({ messages: req.messages })
    choosePool(tenant, POOLS, req.model, task.task, m.modality, m.required)
  }
  const fullUs = ((performance.now() - t0) / n) * 1000
  return { classifyUs, fullUs, bytes: prompt.length }
}

// ---- local KV seeding (tenant, key, one cached answer), before wrangler dev starts
const cachedBody = {
  model: 'auto',
  temperature: 0,
  max_tokens: 16,
  messages: [{ role: 'user', content: 'What is the capital of France?' }],
}

async function seed(persistDir: string): Promise<string> {
  const entries: { key: string; value: string }[] = []
  const kv = {
    async put(key: string, value: string) {
      entries.push({ key, value })
    },
  } as unknown as KVNamespace
  await kv.put(
    kvTenant(TENANT),
    JSON.stringify({
      id: TENANT,
      name: 'bench',
      allowedPools: ['general', 'code', 'vision'],
      defaultPool: 'general',
      poolMap: { code: 'code', math: 'code' },
      rateLimits: { requestsPerMinute: 100_000_000, tokensPerMinute: 1_000_000_000 },
      cacheTtlSeconds: 3600,
      maxLiveStreams: 1_000_000,
      batchQueueTokens: 1_000_000_000,
      queueShare: 1,
    }),
  )
  const { key } = await createApiKey(kv, TENANT, 'bench', null)
  const req = validateBody('chat', cachedBody)
  const sampling = { maxTokens: 16, temperature: 0, topP: 1, topK: 0, seed: null, stop: [] }
  const ck = await cacheKey(TENANT, 'general', 'moe-demo', canonicalRequest('chat', req, sampling))
  const answer: CachedAnswer = {
    v: 1,
    text: 'Paris.',
    finishReason: 'stop',
    usage: { promptTokens: 9, completionTokens: 2 },
    requestId: 'req_bench',
    createdAt: Date.now(),
    expiresAt: Date.now() + 3_600_000,
    moe: { pool: 'general', task: 'chat', modality: 'text' },
  }
  const file = join(persistDir, 'seed.json')
  for (const [binding, list] of [
    ['AUTH', entries],
    ['RESPONSE_CACHE', [{ key: ck, value: JSON.stringify(answer) }]],
  ] as const) {
    writeFileSync(file, JSON.stringify(list))
    const r = spawnSync(
      'npx',
      ['wrangler', 'kv', 'bulk', 'put', file, '--binding', binding, '--local', '--persist-to', persistDir],
      { cwd: repoRoot, encoding: 'utf8', env: { ...process.env, WRANGLER_SEND_METRICS: 'false' } },
    )
    if (r.status !== 0) throw new Error(`seeding ${binding} failed: ${r.stderr}`)
  }
  return key
}

const signed = (x: number, digits: number): string => `${x >= 0 ? '+' : ''}${x.toFixed(digits)}`

interface CaseResult {
  name: string
  connections: number
  rps: number
  mean: number
  p50: number
  p99: number
  errors: number
  non2xx: number
}

async function run(
  name: string,
  url: string,
  connections: number,
  opts: Partial<autocannon.Options>,
): Promise<CaseResult> {
  const r = await autocannon({ url, connections, duration: SECONDS, pipelining: 1, ...opts })
  return {
    name,
    connections,
    rps: r.requests.average,
    mean: r.latency.average,
    p50: r.latency.p50,
    p99: r.latency.p99,
    errors: r.errors + r.timeouts,
    non2xx: r.non2xx,
  }
}

async function main() {
  const cpu = routerCpu()
  const persistDir = mkdtempSync(join(tmpdir(), 'moe-edge-bench-'))
  const key = await seed(persistDir)
  const edge = await startEdge({ QUEUE_PREFIX: PREFIX }, { persistDir })
  const redis = new Redis(REDIS_URL)
  const queues = [...POOLS.keys()].map(
    (p) => new Queue(poolQueueName(p), { connection: redis, prefix: PREFIX }),
  )
  const drain = setInterval(() => {
    for (const q of queues) void q.drain(true).catch(() => {})
  }, 250)
  const auth = { authorization: `Bearer ${key}`, 'content-type': 'application/json' }
  try {
    const check = await fetch(`${edge.url}/v1/chat/completions`, {
      method: 'POST',
      headers: auth,
      body: JSON.stringify(cachedBody),
    })
    if (check.headers.get('x-moe-cache') !== 'HIT')
      throw new Error(`cache not primed: ${check.status} ${await check.text()}`)
    const asyncBody = JSON.stringify({
      model: 'auto',
      max_tokens: 16,
      messages: [{ role: 'user', content: 'Write a haiku about queues.' }],
    })
    const cases = [
      ['trivial', `${edge.url}/healthz`, {}],
      ['auth', `${edge.url}/v1/models`, { headers: auth }],
      [
        'cache',
        `${edge.url}/v1/chat/completions`,
        { method: 'POST', headers: auth, body: JSON.stringify(cachedBody) },
      ],
      [
        'enqueue',
        `${edge.url}/v1/chat/completions`,
        { method: 'POST', headers: { ...auth, prefer: 'respond-async' }, body: asyncBody },
      ],
    ] as const
    // Warm every path (isolate, Durable Object, Redis connection, BullMQ scripts).
    for (const [name, url, opts] of cases) await run(name, url, 4, { ...opts, duration: 1 })
    const results: CaseResult[] = []
    for (const connections of [1, 8]) {
      for (const [name, url, opts] of cases)
        results.push(await run(name, url, connections, opts as Partial<autocannon.Options>))
    }
    console.log(
      `\nedge bench: wrangler dev (workerd) on 127.0.0.1, ${SECONDS} s per case, Redis ${REDIS_URL}`,
    )
    console.log(
      'case      conns   req/s  mean ms   p50 ms  p99 ms  +p50 vs trivial  +mean vs trivial  errors  non-2xx',
    )
    for (const r of results) {
      const base = results.find((b) => b.name === 'trivial' && b.connections === r.connections)!
      console.log(
        `${r.name.padEnd(9)} ${String(r.connections).padStart(5)} ${r.rps.toFixed(0).padStart(7)} ${r.mean.toFixed(2).padStart(8)} ${r.p50.toFixed(1).padStart(8)} ${r.p99.toFixed(1).padStart(7)} ${(r.name === 'trivial' ? '-' : `${signed(r.p50 - base.p50, 1)} ms`).padStart(16)} ${(r.name === 'trivial' ? '-' : `${signed(r.mean - base.mean, 2)} ms`).padStart(17)} ${String(r.errors).padStart(7)} ${String(r.non2xx).padStart(8)}`,
      )
    }
    console.log(
      `router, in-process: ${cpu.classifyUs.toFixed(1)} us per ${cpu.bytes}-byte prompt (classify); ${cpu.fullUs.toFixed(1)} us with validation + modality + pool choice`,
    )
    const failed = results.filter((r) => r.non2xx > 0 || r.errors > 0)
    if (failed.length > 0) console.log(`note: non-2xx/errors in ${failed.map((f) => f.name).join(', ')}`)
  } finally {
    clearInterval(drain)
    await edge.stop()
    const keys = await redis.keys(`${PREFIX}:*`)
    if (keys.length > 0) await redis.del(...keys)
    await Promise.all(queues.map((q) => q.close().catch(() => {})))
    redis.disconnect()
    rmSync(persistDir, { recursive: true, force: true })
  }
}

await main()
