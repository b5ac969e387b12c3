import {
  BATCH_EVENT_TYPES,
  BATCH_QUEUE,
  BATCH_RECORD_TTL_SECONDS,
  BATCH_TRANSITION_LUA,
  BatchControlData,
  BatchParentData,
  type BatchStatic,
  batchErrorLine,
  batchKey,
  batchOutputLine,
  type ChildResult,
  cancelJobs,
  connectRedis,
  decodeJobFailure,
  httpStatusOf,
  type RedisClient,
  type RedisEndpoint,
  type StoredFileMeta,
  storedFileKey,
  type WebhookEvent,
} from '@moe/shared'
import { type Job, Queue, Worker } from 'bullmq'
import type { Logger } from 'pino'
import type { WebhookConfig, WorkerConfig } from './config.ts'
import { enqueueWebhookEvent, WebhookDelivery } from './webhook-delivery.ts'

// The Node side of batches. Consumes the `batches` queue:
//   finalize  the flow's parent, which BullMQ hands over once every child finished (or was
//             removed): writes the output and error files (Redis; the edge serves them), moves
//             the batch to completed / cancelled / expired and enqueues the webhook event;
//   cancel    (from POST /v1/batches/{id}/cancel) and expire (delayed by the completion window):
//             removes the children still waiting and asks the running ones to stop.

type Transitioning = RedisClient & {
  moeBatchTransition(key: string, ...args: string[]): Promise<string | null>
}

const nowS = (): string => String(Math.floor(Date.now() / 1000))

/** `moe:pool.general:batch_x-3` -> queue `pool.general`, id `batch_x-3`. */
function parseJobKey(prefix: string, key: string): { queue: string; id: string } | null {
  if (!key.startsWith(`${prefix}:`)) return null
  const rest = key.slice(prefix.length + 1)
  const i = rest.lastIndexOf(':')
  return i < 0 ? null : { queue: rest.slice(0, i), id: rest.slice(i + 1) }
}

/** Deterministic file ids, so a re-run finalisation rewrites the same files. */
const outputFileId = (batchId: string) => `file-${batchId.replace(/^batch_/, '')}out`
const errorFileId = (batchId: string) => `file-${batchId.replace(/^batch_/, '')}err`

export class BatchCoordinator {
  private readonly endpoint: string | RedisEndpoint
  private readonly prefix: string
  private readonly log: Logger
  private readonly webhooks: WebhookConfig
  private redis!: Transitioning
  private worker: Worker | null = null
  private readonly queues = new Map<string, Queue>()

  constructor(endpoint: string | RedisEndpoint, prefix: string, log: Logger, webhooks: WebhookConfig) {
    this.endpoint = endpoint
    this.prefix = prefix
    this.log = log.child({ component: 'batch-coordinator' })
    this.webhooks = webhooks
  }

  async start(): Promise<void> {
    this.redis = connectRedis(this.endpoint, { maxRetriesPerRequest: null }) as Transitioning
    this.redis.on('error', (e) => this.log.warn({ err: e.message }, 'redis connection error'))
    this.redis.defineCommand('moeBatchTransition', { numberOfKeys: 1, lua: BATCH_TRANSITION_LUA })
    this.worker = new Worker(BATCH_QUEUE, (job) => this.process(job), {
      connection: connectRedis(this.endpoint, { maxRetriesPerRequest: null }),
      prefix: this.prefix,
      concurrency: 4,
    })
    this.worker.on('error', (e) => this.log.error({ err: e.message }, 'batch worker error'))
  }

  async close(): Promise<void> {
    await this.worker?.close()
    await Promise.all([...this.queues.values()].map((q) => q.close()))
    await this.redis?.quit().catch(() => {})
  }

  private queue(name: string): Queue {
    let q = this.queues.get(name)
    if (!q) {
      q = new Queue(name, { connection: this.redis, prefix: this.prefix })
      this.queues.set(name, q)
    }
    return q
  }

  private process(job: Job): Promise<unknown> {
    if (job.name === 'finalize') return this.finalize(job)
    return this.control(BatchControlData.parse(job.data))
  }

  /** Cancel or expire: remove the waiting children, stop the running ones at their next step. */
  private async control(c: BatchControlData): Promise<{ removed: number; stopped: number }> {
    const key = batchKey(this.prefix, c.batchId)
    if (c.action === 'expire') {
      const moved = await this.redis.moeBatchTransition(key, 'in_progress', 'in_progress', 'expiring', '1')
      if (moved === null) return { removed: 0, stopped: 0 }
    }
    const deps = await this.unprocessedChildren(c.batchId)
    let removed = 0
    const running: string[] = []
    await Promise.all(
      deps.map(async (dep) => {
        const k = parseJobKey(this.prefix, dep)
        if (!k) return
        // 0: the child is locked (running); 1: removed (and, if it was the last, the parent is released).
        if ((await this.queue(k.queue).remove(k.id)) === 1) removed++
        else running.push(k.id)
      }),
    )
    await cancelJobs(this.redis, running)
    this.log.info(
      { batchId: c.batchId, action: c.action, removed, stopped: running.length },
      'batch children stopped',
    )
    return { removed, stopped: running.length }
  }

  /** The keys of a batch's children that have not finished (SSCAN pages may repeat a key). */
  private async unprocessedChildren(batchId: string): Promise<string[]> {
    const parent = await this.queue(BATCH_QUEUE).getJob(batchId)
    if (!parent) return []
    const keys = new Set<string>()
    let cursor = 0
    do {
      const page = await parent.getDependencies({ unprocessed: { cursor, count: 1000 } })
      for (const k of page.unprocessed ?? []) keys.add(k)
      cursor = page.nextUnprocessedCursor ?? 0
    } while (cursor !== 0)
    return [...keys]
  }

