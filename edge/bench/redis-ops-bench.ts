// Redis operations and bytes per generated token, through the whole local stack. Run from the
// repo root:  npx node edge/bench/redis-ops-bench.ts   (about a minute on 2 cores)
// Env: BENCH_N (requests per phase, default 200), BENCH_CONCURRENCY (16), BENCH_REDIS_CLUSTER=1
// (a 3-master Redis Cluster instead of one redis-server: INFO and MONITOR summed over the masters,
// with each master's share of the commands).
//
// A private redis-server (so INFO commandstats counts this stack only: the edge under
// `wrangler dev`, its Durable Object, one `moe serve` worker on the tiny model). Each phase runs
// N requests of known token counts (usage.completion_tokens) and diffs INFO commandstats, INFO
// stats (connections, network bytes) and INFO memory around it; the background rate measured in
// an idle phase (BullMQ's blocking pops, stalled checks, the worker's queue-depth gauge) is
// subtracted per second of the phase. Commands the bench itself sends (INFO, CLIENT, MEMORY,
// SCAN, MONITOR, PING) are left out. Two live phases with different max_tokens separate the
// per-request cost from the per-token cost, command by command (a least-squares line through
// the phases). A single 8-token request is also traced with MONITOR, grouped by connection, to
// show who sends what.
import { once } from 'node:events'
import { mkdirSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { join } from 'node:path'
import { connectRedis, jobEventsKey, parseClusterNodes, type RedisClient } from '@moe/shared'
import { Redis } from 'ioredis'
import OpenAI, { toFile } from 'openai'
import { startRedisCluster } from '../../tests/src/redis-cluster.ts'
import { streamRequest } from '../../tests/src/sse.ts'
import { devTenantConfig, type Stack, startStack } from '../../tests/src/stack.ts'
import { adminCall, createTenant, repoRoot, type TestTenant } from '../test/wrangler-dev.ts'
import { commandCalls, diffCalls, infoOf, loadavg, machine, num, r3, startBenchRedis } from './bench-redis.ts'

const N = Number(process.env.BENCH_N ?? 200)
const CONC = Number(process.env.BENCH_CONCURRENCY ?? 16)
const TIME_LIMIT_MS = Number(process.env.BENCH_TIME_LIMIT_MS ?? 600_000)
const IDLE_MS = Number(process.env.BENCH_IDLE_MS ?? 10_000)
const CLUSTER = process.env.BENCH_REDIS_CLUSTER === '1'
const OWN = new Set([
  'info',
  'client|list',
  'client|setname',
  'memory|usage',
  'scan',
  'monitor',
  'ping',
  'select',
])

const timer = setTimeout(() => {
  console.error('redis-ops-bench: time limit reached')
  process.exit(1)
}, TIME_LIMIT_MS)

interface Snapshot {
  at: number
  calls: Record<string, number>
  stats: Record<string, string>
  memory: Record<string, string>
  /** Redis's own CPU time (INFO cpu, user + sys, all its threads), ms. */
  cpuMs: number
  /** Commands (not the bench's own) each node has run so far. */
  nodeCalls: number[]
}

/** Adds one node's INFO fields into a sum (numbers add up; anything else keeps the last value). */
const sumInto = (into: Record<string, string>, add: Record<string, string>) => {
  for (const [k, v] of Object.entries(add)) {
    const x = Number(v)
    into[k] = Number.isFinite(x) ? String((Number(into[k]) || 0) + x) : v
  }
}

/** INFO of every node (one on a single Redis; each master of a cluster), summed. */
async function snap(nodes: Redis[]): Promise<Snapshot> {
  const s: Snapshot = { at: performance.now(), calls: {}, stats: {}, memory: {}, cpuMs: 0, nodeCalls: [] }
  for (const redis of nodes) {
    const calls = await commandCalls(redis)
    for (const [k, v] of Object.entries(calls)) s.calls[k] = (s.calls[k] ?? 0) + v
    s.nodeCalls.push(Object.entries(calls).reduce((a, [k, v]) => a + (OWN.has(k) ? 0 : v), 0))
    sumInto(s.stats, await infoOf(redis, 'stats'))
    sumInto(s.memory, await infoOf(redis, 'memory'))
    const c = await infoOf(redis, 'cpu')
    s.cpuMs += (num(c, 'used_cpu_user') + num(c, 'used_cpu_sys')) * 1000
  }
  return s
}

interface JobRef {
  id: string
  pool: string
  tokens: number
}

interface PhaseResult {
  name: string
  requests: number
  completion_tokens: number
  seconds: number
  /** Per command, background-subtracted. */
  calls: Record<string, number>
  calls_total: number
  net_in_bytes: number
  net_out_bytes: number
  connections_opened: number
  used_memory_delta: number
  redis_cpu_ms: number
  redis_cpu_us_per_token: number
  redis_cpu_us_per_request: number
  per_request: Record<string, number>
  per_token: Record<string, number>
  /** Share of the phase's commands each node ran (a cluster's masters; idle not subtracted). */
  node_share?: number[]
  memory_usage_sample?: Record<string, number>
}

let idleRate: Record<string, number> = {}
let idleNet = { in: 0, out: 0 }
let idleCpuMsPerS = 0

function phaseResult(name: string, a: Snapshot, b: Snapshot, jobs: JobRef[]): PhaseResult {
  const seconds = (b.at - a.at) / 1000
  const raw = diffCalls(a.calls, b.calls)
  const calls: Record<string, number> = {}
  for (const [k, v] of Object.entries(raw)) {
    if (OWN.has(k)) continue
    const net = Math.round(v - (idleRate[k] ?? 0) * seconds)
    if (net > 0) calls[k] = net
  }
  const tokens = jobs.reduce((s, j) => s + j.tokens, 0)
  const total = Object.values(calls).reduce((s, v) => s + v, 0)
  const per = (d: number) =>
    Object.fromEntries(
      Object.entries({ ...calls, TOTAL: total })
        .sort((x, y) => y[1] - x[1])
        .map(([k, v]) => [k, r3(v / d)]),
    )
  const d = (k: string) => num(b.stats, k) - num(a.stats, k)
  return {
    name,
    requests: jobs.length,
    completion_tokens: tokens,
    seconds: r3(seconds),
    calls,
    calls_total: total,
    net_in_bytes: Math.round(d('total_net_input_bytes') - idleNet.in * seconds),
    net_out_bytes: Math.round(d('total_net_output_bytes') - idleNet.out * seconds),
    connections_opened: d('total_connections_received'),
    used_memory_delta: num(b.memory, 'used_memory') - num(a.memory, 'used_memory'),
    redis_cpu_ms: r3(b.cpuMs - a.cpuMs - idleCpuMsPerS * seconds),
    redis_cpu_us_per_token: r3(((b.cpuMs - a.cpuMs - idleCpuMsPerS * seconds) * 1000) / Math.max(1, tokens)),
    redis_cpu_us_per_request: r3(((b.cpuMs - a.cpuMs - idleCpuMsPerS * seconds) * 1000) / jobs.length),
    per_request: per(jobs.length),
    per_token: per(Math.max(1, tokens)),
    ...(b.nodeCalls.length > 1
      ? (() => {
          const d = b.nodeCalls.map((n, i) => n - a.nodeCalls[i]!)
          const all = d.reduce((x, y) => x + y, 0)
          return { node_share: d.map((n) => r3(n / Math.max(1, all))) }
        })()
      : {}),
  }
}

/** MEMORY USAGE of each job's keys (stream, BullMQ job hash, edge job meta), summed over jobs. */
async function memoryOf(redis: RedisClient, prefix: string, jobs: JobRef[]) {
  const sum: Record<string, number> = { stream: 0, bull_job_hash: 0, job_meta: 0, stream_entries: 0 }
  const first = jobs[0]
  const ttl = first
    ? {
        stream_ttl_s: await redis.ttl(jobEventsKey(first.id)),
        job_meta_ttl_s: await redis.ttl(`${prefix}:jobmeta:${first.id}`),
        done_event_bytes: (
          (await redis.xrevrange(jobEventsKey(first.id), '+', '-', 'COUNT', 1))[0]?.[1] ?? []
        ).reduce((a, f) => a + Buffer.byteLength(f), 0),
      }
    : ({} as Record<string, number>)
  for (const j of jobs) {
    sum.stream! += Number((await redis.memory('USAGE', jobEventsKey(j.id), 'SAMPLES', '0')) ?? 0)
    sum.stream_entries! += await redis.xlen(jobEventsKey(j.id))
    sum.bull_job_hash! += Number(
      (await redis.memory('USAGE', `${prefix}:pool.${j.pool}:${j.id}`, 'SAMPLES', '0')) ?? 0,
    )
    sum.job_meta! += Number((await redis.memory('USAGE', `${prefix}:jobmeta:${j.id}`, 'SAMPLES', '0')) ?? 0)
  }
  const tokens = jobs.reduce((s, j) => s + j.tokens, 0)
  const out: Record<string, number> = { jobs: jobs.length, tokens, ...ttl }
  for (const [k, v] of Object.entries(sum)) {
    out[`${k}_per_request`] = Math.round(v / jobs.length)
    if (k === 'stream') out.stream_bytes_per_token = r3(v / Math.max(1, tokens))
  }
  return out
}

const chatBody = (i: number, maxTokens: number) => ({
  model: 'auto',
  max_tokens: maxTokens,
  temperature: 1,
  messages: [{ role: 'user', content: `Request ${i}: say something about experts.` }],
})

/** A batch input file of `n` chat lines of up to 64 tokens each. */
const batchJsonl = (n: number): string =>
  `${Array.from({ length: n }, (_, i) =>
    JSON.stringify({
      custom_id: `r${i}`,
      method: 'POST',
      url: '/v1/chat/completions',
      body: chatBody(i, 64),
    }),
  ).join('\n')}\n`

async function runLive(
  stack: Stack,
  tenant: TestTenant,
  n: number,
  conc: number,
  maxTokens: number,
  stream: boolean,
): Promise<JobRef[]> {
  const jobs: JobRef[] = []
  let next = 0
  await Promise.all(
    Array.from({ length: conc }, async () => {
      while (next < n) {
        const i = next++
        const url = `${stack.url}/v1/chat/completions`
        if (stream) {
          const r = await streamRequest(
            url,
            tenant.key,
            { ...chatBody(i, maxTokens), stream_options: { include_usage: true } },
            { headers: { 'cache-control': 'no-store' }, timeoutMs: 120_000 },
          )
          if (r.status !== 200 || !r.done || r.error)
            throw new Error(`request ${i}: ${r.status} ${JSON.stringify(r.body ?? r.error)}`)
          jobs.push({
            id: r.headers.get('x-request-id')!,
            pool: r.headers.get('x-moe-pool')!,
            tokens: r.completionTokens ?? 0,
          })
        } else {
          const res = await fetch(url, {
            method: 'POST',
            headers: {
              authorization: `Bearer ${tenant.key}`,
              'content-type': 'application/json',
              'cache-control': 'no-store',
            },
            body: JSON.stringify(chatBody(i, maxTokens)),
          })
          const b = (await res.json()) as { usage?: { completion_tokens: number } }
          if (res.status !== 200) throw new Error(`request ${i}: ${res.status} ${JSON.stringify(b)}`)
          jobs.push({
            id: res.headers.get('x-request-id')!,
            pool: res.headers.get('x-moe-pool')!,
            tokens: b.usage?.completion_tokens ?? 0,
          })
        }
      }
    }),
  )
  return jobs
}

/** Least squares per command over phases: calls = a * requests + b * tokens. */
function fitPerRequestPerToken(phases: PhaseResult[]) {
  const cmds = new Set(phases.flatMap((p) => Object.keys(p.calls)))
  const out: Record<string, { per_request: number; per_token: number }> = {}
  for (const k of [...cmds, 'TOTAL']) {
    let srr = 0
    let srt = 0
    let stt = 0
    let syr = 0
    let syt = 0
    for (const p of phases) {
      const y = k === 'TOTAL' ? p.calls_total : (p.calls[k] ?? 0)
      const r = p.requests
      const t = p.completion_tokens
      srr += r * r
      srt += r * t
      stt += t * t
      syr += y * r
      syt += y * t
    }
    const det = srr * stt - srt * srt
    if (det === 0) continue
    out[k] = { per_request: r3((syr * stt - syt * srt) / det), per_token: r3((syt * srr - syr * srt) / det) }
  }
  return out
}

/**
 * Counts every command Redis executes while running, from MONITOR: sent by a client ("top") or
 * run inside a Lua script ("lua"; INFO commandstats counts both, so it cannot tell them apart),
 * and which streams XADD writes to (job event streams or BullMQ's per-queue event log).
 */
async function monitorCounts(urls: string[]) {
  const bases = urls.map((url) => new Redis(url))
  const monitors = await Promise.all(bases.map((b) => b.monitor()))
  const top: Record<string, number> = {}
  const lua: Record<string, number> = {}
  const xadd: Record<string, number> = {}
  const onCommand = (_time: string, args: string[], source: string) => {
    const cmd = (args[0] ?? '').toLowerCase()
    if (source !== 'lua' && (OWN.has(cmd) || cmd === 'client' || cmd === 'memory' || cmd === 'monitor'))
      return
    const into = source === 'lua' ? lua : top
    into[cmd] = (into[cmd] ?? 0) + 1
    if (cmd === 'xadd') {
      const key = args[1] ?? ''
      const kind = /^moe:job:\{.*\}:events$/.test(key)
        ? 'job_events'
        : key.endsWith(':events')
          ? 'bullmq_events'
          : key
      xadd[kind] = (xadd[kind] ?? 0) + 1
    }
  }
  for (const m of monitors) m.on('monitor', onCommand)
  await new Promise((r) => setTimeout(r, 200))
  const t0 = performance.now()
  return {
    async stop() {
      await new Promise((r) => setTimeout(r, 200))
      const seconds = (performance.now() - t0) / 1000
      for (const m of monitors) m.disconnect()
      for (const b of bases) b.disconnect()
      return { seconds, top, lua, xadd }
    },
  }
}

const sumOf = (o: Record<string, number>) => Object.values(o).reduce((a, b) => a + b, 0)

async function traceOne(stack: Stack, tenant: TestTenant, urls: string[]) {
  const bases = urls.map((url) => new Redis(url))
  const monitors = await Promise.all(bases.map((b) => b.monitor()))
  const byConn: Record<string, string[]> = {}
  const onCommand = (_time: string, args: string[], source: string) => {
    const cmd = (args[0] ?? '').toLowerCase()
    if (OWN.has(cmd) || cmd === 'info' || cmd === 'client') return
    let label = cmd
    if (cmd === 'evalsha' || cmd === 'eval')
      label = `${cmd}(${args[2]} keys: ${(args[3] ?? '').split(':').slice(-1)[0]})`
    byConn[source] = [...(byConn[source] ?? []), label]
  }
  for (const m of monitors) m.on('monitor', onCommand)
  await new Promise((r) => setTimeout(r, 300))
  const r = await streamRequest(
    `${stack.url}/v1/chat/completions`,
    tenant.key,
    { ...chatBody(0, 8), stream_options: { include_usage: true } },
    { headers: { 'cache-control': 'no-store' } },
  )
  await new Promise((res) => setTimeout(res, 500))
  for (const m of monitors) m.disconnect()
  for (const b of bases) b.disconnect()
  // Compact each connection's sequence: runs of the same label as "label xN".
  const compact: Record<string, string[]> = {}
  for (const [src, labels] of Object.entries(byConn)) {
    const out: string[] = []
    let prev = ''
    let count = 0
    for (const l of [...labels, '']) {
      if (l === prev) count++
      else {
        if (prev) out.push(count > 1 ? `${prev} x${count}` : prev)
        prev = l
        count = 1
      }
    }
    compact[src] = out
  }
  return { completion_tokens: r.completionTokens, job: r.headers.get('x-request-id'), by_connection: compact }
}

async function main() {
  const where = machine()
  const redisSrv = CLUSTER ? await benchCluster() : { ...(await startBenchRedis()), nodes: undefined }
  const urls = redisSrv.nodes ? redisSrv.nodes.split(',').map((n) => `redis://${n}`) : [redisSrv.url]
  const mon = urls.map((url) => new Redis(url))
  const keys = connectRedis({ redisUrl: redisSrv.url, redisClusterNodes: parseClusterNodes(redisSrv.nodes) })
  let stack: Stack | null = null
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
  try {
    stack = await startStack({
      redisUrl: redisSrv.url,
      ...(redisSrv.nodes ? { clusterNodes: redisSrv.nodes } : {}),
      workers: 1,
      edgeVars: { WEBHOOK_ALLOW_LOOPBACK: '1' },
      workerEnv: { MOE_WEBHOOK_ALLOW_LOOPBACK: '1' },
    })
    const tenant = await createTenant(stack, {
      ...devTenantConfig(),
      id: `ops_${Date.now().toString(36)}`,
      name: 'redis ops bench',
      rateLimits: { requestsPerMinute: 10_000_000, tokensPerMinute: 1_000_000_000 },
      cacheTtlSeconds: 0,
      maxLiveStreams: 1000,
    })
    const wh = await adminCall(stack, 'POST', `/tenants/${tenant.id}/webhooks`, {
      url: hook,
      events: ['batch.completed'],
    })
    if (wh.status !== 201) throw new Error(`webhook registration: ${wh.status} ${await wh.text()}`)

    // Warm-up (engine, isolate, Durable Object, scripts loaded), then settle.
    await runLive(stack, tenant, 32, 16, 8, true)
    await runLive(stack, tenant, 16, 16, 8, false)
    await new Promise((r) => setTimeout(r, 1000))

    // Idle background.
    const i0 = await snap(mon)
    await new Promise((r) => setTimeout(r, IDLE_MS))
    const i1 = await snap(mon)
    const idleS = (i1.at - i0.at) / 1000
    idleRate = Object.fromEntries(
      Object.entries(diffCalls(i0.calls, i1.calls))
        .filter(([k]) => !OWN.has(k))
        .map(([k, v]) => [k, v / idleS]),
    )
    idleCpuMsPerS = (i1.cpuMs - i0.cpuMs) / idleS
    idleNet = {
      in: (num(i1.stats, 'total_net_input_bytes') - num(i0.stats, 'total_net_input_bytes')) / idleS,
      out: (num(i1.stats, 'total_net_output_bytes') - num(i0.stats, 'total_net_output_bytes')) / idleS,
    }
    console.log(
      `idle, per second: ${JSON.stringify(Object.fromEntries(Object.entries(idleRate).map(([k, v]) => [k, r3(v)])))}`,
    )

    const phases: PhaseResult[] = []
    const live = async (name: string, n: number, conc: number, maxTokens: number, stream: boolean) => {
      const a = await snap(mon)
      const jobs = await runLive(stack!, tenant, n, conc, maxTokens, stream)
      await new Promise((r) => setTimeout(r, 300)) // the worker's last EXPIREs and BullMQ's completion
      const b = await snap(mon)
      const p = phaseResult(name, a, b, jobs)
      p.memory_usage_sample = await memoryOf(keys, stack!.prefix, jobs.slice(0, 50))
      phases.push(p)
      console.log(
        `${name}: ${JSON.stringify({ requests: p.requests, tokens: p.completion_tokens, per_token: p.per_token, per_request_total: p.per_request.TOTAL })}`,
      )
      return p
    }
    const s8 = await live(`live streamed, max_tokens 8, ${CONC} concurrent`, N, CONC, 8, true)
    const s64 = await live(`live streamed, max_tokens 64, ${CONC} concurrent`, N, CONC, 64, true)
    const s64c1 = await live('live streamed, max_tokens 64, 1 at a time', Math.min(N, 50), 1, 64, true)
    const n64 = await live(
      `live not streamed, max_tokens 64, ${CONC} concurrent`,
      Math.min(N, 100),
      CONC,
      64,
      false,
    )

    // ---- batch: N lines, max_tokens 64, create to webhook.
    const client = new OpenAI({
      apiKey: tenant.key,
      baseURL: `${stack.url}/v1`,
      maxRetries: 0,
      timeout: 120_000,
    })
    const runBatch = async (n: number): Promise<JobRef[]> => {
      const text = batchJsonl(n)
      const f = await client.files.create({
        file: await toFile(Buffer.from(text), 'm.jsonl'),
        purpose: 'batch',
      })
      webhookAt = 0
      const bt = await client.batches.create({
        input_file_id: f.id,
        endpoint: '/v1/chat/completions',
        completion_window: '24h',
      })
      const until = Date.now() + 180_000
      while (webhookAt === 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 5))
      if (webhookAt === 0) throw new Error('batch webhook did not arrive')
      const d = await client.batches.retrieve(bt.id)
      const o = (await (await client.files.content(d.output_file_id!)).text()).split('\n').filter(Boolean)
      return o.map((l) => {
        const x = JSON.parse(l) as {
          custom_id: string
          response: { body: { usage: { completion_tokens: number } } }
        }
        return {
          id: `${bt.id}-${x.custom_id.slice(1)}`,
          pool: 'general',
          tokens: x.response.body.usage.completion_tokens,
        }
      })
    }
    const jsonl = batchJsonl(N)
    const file = await client.files.create({
      file: await toFile(Buffer.from(jsonl), 'ops.jsonl'),
      purpose: 'batch',
    })
    const a = await snap(mon)
    webhookAt = 0
    const batch = await client.batches.create({
      input_file_id: file.id,
      endpoint: '/v1/chat/completions',
      completion_window: '24h',
    })
    const deadline = Date.now() + 180_000
    while (webhookAt === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5))
    if (webhookAt === 0) throw new Error('batch webhook did not arrive')
    await new Promise((r) => setTimeout(r, 300))
    const b = await snap(mon)
    const done = await client.batches.retrieve(batch.id)
    const out = (await (await client.files.content(done.output_file_id!)).text()).split('\n').filter(Boolean)
    const lines = out.map(
      (l) =>
        JSON.parse(l) as {
          custom_id: string
          response: { body: { usage: { completion_tokens: number }; moe?: { pool?: string } } }
        },
    )
    const batchJobs: JobRef[] = lines.map((l) => ({
      id: `${batch.id}-${l.custom_id.slice(1)}`,
      pool: l.response.body.moe?.pool ?? 'general',
      tokens: l.response.body.usage.completion_tokens,
    }))
    const pb = phaseResult(
      `batch of ${N} lines, max_tokens 64 (upload excluded; create to webhook)`,
      a,
      b,
      batchJobs,
    )
    pb.memory_usage_sample = await memoryOf(keys, stack.prefix, batchJobs.slice(0, 50))
    phases.push(pb)
    console.log(
      `${pb.name}: ${JSON.stringify({ requests: pb.requests, tokens: pb.completion_tokens, per_token: pb.per_token, per_request_total: pb.per_request.TOTAL })}`,
    )

    // ---- MONITOR-counted phases: client-sent vs in-script commands, by command.
    const monIdle = await monitorCounts(urls)
    await new Promise((r) => setTimeout(r, Math.min(IDLE_MS, 5000)))
    const idleM = await monIdle.stop()
    const idleTopRate = sumOf(idleM.top) / idleM.seconds
    const idleLuaRate = sumOf(idleM.lua) / idleM.seconds
    const monitoredPhases: Record<string, unknown>[] = []
    const monitored = async (name: string, run: () => Promise<JobRef[]>) => {
      const m = await monitorCounts(urls)
      const jobs = await run()
      await new Promise((r) => setTimeout(r, 300))
      const c = await m.stop()
      const tokens = jobs.reduce((a, j) => a + j.tokens, 0)
      const top = sumOf(c.top) - idleTopRate * c.seconds
      const lua = sumOf(c.lua) - idleLuaRate * c.seconds
      const perReq = (o: Record<string, number>) =>
        Object.fromEntries(
          Object.entries(o)
            .sort((x, y) => y[1] - x[1])
            .map(([k, v]) => [k, r3(v / jobs.length)]),
        )
      const p = {
        name,
        requests: jobs.length,
        completion_tokens: tokens,
        seconds: r3(c.seconds),
        client_commands: Math.round(top),
        script_commands: Math.round(lua),
        client_commands_per_request: r3(top / jobs.length),
        client_commands_per_token: r3(top / Math.max(1, tokens)),
        script_commands_per_request: r3(lua / jobs.length),
        script_commands_per_token: r3(lua / Math.max(1, tokens)),
        xadd_by_stream_per_request: perReq(c.xadd),
        client_commands_by_cmd_per_request: perReq(c.top),
        script_commands_by_cmd_per_request: perReq(c.lua),
        idle_subtracted_per_second: { client: r3(idleTopRate), script: r3(idleLuaRate) },
      }
      monitoredPhases.push(p)
      console.log(
        `MONITOR ${name}: ${JSON.stringify({ client_per_req: p.client_commands_per_request, client_per_tok: p.client_commands_per_token, script_per_req: p.script_commands_per_request, xadd: p.xadd_by_stream_per_request })}`,
      )
    }
    const NM = Math.min(N, 60)
    await monitored(`live streamed, max_tokens 8, ${CONC} concurrent`, () =>
      runLive(stack!, tenant, NM, CONC, 8, true),
    )
    await monitored(`live streamed, max_tokens 64, ${CONC} concurrent`, () =>
      runLive(stack!, tenant, NM, CONC, 64, true),
    )
    await monitored(`batch of ${NM} lines, max_tokens 64`, () => runBatch(NM))

    const trace = await traceOne(stack, tenant, urls)

    const result = {
      bench: 'redis-ops-bench',
      command: `${CLUSTER ? 'BENCH_REDIS_CLUSTER=1 ' : ''}npx node edge/bench/redis-ops-bench.ts`,
      env: { BENCH_N: N, BENCH_CONCURRENCY: CONC, BENCH_REDIS_CLUSTER: CLUSTER ? 1 : 0 },
      machine: where,
      loadavg_at_end: loadavg(),
      redis: {
        version: redisSrv.version,
        persistence: 'none (private bench instance)',
        ...(redisSrv.nodes ? { cluster_masters: urls.length } : {}),
      },
      idle_per_second: Object.fromEntries(Object.entries(idleRate).map(([k, v]) => [k, r3(v)])),
      idle_redis_cpu_ms_per_second: r3(idleCpuMsPerS),
      idle_net_bytes_per_second: { in: Math.round(idleNet.in), out: Math.round(idleNet.out) },
      phases,
      fit_live_streamed_concurrent: fitPerRequestPerToken([s8, s64]),
      derived: {
        net_bytes_per_token_live_streamed_64: r3(
          (s64.net_in_bytes + s64.net_out_bytes) / s64.completion_tokens,
        ),
        net_bytes_per_token_live_streamed_64_serial: r3(
          (s64c1.net_in_bytes + s64c1.net_out_bytes) / s64c1.completion_tokens,
        ),
        net_bytes_per_token_live_not_streamed_64: r3(
          (n64.net_in_bytes + n64.net_out_bytes) / n64.completion_tokens,
        ),
        net_bytes_per_token_batch_64: r3((pb.net_in_bytes + pb.net_out_bytes) / pb.completion_tokens),
      },
      monitored_phases: monitoredPhases,
      monitor_trace_one_8_token_request: trace,
    }
    const dir = join(repoRoot, 'edge/bench/results')
    mkdirSync(dir, { recursive: true })
    const path = join(
      dir,
      `redis-ops-${CLUSTER ? 'cluster-' : ''}${new Date().toISOString().replace(/[:.]/g, '-')}.json`,
    )
    writeFileSync(path, `${JSON.stringify(result, null, 2)}\n`)
    console.log(
      JSON.stringify({ fit: result.fit_live_streamed_concurrent, derived: result.derived }, null, 1),
    )
    console.log(path)
  } finally {
    clearTimeout(timer)
    receiver.close()
    await stack?.stop().catch(() => {})
    for (const m of mon) m.disconnect()
    keys.disconnect()
    await redisSrv.stop()
  }
}

/** A 3-master Redis Cluster on loopback (tests/src/redis-cluster.ts), no persistence. */
async function benchCluster() {
  const c = await startRedisCluster(3)
  const r = new Redis(c.url, { maxRetriesPerRequest: 1 })
  try {
    const version = /redis_version:(\S+)/.exec(await r.info('server'))?.[1] ?? '?'
    return { url: c.url, nodes: c.nodes, version, stop: () => c.stop() }
  } finally {
    r.disconnect()
  }
}

await main()
