import {
  BATCH_EVENT_TYPES,
  checkResolvedAddress,
  checkWebhookUrl,
  classifyIp,
  generateWebhookSecret,
  isValidWebhookSecret,
  MoeError,
  type TenantConfig,
  type WebhookEndpoint,
  type WebhookUrlPolicy,
} from '@moe/shared'
import { Hono } from 'hono'
import { z } from 'zod'
import { forgetAuthCache, getTenant, kvTenant, randomBase62 } from './auth.ts'
import type { EdgeConfig } from './config.ts'
import { type AppEnv, admissionOf, jsonBody } from './http.ts'
import { zodToMoeError } from './validate.ts'

// Webhook endpoints of a tenant (admin API). The tenant config in KV keeps them, and a copy goes
// to Redis, where the Node-side delivery worker reads them (and marks one disabled on a 410).
// URLs are checked for SSRF here and again at every delivery.

export const webhookAdmin = new Hono<AppEnv>()

/** Resolves a host name over DNS-over-HTTPS (workerd has no resolver API); [] when it does not resolve. */
async function resolveHost(config: EdgeConfig, host: string): Promise<string[]> {
  const base = config.webhookDohUrl
  const out: string[] = []
  for (const type of ['A', 'AAAA']) {
    const res = await fetch(`${base}?name=${encodeURIComponent(host)}&type=${type}`, {
      headers: { accept: 'application/dns-json' },
      signal: AbortSignal.timeout(3000),
    })
    if (!res.ok) throw new Error(`DNS lookup answered ${res.status}`)
    const body = (await res.json()) as { Answer?: Array<{ type: number; data: string }> }
    for (const a of body.Answer ?? []) if (a.type === 1 || a.type === 28) out.push(a.data)
  }
  return out
}

/** Refuses (400) a URL that is not https or that names or resolves to a non-public address. */
export async function assertSafeWebhookUrl(config: EdgeConfig, url: string): Promise<void> {
  const policy: WebhookUrlPolicy = { allowLoopback: config.webhookAllowLoopback }
  const why = checkWebhookUrl(url, policy)
  if (why) throw new MoeError('invalid_request', `Webhook URL ${why}`, 'url')
  const host = new URL(url).hostname
  if (classifyIp(host) !== null || /(^|\.)localhost$/i.test(host)) return
  let addrs: string[]
  try {
    addrs = await resolveHost(config, host)
  } catch (e) {
    throw new MoeError(
      'invalid_request',
      `Webhook URL host '${host}' could not be resolved (${(e as Error).message})`,
      'url',
    )
  }
  if (addrs.length === 0)
    throw new MoeError('invalid_request', `Webhook URL host '${host}' does not resolve`, 'url')
  for (const a of addrs) {
    const bad = checkResolvedAddress(a, policy)
    if (bad) throw new MoeError('invalid_request', `Webhook URL ${bad}`, 'url')
  }
}

/** Checks every endpoint of a tenant config (on tenant create/replace). */
export async function checkTenantWebhooks(config: EdgeConfig, cfg: TenantConfig): Promise<void> {
  for (const w of cfg.webhooks) {
    await assertSafeWebhookUrl(config, w.url)
    if (!isValidWebhookSecret(w.secret))
      throw new MoeError(
        'invalid_request',
        'Webhook secret must be whsec_ + base64 of at least 16 bytes',
        'secret',
      )
  }
}

/** Copies a tenant's endpoints to Redis for the delivery worker. */
export async function mirrorWebhooks(env: Env, cfg: TenantConfig): Promise<void> {
  await admissionOf(env, cfg.id).putWebhooks(cfg.id, cfg.webhooks)
}

const NewEndpoint = z.strictObject({
  url: z.string().url(),
  secret: z.string().optional(),
  events: z
    .array(z.enum(BATCH_EVENT_TYPES))
    .min(1)
    .default([...BATCH_EVENT_TYPES]),
})

async function tenantOr404(env: Env, id: string): Promise<TenantConfig> {
  const t = await getTenant(env.AUTH, id)
  if (!t) throw new MoeError('not_found', `No tenant '${id}'`)
  return t
}

async function saveTenant(env: Env, cfg: TenantConfig): Promise<void> {
  // Redis (what the delivery worker reads) first: with Redis down nothing changes, rather than
  // the config forgetting an endpoint the worker still signs events for.
  await mirrorWebhooks(env, cfg)
  await env.AUTH.put(kvTenant(cfg.id), JSON.stringify(cfg))
  forgetAuthCache()
}

