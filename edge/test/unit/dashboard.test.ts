import { readFileSync } from 'node:fs'
import { bucketQuantile, LATENCY_BUCKETS_SECONDS, latencyBucket } from '@moe/shared'
import { describe, expect, it } from 'vitest'
import { ASSETS_MODULE, renderAssetsModule } from '../../scripts/dashboard-assets.ts'
import { app } from '../../src/app.ts'
import {
  ApiKeyRecord,
  createApiKey,
  forgetAuthCache,
  kvKeyOfHash,
  kvTenant,
  sha256Hex,
} from '../../src/auth.ts'
import { layerBalance, prefixCacheHitRate } from '../../src/dashboard/store.ts'
import {
  analyticsDataPoint,
  type EdgeRequestRecord,
  telemetryFieldsOf,
} from '../../src/middleware/request-telemetry/index.ts'
import { MemoryKV } from './memory-kv.ts'

// The dashboard's login, sessions and 401s, and the arithmetic behind its panels (no Redis:
// the data itself is tested against the whole stack in tests/test/dashboard.test.ts).

const ADMIN = 'admin-token-for-unit-tests'

async function setup() {
  forgetAuthCache()
  const kv = new MemoryKV()
  await kv.put(
    kvTenant('t1'),
    JSON.stringify({ id: 't1', name: 't', allowedPools: ['code'], defaultPool: 'code' }),
  )
  const { key, record } = await createApiKey(kv as unknown as KVNamespace, 't1', 'unit', null)
  const env = {
    ENVIRONMENT: 'test',
    REDIS_URL: 'redis://127.0.0.1:1',
    MAX_BODY_BYTES: '1000',
    ADMIN_TOKEN: ADMIN,
    AUTH: kv,
  }
  return { kv, key, record, env }
}

const login = (env: object, token: string, base = 'http://edge.test') =>
  app.request(
    `${base}/dashboard/login`,
    { method: 'POST', body: new URLSearchParams({ token }), redirect: 'manual' },
    env,
  )

const cookieOf = (res: Response) => /moe_dashboard=([^;]+)/.exec(res.headers.get('set-cookie') ?? '')?.[1]

describe('dashboard access', () => {
  it('answers 401 with the login form, and 401 JSON for its data, without a session', async () => {
    const { env } = await setup()
    const page = await app.request('/dashboard', {}, env)
    expect(page.status).toBe(401)
    expect(await page.text()).toContain('action="/dashboard/login"')
    const data = await app.request('/dashboard/data', {}, env)
    expect(data.status).toBe(401)
    expect(await data.json()).toMatchObject({
      error: { code: 'invalid_api_key', type: 'authentication_error' },
    })
  })

  it('the admin token signs in: an HttpOnly, SameSite=Strict session cookie without the token in it', async () => {
    const { env } = await setup()
    const res = await login(env, ADMIN)
    expect(res.status).toBe(303)
    expect(res.headers.get('location')).toBe('/dashboard')
    const setCookie = res.headers.get('set-cookie')!
    expect(setCookie).toMatch(/HttpOnly/)
    expect(setCookie).toMatch(/SameSite=Strict/)
    expect(setCookie).toMatch(/Path=\/dashboard/)
    expect(setCookie).not.toMatch(/Secure/)
    expect(setCookie).not.toContain(ADMIN)
    expect((await login(env, ADMIN, 'https://edge.test')).headers.get('set-cookie')).toMatch(/Secure/)
    const page = await app.request(
      '/dashboard',
      { headers: { cookie: `moe_dashboard=${cookieOf(res)}` } },
      env,
    )
    expect(page.status).toBe(200)
    expect(page.headers.get('content-security-policy')).toContain("script-src 'self'")
    expect(await page.text()).toContain('id="expert-load"')
  })

  it('refuses forged, expired and altered sessions, and wrong tokens', async () => {
    const { env, key } = await setup()
    const admin = cookieOf(await login(env, ADMIN))!
    const tenant = cookieOf(await login(env, key))!
    expect(tenant.startsWith('tenant.t1.')).toBe(true)
    const [kind, expires, mac] = admin.split('.')
    for (const forged of [
      `${kind}.${Number(expires) + 1}.${mac}`, // a longer life
      `${kind}.${expires}.${mac!.slice(1)}x`,
      `admin.${Math.floor(Date.now() / 1000) - 10}.${mac}`,
      tenant.replace('tenant.t1.', 'tenant.t2.'),
    ]) {
      const res = await app.request('/dashboard', { headers: { cookie: `moe_dashboard=${forged}` } }, env)
      expect(res.status, forged).toBe(401)
    }
    // A session signed under another admin token is not valid under this one.
    const rotated = { ...env, ADMIN_TOKEN: 'rotated' }
    expect(
      (await app.request('/dashboard', { headers: { cookie: `moe_dashboard=${admin}` } }, rotated)).status,
    ).toBe(401)
    for (const wrong of ['', 'sk-nope', `${ADMIN}x`]) expect((await login(env, wrong)).status).toBe(401)
  })

  it("a tenant's session ends when its key is revoked", async () => {
    const { env, kv, key } = await setup()
    const cookie = cookieOf(await login(env, key))!
    const page = () => app.request('/dashboard', { headers: { cookie: `moe_dashboard=${cookie}` } }, env)
    expect((await page()).status).toBe(200)
    const hash = await sha256Hex(key)
    const record = ApiKeyRecord.parse(await kv.get(kvKeyOfHash(hash), 'json'))
    await kv.put(kvKeyOfHash(hash), JSON.stringify({ ...record, revokedAt: Date.now() }))
    expect((await page()).status).toBe(401)
  })

  it('signing out clears the cookie; the static script and styles need no session', async () => {
    const { env } = await setup()
    const out = await app.request('/dashboard/logout', { method: 'POST', redirect: 'manual' }, env)
    expect(out.status).toBe(303)
    expect(out.headers.get('set-cookie')).toMatch(/moe_dashboard=;.*Max-Age=0/)
    for (const path of ['/dashboard/uplot.js', '/dashboard/dashboard.js']) {
      const res = await app.request(path, {}, env)
      expect(res.status).toBe(200)
      expect(res.headers.get('content-type')).toMatch(/javascript/)
    }
  })

  it('the served assets are the client sources and the pinned uPlot (npm run dashboard-assets)', () => {
    expect(readFileSync(ASSETS_MODULE, 'utf8')).toBe(renderAssetsModule())
  })
})

