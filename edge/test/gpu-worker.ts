import { once } from 'node:events'
import { join } from 'node:path'
import { connectRedis, parseClusterNodes, poolQueueName, QUEUE_PREFIX } from '@moe/shared'
import { Queue } from 'bullmq'
import { repoRoot, spawnOwned } from './wrangler-dev.ts'

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'

export interface RunningWorker {
  /** Process id of the `moe serve` process (the leader of the worker's process group). */
  pid: number
  log(): string
  /** Sends a signal to the worker's whole process group (SIGKILL: a crash) and waits for it to exit. */
  kill(signal: NodeJS.Signals): Promise<void>
  stop(): Promise<void>
}

export interface WorkerOptions {
  /** Redis the worker consumes from (default REDIS_URL). */
  redisUrl?: string
  /** REDIS_CLUSTER_NODES of a Redis Cluster (then `redisUrl` gives only credentials). */
  clusterNodes?: string
  /** Extra environment (MOE_LOCK_MS, MOE_STALLED_INTERVAL_MS, ...). */
  env?: Record<string, string>
}

/**
 * Starts the real GPU worker (`npx moe serve`) on the tiny model and waits until every pool's
 * queue has a consumer. `prefix` (MOE_QUEUE_PREFIX; give the edge the same QUEUE_PREFIX) keeps a
 * test run's queues apart from any other worker on the same Redis.
 */
export async function startGpuWorker(
  prefix = QUEUE_PREFIX,
  pools = ['general', 'code', 'vision'],
  opts: WorkerOptions = {},
): Promise<RunningWorker> {
  const redisUrl = opts.redisUrl ?? REDIS_URL
  const redis = connectRedis(
    { redisUrl, redisClusterNodes: parseClusterNodes(opts.clusterNodes) },
    { maxRetriesPerRequest: null },
  )
  const queues = pools.map((p) => new Queue(poolQueueName(p), { connection: redis, prefix }))
  // Consumers already there (another worker on the same queues): wait for one more on each.
  const before = await Promise.all(queues.map((q) => q.getWorkersCount()))
  // Node itself, not `npx`: no npm wrapper process to outlive a killed test.
  const cli = join(repoRoot, 'gpu-worker/bin/moe.js')
  const { child, log: output } = spawnOwned(process.execPath, [cli, 'serve', '--pools', pools.join(',')], {
    ...process.env,
    REDIS_URL: redisUrl,
    MOE_METRICS_PORT: '0',
    MOE_QUEUE_PREFIX: prefix,
    ...(opts.clusterNodes ? { REDIS_CLUSTER_NODES: opts.clusterNodes } : {}),
    // The tiny random model serves every pool in tests: the demo model's ids, the tiny model's speed.
    MOE_MODEL_DIR: join(repoRoot, 'gpu-worker/models/tiny-mixtral'),
    ...opts.env,
  })
  try {
    const deadline = Date.now() + 120_000
    for (;;) {
      if (child.exitCode !== null) throw new Error(`moe serve exited early:\n${output()}`)
      const counts = await Promise.all(queues.map((q) => q.getWorkersCount()))
      if (counts.every((n, i) => n > before[i]!)) break
      if (Date.now() > deadline) {
        process.kill(-child.pid!, 'SIGKILL')
        throw new Error(`moe serve did not start consuming in 120 s:\n${output()}`)
      }
      await new Promise((r) => setTimeout(r, 250))
    }
  } finally {
    await Promise.all(queues.map((q) => q.close()))
    redis.disconnect()
  }
  const exited = once(child, 'exit').catch(() => {})
  return {
    pid: child.pid!,
    log: output,
    async kill(signal) {
      if (child.exitCode !== null || child.signalCode !== null) return
      process.kill(-child.pid!, signal)
      await exited
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return
      process.kill(-child.pid!, 'SIGTERM')
      await Promise.race([once(child, 'exit'), new Promise((r) => setTimeout(r, 10_000))])
      if (child.exitCode === null) process.kill(-child.pid!, 'SIGKILL')
    },
  }
}
