import {
  type DoneEvent,
  LATENCY_BUCKETS_SECONDS,
  TELEMETRY_ALL,
  telemetryKey,
  telemetryMinute,
  WorkerSnapshot,
  workerHeartbeatsKey,
  workerStateKey,
} from '@moe/shared'
import pino from 'pino'
import { Registry } from 'prom-client'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { TelemetryPublisher } from '../src/service/telemetry.ts'
import type { WorkerService } from '../src/service/worker-service.ts'
import { payload, QueueClient, startService, uniquePrefix } from './service-harness.ts'

// The worker's metrics move with traffic: the Prometheus series an operator scrapes, and the
// per-tenant counters and heartbeat it publishes to Redis for the dashboard. Real Redis, real
// engine (the tiny model), a queue prefix of this run's own.

const prefix = uniquePrefix()
let service: WorkerService
let client: QueueClient

beforeAll(async () => {
  // A long interval: the test flushes when it wants to read. No prefix cache: the expert-load
  // count below expects every prompt token to be routed.
  service = await startService(prefix, { MOE_TELEMETRY_INTERVAL_MS: '60000', MOE_PREFIX_CACHE_TOKENS: '0' })
  client = new QueueClient(prefix)
})
afterAll(async () => {
  await service?.close()
  await client?.close()
})

