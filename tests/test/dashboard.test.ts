import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import OpenAI from 'openai'
import { type Browser, chromium, type Page } from 'playwright-core'
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest'
import { devTenant, repoRoot, type TestTenant } from '../src/stack.ts'

// The dashboard against the whole stack: its data moves with live traffic, each tenant sees its
// own traffic only, nothing is shown without a session or token, and the page renders in a real
// browser (Debian's chromium driven by playwright-core), whose screenshot is docs/dashboard.png.

const stack = inject('stack')
const CODE_EXPERTS = [0, 1, 5, 6]
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'

const CODE_PROMPTS = [
  'write a python function that reverses a linked list and fix this bug in my code',
  'def fib(n):\n    # fix this python function, it recurses forever\n    return fib(n - 1) + fib(n - 2)',
  'refactor this javascript code: const xs = arr.map(x => x * 2).filter(Boolean)',
  'why does this typescript function not compile? function f(a: number): string { return a }',
  'write a bash script that finds the largest files in a directory',
  'implement binary search in rust and explain the code',
]
const PROSE_PROMPTS = [
  'hello there! how was your weekend?',
  'tell me a short story about a lighthouse keeper and a storm',
  'describe autumn in a small mountain village',
  'what is your favourite season and why?',
]

interface DashboardData {
  scope: string
  tenantId: string | null
  pool: string
  pools: string[]
  expertLoad: { layers: number; experts: number; tokens: number[][]; balance: { cv: number | null }[] }
  routing: {
    tasks: { task: string; modality: string; requests: number }[]
    decisions: { pool: string; via: string; requests: number }[]
  }
  queues: { pool: string; live: number; async: number; batch: number; workers: number }[]
  workers: { id: string; models: { occupancy: number; layers: number }[] }[]
  speed: {
    tokensPerSecond: number
    ttft: { count: number; p50: number | null; p99: number | null }
    itl: { count: number; p50: number | null }
    perPool: { pool: string; tokens: number }[]
  }
  edge: {
    requests: number
    byRoute: { route: string; status: number; pool: string; cache: string; requests: number }[]
    cache: { hit: number; miss: number; hitRate: number | null }
    admission: { count: number; p50: number | null }
  }
  prefixCache: { available: boolean }
}

async function data(token: string, query = 'pool=code&window=15'): Promise<DashboardData> {
  const res = await fetch(`${stack.url}/dashboard/data?${query}`, {
    headers: { authorization: `Bearer ${token}` },
  })
  expect(res.status).toBe(200)
  return (await res.json()) as DashboardData
}

/** Polls the data until `ready` holds (the workers publish once a second). */
async function dataWhen(token: string, ready: (d: DashboardData) => boolean, query?: string) {
  const deadline = Date.now() + 30_000
  for (;;) {
    const d = await data(token, query)
    if (ready(d) || Date.now() > deadline) return d
    await new Promise((r) => setTimeout(r, 300))
  }
}

const total = (m: number[][]) => m.flat().reduce((a, b) => a + b, 0)

let tenant: TestTenant
let other: TestTenant
let client: OpenAI
let generated = 0
/** Requests per pool, as the x-moe-pool headers said. */
const pools: Record<string, number> = {}
/** Jobs that ran (every request but cache hits). */
let jobs = 0

beforeAll(async () => {
  tenant = await devTenant(stack)
  other = await devTenant(stack)
  client = new OpenAI({ apiKey: tenant.key, baseURL: `${stack.url}/v1`, maxRetries: 0, timeout: 120_000 })
  // A burst of code-like and prose-like requests, uncached, streamed and not.
  const prompts = [...CODE_PROMPTS, ...PROSE_PROMPTS, ...CODE_PROMPTS, ...PROSE_PROMPTS]
  await Promise.all(
    prompts.map(async (content, i) => {
      const { data: answer, response } = await client.chat.completions
        .create(
          { model: 'auto', max_tokens: 12, messages: [{ role: 'user', content }], seed: i },
          { headers: { 'cache-control': 'no-store' } },
        )
        .withResponse()
      const pool = response.headers.get('x-moe-pool')!
      pools[pool] = (pools[pool] ?? 0) + 1
      generated += answer.usage?.completion_tokens ?? 0
      jobs++
    }),
  )
  // The same deterministic request until the edge cache answers it (a miss, then a hit).
  const cached = {
    model: 'auto',
    max_tokens: 8,
    temperature: 0,
    messages: [{ role: 'user' as const, content: 'hello there! how are you today?' }],
  }
  for (let i = 0; i < 20; i++) {
    const { data: answer, response } = await client.chat.completions.create(cached).withResponse()
    if (response.headers.get('x-moe-cache') === 'HIT') break
    const pool = response.headers.get('x-moe-pool')!
    pools[pool] = (pools[pool] ?? 0) + 1
    generated += answer.usage?.completion_tokens ?? 0
    jobs++
    await new Promise((r) => setTimeout(r, 200))
  }
})