  /** Every child has finished or been removed: write the files, settle the status, send the event. */
  private async finalize(job: Job): Promise<{ status: string }> {
    const p = BatchParentData.parse(job.data)
    const key = batchKey(this.prefix, p.batchId)
    const h = await this.redis.hgetall(key)
    if (!h.obj || !h.status) {
      this.log.warn({ batchId: p.batchId }, 'batch record missing; nothing to finalise')
      return { status: 'missing' }
    }
    const stat = JSON.parse(h.obj) as BatchStatic
    let status = h.status
    if (status === 'in_progress' || status === 'validating') {
      await this.redis.moeBatchTransition(
        key,
        'in_progress,validating',
        'finalizing',
        'finalizing_at',
        nowS(),
      )
      status = (await this.redis.hget(key, 'status')) ?? status
    }
    const [values, failures] = await Promise.all([
      job.getChildrenValues<ChildResult>(),
      job.getIgnoredChildrenFailures(),
    ])
    const byId = new Map<string, ChildResult>()
    for (const [k, v] of Object.entries(values)) {
      const parsed = parseJobKey(this.prefix, k)
      if (parsed && v) byId.set(parsed.id, v)
    }
    const failedById = new Map<string, string>()
    for (const [k, v] of Object.entries(failures)) {
      const parsed = parseJobKey(this.prefix, k)
      if (parsed) failedById.set(parsed.id, v)
    }
    const expiring = h.expiring === '1'
    const created = Math.floor(Date.now() / 1000)
    const out: string[] = []
    const err: string[] = []
    for (const line of p.lines) {
      const r = byId.get(line.j)
      if (r && r.finishReason !== 'cancelled') {
        out.push(batchOutputLine(p.endpoint, line, r, created))
        continue
      }
      const reason = failedById.get(line.j)
      if (reason !== undefined) {
        const failure = decodeJobFailure(reason)
        err.push(batchErrorLine(line, failure, httpStatusOf(failure.code)))
      } else if (expiring) {
        err.push(
          batchErrorLine(
            line,
            {
              code: 'batch_expired',
              message: 'This request could not be executed before the completion window expired.',
            },
            null,
          ),
        )
      } else {
        err.push(
          batchErrorLine(
            line,
            { code: 'batch_cancelled', message: 'This request was not executed: the batch was cancelled.' },
            null,
          ),
        )
      }
    }
    const outId = outputFileId(p.batchId)
    const errId = err.length > 0 ? errorFileId(p.batchId) : ''
    const m = this.redis.multi()
    const writeFile = (id: string, lines: string[], kind: string) => {
      const content = lines.length > 0 ? `${lines.join('\n')}\n` : ''
      const meta: StoredFileMeta = {
        id,
        tenantId: p.tenantId,
        filename: `${p.batchId}_${kind}.jsonl`,
        purpose: 'batch_output',
        bytes: Buffer.byteLength(content),
        created_at: created,
      }
      const fk = storedFileKey(this.prefix, id)
      m.hset(fk, { meta: JSON.stringify(meta), content }).expire(fk, BATCH_RECORD_TTL_SECONDS)
    }
    writeFile(outId, out, 'output')
    if (errId) writeFile(errId, err, 'error')
    await m.exec()

    const final = status === 'cancelling' ? 'cancelled' : expiring ? 'expired' : 'completed'
    const moved = await this.redis.moeBatchTransition(
      key,
      'finalizing,cancelling',
      final,
      `${final}_at`,
      nowS(),
      'output_file_id',
      outId,
      'error_file_id',
      errId,
      'completed',
      String(out.length),
      'failed',
      String(err.length),
    )
    const settled = moved !== null ? final : ((await this.redis.hget(key, 'status')) ?? final)
    await this.queue(BATCH_QUEUE)
      .remove(`${p.batchId}-expire`)
      .catch(() => 0)
    const type = `batch.${settled}`
    if ((BATCH_EVENT_TYPES as readonly string[]).includes(type)) {
      const event: WebhookEvent = {
        // One terminal event per batch: the id is derived from the batch, so a re-run sends the same one.
        id: `evt_${p.batchId.replace(/^batch_/, '')}`,
        object: 'event',
        type,
        created_at: created,
        data: { id: p.batchId },
      }
      await enqueueWebhookEvent(this.redis, this.prefix, this.webhooks, p.tenantId, event, p.batchId)
    }
    this.log.info(
      { batchId: p.batchId, status: settled, total: stat.total, completed: out.length, failed: err.length },
      'batch finalised',
    )
    return { status: settled }
  }
}

/**
 * The batch coordinator and the webhook delivery worker, started by `moe serve` beside the
 * pool consumers (MOE_BATCH_SERVICES=0 leaves them out). Every worker process runs them; BullMQ
 * hands each parent and each delivery to one of them.
 */
export async function startBatchServices(
  config: WorkerConfig,
  log: Logger,
): Promise<{ close(): Promise<void> } | null> {
  if (!config.batchServices) return null
  const { queuePrefix, webhooks } = config
  const coordinator = new BatchCoordinator(config, queuePrefix, log, webhooks)
  const delivery = new WebhookDelivery(config, queuePrefix, log, webhooks)
  await Promise.all([coordinator.start(), delivery.start()])
  log.info(
    { webhookAttempts: webhooks.attempts, webhookBackoffMs: webhooks.backoffMs },
    'batch coordinator and webhook delivery running',
  )
  return {
    close: async () => {
      await Promise.all([coordinator.close(), delivery.close()])
    },
  }
}
