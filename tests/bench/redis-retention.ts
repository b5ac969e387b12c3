// Bytes a completed request leaves in Redis: runs N live requests (streamed, each a different
// prompt, so nothing comes from the cache), plain and with an Idempotency-Key, then sums MEMORY
// USAGE of the keys each left (its event stream, job meta and BullMQ job): now, and what of it
// outlives a 300 s grace (keys with no TTL or a longer one).
//
//   npx node tests/bench/redis-retention.ts [N]      (from the repo root)
//
// Starts its own stack (edge, one worker, the shared Redis), or uses MOE_E2E_URL.
import { jobEventsKey } from '@moe/shared'
import { Redis } from 'ioredis'
import { streamRequest } from '../src/sse.ts'
import { devTenant, startStack } from '../src/stack.ts'

const N = Number(process.argv[2] ?? 40)
const GRACE_MS = Number(process.env.MOE_RETENTION_WAIT_MS ?? 3000)
const stack = await startStack({ workers: 1 }, true)
const redis = new Redis(stack.redisUrl)
const GRACE_S = 300

/**
 * MEMORY USAGE of a key, and whether it outlives the grace period: no TTL or a longer one, or
 * for a BullMQ job (no TTL: BullMQ removes it by age as later jobs finish), removeOnComplete's age.
 */
async function held(key: string, bullmq = false): Promise<{ now: number; later: number }> {
  const [bytes, ttl] = await Promise.all([redis.memory('USAGE', key), redis.pttl(key)])
  const now = Number(bytes ?? 0)
  if (bullmq && now > 0) {
    const opts = JSON.parse((await redis.hget(key, 'opts')) ?? '{}') as {
      removeOnComplete?: { age?: number }
    }
    const age = opts.removeOnComplete?.age
    return { now, later: age !== undefined && age <= GRACE_S ? 0 : now }
  }
  return { now, later: ttl === -1 || ttl > GRACE_S * 1000 ? now : 0 }
}

async function run(t: { id: string; key: string }, idempotent: boolean) {
  const ids: string[] = []
  let pieces = 0
  for (let i = 0; i < N; i++) {
    const r = await streamRequest(
      `${stack.url}/v1/completions`,
      t.key,
      {
        model: 'general',
        prompt: `Retention probe ${i} ${Date.now()}: tell me about queues`,
        max_tokens: 64,
        temperature: 0.8,
        stream: true,
      },
      idempotent ? { headers: { 'idempotency-key': `retention-${Date.now()}-${i}` } } : {},
    )
    if (r.status !== 200 || !r.done) throw new Error(`request ${i}: ${r.status} ${JSON.stringify(r.body)}`)
    ids.push(r.headers.get('x-request-id')!)
    pieces += r.pieces.length
  }
  await new Promise((r) => setTimeout(r, GRACE_MS))
  // An idempotent request's job id is not its request id: find its keys through the job meta.
  const jobIds: string[] = []
  if (idempotent) {
    for (const k of await redis.keys(`${stack.prefix}:jobmeta:idem_*`)) {
      const meta = JSON.parse((await redis.get(k)) ?? '{}') as { tenantId?: string }
      if (meta.tenantId === t.id) jobIds.push(k.slice(`${stack.prefix}:jobmeta:`.length))
    }
  } else jobIds.push(...ids)
  const now: Record<string, number> = { stream: 0, meta: 0, bullmqJob: 0 }
  const later: Record<string, number> = { stream: 0, meta: 0, bullmqJob: 0 }
  for (const id of jobIds) {
    for (const [name, key] of [
      ['stream', jobEventsKey(id)],
      ['meta', `${stack.prefix}:jobmeta:${id}`],
      ['bullmqJob', `${stack.prefix}:pool.general:${id}`],
    ] as const) {
      const h = await held(key, name === 'bullmqJob')
      now[name]! += h.now
      later[name]! += h.later
    }
  }
  const per = (o: Record<string, number>) =>
    Object.fromEntries(Object.entries(o).map(([k, v]) => [k, Math.round(v / N)]))
  const sum = (o: Record<string, number>) => Math.round(Object.values(o).reduce((a, b) => a + b, 0) / N)
  console.log(
    `${idempotent ? 'with Idempotency-Key' : 'plain live'}: ${N} requests, ${(pieces / N).toFixed(1)} streamed pieces each; bytes per request ${GRACE_MS} ms after the last: ${sum(now)} ${JSON.stringify(per(now))}; still held after ${GRACE_S} s: ${sum(later)} ${JSON.stringify(per(later))}`,
  )
}

try {
  await run(await devTenant(stack), false)
  await run(await devTenant(stack), true)
} finally {
  redis.disconnect()
  await stack.stop()
}
