// Streams benchmark: many concurrent streaming chat completions through the whole local stack,
// and what they cost in Redis connections. Run from the repo root:
//   npx node edge/bench/streams-bench.ts            (under a minute on 2 cores)
// Env: BENCH_LEVELS (default 1,50,500), BENCH_MAX_TOKENS (8), BENCH_TENANTS (1: one tenant with a
// live-stream cap (maxLiveStreams) of twice the largest level; N: the load spread round-robin over
// N such tenants), BENCH_ABORTS (100: streams the client drops, 0 skips).
//
// What it starts (and stops): a private redis-server on a free loopback port (so INFO counts
// this stack only), the edge under `wrangler dev` and one `moe serve` worker on the tiny model,
// as tests/src/stack.ts does. Every request goes to 127.0.0.1, and each level is a bounded number
// of waves: C requests opened together, the next wave when all have ended.
//
// Per level C it measures
//   - the trivial route (GET /healthz) at the same concurrency, in the same run: the baseline
//   - streamed completions: time to the first content chunk (TTFT) and to [DONE], p50/p99,
//     and what the worker itself reports (queue wait, its own time to first token); where the
//     TTFT went, from the BullMQ job's timestamps and the stream's first entry id
//   - Redis: connected_clients and blocked_clients sampled every 20 ms (peak), CLIENT LIST at the
//     peak grouped by last command, connections opened per request (total_connections_received
//     delta / requests), Redis CPU (INFO cpu), and how long the client count takes to come back
//     to the baseline. Then the dropped streams: the count back at baseline? leases released?
// Results: edge/bench/results/streams-<date>.json, and a table on stdout.
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { jobEventsKey } from '@moe/shared'
import { Redis } from 'ioredis'
import { type SseResult, streamRequest } from '../../tests/src/sse.ts'
import { devTenantConfig, type Stack, startStack } from '../../tests/src/stack.ts'
import { adminCall, createTenant, repoRoot, type TestTenant } from '../test/wrangler-dev.ts'
import {
  clientsByCmd,
  infoOf,
  loadavg,
  machine,
  num,
  percentile,
  r1,
  startBenchRedis,
} from './bench-redis.ts'

const LEVELS = (process.env.BENCH_LEVELS ?? '1,50,500').split(',').map(Number)
const MAX_TOKENS = Number(process.env.BENCH_MAX_TOKENS ?? 8)
const TENANTS = Number(process.env.BENCH_TENANTS ?? 1)
/** Streams opened together and then dropped by the client (leak check); 0 skips it. */
const ABORTS = Number(process.env.BENCH_ABORTS ?? 100)
const TIME_LIMIT_MS = Number(process.env.BENCH_TIME_LIMIT_MS ?? 600_000)
/** Requests per level: C=1 runs this many one after another; larger C runs waves of C. */
const streamWaves = (c: number) => (c === 1 ? 30 : c <= 64 ? 4 : 2)
const trivialWaves = (c: number) => (c === 1 ? 100 : c <= 64 ? 10 : 4)

const timer = setTimeout(() => {
  console.error('streams-bench: time limit reached')
  process.exit(1)
}, TIME_LIMIT_MS)

interface Sample {
  t: number
  connected: number
  blocked: number
}

/** Samples INFO clients every 20 ms (and CLIENT LIST every 250 ms) until stopped. */
function sampler(redis: Redis) {
  const samples: Sample[] = []
  let peakList: { total: number; byCmd: Record<string, number> } | null = null
  let running = true
  const t0 = performance.now()
  const loop = (async () => {
    let lastList = 0
    while (running) {
      const info = await infoOf(redis, 'clients')
      samples.push({
        t: performance.now() - t0,
        connected: num(info, 'connected_clients'),
        blocked: num(info, 'blocked_clients'),
      })
      if (performance.now() - lastList > 250) {
        lastList = performance.now()
        const l = await clientsByCmd(redis)
        if (!peakList || l.total > peakList.total) peakList = l
      }
      await new Promise((r) => setTimeout(r, 20))
    }
  })()
  return {
    async stop() {
      running = false
      await loop
      const peak = samples.reduce((m, s) => (s.connected > m.connected ? s : m), samples[0]!)
      const peakBlocked = Math.max(...samples.map((s) => s.blocked))
      return { samples: samples.length, peakConnected: peak.connected, peakBlocked, peakList }
    },
  }
}

