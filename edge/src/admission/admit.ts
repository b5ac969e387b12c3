import { generateJobOptions, JOB_PRIORITY, type JobPayload, tenantQueuedKey } from '@moe/shared'
import type { Queue } from 'bullmq'
import type { AdmissionRedis } from './redis-scripts.ts'
import {
  type AdmitRequest,
  type AdmitResult,
  DELIVERED_GRACE_SECONDS,
  JOB_META_TTL_SECONDS,
  type JobMeta,
  type JobState,
  type JobStatus,
  jobMetaKey,
} from './types.ts'

// The admission policy for one request: idempotent replays, rate limits, the pool's and the
// tenant's queue depth, the live-stream cap, then the enqueue. TenantAdmission supplies the
// connection and the queues.

/** What admission needs from the object that holds the connection. */
export interface AdmissionContext {
  redis: AdmissionRedis
  prefix: string
  queue(pool: string): Queue
  jobStatus(jobId: string, tenantId: string): Promise<JobStatus | null>
  /** Drops a finished job so its id can run again; false while a worker holds it. */
  forgetJob(jobId: string, pool: string): Promise<boolean>
  liveKey(tenantId: string): string
}

/** Job states after which an Idempotency-Key is free again (IETF idempotency-key draft). */
const RETRYABLE_STATES: ReadonlySet<JobState> = new Set(['failed', 'cancelled'])

/** The BullMQ priorities that run no later than a job of this kind: they count against its depth. */
const priorityUpTo = (p: JobPayload['priority']): number[] =>
  Array.from({ length: JOB_PRIORITY[p] }, (_, i) => i + 1)

/** Rate limits, backpressure and enqueue for one request. */
export async function admitRequest(ctx: AdmissionContext, req: AdmitRequest): Promise<AdmitResult> {
  const redis = ctx.redis
  const jobId = req.payload.requestId
  const metaKey = jobMetaKey(ctx.prefix, jobId)
  const rlBase = `${ctx.prefix}:rl:${req.meta.tenantId}`
  const priority = req.payload.priority ?? 'live'
  let replay: JobMeta | null = null
  if (req.idempotent) {
    const prior = await ctx.jobStatus(jobId, req.meta.tenantId)
    if (prior && RETRYABLE_STATES.has(prior.state)) {
      // A failed or cancelled request may be retried with its key, and runs again.
      if (!(await ctx.forgetJob(jobId, prior.meta.pool))) {
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
  const q = ctx.queue(req.payload.pool)
  // A replay is a request like any other (it counts against the request rate and holds a
  // stream), but its tokens were charged when the job was admitted.
  const cost = replay ? 0 : req.tokenCost
  const queuedKey = tenantQueuedKey(ctx.prefix, req.payload.pool, req.meta.tenantId)
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
    if ((await redis.moeLease(ctx.liveKey(req.meta.tenantId), req.maxLiveStreams, ttlMs, lease)) !== 1) {
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
