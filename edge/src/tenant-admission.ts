import { DurableObject } from 'cloudflare:workers'
import {
  cancelJobs,
  connectRedis,
  decodeJobFailure,
  type JobFailure,
  jobCancelKey,
  jobEventsKey,
  lastJobEvent,
  poolQueueName,
  SETTLE_TOKENS_LUA,
  type StoredFileMeta,
  signingEndpoint,
  TOKENIZE_JOB,
  type TokenizeJobPayload,
  tenantTokensKey,
  tokenizeJobOptions,
  type WebhookEndpoint,
} from '@moe/shared'
import { Queue } from 'bullmq'
import { admitRequest } from './admission/admit.ts'
import { type AdmissionRedis, defineAdmissionCommands } from './admission/redis-scripts.ts'
import {
  type AdmitRequest,
  type AdmitResult,
  DELIVERED_GRACE_SECONDS,
  type JobMeta,
  type JobState,
  type JobStatus,
  jobMetaKey,
} from './admission/types.ts'
import { getTenant } from './auth.ts'
import {
  type BatchList,
  type BatchObject,
  BatchStore,
  type CreateBatchSpec,
  type StoredFile,
  type WebhookDeliveries,
} from './batch-store.ts'
import { type EdgeConfig, edgeConfigOf } from './config.ts'
import { type DashboardData, type DashboardQuery, readDashboard, recordTelemetry } from './dashboard/store.ts'

export type { AdmitRequest, AdmitResult, JobMeta, JobState, JobStatus } from './admission/types.ts'

// One object per tenant admits that tenant's requests: rate limits, queue depth, enqueue, and
// the tenant's job, batch, file and webhook records. workerd will not let one request use a
// socket another request opened, so a Worker would pay a fresh Redis connection (about 9 ms here)
// on every enqueue; a Durable Object's I/O belongs to the object, so it keeps a warm connection
// and BullMQ queues, and admits in two pipelined round trips.

/** The part of the object's storage it uses: one value and the alarm. */
interface AlarmStorage {
  get<T>(key: string): Promise<T | undefined>
  put(key: string, value: unknown): Promise<void>
  setAlarm(scheduledTime: number): Promise<void>
}

export class TenantAdmission extends DurableObject<Env> {
  private get storage(): AlarmStorage {
    return (this.ctx as { storage: AlarmStorage }).storage
  }

  private redis: AdmissionRedis | null = null
  private readonly queues = new Map<string, Queue>()

  private get config(): EdgeConfig {
    return edgeConfigOf(this.env)
  }

  private get prefix(): string {
    return this.config.queuePrefix
  }

  private conn(): AdmissionRedis {
    if (this.redis && this.redis.status !== 'end') {
      // While the connection is being re-established, answer at once (503) rather than queue
      // the command behind the reconnect backoff; the reconnect goes on in the background.
      if (this.redis.status === 'reconnecting') throw new Error('Redis is unavailable (reconnecting)')
      return this.redis
    }
    for (const q of this.queues.values()) void q.close().catch(() => {})
    this.queues.clear()
    const redis = connectRedis(this.config, {
      maxRetriesPerRequest: 2,
      connectTimeout: 2000,
      enableReadyCheck: false,
      // Retry quickly and steadily, so a Redis that comes back is noticed within a second.
      retryStrategy: (times: number) => Math.min(100 * times, 1000),
    })
    redis.on('error', (e: Error) =>
      console.error(JSON.stringify({ level: 'error', msg: 'redis', error: e.message })),
    )
    this.redis = defineAdmissionCommands(redis)
    return this.redis
  }

  private queue(pool: string): Queue {
    const redis = this.conn()
    let q = this.queues.get(pool)
    if (!q) {
      q = new Queue(poolQueueName(pool), { connection: redis, prefix: this.prefix })
      q.on('error', (e: Error) =>
        console.error(JSON.stringify({ level: 'error', msg: 'queue', pool, error: e.message })),
      )
      this.queues.set(pool, q)
    }
    return q
  }

  private batchStore: BatchStore | null = null

  /** Batches, files and webhooks (batch-store.ts) on this object's warm connection. */
  private batches(): BatchStore {
    const redis = this.conn()
    if (this.batchStore?.conn !== redis) this.batchStore = new BatchStore(redis, this.prefix)
    return this.batchStore
  }