/** Waits until connected_clients is back at `baseline` (or `limitMs` passed); returns when. */
async function settle(redis: Redis, baseline: number, limitMs = 15_000) {
  const t0 = performance.now()
  let last = 0
  while (performance.now() - t0 < limitMs) {
    last = num(await infoOf(redis, 'clients'), 'connected_clients')
    if (last <= baseline) return { ms: Math.round(performance.now() - t0), clients: last }
    await new Promise((r) => setTimeout(r, 50))
  }
  return { ms: null, clients: last }
}

/** Opens a stream and hangs up: right after the headers, or after the first content chunk. */
async function abortedStream(url: string, key: string, i: number, afterContent: boolean): Promise<string> {
  const ac = new AbortController()
  try {
    const res = await fetch(`${url}/v1/chat/completions`, {
      method: 'POST',
      headers: {
        authorization: `Bearer ${key}`,
        'content-type': 'application/json',
        'cache-control': 'no-store',
      },
      body: JSON.stringify({ ...body(i), max_tokens: 64, stream: true }),
      signal: ac.signal,
    })
    if (res.status !== 200) return String(res.status)
    const reader = res.body!.getReader()
    let seen = ''
    for (;;) {
      const { value, done } = await reader.read()
      if (done) return 'ended'
      seen += new TextDecoder().decode(value)
      if (!afterContent || seen.includes('"content"')) break
    }
    ac.abort()
    return 'aborted'
  } catch (e) {
    return (e as Error).name === 'AbortError' ? 'aborted' : (e as Error).message
  }
}

async function trivialOnce(url: string): Promise<number> {
  const t0 = performance.now()
  const res = await fetch(`${url}/healthz`)
  await res.arrayBuffer()
  if (!res.ok) throw new Error(`/healthz ${res.status}`)
  return performance.now() - t0
}

const body = (i: number) => ({
  model: 'auto',
  max_tokens: MAX_TOKENS,
  temperature: 1,
  stream_options: { include_usage: true },
  messages: [{ role: 'user', content: `Request ${i}: say something about experts.` }],
})

interface StreamOutcome {
  r: SseResult | null
  error: string | null
  /** Epoch ms when the request was sent. */
  startedAt: number
}

async function oneStream(stack: Stack, tenant: TestTenant, i: number): Promise<StreamOutcome> {
  const startedAt = Date.now()
  try {
    const r = await streamRequest(`${stack.url}/v1/chat/completions`, tenant.key, body(i), {
      headers: { 'cache-control': 'no-store' },
      timeoutMs: 120_000,
    })
    if (r.status !== 200) return { r, startedAt, error: `${r.status} ${JSON.stringify(r.body)}` }
    if (r.error) return { r, startedAt, error: `stream error ${JSON.stringify(r.error)}` }
    if (!r.done) return { r, startedAt, error: 'no [DONE]' }
    return { r, startedAt, error: null }
  } catch (e) {
    return { r: null, startedAt, error: (e as Error).message }
  }
}

function workerTimings(r: SseResult): { queueWaitMs: number; ttftMs: number; totalMs: number } | null {
  for (const c of r.chunks) {
    const t = (c.moe as { timings?: { queueWaitMs: number; timeToFirstTokenMs: number; totalMs: number } })
      ?.timings
    if (t) return { queueWaitMs: t.queueWaitMs, ttftMs: t.timeToFirstTokenMs, totalMs: t.totalMs }
  }
  return null
}

const stats = (xs: number[]) => ({ n: xs.length, p50: r1(percentile(xs, 50)), p99: r1(percentile(xs, 99)) })

/**
 * Where each request's time to first token went, from timestamps on one clock (this machine):
 * sent (client) -> BullMQ job.timestamp (the Durable Object's enqueue) -> processedOn (a worker
 * took it) -> the id of the first entry of the job's stream (Redis's clock at the first XADD)
 * -> the first content chunk at the client.
 */