/** The value of one sample line of the Prometheus text (0 when absent). */
async function sample(series: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${service.healthPort}/metrics`)).text()
  const line = text.split('\n').find((l) => l.startsWith(`${series} `))
  return line ? Number(line.slice(series.length + 1)) : 0
}

/** A tenant's counters summed over the last few minutes (a run may straddle a minute). */
async function counters(scope: string): Promise<Record<string, number>> {
  const now = telemetryMinute(Date.now())
  const sums: Record<string, number> = {}
  for (let m = now - 2; m <= now; m++) {
    const h = await client.redis.hgetall(telemetryKey(prefix, m, scope))
    for (const [k, v] of Object.entries(h)) sums[k] = (sums[k] ?? 0) + Number(v)
  }
  return sums
}

const sumWhere = (c: Record<string, number>, re: RegExp) =>
  Object.entries(c)
    .filter(([k]) => re.test(k))
    .reduce((s, [, v]) => s + v, 0)

describe('worker metrics and dashboard telemetry', () => {
  it('TTFT, inter-token latency, duration, tokens and expert load move with traffic', async () => {
    const series = {
      ttft: 'moe_time_to_first_token_seconds_count{pool="code"}',
      itl: 'moe_inter_token_latency_seconds_count{pool="code"}',
      duration: 'moe_request_duration_seconds_count{pool="code"}',
      generated: 'moe_generated_tokens_total{pool="code"}',
    }
    const before = Object.fromEntries(
      await Promise.all(Object.entries(series).map(async ([k, s]) => [k, await sample(s)] as const)),
    )
    const tenantId = `tenant-${prefix}`
    const jobs = Array.from({ length: 4 }, (_, i) =>
      payload('code', {
        tenantId,
        // Distinct prompts: identical ones admitted together would be prefilled (and routed) once.
        input: { kind: 'tokens', inputIds: [1, 72 + i, 101, 108, 108, 111] },
        sampling: { maxTokens: 6 + i, temperature: 0, topP: 1, topK: 0, seed: i, stop: [], ignoreEos: true },
      }),
    )
    await Promise.all(jobs.map((p) => client.add(p)))
    const finals = await Promise.all(jobs.map(async (p) => (await client.events(p.requestId!)).at(-1)))
    const generated = finals.reduce((s, e) => s + (e as DoneEvent).usage.completionTokens, 0)
    expect(generated).toBe(6 + 7 + 8 + 9)

    // Prometheus: one first token per job, one inter-token gap per later token.
    expect((await sample(series.ttft)) - before.ttft!).toBe(4)
    expect((await sample(series.itl)) - before.itl!).toBe(generated - 4)
    expect((await sample(series.duration)) - before.duration!).toBe(4)
    expect((await sample(series.generated)) - before.generated!).toBe(generated)

    // Redis, for the dashboard: the same counts under the tenant and under everyone.
    await service.telemetry.flush()
    for (const scope of [tenantId, TELEMETRY_ALL]) {
      const c = await counters(scope)
      expect(sumWhere(c, /^ttft\|code\|/)).toBe(4)
      expect(sumWhere(c, /^itl\|code\|/)).toBe(generated - 4)
      expect(c['gen|code']).toBe(generated)
      expect(c['done|code|length']).toBe(4)
      // Expert load: only the code pool's experts (0, 1, 5, 6), in both layers of the tiny model.
      const experts = Object.keys(c).filter((k) => k.startsWith('x|code|'))
      expect(experts.length).toBeGreaterThan(0)
      for (const k of experts) expect(['0', '1', '5', '6']).toContain(k.split('|')[3])
      expect(new Set(experts.map((k) => k.split('|')[2]))).toEqual(new Set(['0', '1']))
      // Every token of every job went to 2 experts in each of the 2 layers.
      const promptTokens = jobs.length * 6
      expect(sumWhere(c, /^x\|code\|/)).toBe((promptTokens + generated - jobs.length) * 2 * 2)
      // Buckets stay within the shared layout.
      for (const k of Object.keys(c).filter((x) => /^(ttft|itl)\|/.test(x)))
        expect(Number(k.split('|')[2])).toBeLessThanOrEqual(LATENCY_BUCKETS_SECONDS.length)
    }
    // Another tenant's view holds none of it.
    expect(await counters('someone-else')).toEqual({})
  })

  it('publishes a heartbeat with each model’s shape and batch, and drops it on close', async () => {
    await service.telemetry.flush()
    const ids = await client.redis.zrange(workerHeartbeatsKey(prefix), '0', '-1')
    expect(ids).toContain(service.telemetry.workerId)
    const snap = WorkerSnapshot.parse(
      JSON.parse((await client.redis.hget(workerStateKey(prefix), service.telemetry.workerId))!),
    )
    expect(snap.status).toBe('ok')
    expect(snap.pools).toEqual(['general', 'code', 'vision'])
    expect(snap.models).toHaveLength(1)
    expect(snap.models[0]).toMatchObject({ layers: 2, experts: 8, maxBatch: 16, running: 0, occupancy: 0 })
    expect(snap.models[0]!.pools).toEqual(['general', 'code', 'vision'])

    // A worker that stops says goodbye: it leaves the dashboard at once, not after 15 s.
    const leaving = new TelemetryPublisher({
      redis: client.redis,
      prefix,
      snapshot: () => ({ status: 'ok', pools: ['code'], models: [] }),
      registry: new Registry(),
      log: pino({ level: 'silent' }),
      intervalMs: 0,
    })
    await leaving.flush()
    expect(await client.redis.zscore(workerHeartbeatsKey(prefix), leaving.workerId)).not.toBeNull()
    await leaving.close()
    expect(await client.redis.zscore(workerHeartbeatsKey(prefix), leaving.workerId)).toBeNull()
    expect(await client.redis.hget(workerStateKey(prefix), leaving.workerId)).toBeNull()
  })

  it('publishes the increase of the prefix-cache counters', async () => {
    const hits = service.metrics.prefixCacheHits
    await service.telemetry.flush()
    const before = (await counters(TELEMETRY_ALL))['pc|moe_prefix_cache_hits_total'] ?? 0
    hits.inc({ model: 'a' }, 3)
    hits.inc({ model: 'b' }, 2)
    await service.telemetry.flush()
    expect((await counters(TELEMETRY_ALL))['pc|moe_prefix_cache_hits_total']).toBe(before + 5)
    hits.inc({ model: 'a' }, 1)
    await service.telemetry.flush()
    expect((await counters(TELEMETRY_ALL))['pc|moe_prefix_cache_hits_total']).toBe(before + 6)
  })
})
