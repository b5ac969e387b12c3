import { MoeError, TELEMETRY_ALL, TELEMETRY_MAX_WINDOW_MINUTES } from '@moe/shared'
import { Hono } from 'hono'
import { deleteCookie, getCookie, setCookie } from 'hono/cookie'
import { z } from 'zod'
import type { AppEnv, Ctx } from '../http.ts'
import { POOLS } from '../pools.ts'
import { DASHBOARD_CSS, DASHBOARD_JS, UPLOT_CSS, UPLOT_JS } from './assets.gen.ts'
import { CONTENT_SECURITY_POLICY, dashboardPage, loginPage } from './page.ts'
import { SESSION_COOKIE, SESSION_SECONDS, type Viewer, viewerOf, viewerOfToken } from './session.ts'

// GET /dashboard (the page, or the login form with 401), POST /dashboard/login and /logout,
// GET /dashboard/data (what the page polls: 401 without a session or a bearer token), and the
// page's static script and styles.

export const dashboard = new Hono<AppEnv>()

const html = (c: Ctx, body: string, status: 200 | 401) => {
  c.header('content-security-policy', CONTENT_SECURITY_POLICY)
  c.header('cache-control', 'no-store')
  c.header('x-content-type-options', 'nosniff')
  c.header('referrer-policy', 'no-referrer')
  return c.html(body, status)
}

const viewer = (c: Ctx): Promise<Viewer | null> =>
  viewerOf(
    c.env.AUTH,
    c.get('config').adminToken,
    getCookie(c, SESSION_COOKIE),
    c.req.header('authorization'),
  )

dashboard.get('/', async (c) =>
  (await viewer(c)) ? html(c, dashboardPage(), 200) : html(c, loginPage(null), 401),
)

dashboard.post('/login', async (c) => {
  const form = await c.req.parseBody().catch(() => ({}) as Record<string, unknown>)
  const token = typeof form.token === 'string' ? form.token.trim() : ''
  const session = token ? await viewerOfToken(c.env.AUTH, c.get('config').adminToken, token) : null
  if (!session) return html(c, loginPage('That is neither the admin token nor a valid API key.'), 401)
  setCookie(c, SESSION_COOKIE, session.cookie, {
    path: '/dashboard',
    httpOnly: true,
    secure: new URL(c.req.url).protocol === 'https:',
    sameSite: 'Strict',
    maxAge: SESSION_SECONDS,
  })
  return c.redirect('/dashboard', 303)
})

dashboard.post('/logout', (c) => {
  deleteCookie(c, SESSION_COOKIE, { path: '/dashboard' })
  return c.redirect('/dashboard', 303)
})

const DataQuery = z.object({
  pool: z.string().optional(),
  window: z.coerce
    .number()
    .int()
    .min(1)
    .max(TELEMETRY_MAX_WINDOW_MINUTES, { error: `window is at most ${TELEMETRY_MAX_WINDOW_MINUTES} minutes` })
    .default(15),
})

dashboard.get('/data', async (c) => {
  const who = await viewer(c)
  if (!who)
    throw new MoeError(
      'invalid_api_key',
      'Sign in at /dashboard, or send the admin token or an API key as Authorization: Bearer',
    )
  const parsed = DataQuery.safeParse(c.req.query())
  if (!parsed.success) throw new MoeError('invalid_request', parsed.error.issues[0]!.message, 'window')
  const pools = who.kind === 'admin' ? [...POOLS.keys()] : who.tenant.allowedPools.filter((p) => POOLS.has(p))
  const pool = parsed.data.pool ?? pools[0]
  if (pool === undefined || !pools.includes(pool))
    throw new MoeError('invalid_request', `pool must be one of ${pools.join(', ')}`, 'pool')
  const scope = who.kind === 'admin' ? TELEMETRY_ALL : who.tenant.id
  const ns = c.env.TENANT_ADMISSION
  // A tenant's view is read by its own object; the admin's by the one that counts the rest.
  const object = ns.get(ns.idFromName(who.kind === 'admin' ? 'edge-telemetry' : `tenant:${scope}`))
  const data = await object.dashboard({
    scope,
    pools,
    pool,
    poolExperts: POOLS.get(pool)?.experts ?? null,
    windowMinutes: parsed.data.window,
    now: Date.now(),
  })
  c.header('cache-control', 'no-store')
  return c.json(data)
})

const asset = (type: string, body: string) => (c: Ctx) => {
  c.header('content-type', type)
  c.header('cache-control', 'public, max-age=300')
  c.header('x-content-type-options', 'nosniff')
  return c.body(body)
}
dashboard.get('/uplot.js', asset('text/javascript; charset=utf-8', UPLOT_JS))
dashboard.get('/uplot.css', asset('text/css; charset=utf-8', UPLOT_CSS))
dashboard.get('/dashboard.js', asset('text/javascript; charset=utf-8', DASHBOARD_JS))
dashboard.get('/dashboard.css', asset('text/css; charset=utf-8', DASHBOARD_CSS))
