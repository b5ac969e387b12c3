import {
  BATCH_QUEUE,
  BATCH_RECORD_TTL_SECONDS,
  BATCH_TRANSITION_LUA,
  type BatchControlData,
  type BatchParentData,
  type BatchStatic,
  batchKey,
  batchObject,
  generateJobOptions,
  JOB_PRIORITY,
  type JobPayload,
  poolQueueName,
  type RedisClient,
  type StoredFileMeta,
  storedFileKey,
  tenantBatchesKey,
  tenantDeliveriesKey,
  tenantWebhooksKey,
  type WebhookAttempt,
  type WebhookDeliveryRecord,
  type WebhookEndpoint,
  webhookAttemptsKey,
  webhookDeliveryKey,
} from '@moe/shared'
import { FlowProducer, Queue } from 'bullmq'

// The Redis side of batches, run inside the TenantAdmission Durable Object (its warm connection).
// Who stores what:
//   R2 (FILES)          uploaded input files (validated JSONL), read only by the edge at batch creation;
//   BullMQ flow         parent `batches:<batchId>` + one child per line on the line's pool queue,
//                       each child's payload carrying the whole request (workers never read files);
//   Redis hash          the batch record (status machine, timestamps, final counts, file ids);
//   Redis (coordinator) output and error files, written by the Node-side coordinator that
//                       finalises the parent (it cannot reach the edge's R2); served by the edge.

export interface CreateBatchSpec {
  static: BatchStatic
  parent: BatchParentData
  children: JobPayload[]
  windowMs: number
  /** Tokens the batch may use (prompt estimate + max_tokens, summed over its lines). */
  tokens: number
  /** The tenant's limit on tokens in batches not yet finished (OpenAI's enqueued-token limit). */
  queueTokenLimit: number
}

/** Batch states after which its tokens no longer count as enqueued. */
const FINISHED_BATCH = new Set(['completed', 'failed', 'expired', 'cancelled'])

/** Highest BullMQ priority (2^21 - 1): batch lines are offset from the batch priority up to it. */
const MAX_PRIORITY = 2_097_151

/** A tenant's batches that may still hold enqueued tokens, scored by when their window ends. */
const tenantBatchQueueKey = (prefix: string, tenantId: string) => `${prefix}:bq:${tenantId}`

export interface StoredFile {
  meta: StoredFileMeta
  content: string | null
}

export type WebhookDeliveries = Array<WebhookDeliveryRecord & { attempts: WebhookAttempt[] }>

// JSON three levels deep, as a batch object crosses the RPC boundary (a recursive JSON type
// sends Hono's and workerd's type mappings into infinite instantiation).
type Json0 = string | number | boolean | null
type Json1 = Json0 | Json0[] | { [key: string]: Json0 }
type Json2 = Json1 | Json1[] | { [key: string]: Json1 }
type Json3 = Json2 | Json2[] | { [key: string]: Json2 }
/** A Batch object in OpenAI's shape (batchObject in shared/). */
export type BatchObject = { id: string; [key: string]: Json3 }

export interface BatchList {
  data: BatchObject[]
  has_more: boolean
}

type Transitioning = RedisClient & {
  moeBatchTransition(key: string, ...args: string[]): Promise<string | null>
}

const nowS = (): string => String(Math.floor(Date.now() / 1000))

export class BatchStore {
  readonly redis: Transitioning
  /** The connection it was made for (the Durable Object makes a new store when it reconnects). */
  readonly conn: RedisClient
  private readonly prefix: string
  private flow: FlowProducer | null = null
  private control: Queue | null = null

  constructor(redis: RedisClient, prefix: string) {
    this.redis = redis as unknown as Transitioning
    this.conn = redis
    this.prefix = prefix
    if (!(redis as unknown as Partial<Transitioning>).moeBatchTransition)
      redis.defineCommand('moeBatchTransition', { numberOfKeys: 1, lua: BATCH_TRANSITION_LUA })
  }

