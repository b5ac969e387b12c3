import { OpenAI as LangChainOpenAI } from '@langchain/openai'
import OpenAI, { toFile } from 'openai'
import { beforeAll, describe, expect, inject, it } from 'vitest'
import { devTenant, type TestTenant } from '../src/stack.ts'

// OpenAI parity for sampling: logprobs, n > 1, prompt arrays, penalties and logit_bias, and
// files.list, through the official `openai` client and LangChain's text-completion class, against
// edge + worker + Redis. The stack serves the tiny byte-level model: byte b is token b + 3.

const stack = inject('stack')
const noStore = { headers: { 'cache-control': 'no-store' } }
const messages = [{ role: 'user' as const, content: 'Say hello to the experts.' }]
const VOCAB = 259
const tokenOf = (ch: string) => ch.charCodeAt(0) + 3
let tenant: TestTenant
let client: OpenAI

/** logit_bias that bans every token but `allowed`. */
function only(...allowed: string[]): Record<string, number> {
  const keep = new Set(allowed.map(tokenOf))
  const bias: Record<string, number> = {}
  for (let id = 0; id < VOCAB; id++) if (!keep.has(id)) bias[id] = -100
  return bias
}

const bytesText = (entries: Array<{ bytes: number[] | null }>) =>
  new TextDecoder().decode(new Uint8Array(entries.flatMap((e) => e.bytes ?? [])))

beforeAll(async () => {
  tenant = await devTenant(stack)
  client = new OpenAI({ apiKey: tenant.key, baseURL: `${stack.url}/v1`, maxRetries: 0, timeout: 120_000 })
})

describe('logprobs', () => {
  it('chat: one entry per token with bytes and top_logprobs, spelling the content, streamed alike', async () => {
    const params = {
      model: 'auto',
      messages,
      max_tokens: 16,
      temperature: 0,
      logprobs: true,
      top_logprobs: 3,
    }
    const res = await client.chat.completions.create(params, noStore)
    const choice = res.choices[0]!
    const content = choice.logprobs!.content!
    const eos = choice.finish_reason === 'stop' ? 1 : 0
    expect(content).toHaveLength(res.usage!.completion_tokens - eos)
    expect(bytesText(content)).toBe(choice.message.content)
    for (const e of content) {
      expect(e.logprob).toBeLessThanOrEqual(0)
      expect(e.top_logprobs).toHaveLength(3)
      const tops = e.top_logprobs.map((t) => t.logprob)
      expect(tops).toEqual([...tops].sort((a, b) => b - a))
      // Greedy: the sampled token is the most likely one.
      expect(e.logprob).toBeCloseTo(tops[0]!, 6)
    }
    const stream = await client.chat.completions.create({ ...params, stream: true }, noStore)
    const streamed: typeof content = []
    for await (const chunk of stream) streamed.push(...(chunk.choices[0]?.logprobs?.content ?? []))
    // The same tokens and alternatives; the logprobs agree to float noise (the second request may
    // reuse the first one's prompt KV from the prefix cache, a different summation order).
    const approx = (es: typeof content) =>
      es.map((e) => ({
        ...e,
        logprob: expect.closeTo(e.logprob, 4),
        top_logprobs: e.top_logprobs.map((t) => ({ ...t, logprob: expect.closeTo(t.logprob, 4) })),
      }))
    expect(streamed).toEqual(approx(content))
  })

  it('completions: the legacy tokens / token_logprobs / top_logprobs / text_offset shape', async () => {
    // ASCII only: a byte-level token holding part of a character has no string of its own (the
    // chat shape carries its bytes), so only then do the tokens spell the text exactly.
    const ascii = only(...'abcdefghijklmnopqrstuvwxyz ')
    const res = await client.completions.create(
      {
        model: 'auto',
        prompt: 'Once upon a time',
        max_tokens: 12,
        temperature: 0,
        logprobs: 2,
        logit_bias: ascii,
      },
      noStore,
    )
    const choice = res.choices[0]!
    const lp = choice.logprobs!
    expect(lp.tokens!.join('')).toBe(choice.text)
    expect(lp.token_logprobs).toHaveLength(lp.tokens!.length)
    // Up to logprobs + 1 entries: the sampled token is always listed.
    for (const [i, top] of lp.top_logprobs!.entries()) {
      expect(Object.keys(top).length).toBeLessThanOrEqual(3)
      expect(top[lp.tokens![i]!]).toBe(lp.token_logprobs![i])
    }
    let offset = 0
    for (const [i, token] of lp.tokens!.entries()) {
      expect(lp.text_offset![i]).toBe(offset)
      offset += token.length
    }
  })

  it('report the distribution after penalties: presence_penalty lowers a used token by exactly its value', async () => {
    // Only x and y may come; at step 2 the token of step 1 is down by presence_penalty in logit space.
    const base = {
      model: 'auto',
      messages,
      max_tokens: 2,
      temperature: 0,
      logprobs: true,
      top_logprobs: 2,
      logit_bias: only('x', 'y'),
    }
    const gapAtStep2 = async (extra: Record<string, unknown>) => {
      const res = await client.chat.completions.create({ ...base, ...extra }, noStore)
      const [first, second] = res.choices[0]!.logprobs!.content!
      const lp = (t: string) => second!.top_logprobs.find((x) => x.token === t)!.logprob
      return { first: first!.token, gap: lp(first!.token) - lp(first!.token === 'x' ? 'y' : 'x') }
    }
    const plain = await gapAtStep2({})
    const penalised = await gapAtStep2({ presence_penalty: 1.5 })
    expect(penalised.first).toBe(plain.first)
    expect(penalised.gap).toBeCloseTo(plain.gap - 1.5, 3)
  })
})