async function ttftBreakdown(redis: Redis, prefix: string, outcomes: StreamOutcome[]) {
  const parts = {
    to_edge_handler: [] as number[],
    in_durable_object: [] as number[],
    to_enqueue: [] as number[],
    queued: [] as number[],
    to_first_xadd: [] as number[],
    relay: [] as number[],
  }
  for (const o of outcomes) {
    const r = o.r
    if (!r || o.error || r.ttftMs === null) continue
    const id = r.headers.get('x-request-id')
    const pool = r.headers.get('x-moe-pool')
    if (!id || !pool) continue
    const [ts, taken, data] = await redis.hmget(
      `${prefix}:pool.${pool}:${id}`,
      'timestamp',
      'processedOn',
      'data',
    )
    const first = (await redis.xrange(jobEventsKey(id), '-', '+', 'COUNT', 1))[0]
    if (!ts || !taken || !first) continue
    const xaddAt = Number(first[0].split('-')[0])
    // payload.createdAt: the edge's clock just before it calls the tenant's Durable Object.
    const createdAt = Number((JSON.parse(data ?? '{}') as { createdAt?: number }).createdAt)
    parts.to_edge_handler.push(createdAt - o.startedAt)
    parts.in_durable_object.push(Number(ts) - createdAt)
    parts.to_enqueue.push(Number(ts) - o.startedAt)
    parts.queued.push(Number(taken) - Number(ts))
    parts.to_first_xadd.push(xaddAt - Number(taken))
    parts.relay.push(o.startedAt + r.ttftMs - xaddAt)
  }
  return Object.fromEntries(Object.entries(parts).map(([k, v]) => [k, stats(v)]))
}

