import { type ChildProcess, spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { JOB_PRIORITY, type JobPayloadInput, poolQueueName, readJobStream } from '@moe/shared'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'
import type { ExportDtype } from '../engine/onnx-export.ts'
import { REPO_ROOT } from '../service/config.ts'

// Load through the real service, for the benchmarks: a worker process
// (`moe serve`) on one bench pool, jobs enqueued on Redis with BullMQ, and
// every job's token stream followed to its end.

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const CLI = join(REPO_ROOT, 'gpu-worker/bin/moe.js')
const POOL = 'bench'

/** A bench prompt: bos, then byte tokens that differ per salt. */
export const benchPrompt = (len: number, salt: number): number[] => [
  1,
  ...Array.from({ length: len - 1 }, (_, i) => 3 + ((i * 7919 + salt * 104729) % 255)),
]

export interface BenchWorkerOptions {
  maxBatch: number
  maxContext: number
  dtype?: ExportDtype
  /** MOE_THREADS; default: the worker's own default (all cores). */
  threads?: number
}

function startWorker(dir: string, prefix: string, opts: BenchWorkerOptions): Promise<ChildProcess> {
  const poolsFile = join(mkdtempSync(join(tmpdir(), 'moe-bench-pools-')), 'pools.json')
  writeFileSync(
    poolsFile,
    JSON.stringify({
      pools: [{ name: POOL, modelDir: dir, modelId: POOL, maxTokensLimit: 4096, dtype: opts.dtype }],
    }),
  )
  const child = spawn(process.execPath, [CLI, 'serve'], {
    env: {
      ...process.env,
      REDIS_URL,
      MOE_POOLS_FILE: poolsFile,
      MOE_QUEUE_PREFIX: prefix,
      MOE_EP: 'cpu',
      MOE_METRICS_PORT: '0',
      MOE_MAX_BATCH: String(opts.maxBatch),
      MOE_MAX_CONTEXT: String(opts.maxContext),
      ...(opts.threads ? { MOE_THREADS: String(opts.threads) } : {}),
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  return new Promise((resolve, reject) => {
    let out = ''
    child.stdout!.on('data', (d) => {
      out += d
      if (out.includes('gpu worker serving')) resolve(child)
    })
    child.once('exit', (code) => reject(new Error(`worker exited with ${code}`)))
  })
}

/** Follows one job's stream until it ends; returns when the first token and the end arrived. */
async function follow(
  redis: Redis,
  jobId: string,
): Promise<{ firstAt: number; endAt: number; tokens: number }> {
  let firstAt = 0
  let tokens = 0
  for await (const ev of readJobStream(redis, jobId, { blockMs: 5000 })) {
    if (ev.type === 'token') {
      tokens++
      firstAt ||= performance.now()
    } else if (ev.type === 'error') throw new Error(`${jobId}: ${ev.code} ${ev.message}`)
  }
  return { firstAt, endAt: performance.now(), tokens }
}

export interface JobShape {
  promptLen: number
  maxTokens: number
  /** 0 for greedy; the service bench samples at 0.8. */
  temperature: number
}

/** A token-input job for the bench pool; `salt` varies the prompt, the tenant and the seed. */
export function benchJob(shape: JobShape, salt: number): JobPayloadInput {
  return {
    version: 1,
    requestId: `bench-${randomUUID()}`,
    tenantId: `t${salt % 8}`,
    pool: POOL,
    model: POOL,
    input: { kind: 'tokens', inputIds: benchPrompt(shape.promptLen, salt) },
    sampling: {
      maxTokens: shape.maxTokens,
      temperature: shape.temperature,
      topP: shape.temperature ? 0.95 : 1,
      topK: 0,
      seed: salt,
      stop: [],
      ignoreEos: true,
    },
    deadline: Date.now() + 600_000,
    createdAt: Date.now(),
  }
}

export interface ConcurrentRun {
  concurrency: number
  tokens: number
  wallMs: number
  tokensPerSecond: number
  ttftP50: number
}

/** A worker process serving one model dir, and the Redis clients that drive it; close() when done. */
export class BenchService {
  private readonly worker: ChildProcess
  private readonly redis: Redis
  private readonly readers: Redis[]
  private readonly queue: Queue

  private constructor(worker: ChildProcess, redis: Redis, readers: Redis[], queue: Queue) {
    this.worker = worker
    this.redis = redis
    this.readers = readers
    this.queue = queue
  }

  /** Starts the worker and waits until it serves; `readers` bounds the jobs followed at once. */
  static async start(dir: string, opts: BenchWorkerOptions & { readers: number }): Promise<BenchService> {
    const prefix = `moe-bench-${randomUUID().slice(0, 8)}`
    const worker = await startWorker(dir, prefix, opts)
    const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: null })
    const readers = Array.from(
      { length: opts.readers },
      () => new Redis(REDIS_URL, { maxRetriesPerRequest: null }),
    )
    const queue = new Queue(poolQueueName(POOL), { connection: redis, prefix })
    return new BenchService(worker, redis, readers, queue)
  }

  /** Enqueues one job and follows it to its end. */
  async one(p: JobPayloadInput): Promise<{ start: number; firstAt: number; endAt: number; tokens: number }> {
    const start = performance.now()
    const followed = follow(this.readers[0]!, p.requestId)
    await this.add(p)
    return { start, ...(await followed) }
  }

  /** Enqueues all jobs at once and waits for every stream to end. */
  async concurrent(jobs: JobPayloadInput[]): Promise<ConcurrentRun> {
    if (jobs.length > this.readers.length)
      throw new Error(`${jobs.length} jobs need ${jobs.length} readers; started with ${this.readers.length}`)
    const start = performance.now()
    const followed = jobs.map((p, i) => follow(this.readers[i]!, p.requestId))
    await Promise.all(jobs.map((p) => this.add(p)))
    const results = await Promise.all(followed)
    const wallMs = Math.max(...results.map((r) => r.endAt)) - start
    const tokens = results.reduce((a, r) => a + r.tokens, 0)
    const ttft = results.map((r) => r.firstAt - start).sort((a, b) => a - b)
    return {
      concurrency: jobs.length,
      tokens,
      wallMs,
      tokensPerSecond: (tokens * 1000) / wallMs,
      ttftP50: ttft[Math.floor(ttft.length / 2)]!,
    }
  }

  private add(p: JobPayloadInput) {
    return this.queue.add('generate', p, {
      jobId: p.requestId,
      priority: JOB_PRIORITY.live,
      removeOnComplete: true,
    })
  }

  /** Stops the worker and waits for it to exit, so the next measurement has the cores to itself. */
  async close(): Promise<void> {
    const exited =
      this.worker.exitCode === null && this.worker.signalCode === null
        ? new Promise((resolve) => this.worker.once('exit', resolve))
        : Promise.resolve()
    this.worker.kill('SIGTERM')
    await exited
    await this.queue.obliterate({ force: true }).catch(() => {})
    await this.queue.close()
    for (const r of [this.redis, ...this.readers]) r.disconnect()
  }
}