describe('logit_bias and penalties', () => {
  it('logit_bias -100 on every other token leaves only the allowed one', async () => {
    const res = await client.chat.completions.create(
      { model: 'auto', messages, max_tokens: 6, temperature: 1, seed: 3, logit_bias: only('x') },
      noStore,
    )
    expect(res.choices[0]!.message.content).toBe('xxxxxx')
    expect(res.choices[0]!.finish_reason).toBe('length')
  })

  it('frequency_penalty at 2 turns a forced repeat into alternation', async () => {
    // With only x and y allowed and both near, a strong frequency penalty forbids long runs.
    const res = await client.chat.completions.create(
      {
        model: 'auto',
        messages,
        max_tokens: 12,
        temperature: 0,
        frequency_penalty: 2,
        logit_bias: { ...only('x', 'y') },
      },
      noStore,
    )
    const text = res.choices[0]!.message.content!
    expect(text).toMatch(/^[xy]{12}$/)
    expect(text).toContain('x')
    expect(text).toContain('y')
  })

  it('refuses out-of-range values with a 400 naming the parameter', async () => {
    for (const [param, value] of [
      ['frequency_penalty', 3],
      ['presence_penalty', -2.5],
      ['min_p', 2],
      ['repetition_penalty', 0],
      ['n', 9],
    ] as const) {
      const err = await client.chat.completions
        .create({ model: 'auto', messages, max_tokens: 2, [param]: value } as never, noStore)
        .catch((e: unknown) => e as InstanceType<typeof OpenAI.APIError>)
      expect(err).toBeInstanceOf(OpenAI.APIError)
      expect((err as InstanceType<typeof OpenAI.APIError>).status).toBe(400)
      expect((err as InstanceType<typeof OpenAI.APIError>).param).toBe(param)
    }
  })
})

describe('n > 1', () => {
  it('chat: n choices with their own seeds; streamed chunks carry the index and usage totals them', async () => {
    const params = { model: 'auto', messages, max_tokens: 16, temperature: 1, seed: 99, n: 3 }
    const res = await client.chat.completions.create(params, noStore)
    expect(res.choices.map((c) => c.index)).toEqual([0, 1, 2])
    expect(new Set(res.choices.map((c) => c.message.content)).size).toBeGreaterThan(1)
    // Choice 0 is what n = 1 gives with the same seed.
    const single = await client.chat.completions.create({ ...params, n: 1 }, noStore)
    expect(res.choices[0]!.message.content).toBe(single.choices[0]!.message.content)
    expect(res.usage!.prompt_tokens).toBe(single.usage!.prompt_tokens)

    const stream = await client.chat.completions.create(
      { ...params, stream: true, stream_options: { include_usage: true } },
      noStore,
    )
    const texts = ['', '', '']
    const finishes: Array<string | null> = [null, null, null]
    let usage: OpenAI.CompletionUsage | undefined
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        texts[c.index] += c.delta.content ?? ''
        finishes[c.index] = c.finish_reason ?? finishes[c.index]!
      }
      if (chunk.usage) usage = chunk.usage
    }
    expect(texts).toEqual(res.choices.map((c) => c.message.content))
    expect(finishes).toEqual(res.choices.map((c) => c.finish_reason))
    expect(usage).toEqual(res.usage)
  })

  it('completions: prompts x n choices, indexed prompt-major', async () => {
    const prompts = ['Alpha', 'Beta']
    const res = await client.completions.create(
      { model: 'auto', prompt: prompts, max_tokens: 8, temperature: 0, n: 2 },
      noStore,
    )
    expect(res.choices.map((c) => c.index)).toEqual([0, 1, 2, 3])
    for (const [p, prompt] of prompts.entries()) {
      const alone = await client.completions.create(
        { model: 'auto', prompt, max_tokens: 8, temperature: 0 },
        noStore,
      )
      // Greedy: both choices of a prompt are its greedy answer.
      expect(res.choices[2 * p]!.text).toBe(alone.choices[0]!.text)
      expect(res.choices[2 * p + 1]!.text).toBe(alone.choices[0]!.text)
    }
  })

  it('a batch line with n = 2 and logprobs writes both choices to the output file, listed by files.list', async () => {
    const line = {
      custom_id: 'n2',
      method: 'POST',
      url: '/v1/chat/completions',
      body: { model: 'auto', messages, max_tokens: 4, n: 2, logprobs: true, seed: 3 },
    }
    const file = await client.files.create({
      file: await toFile(Buffer.from(JSON.stringify(line)), 'n2.jsonl'),
      purpose: 'batch',
    })
    let batch = await client.batches.create({
      input_file_id: file.id,
      endpoint: '/v1/chat/completions',
      completion_window: '24h',
    })
    const deadline = Date.now() + 120_000
    while (!['completed', 'failed', 'cancelled', 'expired'].includes(batch.status) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500))
      batch = await client.batches.retrieve(batch.id)
    }
    expect(batch.status).toBe('completed')
    const out = JSON.parse((await (await client.files.content(batch.output_file_id!)).text()).trim()) as {
      response: { body: OpenAI.ChatCompletion }
    }
    const choices = out.response.body.choices
    expect(choices.map((c) => c.index)).toEqual([0, 1])
    // Every token but an ending EOS has an entry: a choice that ran to max_tokens has 4.
    for (const c of choices) {
      expect(Array.isArray(c.logprobs?.content)).toBe(true)
      if (c.finish_reason === 'length') expect(c.logprobs!.content!).toHaveLength(4)
    }
    expect(choices.some((c) => (c.logprobs?.content?.length ?? 0) > 0)).toBe(true)

    const outputs = []
    for await (const f of client.files.list({ purpose: 'batch_output' })) outputs.push(f.id)
    expect(outputs).toContain(batch.output_file_id)
    const inputs = []
    for await (const f of client.files.list({ purpose: 'batch' })) inputs.push(f.id)
    expect(inputs).toContain(file.id)
    expect(inputs).not.toContain(batch.output_file_id)
  })
})

