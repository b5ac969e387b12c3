import { describe, expect, it } from 'vitest'
import { app } from '../../src/app.ts'
import { createApiKey, forgetAuthCache, kvTenant } from '../../src/auth.ts'
import { type ResponseFrame, responsesEvents } from '../../src/responses/index.ts'
import { chatRequestOf, parseResponsesRequest } from '../../src/responses/request.ts'
import { MemoryKV } from './memory-kv.ts'

// POST /v1/responses: what it accepts and refuses, how it becomes a chat request, and how a chat
// chunk stream becomes the Responses event sequence (no Redis needed).

describe('Responses requests', async () => {
  forgetAuthCache()
  const kv = new MemoryKV()
  await kv.put(
    kvTenant('rs1'),
    JSON.stringify({ id: 'rs1', name: 'r', allowedPools: ['general'], defaultPool: 'general' }),
  )
  const { key } = await createApiKey(kv as unknown as KVNamespace, 'rs1', 'unit', null)
  const env = { ENVIRONMENT: 'test', REDIS_URL: 'redis://127.0.0.1:1', MAX_BODY_BYTES: '100000', AUTH: kv }
  const post = (body: unknown) =>
    app.request(
      '/v1/responses',
      {
        method: 'POST',
        headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      },
      env,
    )

  it('refuses what is not supported with a 400 naming the parameter', async () => {
    for (const [param, value] of [
      ['previous_response_id', 'resp_1'],
      ['store', true],
      ['background', true],
      ['tools', [{ type: 'web_search' }]],
      ['include', ['file_search_call.results']],
      ['truncation', 'auto'],
    ] as const) {
      const res = await post({ model: 'auto', input: 'hi', [param]: value })
      expect(res.status, param).toBe(400)
      const body = (await res.json()) as { error: { code: string; param: string; message: string } }
      expect(body.error).toMatchObject({ code: 'unsupported_parameter', param })
      expect(body.error.message).toContain(param)
    }
    const unknown = await post({ model: 'auto', input: 'hi', frequency_penalty: 1 })
    expect(unknown.status).toBe(400)
    expect(await unknown.json()).toMatchObject({ error: { param: 'frequency_penalty' } })
  })

  it('names the Responses parameter in errors the chat path raises', async () => {
    const res = await post({ model: 'auto', input: 'hi', max_output_tokens: 10_000_000 })
    expect(res.status).toBe(400)
    const body = (await res.json()) as { error: { param: string; message: string } }
    expect(body.error.param).toBe('max_output_tokens')
    expect(body.error.message).toContain('max_output_tokens is too large')
    const schema = await post({
      model: 'auto',
      input: 'hi',
      text: { format: { type: 'json_schema', name: 'x', schema: { type: 'object', patternProperties: {} } } },
    })
    expect(schema.status).toBe(400)
    expect(await schema.json()).toMatchObject({ error: { param: 'text.format' } })
  })

  it('names the input item it cannot read', async () => {
    const image = await post({
      model: 'auto',
      input: [{ role: 'user', content: [{ type: 'input_image', image_url: 'https://x/y.png' }] }],
    })
    expect(image.status).toBe(400)
    expect(await image.json()).toMatchObject({ error: { param: 'input.0.content' } })
    const call = await post({
      model: 'auto',
      input: [{ type: 'function_call_output', call_id: 'c', output: '1' }],
    })
    expect(call.status).toBe(400)
    expect(await call.json()).toMatchObject({ error: { param: 'input.0.type' } })
    const noInput = await post({ model: 'auto' })
    expect(await noInput.json()).toMatchObject({ error: { param: 'input' } })
  })

  it('accepts the neutral values SDKs send, and becomes the chat request it runs as', () => {
    const req = parseResponsesRequest({
      model: 'auto',
      instructions: 'Be brief.',
      input: [
        { role: 'user', content: 'Hi' },
        {
          type: 'message',
          role: 'assistant',
          id: 'msg_1',
          status: 'completed',
          content: [{ type: 'output_text', text: 'Hello', annotations: [] }],
        },
        {
          role: 'developer',
          content: [
            { type: 'input_text', text: 'More' },
            { type: 'input_text', text: '!' },
          ],
        },
      ],
      max_output_tokens: 7,
      temperature: 0,
      stream: true,
      store: false,
      tools: [],
      tool_choice: 'auto',
      truncation: 'disabled',
      reasoning: { effort: null },
      text: { format: { type: 'json_schema', name: 'x', schema: { type: 'object' }, strict: true } },
    })
    expect(chatRequestOf(req)).toEqual({
      model: 'auto',
      messages: [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'Hi' },
        { role: 'assistant', content: 'Hello' },
        { role: 'developer', content: 'More!' },
      ],
      max_completion_tokens: 7,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
      response_format: {
        type: 'json_schema',
        json_schema: { name: 'x', schema: { type: 'object' }, strict: true },
      },
    })
  })
})