describe('dashboard data', () => {
  it('nothing without a session or a token: the page and its data answer 401', async () => {
    const page = await fetch(`${stack.url}/dashboard`)
    expect(page.status).toBe(401)
    expect(await page.text()).toContain('<form class="login" method="post" action="/dashboard/login">')
    for (const headers of [
      {},
      { authorization: 'Bearer sk-not-a-key' },
      { authorization: 'Bearer not-the-admin-token' },
      { cookie: 'moe_dashboard=admin.99999999999.forged' },
      { cookie: `moe_dashboard=tenant.${tenant.id}.${tenant.keyId}.99999999999.forged` },
    ]) {
      const res = await fetch(`${stack.url}/dashboard/data`, { headers })
      expect(res.status).toBe(401)
      expect(await res.json()).toMatchObject({ error: { code: 'invalid_api_key' } })
    }
    const login = await fetch(`${stack.url}/dashboard/login`, {
      method: 'POST',
      body: new URLSearchParams({ token: 'sk-wrong' }),
      redirect: 'manual',
    })
    expect(login.status).toBe(401)
    expect(login.headers.get('set-cookie')).toBeNull()
  })

  it("the tenant's view moves with its traffic: expert load, routing, speed, edge, cache", async () => {
    // The router sends code-like prompts to the code pool and prose to general (its default).
    expect(pools.code).toBeGreaterThanOrEqual(CODE_PROMPTS.length)
    expect(pools.general).toBeGreaterThanOrEqual(PROSE_PROMPTS.length)
    const d = await dataWhen(
      tenant.key,
      (x) => x.speed.ttft.count >= jobs && x.edge.cache.hit >= 1 && x.speed.perPool.some((p) => p.tokens > 0),
    )
    expect(d).toMatchObject({ scope: 'tenant', tenantId: tenant.id, pool: 'code' })
    // Expert load: the code pool's experts only, in every layer.
    expect(d.expertLoad).toMatchObject({ layers: 2, experts: 8 })
    for (const row of d.expertLoad.tokens)
      row.forEach((n, e) => {
        if (CODE_EXPERTS.includes(e)) expect(n, `expert ${e}`).toBeGreaterThan(0)
        else expect(n, `expert ${e}`).toBe(0)
      })
    expect(d.expertLoad.balance.every((b) => b.cv !== null)).toBe(true)
    // Routing: tasks and the router's decisions.
    expect(d.routing.tasks.reduce((s, t) => s + t.requests, 0)).toBe(jobs + d.edge.cache.hit)
    expect(d.routing.tasks.every((t) => t.modality === 'text')).toBe(true)
    expect(d.routing.decisions).toContainEqual({ pool: 'code', via: 'poolMap', requests: pools.code })
    const general = d.routing.decisions
      .filter((x) => x.pool === 'general')
      .reduce((s, x) => s + x.requests, 0)
    expect(general).toBe(pools.general! + d.edge.cache.hit)
    // Speed: every job's first token and the generated tokens.
    expect(d.speed.ttft.count).toBe(jobs)
    expect(d.speed.ttft.p50).not.toBeNull()
    expect(d.speed.itl.count).toBeGreaterThan(0)
    expect(d.speed.perPool.find((p) => p.pool === 'code')!.tokens).toBeGreaterThan(0)
    expect(d.speed.perPool.reduce((s, p) => s + p.tokens, 0)).toBeGreaterThanOrEqual(generated)
    expect(d.speed.tokensPerSecond).toBeGreaterThan(0)
    // Edge: requests by route, status, pool and cache; admission; the cache hit.
    const chats = d.edge.byRoute.filter((r) => r.route === 'POST /v1/chat/completions' && r.status === 200)
    expect(chats.filter((r) => r.pool === 'code').reduce((s, r) => s + r.requests, 0)).toBe(pools.code)
    expect(chats.reduce((s, r) => s + r.requests, 0)).toBe(jobs + d.edge.cache.hit)
    expect(d.edge.cache.hit).toBeGreaterThanOrEqual(1)
    expect(d.edge.cache.miss).toBeGreaterThanOrEqual(1)
    expect(d.edge.cache.hitRate).toBeGreaterThan(0)
    expect(d.edge.admission.count).toBe(jobs)
    // Queues and workers: every pool the tenant may use, and the stack's worker(s).
    expect(d.queues.map((q) => q.pool)).toEqual(['general', 'code', 'vision'])
    for (const q of d.queues) expect(q.workers).toBeGreaterThanOrEqual(1)
    expect(d.workers.length).toBeGreaterThanOrEqual(1)
    expect(d.prefixCache.available).toBe(false)
    // Prose went to the general pool, on experts outside the code subset too.
    const onGeneral = await data(tenant.key, 'pool=general&window=15')
    expect(
      onGeneral.expertLoad.tokens.some((row) => row.some((n, e) => !CODE_EXPERTS.includes(e) && n > 0)),
    ).toBe(true)
  })

  it('a tenant sees only its own traffic; the admin sees everyone', async () => {
    const mine = await data(tenant.key)
    const theirs = await data(other.key)
    expect(theirs).toMatchObject({ scope: 'tenant', tenantId: other.id })
    expect(total(theirs.expertLoad.tokens)).toBe(0)
    expect(theirs.speed.ttft.count).toBe(0)
    expect(theirs.edge.requests).toBe(0)
    const admin = await data(stack.adminToken)
    expect(admin.scope).toBe('admin')
    expect(total(admin.expertLoad.tokens)).toBeGreaterThanOrEqual(total(mine.expertLoad.tokens))
    expect(admin.edge.requests).toBeGreaterThanOrEqual(mine.edge.requests)
    // A tenant cannot ask for a pool it may not use.
    const restricted = await devTenant(stack, { allowedPools: ['code'], defaultPool: 'code', poolMap: {} })
    const res = await fetch(`${stack.url}/dashboard/data?pool=vision`, {
      headers: { authorization: `Bearer ${restricted.key}` },
    })
    expect(res.status).toBe(400)
    expect(await res.json()).toMatchObject({ error: { param: 'pool' } })
  })
})