async function main() {
  const where = machine()
  const redisSrv = await startBenchRedis()
  const mon = new Redis(redisSrv.url)
  let stack: Stack | null = null
  try {
    stack = await startStack({ redisUrl: redisSrv.url, workers: 1 })
    const cap = Math.max(...LEVELS) * 2
    const tenants: TestTenant[] = []
    for (let t = 0; t < TENANTS; t++) {
      tenants.push(
        await createTenant(stack, {
          ...devTenantConfig(),
          id: `streams_${t}_${Date.now().toString(36)}`,
          name: `streams bench ${t}`,
          rateLimits: { requestsPerMinute: 10_000_000, tokensPerMinute: 1_000_000_000 },
          cacheTtlSeconds: 0,
          // Read by edges that have the per-tenant live-stream cap; stripped by those without.
          maxLiveStreams: cap,
        }),
      )
    }
    const stored = (await (await adminCall(stack, 'GET', `/tenants/${tenants[0]!.id}`)).json()) as Record<
      string,
      unknown
    >
    const capApplied = stored.maxLiveStreams ?? null
    console.log(
      `tenants: ${TENANTS}; maxLiveStreams sent ${cap}, stored ${capApplied === null ? '(field not in this edge)' : capApplied}`,
    )
    const tenantFor = (i: number) => tenants[i % tenants.length]!

    // Warm-up: isolate, Durable Object(s), BullMQ scripts, the engine's first runs.
    let seq = 0
    for (let w = 0; w < 2; w++)
      await Promise.all(Array.from({ length: 16 }, () => oneStream(stack!, tenantFor(seq), seq++)))
    for (let i = 0; i < 20; i++) await trivialOnce(stack.url)

    const baseClients = num(await infoOf(mon, 'clients'), 'connected_clients')
    const baseList = await clientsByCmd(mon)
    console.log(`baseline: ${baseClients} connected clients ${JSON.stringify(baseList.byCmd)}`)

    // biome-ignore lint/suspicious/noExplicitAny: one level's figures, printed below
    const levels: any[] = []
    for (const c of LEVELS) {
      // ---- trivial route at this concurrency
      const triv: number[] = []
      for (let w = 0; w < trivialWaves(c); w++)
        triv.push(...(await Promise.all(Array.from({ length: c }, () => trivialOnce(stack!.url)))))

      // ---- streams at this concurrency, with a one-at-a-time trivial probe alongside
      const before = await infoOf(mon, 'stats')
      const cpu0 = await infoOf(mon, 'cpu')
      const s = sampler(mon)
      const outcomes: StreamOutcome[] = []
      const probe: number[] = []
      let probing = true
      const probeLoop = (async () => {
        while (probing) {
          probe.push(await trivialOnce(stack!.url))
          await new Promise((r) => setTimeout(r, 20))
        }
      })()
      const w0 = performance.now()
      for (let w = 0; w < streamWaves(c); w++)
        outcomes.push(
          ...(await Promise.all(
            Array.from({ length: c }, () => {
              const i = seq++
              return oneStream(stack!, tenantFor(i), i)
            }),
          )),
        )
      const wallMs = performance.now() - w0
      probing = false
      await probeLoop
      const sampled = await s.stop()
      const after = await infoOf(mon, 'stats')
      const cpu1 = await infoOf(mon, 'cpu')
      const settled = await settle(mon, baseClients)
      const redisCpuMs =
        (num(cpu1, 'used_cpu_user') +
          num(cpu1, 'used_cpu_sys') -
          num(cpu0, 'used_cpu_user') -
          num(cpu0, 'used_cpu_sys')) *
        1000

      const ok = outcomes.filter((o) => o.error === null).map((o) => o.r!)
      const errors = outcomes.filter((o) => o.error !== null)
      const byStatus: Record<string, number> = {}
      for (const o of outcomes) {
        const k = o.r ? String(o.r.status) : 'fetch failed'
        byStatus[k] = (byStatus[k] ?? 0) + 1
      }
      const wt = ok.map(workerTimings).filter((x) => x !== null)
      const tokens = ok.reduce((a, r) => a + (r.completionTokens ?? 0), 0)
      const opened = num(after, 'total_connections_received') - num(before, 'total_connections_received')
      const level = {
        concurrency: c,
        requests: outcomes.length,
        ok: ok.length,
        by_status: byStatus,
        first_errors: errors.slice(0, 3).map((e) => e.error),
        completion_tokens: tokens,
        wall_ms: Math.round(wallMs),
        trivial_ms: stats(triv),
        trivial_probe_during_streams_ms: stats(probe),
        ttft_ms: stats(ok.map((r) => r.ttftMs ?? Number.NaN).filter(Number.isFinite)),
        total_ms: stats(ok.map((r) => r.totalMs)),
        worker_queue_wait_ms: stats(wt.map((t) => t.queueWaitMs)),
        worker_ttft_ms: stats(wt.map((t) => t.ttftMs)),
        // Client TTFT less the worker's queue wait (from the edge's admission timestamp) and its own
        // time to first token: the edge before admission plus the relay (XREAD wake-up, SSE, proxy).
        ttft_breakdown_ms: await ttftBreakdown(mon, stack!.prefix, outcomes),
        edge_and_relay_share_of_ttft_ms: stats(
          ok.flatMap((r) => {
            const t = workerTimings(r)
            return t && r.ttftMs !== null ? [r.ttftMs - t.queueWaitMs - t.ttftMs] : []
          }),
        ),
        redis: {
          baseline_clients: baseClients,
          peak_connected_clients: sampled.peakConnected,
          peak_blocked_clients: sampled.peakBlocked,
          peak_client_list_by_cmd: sampled.peakList?.byCmd ?? null,
          connections_opened: opened,
          connections_opened_per_request: Math.round((opened / outcomes.length) * 1000) / 1000,
          // Includes the sampler's own INFO/CLIENT LIST calls (every 20 ms / 250 ms).
          redis_cpu_ms: Math.round(redisCpuMs),
          redis_cpu_share_of_one_core: Math.round((redisCpuMs / wallMs) * 1000) / 1000,
          rejected_connections: num(after, 'rejected_connections') - num(before, 'rejected_connections'),
          back_to_baseline_after_ms: settled.ms,
          clients_when_settle_ended: settled.clients,
          info_samples: sampled.samples,
        },
        loadavg_after: loadavg(),
      }
      levels.push(level)
      console.log(JSON.stringify(level))
    }

    const liveLeases = async () => {
      let n = 0
      for (const t of tenants) n += await mon.zcard(`${stack!.prefix}:live:${t.id}`)
      return n
    }
    const leasesAfterLevels = await liveLeases()
    // Clients that hang up: half right after the headers (job still queued), half after the first
    // content chunk. Every reader connection should close; how long until the count is back?
    let aborts: Record<string, unknown> | null = null
    if (ABORTS > 0) {
      const before = await infoOf(mon, 'stats')
      const s = sampler(mon)
      const outcomes = await Promise.all(
        Array.from({ length: ABORTS }, (_, k) => {
          const i = seq++
          return abortedStream(stack!.url, tenantFor(i).key, i, k % 2 === 1)
        }),
      )
      const sampled = await s.stop()
      const settled = await settle(mon, baseClients, 20_000)
      const after = await infoOf(mon, 'stats')
      const byOutcome: Record<string, number> = {}
      for (const o of outcomes) byOutcome[o] = (byOutcome[o] ?? 0) + 1
      aborts = {
        streams: ABORTS,
        outcomes: byOutcome,
        peak_connected_clients: sampled.peakConnected,
        connections_opened:
          num(after, 'total_connections_received') - num(before, 'total_connections_received'),
        back_to_baseline_after_ms: settled.ms,
        clients_when_settle_ended: settled.clients,
        cancel_keys_set: (await mon.keys('moe:job:*:cancel')).length,
        // Live-stream leases still held by the tenant(s) once every client has gone.
        live_leases_held: await liveLeases(),
      }
      console.log(`aborts: ${JSON.stringify(aborts)}`)
    }

    // Leak check: the count a while after the last level, against the baseline.
    await new Promise((r) => setTimeout(r, 5000))
    const endList = await clientsByCmd(mon)
    const result = {
      bench: 'streams-bench',
      command: 'npx node edge/bench/streams-bench.ts',
      env: { BENCH_LEVELS: LEVELS.join(','), BENCH_MAX_TOKENS: MAX_TOKENS, BENCH_TENANTS: TENANTS },
      machine: where,
      redis: { version: redisSrv.version, persistence: 'none (private bench instance)' },
      stack: 'wrangler dev (workerd) + 1 moe serve worker (tiny model, MOE_MAX_BATCH default 32)',
      tenants: { count: TENANTS, max_live_streams_sent: cap, max_live_streams_stored: capApplied },
      baseline: { clients: baseClients, by_cmd: baseList.byCmd },
      levels,
      live_leases_after_levels: leasesAfterLevels,
      aborts,
      after_5s: { clients: endList.total, by_cmd: endList.byCmd, live_leases_held: await liveLeases() },
    }
    const dir = join(repoRoot, 'edge/bench/results')
    mkdirSync(dir, { recursive: true })
    const file = join(dir, `streams-${new Date().toISOString().replace(/[:.]/g, '-')}.json`)
    writeFileSync(file, `${JSON.stringify(result, null, 2)}\n`)
    console.log(`\n${file}`)
    console.log(
      'C     req   ok  ttft p50/p99   total p50/p99   trivial p50/p99  probe p50/p99  worker q-wait p50  peak clients  conns/req',
    )
    for (const l of levels) {
      console.log(
        `${String(l.concurrency).padEnd(5)} ${String(l.requests).padStart(4)} ${String(l.ok).padStart(4)}  ${l.ttft_ms.p50}/${l.ttft_ms.p99}  ${l.total_ms.p50}/${l.total_ms.p99}  ${l.trivial_ms.p50}/${l.trivial_ms.p99}  ${l.trivial_probe_during_streams_ms.p50}/${l.trivial_probe_during_streams_ms.p99}  ${l.worker_queue_wait_ms.p50}  ${l.redis.peak_connected_clients}  ${l.redis.connections_opened_per_request}`,
      )
    }
  } finally {
    clearTimeout(timer)
    await stack?.stop().catch(() => {})
    mon.disconnect()
    await redisSrv.stop()
  }
}

await main()
