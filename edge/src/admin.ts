import { MoeError, TenantConfig } from '@moe/shared'
import { Hono } from 'hono'
import { z } from 'zod'
import {
  ApiKeyRecord,
  createApiKey,
  forgetAuthCache,
  getTenant,
  kvKeyOfHash,
  kvTenant,
  kvTenantKey,
} from './auth.ts'
import { type AppEnv, admissionOf, type Ctx, jsonBody, limitBody, requireJson } from './http.ts'
import { adminAuth } from './middleware/admin-auth/index.ts'
import { POOLS } from './pools.ts'
import { zodToMoeError } from './validate.ts'
import { checkTenantWebhooks, mirrorWebhooks, webhookAdmin } from './webhooks-admin.ts'

// Admin API, behind the ADMIN_TOKEN secret: tenants and their API keys.

export const admin = new Hono<AppEnv>()

admin.use('*', adminAuth({ token: (c) => c.get('config').adminToken }))
admin.on(['POST', 'PUT'], '*', requireJson, limitBody)

function checkTenant(cfg: TenantConfig): void {
  for (const p of [...cfg.allowedPools, cfg.defaultPool, ...Object.values(cfg.poolMap)]) {
    if (!POOLS.has(p))
      throw new MoeError('invalid_request', `Unknown pool '${p}'; pools: ${[...POOLS.keys()].join(', ')}`)
  }
  if (!cfg.allowedPools.includes(cfg.defaultPool)) {
    throw new MoeError('invalid_request', 'defaultPool must be one of allowedPools', 'defaultPool')
  }
}

async function putTenant(c: Ctx, body: unknown, id?: string): Promise<TenantConfig> {
  const raw = id === undefined ? body : { ...(body as object), id }
  const rawId = (raw as { id?: unknown } | null)?.id
  const stored = typeof rawId === 'string' ? await getTenant(c.env.AUTH, rawId) : null
  const parsed = TenantConfig.safeParse(stored ? withStoredSecrets(raw, stored) : raw)
  if (!parsed.success) throw zodToMoeError(parsed.error)
  checkTenant(parsed.data)
  await checkTenantWebhooks(c.get('config'), parsed.data)
  const cfg = stored ? await keepDisabled(c.env, parsed.data) : parsed.data
  // Redis (what the delivery worker reads) first: if it cannot be written, nothing changes.
  await mirrorWebhooks(c.env, cfg)
  await c.env.AUTH.put(kvTenant(cfg.id), JSON.stringify(cfg))
  forgetAuthCache()
  return cfg
}

/**
 * A replaced config's endpoints keep their stored secret when the body leaves it out (as
 * GET /admin/tenants/:id shows them: without secrets).
 */
function withStoredSecrets(body: unknown, stored: TenantConfig): unknown {
  const hooks = (body as { webhooks?: unknown } | null)?.webhooks
  if (!Array.isArray(hooks)) return body
  return {
    ...(body as object),
    webhooks: hooks.map((w: unknown) => {
      if (typeof w !== 'object' || w === null || 'secret' in w) return w
      const old = stored.webhooks.find((s) => s.id === (w as { id?: unknown }).id)
      return old ? { ...w, secret: old.secret, previousSecret: old.previousSecret } : w
    }),
  }
}

/** A PUT never re-enables an endpoint that a 410 disabled: that takes POST .../webhooks/:wid. */
async function keepDisabled(env: Env, cfg: TenantConfig): Promise<TenantConfig> {
  const live = await admissionOf(env, cfg.id).getWebhooks(cfg.id)
  return {
    ...cfg,
    webhooks: cfg.webhooks.map((w) => ({
      ...w,
      disabled: w.disabled || (live.find((l) => l.id === w.id)?.disabled ?? false),
    })),
  }
}

/** A tenant's config as the admin API shows it: webhook secrets are never read back. */
const shownTenant = (t: TenantConfig) => ({
  ...t,
  webhooks: t.webhooks.map(({ secret: _s, previousSecret: _p, ...w }) => w),
})