const chunk = (delta: Record<string, unknown>, finish: string | null = null) =>
  `data: ${JSON.stringify({ object: 'chat.completion.chunk', model: 'moe-demo', choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`

async function events(chatSse: string[]): Promise<Array<Record<string, unknown>>> {
  const frame: ResponseFrame = {
    id: 'resp_x',
    itemId: 'msg_x',
    createdAt: 1,
    model: 'auto',
    req: parseResponsesRequest({ model: 'auto', input: 'hi', max_output_tokens: 2 }),
  }
  const enc = new TextEncoder()
  const source = new ReadableStream<Uint8Array>({
    start(ctl) {
      // Split mid-frame: the reshaper must buffer partial frames.
      for (const s of chatSse) for (const half of [s.slice(0, 5), s.slice(5)]) ctl.enqueue(enc.encode(half))
      ctl.close()
    },
  })
  const text = await new Response(source.pipeThrough(responsesEvents(frame))).text()
  return text
    .split('\n\n')
    .filter((f) => f.startsWith('event:'))
    .map((f) => {
      const [ev, data] = f.split('\n')
      const parsed = JSON.parse(data!.slice(6)) as Record<string, unknown>
      expect(ev).toBe(`event: ${parsed.type}`)
      return parsed
    })
}

describe('Responses streaming events', () => {
  it('reshapes a chat stream into the Responses event sequence, numbered', async () => {
    const usage = { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 }
    const evs = await events([
      ': queued\n\n',
      chunk({ role: 'assistant', content: '' }),
      chunk({ content: 'He' }),
      chunk({ content: 'llo' }),
      chunk({}, 'length'),
      `data: ${JSON.stringify({ choices: [], usage })}\n\n`,
      'data: [DONE]\n\n',
    ])
    expect(evs.map((e) => e.type)).toEqual([
      'response.created',
      'response.in_progress',
      'response.output_item.added',
      'response.content_part.added',
      'response.output_text.delta',
      'response.output_text.delta',
      'response.output_text.done',
      'response.content_part.done',
      'response.output_item.done',
      'response.incomplete',
    ])
    expect(evs.map((e) => e.sequence_number)).toEqual(evs.map((_, i) => i))
    expect(evs[6]).toMatchObject({ text: 'Hello', item_id: 'msg_x' })
    const final = evs.at(-1)!.response as Record<string, unknown>
    expect(final).toMatchObject({
      id: 'resp_x',
      object: 'response',
      model: 'moe-demo',
      status: 'incomplete',
      incomplete_details: { reason: 'max_output_tokens' },
      output: [
        {
          type: 'message',
          role: 'assistant',
          content: [{ type: 'output_text', text: 'Hello', annotations: [] }],
        },
      ],
      usage: { input_tokens: 3, output_tokens: 2, total_tokens: 5 },
    })
  })

  it('ends with error and response.failed when the job fails', async () => {
    const evs = await events([
      chunk({ content: 'a' }),
      `data: ${JSON.stringify({ error: { message: 'boom', code: 'internal_error', param: null } })}\n\n`,
    ])
    expect(evs.map((e) => e.type).slice(-2)).toEqual(['error', 'response.failed'])
    expect(evs.at(-2)).toMatchObject({ code: 'internal_error', message: 'boom' })
    expect(evs.at(-1)).toMatchObject({ response: { status: 'failed', error: { message: 'boom' } } })
  })
})
