import { DurableObject } from 'cloudflare:workers'
import {
  cancelJobs,
  decodeJobFailure,
  generateJobOptions,
  JOB_PRIORITY,
  type JobFailure,
  type JobPayload,
  jobCancelKey,
  jobEventsKey,
  lastJobEvent,
  poolQueueName,
  SETTLE_TOKENS_LUA,
  type StreamEvent,
  signingEndpoint,
  tenantQueuedKey,
  tenantTokensKey,
  type WebhookEndpoint,
} from '@moe/shared'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'
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

// One object per tenant admits that tenant's requests: rate limits, queue depth, enqueue, and
// the tenant's job, batch, file and webhook records. workerd will not let one request use a
// socket another request opened, so a Worker would pay a fresh Redis connection (about 9 ms here)
// on every enqueue; a Durable Object's I/O belongs to the object, so it keeps a warm connection
// and BullMQ queues, and admits in two pipelined round trips.

/** How long the edge remembers who owns a job (for GET /v1/jobs/{id}). */
export const JOB_META_TTL_SECONDS = 86_400

/** How long a delivered live answer that no Idempotency-Key can replay stays in Redis. */
export const DELIVERED_GRACE_SECONDS = 300

export interface JobMeta {
  tenantId: string
  pool: string
  model: string
  endpoint: 'chat' | 'completion'
  createdAt: number
  async: boolean
  /** SHA-256 of the canonical request: an Idempotency-Key is bound to the body it first came with. */
  bodyHash?: string
}

export interface AdmitRequest {
  payload: JobPayload
  meta: JobMeta
  limits: { requestsPerMinute: number; tokensPerMinute: number }
  /** Tokens charged against tokens-per-minute now: prompt estimate plus max_tokens. */
  tokenCost: number
  maxQueueDepth: number
  /** The most jobs this tenant may have queued on the pool (its share of maxQueueDepth). */
  tenantQueueDepth: number
  /** Set when the job id came from an Idempotency-Key: an existing job is returned, not re-run. */
  idempotent: boolean
  /**
   * A live request holds a stream (and a Redis connection) until its job ends: at most this many
   * at once per tenant. Null for asynchronous jobs, which hold none.
   */
  maxLiveStreams: number | null
}

export type AdmitResult =
  | {
      ok: true
      jobId: string
      existing: boolean
      meta: JobMeta
      /** The rate-limit window the tokens were charged to (absent when nothing was charged). */
      window?: number
      /** The live-stream slot this request holds; give it back with releaseStream. */
      lease?: string
    }
  | {
      ok: false
      code: 'rate_limited' | 'overloaded' | 'idempotency_conflict'
      message: string
      retryAfterSeconds: number
    }

export type JobState = 'queued' | 'running' | 'completed' | 'failed' | 'cancelled'

export interface JobStatus {
  meta: JobMeta
  state: JobState
  bullState: string
  /** The last event of the job's stream when it is `done` or `error`. */
  final: StreamEvent | null
  /** Why BullMQ gave up on the job, when its stream has no final event. */
  failure: JobFailure | null
}

// Sliding-window limits (two fixed one-minute windows, the previous one weighted by how much of
// it still overlaps the window ending now), checked and charged atomically, on Redis's clock so
// every edge location agrees. Returns {allowed, reason, retryAfterMs, window}.
const RATE_LIMIT_LUA = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local win = 60000
local cur = math.floor(now / win)
local frac = (now % win) / win
local base = KEYS[1]
local reqLimit = tonumber(ARGV[1])
local tokLimit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local rc = tonumber(redis.call('GET', base .. ':r:' .. cur) or '0')
local rp = tonumber(redis.call('GET', base .. ':r:' .. (cur - 1)) or '0')
local tc = tonumber(redis.call('GET', base .. ':t:' .. cur) or '0')
local tp = tonumber(redis.call('GET', base .. ':t:' .. (cur - 1)) or '0')
local function wait(prev, curv, need, limit)
  if curv + need > limit then return math.ceil((1 - frac) * win) end
  if prev <= 0 then return 1000 end
  local f = 1 - (limit - curv - need) / prev
  return math.max(1000, math.ceil((f - frac) * win))
end
if cost > tokLimit then return {0, 'tokens_over_limit', win, cur} end
if rp * (1 - frac) + rc + 1 > reqLimit then return {0, 'requests', wait(rp, rc, 1, reqLimit), cur} end
if tp * (1 - frac) + tc + cost > tokLimit then return {0, 'tokens', wait(tp, tc, cost, tokLimit), cur} end
redis.call('INCR', base .. ':r:' .. cur)
redis.call('PEXPIRE', base .. ':r:' .. cur, 2 * win)
redis.call('INCRBY', base .. ':t:' .. cur, cost)
redis.call('PEXPIRE', base .. ':t:' .. cur, 2 * win)
return {1, '', 0, cur}
`

type RateLimited = Redis & {
  moeRateLimit(
    base: string,
    reqLimit: number,
    tokLimit: number,
    cost: number,
  ): Promise<[number, string, number, number]>
  moeLease(key: string, cap: number, ttlMs: number, lease: string): Promise<number>
  moeKeepLast(key: string): Promise<number>
}

/** The BullMQ priorities that run no later than a job of this kind: they count against its depth. */
const priorityUpTo = (p: JobPayload['priority']): number[] =>
  Array.from({ length: JOB_PRIORITY[p] }, (_, i) => i + 1)

// A tenant's live-stream slots: a sorted set of lease ids scored by when they lapse (so a lease
// whose release was lost frees itself). Returns 1 and takes a slot, or 0 when all are held.
const LEASE_LUA = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
`