/** Register an endpoint: `{url, events?, secret?}`; the answer holds the secret (generated when absent). */
webhookAdmin.post('/tenants/:id/webhooks', async (c) => {
  const tenant = await tenantOr404(c.env, c.req.param('id'))
  const parsed = NewEndpoint.safeParse(await jsonBody(c))
  if (!parsed.success) throw zodToMoeError(parsed.error)
  const { url, events } = parsed.data
  const secret = parsed.data.secret ?? generateWebhookSecret()
  if (!isValidWebhookSecret(secret))
    throw new MoeError('invalid_request', 'secret must be whsec_ + base64 of at least 16 bytes', 'secret')
  await assertSafeWebhookUrl(c.get('config'), url)
  if (tenant.webhooks.length >= 16)
    throw new MoeError('invalid_request', 'A tenant may have at most 16 webhook endpoints')
  const endpoint: WebhookEndpoint = { id: `we_${randomBase62(16)}`, url, secret, events, disabled: false }
  await saveTenant(c.env, { ...tenant, webhooks: [...tenant.webhooks, endpoint] })
  return c.json(endpoint, 201)
})

/** The tenant's endpoints as the delivery worker sees them (`disabled` after a 410). */
webhookAdmin.get('/tenants/:id/webhooks', async (c) => {
  const tenant = await tenantOr404(c.env, c.req.param('id'))
  const live = await admissionOf(c.env, tenant.id).getWebhooks(tenant.id)
  return c.json({ object: 'list', data: live.map(({ secret: _s, ...rest }) => rest) })
})

/** Re-enable (or disable) an endpoint: `{disabled: boolean}`. */
webhookAdmin.post('/tenants/:id/webhooks/:wid', async (c) => {
  const tenant = await tenantOr404(c.env, c.req.param('id'))
  const body = z.strictObject({ disabled: z.boolean() }).safeParse(await jsonBody(c))
  if (!body.success) throw zodToMoeError(body.error)
  const wid = c.req.param('wid')
  if (!tenant.webhooks.some((w) => w.id === wid))
    throw new MoeError('not_found', `No webhook endpoint '${wid}'`)
  const live = await admissionOf(c.env, tenant.id).getWebhooks(tenant.id)
  const webhooks = tenant.webhooks.map((w) => {
    const disabled =
      w.id === wid ? body.data.disabled : (live.find((l) => l.id === w.id)?.disabled ?? w.disabled)
    return { ...w, disabled }
  })
  await saveTenant(c.env, { ...tenant, webhooks })
  const { secret: _s, previousSecret: _p, ...rest } = webhooks.find((w) => w.id === wid)!
  return c.json(rest)
})

/**
 * Rotate an endpoint's secret: `{grace_seconds?}` (default a day, at most a week). The answer
 * holds the new secret; until the grace ends every event is signed with both, so receivers
 * can switch over without dropping one.
 */
webhookAdmin.post('/tenants/:id/webhooks/:wid/rotate', async (c) => {
  const tenant = await tenantOr404(c.env, c.req.param('id'))
  const body = z
    .strictObject({
      grace_seconds: z
        .number()
        .int()
        .min(0)
        .max(7 * 86_400)
        .default(86_400),
    })
    .safeParse(await jsonBody(c))
  if (!body.success) throw zodToMoeError(body.error)
  const wid = c.req.param('wid')
  const old = tenant.webhooks.find((w) => w.id === wid)
  if (!old) throw new MoeError('not_found', `No webhook endpoint '${wid}'`)
  const secret = generateWebhookSecret()
  const expiresAt = Date.now() + body.data.grace_seconds * 1000
  const live = await admissionOf(c.env, tenant.id).getWebhooks(tenant.id)
  const webhooks = tenant.webhooks.map((w) => ({
    ...w,
    // Keep what the delivery side knows (a 410 disables).
    disabled: w.disabled || (live.find((l) => l.id === w.id)?.disabled ?? false),
    ...(w.id === wid
      ? {
          secret,
          ...(body.data.grace_seconds > 0 ? { previousSecret: { secret: old.secret, expiresAt } } : {}),
        }
      : {}),
  }))
  if (body.data.grace_seconds === 0) delete webhooks.find((w) => w.id === wid)!.previousSecret
  await saveTenant(c.env, { ...tenant, webhooks })
  return c.json({
    id: wid,
    object: 'webhook_endpoint',
    secret,
    previous_secret_expires_at: body.data.grace_seconds > 0 ? Math.floor(expiresAt / 1000) : null,
  })
})

webhookAdmin.delete('/tenants/:id/webhooks/:wid', async (c) => {
  const tenant = await tenantOr404(c.env, c.req.param('id'))
  const wid = c.req.param('wid')
  if (!tenant.webhooks.some((w) => w.id === wid))
    throw new MoeError('not_found', `No webhook endpoint '${wid}'`)
  await saveTenant(c.env, { ...tenant, webhooks: tenant.webhooks.filter((w) => w.id !== wid) })
  return c.json({ id: wid, object: 'webhook_endpoint', deleted: true })
})
