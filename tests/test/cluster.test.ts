import { connectRedis, jobCancelKey, jobEventsKey, parseClusterNodes, poolQueueName } from '@moe/shared'
import { Queue } from 'bullmq'
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest'
import { devTenant, type Stack, startStack, type TestTenant } from '../src/stack.ts'
import { FAST_RECOVERY, jobOf, streamsSurviveWorkerKill } from '../src/worker-kill.ts'

// On the Redis Cluster of vitest.cluster.config.ts (run with `npm run test:cluster`): the
// worker-kill fault on a stack of its own, and where the keys land. The happy paths run from
// happy.test.ts against the cluster stack of the global setup.

const cluster = inject('redisCluster')
let stack: Stack
let tenant: TestTenant

beforeAll(async () => {
  stack = await startStack({
    redisUrl: cluster.url,
    clusterNodes: cluster.nodes,
    workers: 2,
    workerEnv: FAST_RECOVERY,
  })
  tenant = await devTenant(stack, {
    rateLimits: { requestsPerMinute: 100_000, tokensPerMinute: 100_000_000 },
  })
})

afterAll(async () => {
  await stack?.stop()
})

describe('Redis Cluster', () => {
  it('keeps every queue key in the prefix slot and spreads the job streams over the masters', async () => {
    const redis = connectRedis({ redisUrl: cluster.url, redisClusterNodes: parseClusterNodes(cluster.nodes) })
    try {
      const ids = Array.from({ length: 24 }, (_, i) => `slot-probe-${i}`)
      const slots = new Set<number>()
      for (const id of ids) {
        const slot = Number(await redis.cluster('KEYSLOT', jobEventsKey(id)))
        expect(Number(await redis.cluster('KEYSLOT', jobCancelKey(id)))).toBe(slot)
        slots.add(slot)
      }
      expect(slots.size).toBeGreaterThan(12)
      expect(await redis.cluster('KEYSLOT', `${stack.prefix}:pool.general:wait`)).toBe(
        await redis.cluster('KEYSLOT', `${stack.prefix}:batches:wait`),
      )
    } finally {
      redis.disconnect()
    }
  })

  it('cancels a queued job: the cancel key lands in its slot, and the worker ends it unrun', async () => {
    const redis = connectRedis({ redisUrl: cluster.url, redisClusterNodes: parseClusterNodes(cluster.nodes) })
    const general = new Queue(poolQueueName('general'), { connection: redis, prefix: stack.prefix })
    try {
      // Held in a paused queue, so it is cancelled before any worker takes it.
      await general.pause()
      const res = await fetch(`${stack.url}/v1/chat/completions`, {
        method: 'POST',
        headers: {
          authorization: `Bearer ${tenant.key}`,
          'content-type': 'application/json',
          prefer: 'respond-async',
        },
        body: JSON.stringify({ model: 'general', messages: [{ role: 'user', content: 'cancel me' }] }),
      })
      expect(res.status).toBe(202)
      const { id } = (await res.json()) as { id: string }
      const del = await fetch(`${stack.url}/v1/jobs/${id}`, {
        method: 'DELETE',
        headers: { authorization: `Bearer ${tenant.key}` },
      })
      expect(del.status).toBe(200)
      expect(await redis.get(jobCancelKey(id))).toBe('1')
      await general.resume()
      // A worker takes it, finds the cancel key, and ends it without generating.
      const deadline = Date.now() + 60_000
      while ((await redis.xlen(jobEventsKey(id))) === 0 && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 200))
      expect(await redis.xlen(jobEventsKey(id))).toBe(1)
      expect((await jobOf(stack, tenant, id)).status).toBe('cancelled')
    } finally {
      await general.resume().catch(() => {})
      await general.close()
      redis.disconnect()
    }
  })

  it('a worker killed with SIGKILL mid-generation: 20 streams complete, no token duplicated or missing', async () => {
    await streamsSurviveWorkerKill(stack, tenant)
  })
})
