import { MoeError, type TenantConfig } from '@moe/shared'
import { Hono } from 'hono'
import { type AppEnv, limitBody, requireJson } from './http.ts'
import { tenantAuth } from './middleware/tenant-auth/index.ts'
import { POOLS } from './pools.ts'

// GET /v1/models and /v1/models/{id}: `auto` (the router), then each pool the tenant may use,
// by model id and by name.

export const models = new Hono<AppEnv>()

models.use('/models', tenantAuth({ keys: (c) => c.env.AUTH }))
models.on(['POST', 'PUT', 'PATCH'], '/models', requireJson, limitBody)

models.use('/models/*', tenantAuth({ keys: (c) => c.env.AUTH }))

/** The models a tenant may use: `auto`, then each allowed pool by model id and by name. */
function modelList(tenant: TenantConfig): Record<string, unknown>[] {
  const data: Record<string, unknown>[] = [
    { id: 'auto', object: 'model', created: 0, owned_by: 'moe-edge', moe: { kind: 'router' } },
  ]
  for (const name of tenant.allowedPools) {
    const p = POOLS.get(name)
    if (!p) continue
    const moe = { pool: p.name, modalities: p.modalities, experts: p.experts, max_tokens: p.maxTokensLimit }
    data.push({
      id: p.modelId,
      object: 'model',
      created: 0,
      owned_by: 'moe-edge',
      moe: { kind: 'model', ...moe },
    })
    data.push({
      id: p.name,
      object: 'model',
      created: 0,
      owned_by: 'moe-edge',
      moe: { kind: 'pool', ...moe },
    })
  }
  return data
}

models.get('/models', (c) => c.json({ object: 'list', data: modelList(c.get('principal').tenant) }))

/** GET /v1/models/{id} (the SDKs' models.retrieve): one of the tenant's models, or 404. */
models.get('/models/:id', (c) => {
  const id = c.req.param('id')
  const model = modelList(c.get('principal').tenant).find((m) => m.id === id)
  if (!model)
    throw new MoeError(
      'not_found',
      `The model '${id}' does not exist or you do not have access to it.`,
      'model',
    )
  return c.json(model)
})