  createBatch(spec: CreateBatchSpec): Promise<BatchObject> {
    return this.batches().createBatch(spec)
  }
  getBatch(batchId: string, tenantId: string): Promise<BatchObject | null> {
    return this.batches().getBatch(batchId, tenantId)
  }
  listBatches(tenantId: string, after: string | null, limit: number): Promise<BatchList> {
    return this.batches().listBatches(tenantId, after, limit)
  }
  cancelBatch(batchId: string, tenantId: string): Promise<BatchObject | null> {
    return this.batches().cancelBatch(batchId, tenantId)
  }
  getStoredFile(fileId: string, tenantId: string, withContent: boolean): Promise<StoredFile | null> {
    return this.batches().getStoredFile(fileId, tenantId, withContent)
  }
  listStoredFiles(tenantId: string): Promise<StoredFileMeta[]> {
    return this.batches().listStoredFiles(tenantId)
  }
  deleteStoredFile(fileId: string, tenantId: string): Promise<boolean> {
    return this.batches().deleteStoredFile(fileId, tenantId)
  }
  /**
   * Mirrors a tenant's endpoints for the delivery worker, each with the secrets to sign with
   * now; while a rotated-out secret is still honoured, an alarm mirrors again when it lapses.
   */
  async putWebhooks(tenantId: string, endpoints: WebhookEndpoint[]): Promise<void> {
    const now = Date.now()
    await this.batches().putWebhooks(
      tenantId,
      endpoints.map((e) => signingEndpoint(e, now)),
    )
    const lapses = endpoints
      .map((e) => e.previousSecret?.expiresAt ?? 0)
      .filter((t) => t > now)
      .sort((a, b) => a - b)
    if (lapses.length > 0) {
      await this.storage.put('tenantId', tenantId)
      await this.storage.setAlarm(lapses[0]!)
    }
  }

  /** A rotated-out webhook secret's grace is over: mirror the endpoints again without it. */
  override async alarm(): Promise<void> {
    const tenantId = await this.storage.get<string>('tenantId')
    if (!tenantId) return
    const tenant = await getTenant(this.env.AUTH, tenantId)
    if (tenant) await this.putWebhooks(tenantId, tenant.webhooks)
  }
  getWebhooks(tenantId: string): Promise<WebhookEndpoint[]> {
    return this.batches().getWebhooks(tenantId)
  }
  listDeliveries(tenantId: string, batchId: string | null, limit: number): Promise<WebhookDeliveries> {
    return this.batches().listDeliveries(tenantId, batchId, limit)
  }

  /** Adds one edge request's counters (middleware/request-telemetry) to the minute's hashes. */
  recordTelemetry(tenantId: string | null, fields: Record<string, number>): Promise<void> {
    return recordTelemetry(this.conn(), this.prefix, tenantId, fields)
  }

  /** What the dashboard shows (dashboard/store.ts), read on this object's warm connection. */
  dashboard(query: DashboardQuery): Promise<DashboardData> {
    return readDashboard(
      { redis: this.conn(), prefix: this.prefix, queue: (pool) => this.queue(pool) },
      query,
    )
  }

  async ping(): Promise<string> {
    return this.conn().ping()
  }

  /** Rate limits, backpressure and enqueue for one request (admission/admit.ts). */
  admit(req: AdmitRequest): Promise<AdmitResult> {
    return admitRequest(
      {
        redis: this.conn(),
        prefix: this.prefix,
        queue: (pool) => this.queue(pool),
        jobStatus: (jobId, tenantId) => this.jobStatus(jobId, tenantId),
        forgetJob: (jobId, pool) => this.forgetJob(jobId, pool),
        liveKey: (tenantId) => this.liveKey(tenantId),
      },
      req,
    )
  }

  private liveKey(tenantId: string): string {
    return `${this.prefix}:live:${tenantId}`
  }

  /** Gives back a live-stream slot taken by admit. */
  async releaseStream(tenantId: string, lease: string): Promise<void> {
    await this.conn().zrem(this.liveKey(tenantId), lease)
  }

  /** Counts a request answered without a job (a cache hit) against the request rate. */
  async chargeRequest(
    tenantId: string,
    limits: AdmitRequest['limits'],
  ): Promise<{ ok: true } | { ok: false; message: string; retryAfterSeconds: number }> {
    const [allowed, , retryMs] = await this.conn().moeRateLimit(
      `${this.prefix}:rl:${tenantId}`,
      limits.requestsPerMinute,
      limits.tokensPerMinute,
      0,
    )
    if (allowed === 1) return { ok: true }
    const retryAfterSeconds = Math.max(1, Math.ceil(retryMs / 1000))
    return {
      ok: false,
      message: `Rate limit reached: ${limits.requestsPerMinute} requests per minute. Try again in ${retryAfterSeconds} s.`,
      retryAfterSeconds,
    }
  }

