import { type ChildProcess, spawn } from 'node:child_process'
import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { poolQueueName, QUEUE_PREFIX } from '@moe/shared'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'
import { repoRoot } from './wrangler-dev.ts'

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'

/** The real GPU worker exists once its service entry point lands. */
export const gpuWorkerAvailable = existsSync(join(repoRoot, 'gpu-worker/src/service/serve.ts'))

export interface RunningWorker {
  log(): string
  stop(): Promise<void>
}

/**
 * Starts the real GPU worker (`npx moe serve`) on the tiny model and waits until every pool's
 * queue has a consumer. `prefix` (MOE_QUEUE_PREFIX; give the edge the same QUEUE_PREFIX) keeps a
 * test run's queues apart from any other worker on the same Redis.
 */
export async function startGpuWorker(
  prefix = QUEUE_PREFIX,
  pools = ['general', 'code', 'vision'],
): Promise<RunningWorker> {
  const child: ChildProcess = spawn('npx', ['moe', 'serve', '--pools', pools.join(',')], {
    cwd: repoRoot,
    env: { ...process.env, REDIS_URL, MOE_METRICS_PORT: '0', MOE_QUEUE_PREFIX: prefix },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  })
  let log = ''
  child.stdout?.on('data', (d) => {
    log += d
  })
  child.stderr?.on('data', (d) => {
    log += d
  })
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: null })
  const queues = pools.map((p) => new Queue(poolQueueName(p), { connection: redis, prefix }))
  try {
    const deadline = Date.now() + 120_000
    for (;;) {
      if (child.exitCode !== null) throw new Error(`moe serve exited early:\n${log}`)
      const counts = await Promise.all(queues.map((q) => q.getWorkersCount()))
      if (counts.every((n) => n > 0)) break
      if (Date.now() > deadline) throw new Error(`moe serve did not start consuming in 120 s:\n${log}`)
      await new Promise((r) => setTimeout(r, 250))
    }
  } finally {
    await Promise.all(queues.map((q) => q.close()))
    redis.disconnect()
  }
  return {
    log: () => log,
    async stop() {
      if (child.exitCode !== null) return
      process.kill(-child.pid!, 'SIGTERM')
      await Promise.race([once(child, 'exit'), new Promise((r) => setTimeout(r, 10_000))])
      if (child.exitCode === null) process.kill(-child.pid!, 'SIGKILL')
    },
  }
}