describe('files.list', () => {
  it('pages with limit and after, newest first or oldest first, and shows a tenant only its own files', async () => {
    const own = await devTenant(stack)
    const mine = new OpenAI({ apiKey: own.key, baseURL: `${stack.url}/v1`, maxRetries: 0 })
    const line = (i: number) =>
      JSON.stringify({
        custom_id: `f${i}`,
        method: 'POST',
        url: '/v1/completions',
        body: { model: 'auto', prompt: 'x', max_tokens: 1 },
      })
    const ids: string[] = []
    for (let i = 0; i < 3; i++) {
      const f = await mine.files.create({
        file: await toFile(Buffer.from(line(i)), `f${i}.jsonl`),
        purpose: 'batch',
      })
      ids.push(f.id)
      // created_at has one-second resolution: space the uploads so the order is theirs.
      await new Promise((r) => setTimeout(r, 1100))
    }
    const page = await mine.files.list({ limit: 2 })
    expect(page.data.map((f) => f.id)).toEqual([ids[2], ids[1]])
    expect(page.has_more).toBe(true)
    // The SDK's auto-pagination follows `after` to the end.
    const all = []
    for await (const f of mine.files.list({ limit: 1 })) all.push(f.id)
    expect(all).toEqual([...ids].reverse())
    const asc = await mine.files.list({ order: 'asc' })
    expect(asc.data.map((f) => f.id)).toEqual(ids)
    expect(asc.data[0]).toMatchObject({
      object: 'file',
      purpose: 'batch',
      filename: 'f0.jsonl',
      status: 'processed',
    })
    // Another tenant sees none of them.
    const theirs = []
    for await (const f of client.files.list()) theirs.push(f.id)
    for (const id of ids) expect(theirs).not.toContain(id)
    const bad = await fetch(`${stack.url}/v1/files?limit=0`, {
      headers: { authorization: `Bearer ${own.key}` },
    })
    expect(bad.status).toBe(400)
    expect(((await bad.json()) as { error: { param: string } }).error.param).toBe('limit')
  })
})

describe("LangChain's OpenAI text-completion class", () => {
  it('sends several prompts as one prompt array and gets one generation per prompt, in order', async () => {
    const llm = new LangChainOpenAI({
      model: 'auto',
      apiKey: tenant.key,
      configuration: { baseURL: `${stack.url}/v1`, defaultHeaders: noStore.headers },
      maxTokens: 8,
      temperature: 0,
      maxRetries: 0,
    })
    const prompts = ['Alpha', 'Beta', 'Gamma']
    const result = await llm.generate(prompts)
    expect(result.generations).toHaveLength(3)
    for (const [i, prompt] of prompts.entries()) {
      const alone = await client.completions.create(
        { model: 'auto', prompt, max_tokens: 8, temperature: 0 },
        noStore,
      )
      expect(result.generations[i]![0]!.text).toBe(alone.choices[0]!.text)
    }
  })
})
