import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { createServer, type Server } from 'node:http'
import {
  BATCH_RECORD_TTL_SECONDS,
  generateWebhookSecret,
  tenantDeliveriesKey,
  tenantWebhooksKey,
  type WebhookEndpoint,
  type WebhookEvent,
  webhookAttemptsKey,
  webhookDeliveryKey,
} from '@moe/shared'
import { Redis } from 'ioredis'
import pino from 'pino'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { WebhookConfig } from '../src/service/config.ts'
import { enqueueWebhookEvent, WebhookDelivery, webhookBackoff } from '../src/service/webhook-delivery.ts'

// Delivery-time SSRF checks (the URL is checked again, and the host resolved, at every attempt:
// an endpoint stored before a policy change, or a name that now resolves to a private address,
// is refused) and the retry schedule. Real Redis and BullMQ.

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const PREFIX = `moewh-${randomBytes(4).toString('hex')}`
const cfg: WebhookConfig = {
  attempts: 3,
  backoffMs: 50,
  maxBackoffMs: 1000,
  timeoutMs: 2000,
  allowLoopback: false,
}

describe('webhook delivery', () => {
  let redis: Redis
  let server: Server
  let port = 0
  let hits = 0
  let delivery: WebhookDelivery

  beforeAll(async () => {
    redis = new Redis(REDIS_URL, { maxRetriesPerRequest: null })
    server = createServer((_req, res) => {
      hits++
      res.writeHead(200).end()
    })
    server.listen(0, '127.0.0.1')
    await once(server, 'listening')
    port = (server.address() as { port: number }).port
    delivery = new WebhookDelivery(REDIS_URL, PREFIX, pino({ level: 'silent' }), cfg)
    await delivery.start()
  })
  afterAll(async () => {
    await delivery?.close()
    server?.close()
    const keys = await redis.keys(`${PREFIX}:*`)
    if (keys.length > 0) await redis.del(...keys)
    redis.disconnect()
  })

  it("trims a tenant's delivery list to live records and gives it a TTL", async () => {
    const tenant = 't-trim'
    const list = tenantDeliveriesKey(PREFIX, tenant)
    await redis.zadd(list, Date.now() - BATCH_RECORD_TTL_SECONDS * 1000 - 60_000, 'old-delivery')
    await redis.zadd(list, Date.now() - 1000, 'recent-delivery')
    const ep: WebhookEndpoint = {
      id: 'we_t',
      url: 'https://127.0.0.1/hook', // refused before any connection (loopback)
      secret: generateWebhookSecret(),
      events: ['batch.completed'],
      disabled: true,
    }
    await redis.hset(tenantWebhooksKey(PREFIX, tenant), ep.id, JSON.stringify({ ...ep, disabled: false }))
    const event: WebhookEvent = {
      id: 'evt_t',
      object: 'event',
      type: 'batch.completed',
      created_at: 1,
      data: { id: 'b' },
    }
    expect(await enqueueWebhookEvent(redis, PREFIX, cfg, tenant, event, 'b')).toBe(1)
    expect(await redis.zrange(list, '0', '-1')).toEqual(['recent-delivery', 'evt_t-we_t'])
    expect(await redis.ttl(list)).toBeGreaterThan(0)
  })

  it('refuses loopback receivers at delivery time when the dev setting is off', async () => {
    const tenant = 't1'
    const endpoints: WebhookEndpoint[] = [
      {
        id: 'we_a',
        url: `http://127.0.0.1:${port}/x`,
        secret: generateWebhookSecret(),
        events: ['batch.completed'],
        disabled: false,
      },
      {
        id: 'we_b',
        url: `https://localhost:${port}/x`,
        secret: generateWebhookSecret(),
        events: ['batch.completed'],
        disabled: false,
      },
    ]
    for (const e of endpoints) await redis.hset(tenantWebhooksKey(PREFIX, tenant), e.id, JSON.stringify(e))
    const event: WebhookEvent = {
      id: 'evt_1',
      object: 'event',
      type: 'batch.completed',
      created_at: 1,
      data: { id: 'batch_1' },
    }
    expect(await enqueueWebhookEvent(redis, PREFIX, cfg, tenant, event, 'batch_1')).toBe(2)
    for (const e of endpoints) {
      const id = `${event.id}-${e.id}`
      const deadline = Date.now() + 20_000
      let status = 'pending'
      while (status === 'pending' && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 50))
        status = JSON.parse((await redis.get(webhookDeliveryKey(PREFIX, id)))!).status
      }
      expect(status).toBe('failed')
      const attempts = (await redis.lrange(webhookAttemptsKey(PREFIX, id), 0, -1)).map((a) => JSON.parse(a))
      expect(attempts).toHaveLength(1)
      expect(attempts[0].status_code).toBeNull()
      expect(attempts[0].error).toMatch(/^refused: URL .*(loopback|https)/)
    }
    expect(hits).toBe(0)
  })

  it('backs off exponentially with jitter, capped, over hours by default', () => {
    for (let n = 1; n <= 6; n++) {
      const d = webhookBackoff(cfg, n)
      const full = Math.min(cfg.maxBackoffMs, cfg.backoffMs * 2 ** (n - 1))
      expect(d).toBeGreaterThanOrEqual(full / 2)
      expect(d).toBeLessThanOrEqual(full)
    }
    const prod: WebhookConfig = { ...cfg, attempts: 10, backoffMs: 30_000, maxBackoffMs: 3 * 3_600_000 }
    let least = 0
    for (let n = 1; n < prod.attempts; n++)
      least += Math.min(prod.maxBackoffMs, prod.backoffMs * 2 ** (n - 1)) / 2
    expect(least).toBeGreaterThan(2 * 3_600_000)
  })
})
