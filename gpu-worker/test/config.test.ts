import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { ConfigError, loadWorkerConfig } from '../src/service/config.ts'
import { DEMO_MODEL_DIR } from './fixtures.ts'

const MOE_BIN = join(import.meta.dirname, '..', 'bin', 'moe.js')

describe('worker configuration', () => {
  it('reads defaults and every pool from pools.json', () => {
    const c = loadWorkerConfig({})
    expect(c.pools.map((p) => p.name)).toEqual(['general', 'code', 'vision'])
    expect(c.pools[0]!.modelDir).toBe(DEMO_MODEL_DIR)
    expect(c).toMatchObject({
      redisUrl: 'redis://127.0.0.1:6379',
      ep: 'auto',
      maxBatch: 32,
      engineThread: true,
      spin: false,
    })
  })

  it('takes --pools over MOE_POOLS, and MOE_MODEL_DIR over every pool model', () => {
    const c = loadWorkerConfig({ MOE_POOLS: 'general', MOE_MODEL_DIR: '/models/mixtral' }, 'code,vision')
    expect(c.pools.map((p) => p.name)).toEqual(['code', 'vision'])
    expect(c.pools.every((p) => p.modelDir === '/models/mixtral')).toBe(true)
  })

  it('names the variable that is wrong', () => {
    expect(() => loadWorkerConfig({ MOE_MAX_BATCH: 'lots' })).toThrow(/MOE_MAX_BATCH/)
    expect(() => loadWorkerConfig({ MOE_EP: 'tpu' })).toThrow(/MOE_EP/)
    expect(() => loadWorkerConfig({ REDIS_URL: 'http://x' })).toThrow(/REDIS_URL/)
    expect(() => loadWorkerConfig({}, 'nope')).toThrow(/unknown pool\(s\) nope/)
    expect(() => loadWorkerConfig({ MOE_POOLS_FILE: '/nonexistent.json' })).toThrow(ConfigError)
    expect(() => loadWorkerConfig({ MOE_BATCH_SERVICES: 'yes' })).toThrow(
      /MOE_BATCH_SERVICES: must be 0 or 1/,
    )
    expect(() => loadWorkerConfig({ MOE_WEBHOOK_ATTEMPTS: '0' })).toThrow(/MOE_WEBHOOK_ATTEMPTS/)
    expect(() => loadWorkerConfig({ MOE_EXPORT_CACHE: '' })).toThrow(/MOE_EXPORT_CACHE/)
    expect(() => loadWorkerConfig({ REDIS_CLUSTER_NODES: 'host-without-port' })).toThrow(
      /REDIS_CLUSTER_NODES: 'host-without-port' is not host:port/,
    )
    expect(() => loadWorkerConfig({ REDIS_CLUSTER_NODES: 'a:1', MOE_QUEUE_PREFIX: 'moe' })).toThrow(
      /MOE_QUEUE_PREFIX: 'moe' has no hash tag.*'\{moe\}'/,
    )
    expect(() => loadWorkerConfig({ MOE_QUEUE_PREFIX: '{a}{b}' })).toThrow(/MOE_QUEUE_PREFIX/)
  })

  it('takes a Redis Cluster from REDIS_CLUSTER_NODES and a hash-tagged queue prefix', () => {
    expect(loadWorkerConfig({})).toMatchObject({ redisClusterNodes: null, queuePrefix: '{moe}' })
    const c = loadWorkerConfig({
      REDIS_URL: 'rediss://:secret@redis.internal:6380',
      REDIS_CLUSTER_NODES: '10.0.0.5:6379,10.0.0.6:6379',
      MOE_QUEUE_PREFIX: 'prod{moe}',
    })
    expect(c.redisClusterNodes).toEqual([
      { host: '10.0.0.5', port: 6379 },
      { host: '10.0.0.6', port: 6379 },
    ])
    expect(c.queuePrefix).toBe('prod{moe}')
  })

  it('holds every MOE_* setting, the batch services and webhooks included', () => {
    const c = loadWorkerConfig({
      MOE_BATCH_SERVICES: '0',
      MOE_WEBHOOK_ATTEMPTS: '3',
      MOE_WEBHOOK_ALLOW_LOOPBACK: '1',
      MOE_EXPORT_CACHE: '/tmp/onnx-cache',
    })
    expect(c.batchServices).toBe(false)
    expect(c.exportCacheDir).toBe('/tmp/onnx-cache')
    expect(c.webhooks).toEqual({
      attempts: 3,
      backoffMs: 30_000,
      maxBackoffMs: 3 * 3_600_000,
      timeoutMs: 10_000,
      allowLoopback: true,
    })
    expect(loadWorkerConfig({}).batchServices).toBe(true)
  })

  it('exits 1 with a message, not a stack trace, on a bad setting', () => {
    const r = spawnSync(process.execPath, [MOE_BIN, 'serve'], {
      env: { ...process.env, MOE_MAX_BATCH: 'lots' },
      encoding: 'utf8',
      timeout: 20_000,
    })
    expect(r.status).toBe(1)
    expect(r.stderr).toContain('MOE_MAX_BATCH')
    expect(r.stderr).not.toMatch(/ZodError|\n\s+at /)
  })
})
