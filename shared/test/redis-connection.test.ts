import { randomUUID } from 'node:crypto'
import { afterAll, describe, expect, it } from 'vitest'
import {
  clusterPrefixProblem,
  connectRedis,
  execPerSlot,
  hashTagOf,
  isCluster,
  JOB_CANCEL_CHANNEL,
  jobCancelKey,
  jobEventsKey,
  parseClusterNodes,
  QUEUE_PREFIX,
  QUEUE_PREFIX_PATTERN,
} from '../src/index.ts'

// Against the real Redis (REDIS_URL, default 127.0.0.1:6379); the cluster paths run end to end
// in tests/ (npm run test:cluster).
const redis = connectRedis(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', { maxRetriesPerRequest: 1 })
afterAll(() => redis.disconnect())

describe('REDIS_CLUSTER_NODES', () => {
  it('parses host:port lists, IPv6 in brackets, and says what is wrong', () => {
    expect(parseClusterNodes(undefined)).toBeNull()
    expect(parseClusterNodes(' ')).toBeNull()
    expect(parseClusterNodes('10.0.0.5:6379, redis-1.internal:7000,[::1]:7001')).toEqual([
      { host: '10.0.0.5', port: 6379 },
      { host: 'redis-1.internal', port: 7000 },
      { host: '::1', port: 7001 },
    ])
    expect(() => parseClusterNodes('10.0.0.5')).toThrow("'10.0.0.5' is not host:port")
    expect(() => parseClusterNodes('a:1,,b:2')).toThrow("'' is not host:port")
    expect(() => parseClusterNodes('a:70000')).toThrow("'a:70000' is not host:port")
  })
})

describe('key slots', () => {
  it("tags a job's stream and cancel key alike, and every queue key by the prefix", () => {
    expect(hashTagOf(jobEventsKey('chatcmpl-1'))).toBe('chatcmpl-1')
    expect(hashTagOf(jobCancelKey('chatcmpl-1'))).toBe('chatcmpl-1')
    expect(hashTagOf(`${QUEUE_PREFIX}:pool.general:wait`)).toBe('moe')
    // Redis reads the first {...}: a prefixed key keeps the prefix's slot whatever follows.
    expect(hashTagOf(`${QUEUE_PREFIX}:jobmeta:{x}`)).toBe('moe')
    expect(hashTagOf('moe:{}:x')).toBeNull()
  })

  it('accepts a prefix with one hash tag, and asks for one on a cluster', () => {
    for (const ok of ['moe', '{moe}', 'prod{moe}', 'e2e-1a2b', '{e2e-1a2b}'])
      expect(QUEUE_PREFIX_PATTERN.test(ok), ok).toBe(true)
    for (const bad of ['moe:x', '{a}{b}', '{}', 'a b', '{moe'])
      expect(QUEUE_PREFIX_PATTERN.test(bad), bad).toBe(false)
    expect(clusterPrefixProblem('{moe}')).toBeNull()
    expect(clusterPrefixProblem('moe')).toContain("use e.g. '{moe}'")
  })
})

describe('execPerSlot on a single Redis', () => {
  it("returns each item's replies in order, from one pipeline", async () => {
    expect(isCluster(redis)).toBe(false)
    const ids = Array.from({ length: 5 }, () => `rc-${randomUUID()}`)
    await redis.set(jobCancelKey(ids[3]!), '1', 'EX', 60)
    const replies = await execPerSlot(redis, ids, jobCancelKey, (p, id) =>
      p.exists(jobCancelKey(id)).ttl(jobCancelKey(id)),
    )
    expect(replies.map((r) => r.length)).toEqual([2, 2, 2, 2, 2])
    expect(replies.map((r) => r[0]![1])).toEqual([0, 0, 0, 1, 0])
    const multi = await execPerSlot(
      redis,
      ids.slice(0, 2),
      jobCancelKey,
      (m, id) => m.publish(JOB_CANCEL_CHANNEL, id),
      {
        multi: true,
      },
    )
    expect(multi.map((r) => r.length)).toEqual([1, 1])
    await redis.del(jobCancelKey(ids[3]!))
  })
})