  private controlQueue(): Queue {
    this.control ??= new Queue(BATCH_QUEUE, { connection: this.redis, prefix: this.prefix })
    return this.control
  }

  /** Tokens and lines of the tenant's unfinished batches; finished ones leave the set. */
  private async enqueued(tenantId: string): Promise<{ tokens: number; lines: number }> {
    const qkey = tenantBatchQueueKey(this.prefix, tenantId)
    await this.redis.zremrangebyscore(qkey, '-inf', Date.now())
    const ids: string[] = await this.redis.zrangebyscore(qkey, '-inf', '+inf')
    let tokens = 0
    let lines = 0
    for (const id of ids) {
      const [status, t, obj] = await this.redis.hmget(batchKey(this.prefix, id), 'status', 'tokens', 'obj')
      if (status == null || FINISHED_BATCH.has(status)) {
        await this.redis.zrem(qkey, id)
        continue
      }
      tokens += Number(t ?? 0)
      lines += obj ? (JSON.parse(obj) as BatchStatic).total : 0
    }
    return { tokens, lines }
  }

  /** A batch still validating fails with one error, in OpenAI's `errors` list shape. */
  private async failValidating(key: string, code: string, message: string): Promise<void> {
    const errors = { object: 'list', data: [{ code, message, param: null, line: null }] }
    await this.redis.moeBatchTransition(
      key,
      'validating',
      'failed',
      'failed_at',
      nowS(),
      'errors',
      JSON.stringify(errors),
    )
  }

  /**
   * Records the batch, then adds the flow (parent + children) and the expiry job; a batch over
   * the tenant's enqueued-token limit is recorded as failed, and nothing is queued.
   */
  async createBatch(spec: CreateBatchSpec): Promise<BatchObject> {
    const s = spec.static
    const key = batchKey(this.prefix, s.id)
    const before = await this.enqueued(s.tenantId)
    const overQuota = before.tokens + spec.tokens > spec.queueTokenLimit
    await this.redis
      .multi()
      .hset(key, {
        obj: JSON.stringify(s),
        status: 'validating',
        tenant: s.tenantId,
        tokens: String(overQuota ? 0 : spec.tokens),
      })
      .expire(key, BATCH_RECORD_TTL_SECONDS)
      .zadd(tenantBatchesKey(this.prefix, s.tenantId), s.created_at * 1000 + (Date.now() % 1000), s.id)
      // Entries older than a batch record's TTL name records that are gone: trim them, and let
      // the list itself lapse with its newest batch.
      .zremrangebyscore(
        tenantBatchesKey(this.prefix, s.tenantId),
        '-inf',
        Date.now() - BATCH_RECORD_TTL_SECONDS * 1000,
      )
      .expire(tenantBatchesKey(this.prefix, s.tenantId), BATCH_RECORD_TTL_SECONDS)
      .exec()
    if (overQuota) {
      // As OpenAI's batch queue limit does: the batch is created, and fails at once.
      await this.failValidating(
        key,
        'token_limit_exceeded',
        `Enqueued token limit reached: this batch needs up to ${spec.tokens} tokens and ${before.tokens} are already enqueued in unfinished batches; the limit is ${spec.queueTokenLimit}. Try again once some in-progress batches have completed.`,
      )
      return (await this.getBatch(s.id, s.tenantId))!
    }
    await this.redis
      .multi()
      .zadd(tenantBatchQueueKey(this.prefix, s.tenantId), Date.now() + spec.windowMs + 3_600_000, s.id)
      .expire(tenantBatchQueueKey(this.prefix, s.tenantId), Math.ceil(spec.windowMs / 1000) + 3600)
      .exec()
    try {
      this.flow ??= new FlowProducer({ connection: this.redis, prefix: this.prefix })
      const age = BATCH_RECORD_TTL_SECONDS
      await this.flow.add({
        name: 'finalize',
        queueName: BATCH_QUEUE,
        data: spec.parent,
        opts: { jobId: s.id, removeOnComplete: { age }, removeOnFail: { age }, attempts: 5 },
        children: spec.children.map((p, i) => ({
          name: 'generate',
          queueName: poolQueueName(p.pool),
          data: p,
          // A failed line is reported in the error file; it does not fail the batch. Line i of a
          // tenant that already has n lines queued runs at batch priority + n + i: equal
          // priorities run first in, first out, so tenants' batches interleave line by line
          // instead of one tenant's 50,000 lines running before another's first.
          opts: {
            ...generateJobOptions(p.requestId, 'batch'),
            priority: Math.min(MAX_PRIORITY, JOB_PRIORITY.batch + before.lines + i),
            ignoreDependencyOnFailure: true,
          },
        })),
      })
      const expire: BatchControlData = { batchId: s.id, action: 'expire' }
      await this.controlQueue().add('expire', expire, {
        jobId: `${s.id}-expire`,
        delay: spec.windowMs,
        removeOnComplete: true,
        removeOnFail: true,
      })
    } catch (e) {
      console.error(
        JSON.stringify({ level: 'error', msg: 'batch enqueue failed', batch: s.id, error: String(e) }),
      )
      await this.failValidating(
        key,
        'enqueue_failed',
        `The batch's requests could not be queued (batch ${s.id}); please create the batch again.`,
      )
      throw e
    }
    const moved = await this.redis.moeBatchTransition(
      key,
      'validating',
      'in_progress',
      'in_progress_at',
      nowS(),
    )
    // Cancelled while the children were being added: only now are they all there to remove.
    if (moved === null && (await this.redis.hget(key, 'status')) === 'cancelling')
      await this.enqueueCancel(s.id)
    return (await this.getBatch(s.id, s.tenantId))!
  }

