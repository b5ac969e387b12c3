import { lookup as dnsLookup } from 'node:dns/promises'
import { request as httpRequest } from 'node:http'
import { request as httpsRequest } from 'node:https'
import type { LookupFunction } from 'node:net'
import {
  BATCH_RECORD_TTL_SECONDS,
  checkResolvedAddress,
  checkWebhookUrl,
  connectRedis,
  type RedisClient,
  type RedisEndpoint,
  tenantDeliveriesKey,
  tenantWebhooksKey,
  WEBHOOK_QUEUE,
  type WebhookAttempt,
  WebhookDeliveryData,
  type WebhookDeliveryRecord,
  type WebhookEndpoint,
  type WebhookEvent,
  webhookAttemptsKey,
  webhookDeliveryKey,
  webhookHeaders,
} from '@moe/shared'
import { type Job, Queue, UnrecoverableError, Worker } from 'bullmq'
import type { Logger } from 'pino'
import type { WebhookConfig } from './config.ts'

// Webhook delivery: one BullMQ job per (event, endpoint) on the `webhooks` queue, signed per
// Standard Webhooks with the same webhook-id on every attempt. Retried with exponential backoff
// and jitter on timeouts, connection errors, 429 and 5xx; not retried on other 4xx; a 410
// disables the endpoint. Every attempt is recorded (status, latency) for GET /v1/webhooks/deliveries.
// The URL is checked again here (SSRF): the host is resolved and every address must be public,
// and the connection goes to the address that was checked (no second lookup to rebind).

/** Most webhook deliveries a tenant's list keeps (GET /v1/webhooks/deliveries pages through it). */
export const DELIVERY_LIST_MAX = 10_000

/** Delay before retry n (1-based): min(cap, base * 2^(n-1)), "equal jitter" (between half and all of it). */
export function webhookBackoff(cfg: WebhookConfig, attemptsMade: number): number {
  const d = Math.min(cfg.maxBackoffMs, cfg.backoffMs * 2 ** Math.max(0, attemptsMade - 1))
  return Math.round(d / 2 + (Math.random() * d) / 2)
}

/** Enqueues one delivery per subscribed, enabled endpoint of the tenant. Idempotent per event id. */
export async function enqueueWebhookEvent(
  redis: RedisClient,
  prefix: string,
  cfg: WebhookConfig,
  tenantId: string,
  event: WebhookEvent,
  batchId: string | null,
): Promise<number> {
  const all = await redis.hgetall(tenantWebhooksKey(prefix, tenantId))
  const endpoints = Object.values(all)
    .map((v) => JSON.parse(v) as WebhookEndpoint)
    .filter((e) => !e.disabled && e.events.includes(event.type))
  if (endpoints.length === 0) return 0
  const queue = new Queue(WEBHOOK_QUEUE, { connection: redis, prefix })
  try {
    const body = JSON.stringify(event)
    for (const ep of endpoints) {
      const deliveryId = `${event.id}-${ep.id}`
      const record: WebhookDeliveryRecord = {
        id: deliveryId,
        object: 'webhook.delivery',
        event_id: event.id,
        event_type: event.type,
        endpoint_id: ep.id,
        url: ep.url,
        batch_id: batchId,
        created_at: event.created_at,
        status: 'pending',
      }
      const fresh = await redis.set(
        webhookDeliveryKey(prefix, deliveryId),
        JSON.stringify(record),
        'EX',
        BATCH_RECORD_TTL_SECONDS,
        'NX',
      )
      if (fresh === null) continue
      // The list holds what the records do: entries older than a record's TTL, and past the
      // newest DELIVERY_LIST_MAX, are dropped as new ones arrive.
      const list = tenantDeliveriesKey(prefix, tenantId)
      await redis
        .multi()
        .zadd(list, Date.now(), deliveryId)
        .zremrangebyscore(list, '-inf', Date.now() - BATCH_RECORD_TTL_SECONDS * 1000)
        .zremrangebyrank(list, 0, -DELIVERY_LIST_MAX - 1)
        .expire(list, BATCH_RECORD_TTL_SECONDS)
        .exec()
      const data: WebhookDeliveryData = {
        deliveryId,
        tenantId,
        endpointId: ep.id,
        eventId: event.id,
        eventType: event.type,
        batchId,
        body,
      }
      await queue.add('deliver', data, {
        jobId: deliveryId,
        attempts: cfg.attempts,
        backoff: { type: 'webhook' },
        removeOnComplete: { age: 86_400 },
        removeOnFail: { age: 7 * 86_400 },
      })
    }
  } finally {
    await queue.close()
  }
  return endpoints.length
}

interface PostResult {
  status: number | null
  error: string | null
}

/** POSTs to a checked address; resolves with the status, or an error (timeout, connection). */
function post(
  url: URL,
  address: { address: string; family: number },
  headers: Record<string, string>,
  body: string,
  timeoutMs: number,
): Promise<PostResult> {
  const pinned: LookupFunction = (_host, opts, cb) => {
    if ((opts as { all?: boolean }).all) (cb as (e: null, a: unknown[]) => void)(null, [address])
    else cb(null, address.address, address.family)
  }
  const send = url.protocol === 'https:' ? httpsRequest : httpRequest
  return new Promise((resolve) => {
    let settled = false
    // A deadline for the whole exchange: `timeout` alone is an idle timer that a receiver
    // trickling one byte at a time would keep resetting.
    const deadline = setTimeout(() => req.destroy(new Error(`timed out after ${timeoutMs} ms`)), timeoutMs)
    const done = (r: PostResult) => {
      clearTimeout(deadline)
      if (!settled) {
        settled = true
        resolve(r)
      }
    }
    const req = send(
      url,
      {
        method: 'POST',
        headers: { ...headers, 'content-type': 'application/json', 'user-agent': 'moe-edge-webhooks/1' },
        lookup: pinned,
        timeout: timeoutMs,
      },
      (res) => {
        res.resume()
        res.on('end', () => done({ status: res.statusCode ?? null, error: null }))
        res.on('error', () => done({ status: res.statusCode ?? null, error: null }))
      },
    )
    req.on('timeout', () => {
      req.destroy(new Error(`timed out after ${timeoutMs} ms`))
    })
    req.on('error', (e) => done({ status: null, error: e.message }))
    req.end(body)
  })
}

