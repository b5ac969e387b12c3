import OpenAI from 'openai'
import type { ResponseStreamEvent } from 'openai/resources/responses/responses'
import { beforeAll, describe, expect, inject, it } from 'vitest'
import { devTenant, type TestTenant } from '../src/stack.ts'

// POST /v1/responses through the official `openai` client, and vLLM's /tokenize and /detokenize
// with fetch, against edge + worker + Redis (the tiny byte-level model).

const stack = inject('stack')
const noStore = { headers: { 'cache-control': 'no-store' } }
let tenant: TestTenant
let client: OpenAI

beforeAll(async () => {
  tenant = await devTenant(stack)
  client = new OpenAI({ apiKey: tenant.key, baseURL: `${stack.url}/v1`, maxRetries: 0, timeout: 120_000 })
})

describe('responses.create', () => {
  it('answers a response object whose output_text is the chat answer to the same prompt', async () => {
    const res = await client.responses.create(
      {
        model: 'auto',
        instructions: 'Be brief.',
        input: 'Say hello.',
        max_output_tokens: 12,
        temperature: 0,
      },
      noStore,
    )
    expect(res.object).toBe('response')
    expect(res.id).toMatch(/^resp_/)
    expect(['completed', 'incomplete']).toContain(res.status)
    const message = res.output[0]!
    expect(message).toMatchObject({ type: 'message', role: 'assistant' })
    const part = (message as { content: Array<{ type: string; text: string; annotations: unknown[] }> })
      .content[0]!
    expect(part).toMatchObject({ type: 'output_text', annotations: [] })
    expect(res.output_text).toBe(part.text)
    expect(res.usage!.total_tokens).toBe(res.usage!.input_tokens + res.usage!.output_tokens)
    if (res.status === 'incomplete') {
      expect(res.incomplete_details).toEqual({ reason: 'max_output_tokens' })
      expect(res.usage!.output_tokens).toBe(12)
    }
    const chat = await client.chat.completions.create(
      {
        model: 'auto',
        messages: [
          { role: 'system', content: 'Be brief.' },
          { role: 'user', content: 'Say hello.' },
        ],
        max_tokens: 12,
        temperature: 0,
      },
      noStore,
    )
    expect(res.output_text).toBe(chat.choices[0]!.message.content)
  })

  it('cut by max_output_tokens: status incomplete with the reason', async () => {
    const res = await client.responses.create(
      {
        model: 'auto',
        input: [{ role: 'user', content: [{ type: 'input_text', text: 'Tell a long story.' }] }],
        max_output_tokens: 1,
        temperature: 0,
      },
      noStore,
    )
    // One token may be EOS (then the answer is complete); otherwise the limit cut it.
    if (res.usage!.output_tokens === 1 && res.output_text !== '') {
      expect(res.status).toBe('incomplete')
      expect(res.incomplete_details).toEqual({ reason: 'max_output_tokens' })
    }
  })

  it('streams the Responses events in order, numbered, spelling the same text', async () => {
    const params = { model: 'auto', input: 'Say hello.', max_output_tokens: 12, temperature: 0 }
    const plain = await client.responses.create(params, noStore)
    const stream = await client.responses.create({ ...params, stream: true }, noStore)
    const events: ResponseStreamEvent[] = []
    for await (const ev of stream) events.push(ev)
    const types = events.map((e) => e.type)
    const last = plain.status === 'incomplete' ? 'response.incomplete' : 'response.completed'
    expect(types.slice(0, 4)).toEqual([
      'response.created',
      'response.in_progress',
      'response.output_item.added',
      'response.content_part.added',
    ])
    expect(types.slice(-4)).toEqual([
      'response.output_text.done',
      'response.content_part.done',
      'response.output_item.done',
      last,
    ])
    expect(new Set(types.slice(4, -4))).toEqual(new Set(['response.output_text.delta']))
    expect(events.map((e) => e.sequence_number)).toEqual(events.map((_, i) => i))
    const deltas = events.flatMap((e) => (e.type === 'response.output_text.delta' ? [e.delta] : []))
    expect(deltas.join('')).toBe(plain.output_text)
    const done = events.find((e) => e.type === 'response.output_text.done')
    expect(done && 'text' in done && done.text).toBe(plain.output_text)
    const final = events.at(-1) as { response: { status: string; usage: unknown; output: unknown[] } }
    expect(final.response.status).toBe(plain.status)
    expect(final.response.usage).toEqual(plain.usage)
    expect(final.response.output).toEqual(plain.output.map((o) => ({ ...o, id: expect.any(String) })))
  })

  it('text.format json_schema: the output parses and fits the schema', async () => {
    const res = await client.responses.create(
      {
        model: 'auto',
        input: 'Name a color.',
        max_output_tokens: 64,
        temperature: 1,
        text: {
          format: {
            type: 'json_schema',
            name: 'color',
            strict: true,
            schema: {
              type: 'object',
              properties: { color: { type: 'string', enum: ['red', 'green', 'blue'] } },
              required: ['color'],
              additionalProperties: false,
            },
          },
        },
      },
      noStore,
    )
    expect(res.status).toBe('completed')
    expect(['red', 'green', 'blue']).toContain((JSON.parse(res.output_text) as { color: string }).color)
  })

  it('refuses previous_response_id with a 400 naming it', async () => {
    const err = await client.responses
      .create({ model: 'auto', input: 'hi', previous_response_id: 'resp_abc' })
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(OpenAI.BadRequestError)
    expect((err as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('previous_response_id')
  })
})

describe('tokenize and detokenize', () => {
  const post = async (path: string, body: unknown) => {
    const res = await fetch(`${stack.url}${path}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${tenant.key}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    })
    return { status: res.status, body: (await res.json()) as Record<string, unknown> }
  }

  it('round-trips text: detokenize(tokenize(x)) == x, special tokens and all', async () => {
    for (const text of ['Hello, experts!', 'Ünïcödé ✓ 你好 🙂', '</s> is only text here']) {
      for (const add_special_tokens of [true, false]) {
        const tok = await post('/tokenize', { model: 'auto', prompt: text, add_special_tokens })
        expect(tok.status).toBe(200)
        const tokens = tok.body.tokens as number[]
        expect(tok.body.count).toBe(tokens.length)
        expect(tok.body.max_model_len).toBeGreaterThan(0)
        const detok = await post('/detokenize', { model: 'auto', tokens })
        expect(detok).toEqual({ status: 200, body: { prompt: text } })
      }
    }
  })

  it('detokenizes no tokens as empty text', async () => {
    expect(await post('/detokenize', { model: 'auto', tokens: [] })).toEqual({
      status: 200,
      body: { prompt: '' },
    })
  })

  it('counts a chat as the chat path counts its prompt', async () => {
    const messages = [{ role: 'user', content: 'Say hello.' }]
    const withPrompt = await post('/tokenize', { model: 'auto', messages })
    const without = await post('/tokenize', { model: 'auto', messages, add_generation_prompt: false })
    expect(withPrompt.status).toBe(200)
    expect(without.status).toBe(200)
    // The tiny model's template answers right after [/INST]: its generation prompt adds nothing.
    expect(withPrompt.body.count as number).toBeGreaterThanOrEqual(without.body.count as number)
    // The chat path's own count of the same prompt.
    const chat = await client.chat.completions.create(
      { model: 'auto', messages: [{ role: 'user', content: 'Say hello.' }], max_tokens: 1 },
      noStore,
    )
    expect(withPrompt.body.count).toBe(chat.usage!.prompt_tokens)
  })

  it('answers clear 400s', async () => {
    const bad = await post('/detokenize', { model: 'auto', tokens: [1, -2] })
    expect(bad.status).toBe(400)
    expect(bad.body).toMatchObject({ error: { param: 'tokens.1' } })
    const huge = await post('/detokenize', { model: 'auto', tokens: [10_000_000] })
    expect(huge.status).toBe(400)
    expect(JSON.stringify(huge.body)).toContain('vocabulary')
    const unknown = await post('/tokenize', { model: 'auto', prompt: 'x', return_token_strs: true })
    expect(unknown.status).toBe(400)
    expect(unknown.body).toMatchObject({ error: { param: 'return_token_strs' } })
  })
})