describe('dashboard arithmetic', () => {
  it('balance per layer: coefficient of variation and max/mean', () => {
    expect(layerBalance(0, [10, 10, 10, 10])).toMatchObject({ tokens: 40, cv: 0, maxOverMean: 1 })
    const skewed = layerBalance(1, [40, 0, 0, 0])
    expect(skewed.maxOverMean).toBe(4)
    expect(skewed.cv).toBeCloseTo(Math.sqrt(3), 10)
    expect(layerBalance(2, [0, 0])).toMatchObject({ cv: null, maxOverMean: null })
  })

  it('latency quantiles from buckets, as histogram_quantile reads them', () => {
    const counts = new Array<number>(LATENCY_BUCKETS_SECONDS.length + 1).fill(0)
    expect(bucketQuantile(counts, 0.5)).toBeNull()
    counts[latencyBucket(0.02)] = 100 // (0.01, 0.025]
    expect(bucketQuantile(counts, 0.5)).toBeCloseTo(0.0175, 10)
    expect(bucketQuantile(counts, 0.99)).toBeCloseTo(0.01 + 0.015 * 0.99, 10)
    counts[latencyBucket(99)] = 100 // the overflow bucket answers its lower bound
    expect(bucketQuantile(counts, 0.99)).toBe(30)
    expect(latencyBucket(0)).toBe(0)
    expect(latencyBucket(0.001)).toBe(0)
  })

  it('prefix-cache hit rate: hit tokens over queried tokens', () => {
    expect(prefixCacheHitRate({})).toBeNull()
    expect(prefixCacheHitRate({ moe_prefix_cache_queries_total: 10, moe_prefix_cache_hits_total: 4 })).toBe(
      0.4,
    )
    expect(prefixCacheHitRate({ moe_prefix_cache_hits_total: 3 })).toBeNull()
  })

  it('one request becomes counter fields and an Analytics Engine data point', () => {
    const r: EdgeRequestRecord = {
      route: 'POST /v1/chat/completions',
      status: 200,
      tenantId: 't1',
      pool: 'code',
      cache: 'MISS',
      task: 'code',
      modality: 'text',
      via: 'poolMap',
      admissionMs: 3,
    }
    expect(telemetryFieldsOf(r)).toEqual({
      'req|POST /v1/chat/completions|200|code|MISS': 1,
      'task|code|text': 1,
      'route|code|poolMap': 1,
      [`adm|${latencyBucket(0.003)}`]: 1,
    })
    expect(analyticsDataPoint(r)).toEqual({
      indexes: ['t1'],
      blobs: ['POST /v1/chat/completions', '200', 'code', 'MISS', 't1', 'code', 'text', 'poolMap'],
      doubles: [3],
    })
    const refused = { ...r, status: 401, tenantId: null, pool: null, cache: null, task: null, via: null }
    expect(telemetryFieldsOf({ ...refused, modality: null, admissionMs: null })).toEqual({
      'req|POST /v1/chat/completions|401|-|-': 1,
    })
  })
})