  /** The batch object; while it runs, request_counts come from the flow's parent. */
  async getBatch(batchId: string, tenantId: string): Promise<BatchObject | null> {
    const h = await this.redis.hgetall(batchKey(this.prefix, batchId))
    if (h.tenant !== tenantId) return null
    let live: { completed: number; failed: number } | undefined
    if (h.completed === undefined) {
      // Lines fail with ignoreDependencyOnFailure, which BullMQ counts as `ignored`, not `failed`.
      const parent = await this.controlQueue().getJob(batchId)
      const n = parent ? await parent.getDependenciesCount({ processed: true, ignored: true }) : {}
      live = { completed: n.processed ?? 0, failed: n.ignored ?? 0 }
    }
    return batchObject(h, live) as BatchObject | null
  }

  /** The tenant's batches, newest first, after the `after` cursor (a batch id). */
  async listBatches(tenantId: string, after: string | null, limit: number): Promise<BatchList> {
    const zkey = tenantBatchesKey(this.prefix, tenantId)
    let start = 0
    if (after) {
      const rank = await this.redis.zrevrank(zkey, after)
      if (rank === null) return { data: [], has_more: false }
      start = rank + 1
    }
    const ids = await this.redis.zrevrange(zkey, start, start + limit)
    const page = ids.slice(0, limit)
    const data = (await Promise.all(page.map((id) => this.getBatch(id, tenantId)))).filter(
      (b): b is BatchObject => b !== null,
    )
    return { data, has_more: ids.length > limit }
  }

  /** in_progress -> cancelling; the coordinator removes waiting children and stops running ones. */
  async cancelBatch(batchId: string, tenantId: string): Promise<BatchObject | null> {
    const key = batchKey(this.prefix, batchId)
    if ((await this.redis.hget(key, 'tenant')) !== tenantId) return null
    const prev = await this.redis.moeBatchTransition(
      key,
      'validating,in_progress',
      'cancelling',
      'cancelling_at',
      nowS(),
    )
    // From `validating`, createBatch enqueues the cancel once its children exist (see there).
    if (prev === 'in_progress') await this.enqueueCancel(batchId)
    return this.getBatch(batchId, tenantId)
  }

