import { mkdtempSync, readdirSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'
import { afterAll, describe, expect, it } from 'vitest'
import { loadWorkerConfig } from '../src/service/config.ts'
import { WorkerService } from '../src/service/worker-service.ts'
import { TINY_MODEL_DIR } from './fixtures.ts'
import { payload, QueueClient, testEnv, uniquePrefix } from './service-harness.ts'

// Pools on one model at different weight dtypes, with the export cache on a volume of its own.

const dir = mkdtempSync(join(tmpdir(), 'moe-pool-dtype-'))
const cache = join(dir, 'export-cache')
const poolsFile = join(dir, 'pools.json')
writeFileSync(
  poolsFile,
  JSON.stringify({
    pools: [
      { name: 'full', modelDir: TINY_MODEL_DIR, modelId: 'tiny' },
      { name: 'small', modelDir: TINY_MODEL_DIR, modelId: 'tiny-int8', dtype: 'int8' },
      { name: 'subset', modelDir: TINY_MODEL_DIR, modelId: 'tiny-int8-code', dtype: 'int8', experts: [0, 2] },
    ],
  }),
)
const prefix = uniquePrefix()
const client = new QueueClient(prefix)
let service: WorkerService | undefined
afterAll(async () => {
  await service?.close()
  await client.close()
})

describe('per-pool weight dtype', () => {
  it('loads one runtime per model and dtype, exports under MOE_EXPORT_CACHE, and serves each pool', async () => {
    const config = loadWorkerConfig(testEnv(prefix, { MOE_POOLS_FILE: poolsFile, MOE_EXPORT_CACHE: cache }))
    expect(config.pools.map((p) => p.dtype)).toEqual([undefined, 'int8', 'int8'])
    service = new WorkerService(config, pino({ level: 'silent' }))
    await service.start()
    expect(service.runtimeFor('small')).toBe(service.runtimeFor('subset'))
    expect(service.runtimeFor('full')).not.toBe(service.runtimeFor('small'))
    const exports = readdirSync(join(cache, readdirSync(cache)[0]!))
    expect(exports.some((d) => d.includes('-fp32-'))).toBe(true)
    expect(exports.some((d) => d.includes('-int8-'))).toBe(true)
    for (const pool of ['full', 'small', 'subset']) {
      const p = payload(pool, { model: pool })
      await client.add(p)
      const events = await client.events(p.requestId!)
      expect(events.at(-1)).toMatchObject({ type: 'done' })
    }
  })

  it('refuses a dtype the engine does not know, naming the pools file', () => {
    const bad = join(dir, 'bad-pools.json')
    writeFileSync(
      bad,
      JSON.stringify({ pools: [{ name: 'x', modelDir: TINY_MODEL_DIR, modelId: 'x', dtype: 'int3' }] }),
    )
    expect(() => loadWorkerConfig({ MOE_POOLS_FILE: bad })).toThrow(/bad-pools.json: pools.0.dtype/)
  })
})