  /** A tokenizer request: counted against the request rate, then queued for the pool's workers. */
  async enqueueTokenize(
    tenantId: string,
    limits: AdmitRequest['limits'],
    payload: TokenizeJobPayload,
  ): Promise<{ ok: true } | { ok: false; message: string; retryAfterSeconds: number }> {
    const charged = await this.chargeRequest(tenantId, limits)
    if (!charged.ok) return charged
    await this.queue(payload.pool).add(TOKENIZE_JOB, payload, tokenizeJobOptions(payload.requestId))
    return { ok: true }
  }

  /**
   * Drops a finished job's record, stream and cancel flag, so its id can run again. False when
   * a worker still holds the job (BullMQ will not remove a locked job).
   */
  private async forgetJob(jobId: string, pool: string): Promise<boolean> {
    const redis = this.conn()
    const q = this.queue(pool)
    const job = await q.getJob(jobId)
    if (job && (await q.remove(jobId)) !== 1) return false
    // Two slots on a cluster: the record's (the queue prefix's tag) and the job's own.
    await Promise.all([
      redis.del(jobMetaKey(this.prefix, jobId)),
      redis.del(jobEventsKey(jobId), jobCancelKey(jobId)),
    ])
    return true
  }

  /**
   * Corrects a request's token charge once its real usage is known: admission
   * charged an estimate (prompt characters / 4 + max_tokens). Only while that
   * minute's counter still exists.
   */
  async settleTokens(tenantId: string, window: number, delta: number): Promise<void> {
    if (delta === 0) return
    await this.conn().eval(SETTLE_TOKENS_LUA, 1, tenantTokensKey(this.prefix, tenantId, window), delta)
  }

  /**
   * Retention once a live answer is delivered. A job that an Idempotency-Key may replay keeps
   * only its final event (replays and GET /v1/jobs rebuild the answer from the `done` event's
   * text); any other live job can never be read again, so its stream and record go after a
   * short grace.
   */
  async retainDelivered(jobId: string, replayable: boolean): Promise<void> {
    const redis = this.conn()
    const last = await lastJobEvent(redis, jobId)
    if (!last || last.type === 'token') return
    if (replayable) await redis.moeKeepLast(jobEventsKey(jobId))
    else
      await Promise.all([
        redis.expire(jobEventsKey(jobId), DELIVERED_GRACE_SECONDS),
        redis.expire(jobMetaKey(this.prefix, jobId), DELIVERED_GRACE_SECONDS),
      ])
  }

  /** Asks the worker to drop the job (at its next step, or before it starts). */
  async cancel(jobId: string): Promise<void> {
    await cancelJobs(this.conn(), [jobId])
  }

  /** Status of one of the tenant's jobs; null when it does not exist or is another tenant's. */
  async jobStatus(jobId: string, tenantId: string): Promise<JobStatus | null> {
    const redis = this.conn()
    const raw = await redis.get(jobMetaKey(this.prefix, jobId))
    if (raw === null) return null
    const meta = JSON.parse(raw) as JobMeta
    if (meta.tenantId !== tenantId) return null
    const q = this.queue(meta.pool)
    const [bullState, last, cancelled] = await Promise.all([
      q.getJobState(jobId),
      lastJobEvent(redis, jobId),
      redis.exists(jobCancelKey(jobId)),
    ])
    const final = last && last.type !== 'token' ? last : null
    let failure: JobFailure | null = null
    let state: JobState
    if (final?.type === 'done') state = final.finishReason === 'cancelled' ? 'cancelled' : 'completed'
    else if (final?.type === 'error') state = final.code === 'cancelled' ? 'cancelled' : 'failed'
    else if (bullState === 'failed') {
      state = 'failed'
      failure = decodeJobFailure((await q.getJob(jobId))?.failedReason)
    } else if (bullState === 'active') state = 'running'
    else if (bullState === 'completed') state = 'completed'
    else if (cancelled === 1) state = 'cancelled'
    else state = 'queued'
    return { meta, state, bullState, final, failure }
  }
}