  private async enqueueCancel(batchId: string): Promise<void> {
    const data: BatchControlData = { batchId, action: 'cancel' }
    await this.controlQueue().add('cancel', data, {
      jobId: `${batchId}-cancel`,
      removeOnComplete: true,
      removeOnFail: true,
      attempts: 5,
      backoff: { type: 'fixed', delay: 500 },
    })
  }

  async getStoredFile(fileId: string, tenantId: string, withContent: boolean): Promise<StoredFile | null> {
    const key = storedFileKey(this.prefix, fileId)
    const [meta, content] = await this.redis.hmget(key, 'meta', ...(withContent ? ['content'] : []))
    if (!meta) return null
    const m = JSON.parse(meta) as StoredFileMeta
    if (m.tenantId !== tenantId) return null
    return { meta: m, content: withContent ? (content ?? '') : null }
  }

  /**
   * The tenant's output and error files (metadata only): those of its batches still on record,
   * which live as long as the files do.
   */
  async listStoredFiles(tenantId: string): Promise<StoredFileMeta[]> {
    const batchIds = await this.redis.zrevrange(tenantBatchesKey(this.prefix, tenantId), 0, -1)
    if (batchIds.length === 0) return []
    const pipe = this.redis.pipeline()
    for (const id of batchIds) pipe.hmget(batchKey(this.prefix, id), 'output_file_id', 'error_file_id')
    const fileIds = ((await pipe.exec()) ?? []).flatMap(([, v]) =>
      ((v as Array<string | null>) ?? []).filter((id): id is string => typeof id === 'string' && id !== ''),
    )
    if (fileIds.length === 0) return []
    const metas = await this.redis
      .pipeline(fileIds.map((id) => ['hget', storedFileKey(this.prefix, id), 'meta']))
      .exec()
    return (metas ?? []).flatMap(([, raw]) => {
      if (typeof raw !== 'string') return []
      const m = JSON.parse(raw) as StoredFileMeta
      return m.tenantId === tenantId ? [m] : []
    })
  }

  async deleteStoredFile(fileId: string, tenantId: string): Promise<boolean> {
    if (!(await this.getStoredFile(fileId, tenantId, false))) return false
    await this.redis.del(storedFileKey(this.prefix, fileId))
    return true
  }

  /** Replaces the delivery side's copy of a tenant's webhook endpoints. */
  async putWebhooks(tenantId: string, endpoints: WebhookEndpoint[]): Promise<void> {
    const key = tenantWebhooksKey(this.prefix, tenantId)
    const m = this.redis.multi().del(key)
    for (const e of endpoints) m.hset(key, e.id, JSON.stringify(e))
    await m.exec()
  }

  /** The tenant's endpoints as the delivery side sees them (with `disabled` set by a 410). */
  async getWebhooks(tenantId: string): Promise<WebhookEndpoint[]> {
    const all = await this.redis.hgetall(tenantWebhooksKey(this.prefix, tenantId))
    return Object.values(all).map((v) => JSON.parse(v) as WebhookEndpoint)
  }

  /** The tenant's webhook deliveries (newest first), each with every attempt. */
  async listDeliveries(tenantId: string, batchId: string | null, limit: number): Promise<WebhookDeliveries> {
    const ids = await this.redis.zrevrange(tenantDeliveriesKey(this.prefix, tenantId), 0, 999)
    const out: WebhookDeliveries = []
    for (const id of ids) {
      const [raw, attempts] = await Promise.all([
        this.redis.get(webhookDeliveryKey(this.prefix, id)),
        this.redis.lrange(webhookAttemptsKey(this.prefix, id), 0, -1),
      ])
      if (!raw) continue
      const rec = JSON.parse(raw) as WebhookDeliveryRecord
      if (batchId !== null && rec.batch_id !== batchId) continue
      out.push({ ...rec, attempts: attempts.map((a) => JSON.parse(a) as WebhookAttempt) })
      if (out.length >= limit) break
    }
    return out
  }
}
