import { MoeError } from '@moe/shared'
import { Hono } from 'hono'
import { describe, expect, it } from 'vitest'
import { MemoryKV } from '../../../test/unit/memory-kv.ts'
import { createApiKey, forgetAuthCache, kvTenant } from '../../auth.ts'
import { type AppEnv, errorResponse } from '../../http.ts'
import { tenantAuth } from './index.ts'

const tenant = { id: 'acme', name: 'Acme', allowedPools: ['general'], defaultPool: 'general' }

async function appWithKeys() {
  forgetAuthCache()
  const kv = new MemoryKV()
  await kv.put(kvTenant('acme'), JSON.stringify(tenant))
  const keys = kv as unknown as KVNamespace
  const logged: Record<string, unknown>[] = []
  const app = new Hono<AppEnv>()
  app.use(async (c, next) => {
    c.set('logFields', {})
    await next()
    logged.push(c.get('logFields'))
  })
  app.use('/v1/*', tenantAuth({ keys: () => keys }))
  app.get('/v1/whoami', (c) => c.json({ tenant: c.get('principal').tenant.id }))
  app.onError((e, c) => (e instanceof MoeError ? errorResponse(c, e) : c.text(String(e), 500)))
  return { app, keys, logged }
}

const bearer = (key: string) => ({ headers: { authorization: `Bearer ${key}` } })

describe('tenantAuth', () => {
  it('puts the key’s tenant on the context and in the access log', async () => {
    const { app, keys, logged } = await appWithKeys()
    const { key } = await createApiKey(keys, 'acme', 'unit', null)
    const res = await app.request('/v1/whoami', bearer(key))
    expect(res.status).toBe(200)
    expect(await res.json()).toEqual({ tenant: 'acme' })
    expect(logged.at(-1)).toEqual({ tenant: 'acme' })
  })

  it('401s a missing, malformed, unknown or expired key in the OpenAI error shape', async () => {
    const { app, keys } = await appWithKeys()
    const expired = await createApiKey(keys, 'acme', 'old', Date.now() - 1)
    for (const init of [
      {},
      { headers: { authorization: 'Basic Zm9vOmJhcg==' } },
      bearer('sk-unknown'),
      bearer(expired.key),
    ]) {
      const res = await app.request('/v1/whoami', init)
      expect(res.status, JSON.stringify(init)).toBe(401)
      const body = (await res.json()) as { error: { code: string; type: string } }
      expect(body.error.code).toBe('invalid_api_key')
    }
  })

  it('refuses to be built without a key store', () => {
    expect(() => tenantAuth({} as never)).toThrow(/keys/)
  })
})
