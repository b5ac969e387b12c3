import { describe, expect, it } from 'vitest'
import { app } from '../../src/app.ts'
import { createApiKey, forgetAuthCache, kvTenant } from '../../src/auth.ts'
import { MemoryKV } from './memory-kv.ts'

// The routes SDKs call besides completions, methods, and CORS preflights (no Redis needed).

describe('routes SDKs call', async () => {
  forgetAuthCache()
  const kv = new MemoryKV()
  await kv.put(
    kvTenant('r1'),
    JSON.stringify({ id: 'r1', name: 'r', allowedPools: ['general', 'code'], defaultPool: 'general' }),
  )
  const { key } = await createApiKey(kv as unknown as KVNamespace, 'r1', 'unit', null)
  const env = { ENVIRONMENT: 'test', REDIS_URL: 'redis://127.0.0.1:1', MAX_BODY_BYTES: '1000', AUTH: kv }
  const auth = { authorization: `Bearer ${key}` }

  it('retrieves one model (models.retrieve), 404 for one the tenant cannot use', async () => {
    const res = await app.request('/v1/models/moe-demo-code', { headers: auth }, env)
    expect(res.status).toBe(200)
    expect(await res.json()).toMatchObject({ id: 'moe-demo-code', object: 'model', moe: { pool: 'code' } })
    expect((await app.request('/v1/models/auto', { headers: auth }, env)).status).toBe(200)
    const missing = await app.request('/v1/models/moe-demo-vision', { headers: auth }, env)
    expect(missing.status).toBe(404)
    expect(await missing.json()).toMatchObject({ error: { code: 'not_found', param: 'model' } })
    expect((await app.request('/v1/models/moe-demo', {}, env)).status).toBe(401)
  })

  it('answers a wrong method on a known path with 405 and Allow, an unknown path with 404', async () => {
    const del = await app.request('/v1/chat/completions', { method: 'DELETE', headers: auth }, env)
    expect(del.status).toBe(405)
    expect(del.headers.get('allow')).toBe('POST')
    expect(await del.json()).toMatchObject({ error: { code: 'method_not_allowed' } })
    const get = await app.request('/v1/chat/completions', { headers: auth }, env)
    expect(get.status).toBe(405)
    const put = await app.request(
      '/v1/models',
      { method: 'PUT', headers: { ...auth, 'content-type': 'application/json' }, body: '{}' },
      env,
    )
    expect(put.status).toBe(405)
    expect(put.headers.get('allow')).toBe('GET')
    expect((await app.request('/v1/nowhere', { headers: auth }, env)).status).toBe(404)
  })

  it('allows the headers a preflight asks for, SDK helpers and User-Agent included', async () => {
    const res = await app.request(
      '/v1/chat/completions',
      {
        method: 'OPTIONS',
        headers: {
          origin: 'https://app.example',
          'access-control-request-method': 'POST',
          'access-control-request-headers':
            'authorization, content-type, x-stainless-helper-method, user-agent',
        },
      },
      env,
    )
    expect(res.status).toBe(204)
    const allowed = (res.headers.get('access-control-allow-headers') ?? '').toLowerCase()
    for (const h of ['authorization', 'content-type', 'x-stainless-helper-method', 'user-agent'])
      expect(allowed).toContain(h)
  })
})