// Replaces a stream by one holding only its newest entry, under the same id and TTL. XTRIM
// would only flag the entries deleted: their listpack node stays allocated until every entry
// in it is gone, the final event's included.
const KEEP_LAST_LUA = `
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('XADD', KEYS[1], last[1][1], unpack(last[1][2]))
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
`

/** Job states after which an Idempotency-Key is free again (IETF idempotency-key draft). */
const RETRYABLE_STATES: ReadonlySet<JobState> = new Set(['failed', 'cancelled'])

export const jobMetaKey = (prefix: string, jobId: string): string => `${prefix}:jobmeta:${jobId}`

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

  private redis: RateLimited | null = null
  private readonly queues = new Map<string, Queue>()

  private get config(): EdgeConfig {
    return edgeConfigOf(this.env)
  }

  private get prefix(): string {
    return this.config.queuePrefix
  }

  private conn(): RateLimited {
    if (this.redis && this.redis.status !== 'end') {
      // While the connection is being re-established, answer at once (503) rather than queue
      // the command behind the reconnect backoff; the reconnect goes on in the background.
      if (this.redis.status === 'reconnecting') throw new Error('Redis is unavailable (reconnecting)')
      return this.redis
    }
    for (const q of this.queues.values()) void q.close().catch(() => {})
    this.queues.clear()
    const redis = new Redis(this.config.redisUrl, {
      maxRetriesPerRequest: 2,
      connectTimeout: 2000,
      enableReadyCheck: false,
      // Retry quickly and steadily, so a Redis that comes back is noticed within a second.
      retryStrategy: (times: number) => Math.min(100 * times, 1000),
    }) as RateLimited
    redis.on('error', (e: Error) =>
      console.error(JSON.stringify({ level: 'error', msg: 'redis', error: e.message })),
    )
    redis.defineCommand('moeRateLimit', { numberOfKeys: 1, lua: RATE_LIMIT_LUA })
    redis.defineCommand('moeLease', { numberOfKeys: 1, lua: LEASE_LUA })
    redis.defineCommand('moeKeepLast', { numberOfKeys: 1, lua: KEEP_LAST_LUA })
    this.redis = redis
    return redis
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

  async ping(): Promise<string> {
    return this.conn().ping()
  }

  /** Rate limits, backpressure and enqueue for one request. */
  async admit(req: AdmitRequest): Promise<AdmitResult> {
    const redis = this.conn()
    const jobId = req.payload.requestId
    const metaKey = jobMetaKey(this.prefix, jobId)
    const rlBase = `${this.prefix}:rl:${req.meta.tenantId}`
    const priority = req.payload.priority ?? 'live'
    let replay: JobMeta | null = null
    if (req.idempotent) {
      const prior = await this.jobStatus(jobId, req.meta.tenantId)
      if (prior && RETRYABLE_STATES.has(prior.state)) {
        // A failed or cancelled request may be retried with its key, and runs again.
        if (!(await this.forgetJob(jobId, prior.meta.pool))) {
          return {
            ok: false,
            code: 'idempotency_conflict',
            message: 'The earlier request with this Idempotency-Key is still being cancelled; retry shortly.',
            retryAfterSeconds: 1,
          }
        }
      } else if (prior) {
        if (prior.meta.bodyHash !== req.meta.bodyHash) {
          return {
            ok: false,
            code: 'idempotency_conflict',
            message:
              'This Idempotency-Key was already used with a different request body; use a new key for a new request.',
            retryAfterSeconds: 0,
          }
        }
        replay = prior.meta
      }
    }
    const q = this.queue(req.payload.pool)
    // A replay is a request like any other (it counts against the request rate and holds a
    // stream), but its tokens were charged when the job was admitted.
    const cost = replay ? 0 : req.tokenCost
    const queuedKey = tenantQueuedKey(this.prefix, req.payload.pool, req.meta.tenantId)
    const [rl, mine, depth] = await Promise.all([
      redis.moeRateLimit(rlBase, req.limits.requestsPerMinute, req.limits.tokensPerMinute, cost),
      replay
        ? Promise.resolve(0)
        : redis
            .multi()
            .zremrangebyscore(queuedKey, '-inf', Date.now())
            .zcard(queuedKey)
            .exec()
            .then((r) => Number(r?.[1]?.[1] ?? 0)),
      replay
        ? Promise.resolve(0)
        : // Only the jobs that run no later than this one count against its depth.
          Promise.all([
            q.getJobCountByTypes('waiting', 'delayed', 'waiting-children'),
            q.getCountsPerPriority(priorityUpTo(priority)),
          ]).then(([n, perPriority]) => n + Object.values(perPriority).reduce((a, b) => a + b, 0)),
    ])
    const [allowed, reason, retryMs, window] = rl
    if (allowed !== 1) {
      const retryAfterSeconds = Math.max(1, Math.ceil(retryMs / 1000))
      const message =
        reason === 'tokens_over_limit'
          ? `This request needs up to ${req.tokenCost} tokens, more than the ${req.limits.tokensPerMinute} tokens per minute this tenant may use; lower max_tokens or the prompt.`
          : reason === 'requests'
            ? `Rate limit reached: ${req.limits.requestsPerMinute} requests per minute. Try again in ${retryAfterSeconds} s.`
            : `Rate limit reached: ${req.limits.tokensPerMinute} tokens per minute. Try again in ${retryAfterSeconds} s.`
      return { ok: false, code: 'rate_limited', message, retryAfterSeconds }
    }
    const giveBack = () => {
      if (cost > 0) void redis.decrby(`${rlBase}:t:${window}`, cost).catch(() => {})
    }
    if (depth >= req.maxQueueDepth) {
      // Not run, so give the tokens back (the request still counts).
      giveBack()
      return {
        ok: false,
        code: 'overloaded',
        message: `The '${req.payload.pool}' pool is at capacity (${depth} requests queued); please retry later.`,
        retryAfterSeconds: Math.min(30, 1 + Math.ceil(depth / 100)),
      }
    }
    if (mine >= req.tenantQueueDepth) {
      giveBack()
      return {
        ok: false,
        code: 'overloaded',
        message: `This tenant has ${mine} requests queued on the '${req.payload.pool}' pool, its share of the pool's queue (${req.tenantQueueDepth}); please retry later.`,
        retryAfterSeconds: Math.min(30, 1 + Math.ceil(mine / 100)),
      }
    }
    let lease: string | undefined
    if (req.maxLiveStreams !== null) {
      lease = `${jobId}:${crypto.randomUUID()}`
      const ttlMs = Math.max(1000, req.payload.deadline - Date.now() + 5000)
      if ((await redis.moeLease(this.liveKey(req.meta.tenantId), req.maxLiveStreams, ttlMs, lease)) !== 1) {
        giveBack()
        return {
          ok: false,
          code: 'rate_limited',
          message: `Too many open requests: this tenant may wait on at most ${req.maxLiveStreams} live responses at once. Wait for one to finish, or submit with 'Prefer: respond-async'.`,
          retryAfterSeconds: 1,
        }
      }
    }
    if (replay) return { ok: true, jobId, existing: true, meta: replay, ...(lease ? { lease } : {}) }
    // A live job no key can replay is not read once delivered: its BullMQ record goes soon too.
    const shortLived = priority === 'live' && !req.idempotent
    const opts = generateJobOptions(jobId, priority)
    // Nobody at the edge waits on an async job: the worker settles its charge.
    const payload =
      priority === 'async' && cost > 0 ? { ...req.payload, charge: { window, tokens: cost } } : req.payload
    await Promise.all([
      redis
        .multi()
        .zadd(queuedKey, req.payload.deadline, jobId)
        // Entries leave by deadline (ZREMRANGEBYSCORE above); the set itself outlives the longest.
        .expire(queuedKey, 2 * 3600)
        .exec(),
      q.add(
        'generate',
        payload,
        shortLived
          ? {
              ...opts,
              removeOnComplete: { age: DELIVERED_GRACE_SECONDS },
              removeOnFail: { age: DELIVERED_GRACE_SECONDS },
            }
          : opts,
      ),
      redis.set(metaKey, JSON.stringify(req.meta), 'EX', JOB_META_TTL_SECONDS),
    ])
    return { ok: true, jobId, existing: false, meta: req.meta, window, ...(lease ? { lease } : {}) }
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

  /**
   * Drops a finished job's record, stream and cancel flag, so its id can run again. False when
   * a worker still holds the job (BullMQ will not remove a locked job).
   */
  private async forgetJob(jobId: string, pool: string): Promise<boolean> {
    const redis = this.conn()
    const q = this.queue(pool)
    const job = await q.getJob(jobId)
    if (job && (await q.remove(jobId)) !== 1) return false
    await redis.del(jobMetaKey(this.prefix, jobId), jobEventsKey(jobId), jobCancelKey(jobId))
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
      await redis
        .multi()
        .expire(jobEventsKey(jobId), DELIVERED_GRACE_SECONDS)
        .expire(jobMetaKey(this.prefix, jobId), DELIVERED_GRACE_SECONDS)
        .exec()
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
