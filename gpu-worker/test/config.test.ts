import { describe, expect, it } from 'vitest'
import { ConfigError, loadWorkerConfig } from '../src/service/config.ts'
import { TINY_MODEL_DIR } from './fixtures.ts'

describe('worker configuration', () => {
  it('reads defaults and every pool from pools.json', () => {
    const c = loadWorkerConfig({})
    expect(c.pools.map((p) => p.name)).toEqual(['general', 'code', 'vision'])
    expect(c.pools[0]!.modelDir).toBe(TINY_MODEL_DIR)
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
  })
})
