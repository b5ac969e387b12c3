// Batch benchmark: a 1,000-line batch on the tiny model through the whole stack (the official
// `openai` client -> wrangler dev -> BullMQ flow -> the real GPU worker -> the batch coordinator
// -> a signed webhook to a local receiver), against the same 1,000 requests sent live at 16
// concurrency. Run from the repo root: `npx node edge/bench/batch-bench.ts` (about a minute).
// Traffic stays on 127.0.0.1; everything it starts is stopped and its Redis keys removed.
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { writeFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { join } from 'node:path'
import { BATCH_QUEUE, poolQueueName } from '@moe/shared'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'
import OpenAI, { toFile } from 'openai'
import { REDIS_URL, startGpuWorker } from '../test/gpu-worker.ts'
import { adminCall, createTenant, repoRoot, startEdge } from '../test/wrangler-dev.ts'

const N = Number(process.env.BENCH_LINES ?? 1000)
const MAX_TOKENS = Number(process.env.BENCH_MAX_TOKENS ?? 16)
const CONCURRENCY = 16
const PREFIX = `moebbench-${randomBytes(4).toString('hex')}`
const TIME_LIMIT_MS = 300_000

const topics = [
  'Write a Python function',
  'Translate to French: good morning',
  'Summarise the meeting',
  'Solve 3x=9',
]
const request = (i: number) => ({
  model: 'auto',
  max_tokens: MAX_TOKENS,
  messages: [{ role: 'user' as const, content: `${topics[i % topics.length]} (${i})` }],
})

const timer = setTimeout(() => {
  console.error('batch-bench: time limit reached')
  process.exit(1)
}, TIME_LIMIT_MS)

let webhookAt = 0
const receiver = createServer((req, res) => {
  req.resume()
  req.on('end', () => {
    webhookAt = performance.now()
    res.writeHead(200).end()
  })
})
receiver.listen(0, '127.0.0.1')
await once(receiver, 'listening')
const hook = `http://127.0.0.1:${(receiver.address() as { port: number }).port}/hook`

const [edge, worker] = await Promise.all([
  startEdge({ QUEUE_PREFIX: PREFIX, WEBHOOK_ALLOW_LOOPBACK: '1' }),
  startGpuWorker(PREFIX, ['general', 'code', 'vision'], { env: { MOE_WEBHOOK_ALLOW_LOOPBACK: '1' } }),
])
const redis = new Redis(REDIS_URL)
try {
  const tenant = await createTenant(edge, {
    rateLimits: { requestsPerMinute: 1_000_000, tokensPerMinute: 100_000_000 },
    cacheTtlSeconds: 0,
  })
  const res = await adminCall(edge, 'POST', `/tenants/${tenant.id}/webhooks`, {
    url: hook,
    events: ['batch.completed'],
  })
  if (res.status !== 201) throw new Error(`webhook registration: ${res.status} ${await res.text()}`)
  const client = new OpenAI({
    apiKey: tenant.key,
    baseURL: `${edge.url}/v1`,
    maxRetries: 0,
    timeout: 120_000,
  })

  // Warm-up: the engine's first runs and the edge's first requests.
  await Promise.all(Array.from({ length: 16 }, (_, i) => client.chat.completions.create(request(i))))

  // ---- batch
  const jsonl = `${Array.from({ length: N }, (_, i) =>
    JSON.stringify({ custom_id: `r${i}`, method: 'POST', url: '/v1/chat/completions', body: request(i) }),
  ).join('\n')}\n`
  const u0 = performance.now()
  const file = await client.files.create({
    file: await toFile(Buffer.from(jsonl), 'bench.jsonl'),
    purpose: 'batch',
  })
  const uploadMs = performance.now() - u0
  const t0 = performance.now()
  const batch = await client.batches.create({
    input_file_id: file.id,
    endpoint: '/v1/chat/completions',
    completion_window: '24h',
  })
  const createMs = performance.now() - t0
  while (webhookAt === 0) await new Promise((r) => setTimeout(r, 5))
  const batchWallMs = webhookAt - t0
  const done = await client.batches.retrieve(batch.id)
  const out = (await (await client.files.content(done.output_file_id!)).text()).split('\n').filter(Boolean)
  const batchTokens = out.reduce((s, l) => s + JSON.parse(l).response.body.usage.completion_tokens, 0)
  // When the last child finished (BullMQ's own timestamps, epoch ms), and when the parent did.
  const children = await Promise.all(
    Array.from({ length: N }, async (_, i) => {
      for (const p of ['general', 'code', 'vision']) {
        const j = await new Queue(poolQueueName(p), { connection: redis, prefix: PREFIX }).getJob(
          `${batch.id}-${i}`,
        )
        if (j) return j
      }
      return null
    }),
  )
  const firstStart = Math.min(...children.map((j) => j?.processedOn ?? Number.POSITIVE_INFINITY))
  const lastFinish = Math.max(...children.map((j) => j?.finishedOn ?? 0))
  const enqueuedAt = Math.min(...children.map((j) => j?.timestamp ?? Number.POSITIVE_INFINITY))
  const parent = await new Queue(BATCH_QUEUE, { connection: redis, prefix: PREFIX }).getJob(batch.id)
  const webhookEpoch = Date.now() - (performance.now() - webhookAt)

  // ---- live, same requests, 16 at a time
  const l0 = performance.now()
  let next = 0
  let liveTokens = 0
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < N) {
        const i = next++
        const r = await client.chat.completions.create(request(i), {
          headers: { 'cache-control': 'no-store' },
        })
        liveTokens += r.usage?.completion_tokens ?? 0
      }
    }),
  )
  const liveWallMs = performance.now() - l0

  const result = {
    lines: N,
    max_tokens: MAX_TOKENS,
    batch: {
      status: done.status,
      upload_ms: Math.round(uploadMs),
      create_ms: Math.round(createMs),
      create_to_webhook_ms: Math.round(batchWallMs),
      enqueue_to_first_child_start_ms: firstStart - enqueuedAt,
      children_span_ms: lastFinish - firstStart,
      last_child_to_parent_done_ms: (parent?.finishedOn ?? 0) - lastFinish,
      last_child_to_webhook_ms: Math.round(webhookEpoch - lastFinish),
      completion_tokens: batchTokens,
      tokens_per_s: Math.round(batchTokens / (batchWallMs / 1000)),
    },
    live: {
      concurrency: CONCURRENCY,
      wall_ms: Math.round(liveWallMs),
      completion_tokens: liveTokens,
      tokens_per_s: Math.round(liveTokens / (liveWallMs / 1000)),
    },
    per_line_ms: {
      batch: +(batchWallMs / N).toFixed(3),
      live: +(liveWallMs / N).toFixed(3),
      create_fanout: +(createMs / N).toFixed(3),
      machinery_outside_generation: +((createMs + (webhookEpoch - lastFinish)) / N).toFixed(3),
    },
  }
  console.log(JSON.stringify(result, null, 2))
  writeFileSync(join(repoRoot, 'edge/bench/batch-bench-result.json'), `${JSON.stringify(result, null, 2)}\n`)
} finally {
  clearTimeout(timer)
  await Promise.all([edge.stop(), worker.stop()])
  receiver.close()
  const keys = await redis.keys(`${PREFIX}:*`)
  for (let i = 0; i < keys.length; i += 500) await redis.del(...keys.slice(i, i + 500))
  redis.disconnect()
}