export class WebhookDelivery {
  private readonly endpoint: string | RedisEndpoint
  private readonly prefix: string
  private readonly log: Logger
  readonly config: WebhookConfig
  private redis!: RedisClient
  private worker: Worker | null = null

  constructor(endpoint: string | RedisEndpoint, prefix: string, log: Logger, config: WebhookConfig) {
    this.endpoint = endpoint
    this.prefix = prefix
    this.log = log.child({ component: 'webhook-delivery' })
    this.config = config
  }

  async start(): Promise<void> {
    this.redis = connectRedis(this.endpoint, { maxRetriesPerRequest: null })
    this.redis.on('error', (e) => this.log.warn({ err: e.message }, 'redis connection error'))
    this.worker = new Worker(WEBHOOK_QUEUE, (job) => this.deliver(job), {
      connection: connectRedis(this.endpoint, { maxRetriesPerRequest: null }),
      prefix: this.prefix,
      concurrency: 16,
      settings: { backoffStrategy: (attemptsMade: number) => webhookBackoff(this.config, attemptsMade) },
    })
    this.worker.on('error', (e) => this.log.error({ err: e.message }, 'webhook worker error'))
  }

  async close(): Promise<void> {
    await this.worker?.close()
    await this.redis?.quit().catch(() => {})
  }

  private async setStatus(id: string, status: WebhookDeliveryRecord['status']): Promise<void> {
    const key = webhookDeliveryKey(this.prefix, id)
    const raw = await this.redis.get(key)
    if (!raw) return
    await this.redis.set(key, JSON.stringify({ ...JSON.parse(raw), status }), 'KEEPTTL')
  }

  private async record(id: string, a: WebhookAttempt): Promise<void> {
    const key = webhookAttemptsKey(this.prefix, id)
    await this.redis.multi().rpush(key, JSON.stringify(a)).expire(key, BATCH_RECORD_TTL_SECONDS).exec()
  }

  private async deliver(job: Job): Promise<{ status: number }> {
    const d = WebhookDeliveryData.parse(job.data)
    const attempt = job.attemptsMade + 1
    const last = attempt >= (job.opts.attempts ?? 1)
    const log = this.log.child({ delivery: d.deliveryId, attempt })
    const giveUp = async (status: WebhookDeliveryRecord['status'], why: string): Promise<never> => {
      await this.setStatus(d.deliveryId, status)
      log.warn({ status, why }, 'webhook delivery stopped')
      throw new UnrecoverableError(why)
    }
    const raw = await this.redis.hget(tenantWebhooksKey(this.prefix, d.tenantId), d.endpointId)
    if (!raw) return giveUp('failed', 'the endpoint was deleted')
    const ep = JSON.parse(raw) as WebhookEndpoint
    if (ep.disabled) return giveUp('disabled', 'the endpoint is disabled')

    const started = performance.now()
    const at = Date.now()
    const policy = { allowLoopback: this.config.allowLoopback }
    const refused = checkWebhookUrl(ep.url, policy)
    const url = new URL(ep.url)
    let address: { address: string; family: number } | null = null
    let result: PostResult
    if (refused) result = { status: null, error: `refused: URL ${refused}` }
    else {
      try {
        const host = url.hostname.replace(/^\[|\]$/g, '')
        const addrs = await dnsLookup(host, { all: true })
        const bad = addrs.map((a) => checkResolvedAddress(a.address, policy)).find((x) => x !== null)
        if (bad) result = { status: null, error: `refused: URL ${bad}` }
        else {
          address = addrs[0] ?? null
          result = address
            ? { status: null, error: null }
            : { status: null, error: 'the host does not resolve' }
        }
      } catch (e) {
        result = { status: null, error: `DNS lookup failed: ${(e as Error).message}` }
      }
    }
    if (address) {
      const headers = await webhookHeaders(ep.secret, d.eventId, d.body)
      result = await post(url, address, headers, d.body, this.config.timeoutMs)
    }
    const latency = Math.round(performance.now() - started)
    await this.record(d.deliveryId, {
      attempt,
      at,
      status_code: result.status,
      latency_ms: latency,
      error: result.error,
    })
    const s = result.status
    log.info({ status: s, error: result.error, latencyMs: latency }, 'webhook attempt')
    if (result.error?.startsWith('refused:')) return giveUp('failed', result.error)
    if (s !== null && s >= 200 && s < 300) {
      await this.setStatus(d.deliveryId, 'succeeded')
      return { status: s }
    }
    if (s === 410) {
      const cur = await this.redis.hget(tenantWebhooksKey(this.prefix, d.tenantId), d.endpointId)
      if (cur)
        await this.redis.hset(
          tenantWebhooksKey(this.prefix, d.tenantId),
          d.endpointId,
          JSON.stringify({ ...(JSON.parse(cur) as WebhookEndpoint), disabled: true }),
        )
      return giveUp('disabled', 'the receiver answered 410 Gone: endpoint disabled')
    }
    if (s !== null && s !== 429 && s < 500) return giveUp('failed', `the receiver answered ${s}: not retried`)
    if (last) await this.setStatus(d.deliveryId, 'failed')
    throw new Error(result.error ?? `the receiver answered ${s}`)
  }
}
