// Runs a built worker image against a real Redis and checks what a deployment relies on:
// /healthz turns 200, a job on pool.general streams tokens and `done`, /metrics has the moe_*
// series, and a stop (SIGTERM, the image's STOPSIGNAL) lets an in-flight job finish and exits 0.
//
//   node infra/scripts/smoke-worker-image.ts moe-worker:cpu
//
// Needs Redis at REDIS_URL (default redis://127.0.0.1:6379), reachable from the container over
// the host network. CONTAINER picks the engine (default docker); CONTAINER_RUN_ARGS adds run flags
// (e.g. podman on a host without systemd: "--runtime runc --cgroup-manager cgroupfs" go in
// CONTAINER_GLOBAL_ARGS). Everything uses its own queue prefix and job ids, so other workers and
// tests on the same Redis are left alone.
import { spawnSync } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { createServer } from 'node:net'
import {
  generateJobOptions,
  type JobPayloadInput,
  jobEventsKey,
  poolQueueName,
  STREAM_FIELD,
  type StreamEvent,
} from '@moe/shared'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'

const image = process.argv[2]
if (!image) {
  console.error('usage: node infra/scripts/smoke-worker-image.ts IMAGE')
  process.exit(2)
}
const engine = process.env.CONTAINER ?? 'docker'
const globalArgs = (process.env.CONTAINER_GLOBAL_ARGS ?? '').split(' ').filter(Boolean)
const runArgs = (process.env.CONTAINER_RUN_ARGS ?? '').split(' ').filter(Boolean)
const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const prefix = `smoke-${randomUUID().slice(0, 8)}`
const name = `moe-smoke-${prefix}`
const pool = 'general'

function sh(args: string[], allowFail = false): string {
  const r = spawnSync(engine, [...globalArgs, ...args], { encoding: 'utf8' })
  if (r.status !== 0 && !allowFail) throw new Error(`${engine} ${args.join(' ')}: ${r.stderr || r.stdout}`)
  return r.stdout.trim()
}

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number }
      s.close(() => resolve(port))
    })
  })
}

let failures = 0
function check(ok: boolean, what: string, detail = ''): void {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}${detail ? ` (${detail})` : ''}`)
  if (!ok) failures++
}

const port = await freePort()
const redis = new Redis(redisUrl, { maxRetriesPerRequest: null })
const queue = new Queue(poolQueueName(pool), { connection: redis, prefix })

async function submit(maxTokens: number): Promise<string> {
  const id = `${prefix}-${randomUUID()}`
  const payload: JobPayloadInput = {
    version: 1,
    requestId: id,
    tenantId: 'smoke',
    pool,
    model: 'moe-demo',
    input: { kind: 'text', prompt: 'Hello' },
    sampling: { maxTokens, temperature: 0, topP: 1, topK: 0, stop: [], ignoreEos: true },
    deadline: Date.now() + 120_000,
    createdAt: Date.now(),
  }
  await queue.add('generate', payload, generateJobOptions(id, 'live'))
  return id
}

/** The job's events until `done` or `error`, or null after the timeout. */
async function events(id: string, timeoutMs: number): Promise<StreamEvent[] | null> {
  const until = Date.now() + timeoutMs
  while (Date.now() < until) {
    const entries = await redis.xrange(jobEventsKey(id), '-', '+')
    const parsed = entries.map(
      ([, fields]) => JSON.parse(fields[fields.indexOf(STREAM_FIELD) + 1]!) as StreamEvent,
    )
    if (parsed.some((e) => e.type !== 'token')) return parsed
    await new Promise((r) => setTimeout(r, 100))
  }
  return null
}

async function healthz(): Promise<number> {
  try {
    return (await fetch(`http://127.0.0.1:${port}/healthz`)).status
  } catch {
    return 0
  }
}

const jobIds: string[] = []
try {
  sh([
    'run',
    '-d',
    '--name',
    name,
    '--network',
    'host',
    ...runArgs,
    '-e',
    `REDIS_URL=${redisUrl}`,
    '-e',
    `MOE_QUEUE_PREFIX=${prefix}`,
    '-e',
    `MOE_METRICS_PORT=${port}`,
    '-e',
    'MOE_BATCH_SERVICES=0',
    '-e',
    'MOE_THREADS=1',
    '-e',
    'MOE_DRAIN_TIMEOUT_MS=30000',
    image,
    'serve',
    '--pools',
    pool,
  ])
  let status = 0
  const t0 = Date.now()
  while (Date.now() - t0 < 120_000) {
    status = await healthz()
    if (status === 200) break
    await new Promise((r) => setTimeout(r, 250))
  }
  check(status === 200, '/healthz answers 200 once the worker is up', `${Date.now() - t0} ms`)

  const first = await submit(8)
  jobIds.push(first)
  const ev = await events(first, 30_000)
  const tokens = ev?.filter((e) => e.type === 'token').length ?? 0
  check(
    ev?.at(-1)?.type === 'done' && tokens > 0,
    'a job streams tokens and done',
    `${tokens} tokens, last ${ev?.at(-1)?.type}`,
  )

  const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text()
  for (const m of [
    'moe_generated_tokens_total',
    'moe_time_to_first_token_seconds',
    'moe_expert_tokens_total',
  ])
    check(metrics.includes(m), `/metrics has ${m}`)

  // A long job in flight, then stop: the worker must drain it and exit 0.
  const long = await submit(400)
  jobIds.push(long)
  const started = Date.now()
  while (Date.now() - started < 10_000 && (await redis.xlen(jobEventsKey(long))) === 0)
    await new Promise((r) => setTimeout(r, 20))
  check((await redis.xlen(jobEventsKey(long))) > 0, 'the long job is generating when the stop comes')
  const t1 = Date.now()
  sh(['stop', '-t', '60', name])
  const exitCode = sh(['inspect', '-f', '{{.State.ExitCode}}', name])
  check(
    exitCode === '0',
    'stop (SIGTERM) drains and the worker exits 0',
    `exit ${exitCode} after ${Date.now() - t1} ms`,
  )
  const longEv = await events(long, 1000)
  check(
    longEv?.at(-1)?.type === 'done',
    'the in-flight job finished during the drain',
    `last ${longEv?.at(-1)?.type}`,
  )
} catch (e) {
  check(false, 'smoke run', (e as Error).message)
} finally {
  if (failures > 0) console.log(sh(['logs', '--tail', '40', name], true))
  sh(['rm', '-f', '-v', name], true)
  await queue.obliterate({ force: true }).catch(() => {})
  await queue.close()
  if (jobIds.length > 0) await redis.del(...jobIds.map(jobEventsKey))
  redis.disconnect()
}
console.log(`${failures === 0 ? 'smoke: passed' : `smoke: ${failures} check(s) failed`}`)
process.exit(failures === 0 ? 0 : 1)
