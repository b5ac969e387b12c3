import { type ChildProcess, spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import {
  JOB_PRIORITY,
  type JobPayloadInput,
  jobEventsKey,
  poolQueueName,
  readJobStream,
  type StreamEvent,
  streamEntryEvent,
} from '@moe/shared'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'
import pino from 'pino'
import { loadWorkerConfig, type WorkerConfig } from '../src/service/config.ts'
import { WorkerService } from '../src/service/worker-service.ts'
import { TINY_MODEL_DIR } from './fixtures.ts'

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const CLI = fileURLToPath(new URL('../bin/moe.js', import.meta.url))

/** A queue prefix of its own per test run, as BullMQ's suite does, so runs never see each other's jobs. */
export const uniquePrefix = () => `moe-test-${randomUUID().slice(0, 8)}`

export function testEnv(prefix: string, extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return {
    ...process.env,
    REDIS_URL,
    MOE_QUEUE_PREFIX: prefix,
    MOE_EP: 'cpu',
    MOE_METRICS_PORT: '0',
    MOE_MAX_CONTEXT: '512',
    MOE_MAX_BATCH: '16',
    MOE_LOG_LEVEL: 'silent',
    // Every pool on the tiny model: fast, and what the outputs here are compared with.
    MOE_MODEL_DIR: TINY_MODEL_DIR,
    ...extra,
  }
}

export async function startService(
  prefix: string,
  extra: Record<string, string> = {},
): Promise<WorkerService> {
  const config: WorkerConfig = loadWorkerConfig(testEnv(prefix, extra))
  const service = new WorkerService(config, pino({ level: 'silent' }))
  await service.start()
  return service
}

/** Starts `moe serve` as its own process (for crash tests). */
export function spawnWorker(prefix: string, extra: Record<string, string> = {}): ChildProcess {
  return spawn(process.execPath, [CLI, 'serve'], {
    env: testEnv(prefix, { MOE_LOG_LEVEL: 'info', ...extra }),
    stdio: ['ignore', 'pipe', 'pipe'],
  })
}

export function payload(pool: string, overrides: Partial<JobPayloadInput> = {}): JobPayloadInput {
  const requestId = overrides.requestId ?? `req-${randomUUID()}`
  return {
    version: 1,
    requestId,
    tenantId: 'tenant-a',
    pool,
    model: 'moe-demo',
    input: { kind: 'tokens', inputIds: [1, 72, 101, 108, 108, 111] },
    sampling: { maxTokens: 12, temperature: 0.8, topP: 0.95, topK: 40, seed: 42, stop: [] },
    deadline: Date.now() + 60_000,
    createdAt: Date.now(),
    priority: 'live',
    ...overrides,
  }
}

export class QueueClient {
  readonly redis = new Redis(REDIS_URL, { maxRetriesPerRequest: null })
  private readonly queues = new Map<string, Queue>()
  readonly prefix: string
  constructor(prefix: string) {
    this.prefix = prefix
  }

  queue(pool: string): Queue {
    let q = this.queues.get(pool)
    if (!q) {
      q = new Queue(poolQueueName(pool), { connection: this.redis, prefix: this.prefix })
      this.queues.set(pool, q)
    }
    return q
  }

  async add(p: JobPayloadInput, opts: { attempts?: number } = {}) {
    return this.queue(p.pool).add('generate', p, {
      jobId: p.requestId,
      priority: JOB_PRIORITY[p.priority ?? 'live'],
      attempts: opts.attempts ?? 1,
      removeOnComplete: { age: 3600 },
      removeOnFail: { age: 3600 },
    })
  }

  /**
   * Waits for a job's `done` or `error`, then returns every event of its stream as written
   * (XRANGE, no de-duplication), so a test sees any token index written twice.
   */
  async events(jobId: string, timeoutMs = 30_000): Promise<StreamEvent[]> {
    let seen = 0
    const timer = setTimeout(() => this.redis.disconnect(), timeoutMs)
    try {
      for await (const _ of readJobStream(this.redis, jobId, { blockMs: 1000 })) seen++
    } catch (e) {
      throw new Error(
        `no end event on ${jobId} within ${timeoutMs} ms (got ${seen} events): ${(e as Error).message}`,
      )
    } finally {
      clearTimeout(timer)
    }
    const entries = await this.redis.xrange(jobEventsKey(jobId), '-', '+')
    return entries.flatMap(([, fields]) => streamEntryEvent(fields) ?? [])
  }

  async close(): Promise<void> {
    for (const q of this.queues.values()) {
      await q.obliterate({ force: true }).catch(() => {})
      await q.close()
    }
    await this.redis.quit()
  }
}
