import type { ExpertPool } from '@moe/shared'
import type { Logger } from 'pino'
import { MoeEngine, type StepEngine } from '../engine/engine.ts'
import { ThreadedEngine } from '../engine/threaded-engine.ts'
import { BatchScheduler } from '../scheduler/batch-scheduler.ts'
import type { WorkerConfig } from './config.ts'
import type { WorkerMetrics } from './metrics.ts'
import type { TokenStreamWriter } from './token-stream.ts'

/** One engine (one model) and the scheduler that batches every pool on it. */
export interface ModelRuntime {
  modelDir: string
  engine: StepEngine
  scheduler: BatchScheduler
}

/**
 * Loads one runtime per model directory the pools name: pools on the same model share one
 * engine and batch together. After each step the scheduler's figures go to the metrics and the
 * step's token events to Redis.
 */
export async function loadModelRuntimes(
  config: WorkerConfig,
  streams: TokenStreamWriter,
  metrics: WorkerMetrics,
  log: Logger,
): Promise<Map<string, ModelRuntime>> {
  const runtimes = new Map<string, ModelRuntime>()
  for (const pool of config.pools) {
    const key = runtimeKey(pool)
    if (!runtimes.has(key)) runtimes.set(key, await loadModelRuntime(config, pool, streams, metrics, log))
  }
  for (const pool of config.pools) runtimes.get(runtimeKey(pool))!.engine.validateExperts(pool.experts)
  return runtimes
}

/** Pools share a runtime when they serve the same model directory at the same dtype. */
export const runtimeKey = (pool: ExpertPool): string => `${pool.modelDir}|${pool.dtype ?? 'default'}`

async function loadModelRuntime(
  c: WorkerConfig,
  pool: ExpertPool,
  streams: TokenStreamWriter,
  metrics: WorkerMetrics,
  log: Logger,
): Promise<ModelRuntime> {
  const { modelDir, modelId: model } = pool
  // Forward passes on a worker thread by default, so queue and stream I/O run during them.
  const engine = await (c.engineThread ? ThreadedEngine : MoeEngine).load({
    modelDir,
    ep: c.ep,
    intraOpThreads: c.threads,
    spin: c.spin,
    maxBatch: c.maxBatch,
    maxContext: c.maxContext,
    prefixCacheTokens: c.prefixCacheTokens,
    dtype: pool.dtype,
    exportCacheDir: c.exportCacheDir,
    log: (msg, fields) => log.info({ model: modelDir, ...fields }, msg),
  })
  let lastPoll = 0
  const scheduler = new BatchScheduler(engine, {
    maxBatch: c.maxBatch,
    maxPrefillTokens: c.maxPrefillTokens,
    prefillChunkTokens: c.prefillChunkTokens,
    prefixCacheTokens: c.prefixCacheTokens,
    hooks: {
      // Cancels arrive by pub/sub (see WorkerService.start); polling the keys is only the fallback.
      pollCancels: (ids) => {
        if (Date.now() - lastPoll < c.cancelPollMs) return Promise.resolve([])
        lastPoll = Date.now()
        return streams.cancelled(ids)
      },
      afterStep: (s) => {
        metrics.batchSize.observe({ model, kind: s.kind }, s.rows)
        metrics.stepSeconds.observe({ model, kind: s.kind }, s.stepMs / 1000)
        metrics.requestsRunning.set({ model }, scheduler.running)
        metrics.requestsWaiting.set({ model }, scheduler.waiting)
        metrics.kvCacheBytes.set({ model }, engine.kvBytes)
        metrics.kvCacheUsage.set({ model }, scheduler.running / engine.maxBatch)
        metrics.batchOccupancy.set({ model }, scheduler.running / scheduler.maxBatch)
        metrics.prefixCacheTokens.set({ model }, scheduler.prefixCache?.tokens ?? 0)
        // Sent behind the next step; the job awaits the chain before it completes.
        streams.flush().catch((err) => log.error({ err: String(err) }, 'writing token events failed'))
      },
      prefixLookup: (queried, hit) => {
        metrics.prefixCacheQueries.inc({ model }, queried)
        metrics.prefixCacheHits.inc({ model }, hit)
      },
    },
  })
  log.info(
    { model: modelDir, ep: engine.ep, maxBatch: c.maxBatch, maxContext: engine.maxContext },
    'engine ready',
  )
  return { modelDir, engine, scheduler }
}
