import { describe, expect, it } from 'vitest'
import { edgeConfigOf } from '../../src/config.ts'

const base = { ENVIRONMENT: 'test', REDIS_URL: 'redis://127.0.0.1:6379' }

function messageOf(env: Record<string, unknown>): string {
  try {
    edgeConfigOf(env)
  } catch (e) {
    return (e as Error).message
  }
  throw new Error('did not throw')
}

describe('EdgeConfig', () => {
  it('applies the defaults for unset and empty vars', () => {
    const c = edgeConfigOf({ ...base, MAX_BODY_BYTES: '', ADMIN_TOKEN: '' })
    expect(c).toEqual({
      environment: 'test',
      redisUrl: 'redis://127.0.0.1:6379',
      redisClusterNodes: null,
      maxBodyBytes: 1_048_576,
      liveTimeoutMs: 300_000,
      filesMaxLines: 50_000,
      filesMaxBytes: 20 * 1024 * 1024,
      webhookAllowLoopback: false,
      webhookDohUrl: 'https://cloudflare-dns.com/dns-query',
      queuePrefix: '{moe}',
      adminToken: null,
    })
  })

  it('parses the numbers and flags it is given', () => {
    const c = edgeConfigOf({
      ...base,
      MAX_BODY_BYTES: '65536',
      LIVE_TIMEOUT_SECONDS: '12',
      FILES_MAX_LINES: '10',
      FILES_MAX_BYTES: '200000',
      WEBHOOK_ALLOW_LOOPBACK: '1',
      QUEUE_PREFIX: 'moetest',
      ADMIN_TOKEN: 'adm',
    })
    expect(c).toMatchObject({
      maxBodyBytes: 65_536,
      liveTimeoutMs: 12_000,
      filesMaxLines: 10,
      filesMaxBytes: 200_000,
      webhookAllowLoopback: true,
      queuePrefix: 'moetest',
      adminToken: 'adm',
    })
  })

  it('never allows loopback webhooks in production', () => {
    expect(edgeConfigOf({ ...base, ENVIRONMENT: 'production', WEBHOOK_ALLOW_LOOPBACK: '1' })).toMatchObject({
      webhookAllowLoopback: false,
    })
  })

  it('names the var and the value it refuses', () => {
    expect(messageOf({ ...base, MAX_BODY_BYTES: 'lots' })).toBe(
      "Invalid edge configuration: MAX_BODY_BYTES must be a positive whole number (got 'lots')",
    )
    expect(messageOf({ ...base, LIVE_TIMEOUT_SECONDS: '0' })).toContain('LIVE_TIMEOUT_SECONDS')
    expect(messageOf({ ...base, FILES_MAX_LINES: '-5' })).toContain('FILES_MAX_LINES')
    expect(messageOf({ ...base, WEBHOOK_ALLOW_LOOPBACK: 'yes' })).toContain(
      "WEBHOOK_ALLOW_LOOPBACK must be '0' or '1'",
    )
    expect(messageOf({ ...base, REDIS_URL: 'localhost:6379' })).toContain('REDIS_URL')
    const both = messageOf({ ENVIRONMENT: 'test', FILES_MAX_BYTES: '1.5' })
    expect(both).toContain('REDIS_URL')
    expect(both).toContain('FILES_MAX_BYTES')
  })

  it('switches to a Redis Cluster on REDIS_CLUSTER_NODES, with a hash-tagged prefix', () => {
    expect(
      edgeConfigOf({ ...base, REDIS_CLUSTER_NODES: '10.0.0.5:6379, redis-1.internal:7000,[::1]:7001' }),
    ).toMatchObject({
      redisClusterNodes: [
        { host: '10.0.0.5', port: 6379 },
        { host: 'redis-1.internal', port: 7000 },
        { host: '::1', port: 7001 },
      ],
      queuePrefix: '{moe}',
    })
    expect(messageOf({ ...base, REDIS_CLUSTER_NODES: '10.0.0.5' })).toContain(
      "REDIS_CLUSTER_NODES '10.0.0.5' is not host:port",
    )
    expect(messageOf({ ...base, REDIS_CLUSTER_NODES: 'a:1', QUEUE_PREFIX: 'moetest' })).toContain(
      "QUEUE_PREFIX 'moetest' has no hash tag",
    )
    expect(edgeConfigOf({ ...base, REDIS_CLUSTER_NODES: 'a:1', QUEUE_PREFIX: '{moetest}' }).queuePrefix).toBe(
      '{moetest}',
    )
    expect(messageOf({ ...base, QUEUE_PREFIX: 'moe:x' })).toContain('QUEUE_PREFIX')
  })

  it('parses an env object once', () => {
    const env = { ...base }
    expect(edgeConfigOf(env)).toBe(edgeConfigOf(env))
  })
})
