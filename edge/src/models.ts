import { Hono } from 'hono'
import { type AppEnv, limitBody, requireJson } from './http.ts'
import { tenantAuth } from './middleware/tenant-auth/index.ts'
import { POOLS } from './pools.ts'

// GET /v1/models: `auto` (the router), then each pool the tenant may use, by model id and by name.

export const models = new Hono<AppEnv>()

models.use('/models', tenantAuth({ keys: (c) => c.env.AUTH }))
models.on(['POST', 'PUT', 'PATCH'], '/models', requireJson, limitBody)

models.get('/models', (c) => {
  const tenant = c.get('principal').tenant
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
  return c.json({ object: 'list', data })
})