/** Create a tenant (409 if it exists). */
admin.post('/tenants', async (c) => {
  const body = await jsonBody(c)
  const id = (body as { id?: unknown })?.id
  if (typeof id === 'string' && (await getTenant(c.env.AUTH, id))) {
    return c.json(
      new MoeError('invalid_request', `Tenant '${id}' already exists; PUT to replace it`).toBody(),
      409,
    )
  }
  return c.json(shownTenant(await putTenant(c, body)), 201)
})

/** Create or replace a tenant's config. */
admin.put('/tenants/:id', async (c) =>
  c.json(shownTenant(await putTenant(c, await jsonBody(c), c.req.param('id')))),
)

admin.get('/tenants/:id', async (c) => {
  const t = await getTenant(c.env.AUTH, c.req.param('id'))
  if (!t) throw new MoeError('not_found', `No tenant '${c.req.param('id')}'`)
  return c.json(shownTenant(t))
})

const NewKey = z.strictObject({
  name: z.string().min(1).max(128).default('default'),
  /** Epoch ms, or use expiresInSeconds. */
  expiresAt: z.number().int().positive().nullable().optional(),
  expiresInSeconds: z.number().int().positive().optional(),
})

/** Create an API key; the plaintext is in this response only. */
admin.post('/tenants/:id/keys', async (c) => {
  const tenantId = c.req.param('id')
  if (!(await getTenant(c.env.AUTH, tenantId))) throw new MoeError('not_found', `No tenant '${tenantId}'`)
  const parsed = NewKey.safeParse(await jsonBody(c))
  if (!parsed.success) throw zodToMoeError(parsed.error)
  const { name, expiresAt, expiresInSeconds } = parsed.data
  const expiry = expiresAt ?? (expiresInSeconds !== undefined ? Date.now() + expiresInSeconds * 1000 : null)
  const { key, record } = await createApiKey(c.env.AUTH, tenantId, name, expiry)
  return c.json({ ...record, key }, 201)
})

async function tenantKeyRecords(kv: KVNamespace, tenantId: string): Promise<ApiKeyRecord[]> {
  const out: ApiKeyRecord[] = []
  let cursor: string | undefined
  do {
    const page = await kv.list({ prefix: kvTenantKey(tenantId, ''), ...(cursor ? { cursor } : {}) })
    for (const k of page.keys) {
      const hash = await kv.get(k.name)
      const rec = hash ? ApiKeyRecord.safeParse(await kv.get(kvKeyOfHash(hash), 'json')) : null
      if (rec?.success) out.push(rec.data)
    }
    cursor = page.list_complete ? undefined : page.cursor
  } while (cursor)
  return out
}

admin.get('/tenants/:id/keys', async (c) =>
  c.json({ object: 'list', data: await tenantKeyRecords(c.env.AUTH, c.req.param('id')) }),
)

/** Revoke a key: it answers 401 from now on. */
admin.delete('/tenants/:id/keys/:keyId', async (c) => {
  const { id, keyId } = c.req.param()
  const hash = await c.env.AUTH.get(kvTenantKey(id, keyId))
  const rec = hash ? ApiKeyRecord.safeParse(await c.env.AUTH.get(kvKeyOfHash(hash), 'json')) : null
  if (!hash || !rec?.success) throw new MoeError('not_found', `No key '${keyId}' for tenant '${id}'`)
  const revoked: ApiKeyRecord = { ...rec.data, revokedAt: rec.data.revokedAt ?? Date.now() }
  await c.env.AUTH.put(kvKeyOfHash(hash), JSON.stringify(revoked))
  forgetAuthCache()
  return c.json({ ...revoked, revoked: true })
})

// Webhook endpoints: /admin/tenants/:id/webhooks (webhooks-admin.ts).
admin.route('/', webhookAdmin)
