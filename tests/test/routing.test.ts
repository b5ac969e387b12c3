import OpenAI from 'openai'
import { beforeAll, describe, expect, inject, it } from 'vitest'
import { devTenant, devTenantConfig, type TestTenant } from '../src/stack.ts'

// The router sends each request to the pool the tenant's config names, and the worker runs it on
// that pool's experts only (the `moe` object: pool, task, expert_load, allowed_experts).

const stack = inject('stack')
const noStore = { headers: { 'cache-control': 'no-store' } }
const POOL_EXPERTS: Record<string, number[] | null> = {
  general: null,
  code: [0, 1, 5, 6],
  vision: [2, 3, 4, 7],
}

interface Moe {
  pool: string
  task: string
  modality: string
  expert_load: number[]
  allowed_experts: number[] | null
}

type Params = OpenAI.ChatCompletionCreateParamsNonStreaming

async function run(client: OpenAI, params: Omit<Params, 'model'> & { model?: string }) {
  const { data, response } = await client.chat.completions
    .create({ model: 'auto', max_tokens: 8, ...params } as Params, noStore)
    .withResponse()
  const moe = (data as unknown as { moe: Moe }).moe
  expect(response.headers.get('x-moe-pool')).toBe(moe.pool)
  expect(response.headers.get('x-moe-task')).toBe(moe.task)
  return moe
}

/** Tokens went only to the pool's experts. */
function expectExperts(moe: Moe, allowed: number[] | null) {
  expect(moe.allowed_experts).toEqual(allowed)
  expect(moe.expert_load.reduce((a, b) => a + b, 0)).toBeGreaterThan(0)
  if (allowed === null) return
  moe.expert_load.forEach((n, e) => {
    if (!allowed.includes(e)) expect(n, `expert ${e} outside ${allowed}`).toBe(0)
  })
}

const text = (content: string) => [{ role: 'user' as const, content }]

describe('dev tenant (infra/config/tenants.dev.json)', () => {
  let client: OpenAI
  const cfg = devTenantConfig()
  beforeAll(async () => {
    const t = await devTenant(stack)
    client = new OpenAI({ apiKey: t.key, baseURL: `${stack.url}/v1`, maxRetries: 0, timeout: 120_000 })
  })

  it('a code prompt reaches the code pool, on its experts', async () => {
    const moe = await run(client, {
      messages: text('write a python function that reverses a linked list and fix this bug in my code'),
    })
    expect(moe.task).toBe('code')
    expect(moe.pool).toBe(cfg.poolMap.code)
    expectExperts(moe, POOL_EXPERTS[moe.pool]!)
  })

  it('a math prompt reaches the pool mapped for math', async () => {
    const moe = await run(client, { messages: text('solve the quadratic equation x^2 - 5x + 6 = 0 for x') })
    expect(moe.task).toBe('math')
    expect(moe.pool).toBe(cfg.poolMap.math)
    expectExperts(moe, POOL_EXPERTS[moe.pool]!)
  })

  it('an image request is refused with a 400 that says so (no pool here reads images)', async () => {
    const err = await client.chat.completions
      .create({
        model: 'auto',
        max_tokens: 4,
        messages: [
          {
            role: 'user',
            content: [
              { type: 'text', text: 'What is in this picture?' },
              { type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=' } },
            ],
          },
        ],
      })
      .then(
        () => null,
        (e: unknown) => e,
      )
    expect(err).toBeInstanceOf(OpenAI.BadRequestError)
    expect((err as InstanceType<typeof OpenAI.BadRequestError>).message).toMatch(/can read them/)
  })

  it('small talk falls to the default pool, on all experts', async () => {
    const moe = await run(client, { messages: text('hello there! how was your weekend?') })
    expect(moe.task).toBe('chat')
    expect(moe.pool).toBe(cfg.defaultPool)
    expectExperts(moe, POOL_EXPERTS[cfg.defaultPool]!)
  })
})

describe('a tenant with a custom route and restricted pools', () => {
  let client: OpenAI
  let tenant: TestTenant
  beforeAll(async () => {
    tenant = await devTenant(stack, {
      allowedPools: ['code', 'vision'],
      defaultPool: 'code',
      poolMap: { legal: 'vision' },
      routes: [
        {
          task: 'legal',
          utterances: [
            'draft an indemnification clause for this contract',
            'review this non-disclosure agreement for risks',
            'is this lease agreement enforceable',
            'summarise the liability terms of the contract',
          ],
        },
      ],
    })
    client = new OpenAI({ apiKey: tenant.key, baseURL: `${stack.url}/v1`, maxRetries: 0, timeout: 120_000 })
  })

  it('its custom route picks its task and pool, and only that pool’s experts run', async () => {
    const moe = await run(client, {
      messages: text('please review this non-disclosure agreement and the indemnification clause'),
    })
    expect(moe.task).toBe('legal')
    expect(moe.pool).toBe('vision')
    expectExperts(moe, POOL_EXPERTS.vision!)
  })

  it('other prompts go to its default pool (code experts), never to general', async () => {
    const moe = await run(client, { messages: text('hello there! how was your weekend?') })
    expect(moe.pool).toBe('code')
    expectExperts(moe, POOL_EXPERTS.code!)
  })

  it('the dry-run router agrees', async () => {
    const res = await client.post<{ task: string; pool: string }>('/route', {
      body: { messages: text('is this lease agreement enforceable') },
    })
    expect(res).toMatchObject({ task: 'legal', pool: 'vision' })
  })

  it('a pool outside its allowed pools is refused (403), and not listed', async () => {
    const err = await client.chat.completions
      .create({ model: 'general', messages: text('hi'), max_tokens: 4 })
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(OpenAI.PermissionDeniedError)
    expect((err as { code?: string }).code).toBe('pool_not_allowed')
    const ids = []
    for await (const m of client.models.list()) ids.push(m.id)
    expect(ids).not.toContain('general')
    expect(ids).toEqual(expect.arrayContaining(['auto', 'code', 'vision']))
  })
})