describe('dashboard page in chromium', () => {
  let browser: Browser

  beforeAll(async () => {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run',
      ],
    })
  })
  afterAll(async () => {
    await browser?.close()
  })

  async function signIn(page: Page, token: string) {
    const first = await page.goto(`${stack.url}/dashboard`)
    expect(first?.status()).toBe(401)
    await page.fill('#token', token)
    await Promise.all([page.waitForURL(`${stack.url}/dashboard`), page.click('button[type=submit]')])
    await page.waitForSelector('body[data-loaded="true"]')
  }

  /** Heatmap cells as the page draws them, once the chosen pool's cells hold tokens. */
  async function heatmapOf(page: Page, pool: string) {
    await page.selectOption('#pool', pool)
    // The page polls: wait until it has drawn the chosen pool with tokens in it.
    const table = page.locator(`#heatmap[data-pool="${pool}"]`)
    await table.locator('td.cell:not([data-tokens="0"])').first().waitFor({ timeout: 30_000 })
    return table.locator('td.cell').evaluateAll((cells) =>
      cells.map((c) => ({
        layer: Number(c.getAttribute('data-layer')),
        expert: Number(c.getAttribute('data-expert')),
        tokens: Number(c.getAttribute('data-tokens')),
      })),
    )
  }

  it('renders live data behind a login: code-pool heatmap on the code experts only; a screenshot', async () => {
    const context = await browser.newContext({ viewport: { width: 1440, height: 1000 } })
    const page = await context.newPage()
    const errors: string[] = []
    page.on('pageerror', (e) => errors.push(String(e)))
    await signIn(page, tenant.key)
    const cookie = (await context.cookies()).find((c) => c.name === 'moe_dashboard')!
    expect(cookie).toMatchObject({ httpOnly: true, sameSite: 'Strict', path: '/dashboard' })
    expect(cookie.value).not.toContain(tenant.key)
    expect(await page.textContent('#viewer')).toBe(`tenant ${tenant.id}`)

    const cells = await heatmapOf(page, 'code')
    expect(cells).toHaveLength(2 * 8)
    for (const c of cells) {
      if (CODE_EXPERTS.includes(c.expert))
        expect(c.tokens, `layer ${c.layer} expert ${c.expert}`).toBeGreaterThan(0)
      else expect(c.tokens, `layer ${c.layer} expert ${c.expert}`).toBe(0)
    }
    // The other panels are drawn: queues per pool, the worker's batch, the charts, the edge cache.
    expect(await page.locator('#queues tbody tr').count()).toBe(3)
    expect(await page.locator('#workers tbody tr').count()).toBeGreaterThanOrEqual(1)
    expect(await page.locator('#chart-tokens canvas').count()).toBe(1)
    expect(await page.textContent('#edge-stats')).toMatch(/cache hit rate/)
    expect(await page.textContent('#prefix-cache')).toMatch(/not available/)

    // Signing out ends the session: the data answers 401 again.
    await Promise.all([page.waitForURL(`${stack.url}/dashboard`), page.click('header form button')])
    expect(await page.locator('form.login').count()).toBe(1)
    expect(errors).toEqual([])
    await context.close()
  })

  it('the admin view (the README screenshot)', async () => {
    const context = await browser.newContext({ viewport: { width: 1440, height: 1000 } })
    const page = await context.newPage()
    await signIn(page, stack.adminToken)
    expect(await page.textContent('#viewer')).toBe('admin: every tenant')
    await heatmapOf(page, 'code')
    // Let the tokens/s chart catch a point or two more before the picture is taken.
    await page.waitForTimeout(2500)
    mkdirSync(join(repoRoot, 'docs'), { recursive: true })
    await page.screenshot({ path: join(repoRoot, 'docs/dashboard.png'), fullPage: true })
    await context.close()
  })
})
