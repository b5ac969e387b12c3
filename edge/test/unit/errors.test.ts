import { MoeError } from '@moe/shared'
import { describe, expect, it } from 'vitest'
import { app } from '../../src/app.ts'
import { createApiKey, forgetAuthCache, kvTenant } from '../../src/auth.ts'
import { EdgeError } from '../../src/http.ts'
import { chunkObject, completionObject, openAiFinishReason } from '../../src/openai-format.ts'
import { parseJson, validateBody } from '../../src/validate.ts'
import { MemoryKV } from './memory-kv.ts'

function thrown(f: () => unknown): MoeError {
  try {
    f()
  } catch (e) {
    return e as MoeError
  }
  throw new Error('did not throw')
}

const chat = { model: 'auto', messages: [{ role: 'user', content: 'hi' }] }

describe('request validation and error mapping', () => {
  it('names unsupported OpenAI parameters in a 400', () => {
    const e = thrown(() => validateBody('chat', { ...chat, functions: [{}], audio: { voice: 'x' } }))
    expect(e.status).toBe(400)
    expect(e.code).toBe('unsupported_parameter')
    expect(e.message).toContain('functions')
    expect(e.message).toContain('audio')
    expect(e.param).toBe('functions')
    const n = thrown(() => validateBody('chat', { ...chat, n: 9 }))
    expect(n.param).toBe('n')
    expect(n.message).toContain('at most 8')
    expect(validateBody('chat', { ...chat, n: 1, functions: null }).n).toBe(1)
  })

  it('accepts the neutral defaults clients send on every request, and still refuses real asks', () => {
    const defaults = {
      ...chat,
      frequency_penalty: 0,
      presence_penalty: 0,
      response_format: { type: 'text' },
      tools: [],
      tool_choice: 'auto',
      parallel_tool_calls: false,
      logprobs: false,
      logit_bias: {},
      store: false,
      service_tier: 'auto',
    }
    const ok = validateBody('chat', defaults)
    expect(ok.messages).toEqual(chat.messages)
    expect(validateBody('completion', { model: 'auto', prompt: 'x', echo: false, best_of: 1 }).prompt).toBe(
      'x',
    )
    for (const [k, v] of [
      ['echo', true],
      ['store', true],
      ['service_tier', 'flex'],
    ] as const) {
      const e = thrown(() => validateBody('chat', { ...defaults, [k]: v }))
      expect(e.code).toBe('unsupported_parameter')
      expect(e.param).toBe(k)
    }
  })

  it('says what is wrong with stop and with null content, instead of "Invalid input"', () => {
    const five = thrown(() => validateBody('chat', { ...chat, stop: ['a', 'b', 'c', 'd', 'e'] }))
    expect(five.message).toContain('at most 4')
    expect(five.param).toBe('stop')
    const history = {
      ...chat,
      messages: [
        { role: 'user', content: 'hi' },
        { role: 'assistant', content: null },
        { role: 'user', content: 'again' },
      ],
    }
    expect(validateBody('chat', history).messages[1]).toEqual({ role: 'assistant', content: '' })
    const user = thrown(() => validateBody('chat', { ...chat, messages: [{ role: 'user', content: null }] }))
    expect(user.message).toContain('content may be null only in an assistant message')
  })

  it('rejects unknown fields and bad values with the offending param', () => {
    const unknown = thrown(() => validateBody('chat', { ...chat, frobnicate: 1 }))
    expect(unknown.message).toBe('Unrecognized request argument supplied: frobnicate')
    const bad = thrown(() => validateBody('chat', { ...chat, messages: [{ role: 'robot', content: 'x' }] }))
    expect(bad.code).toBe('invalid_request')
    expect(bad.param).toBe('messages.0.role')
    expect(thrown(() => validateBody('completion', { model: 'auto' })).param).toBe('prompt')
    expect(thrown(() => validateBody('chat', [1])).status).toBe(400)
  })

  it('maps invalid JSON to 400 invalid_json', () => {
    const e = thrown(() => parseJson('{"model":'))
    expect(e.status).toBe(400)
    expect(e.code).toBe('invalid_json')
  })

  it('renders errors in the OpenAI shape with the right status and headers', () => {
    const e = new EdgeError('rate_limited', 'slow down', null, { 'retry-after': '7' })
    expect(e.status).toBe(429)
    expect(e.toBody()).toEqual({
      error: { message: 'slow down', type: 'rate_limit_error', param: null, code: 'rate_limited' },
    })
    expect(new MoeError('pool_not_allowed', 'no').status).toBe(403)
    expect(new MoeError('overloaded', 'busy').status).toBe(503)
    expect(new MoeError('payload_too_large', 'big').status).toBe(413)
    expect(new MoeError('unsupported_media_type', 'xml').status).toBe(415)
  })
})

describe('the Hono app (no Redis needed for these paths)', async () => {
  forgetAuthCache()
  const kv = new MemoryKV()
  await kv.put(
    kvTenant('u1'),
    JSON.stringify({ id: 'u1', name: 'u', allowedPools: ['general'], defaultPool: 'general' }),
  )
  const { key } = await createApiKey(kv as unknown as KVNamespace, 'u1', 'unit', null)
  const env = { ENVIRONMENT: 'test', REDIS_URL: 'redis://127.0.0.1:1', MAX_BODY_BYTES: '1000', AUTH: kv }
  const post = (path: string, body: string, headers: Record<string, string> = {}) =>
    app.request(
      path,
      {
        method: 'POST',
        body,
        headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', ...headers },
      },
      env,
    )

  it('gives every response a request id, errors included', async () => {
    const res = await app.request('/v1/nope', {}, env)
    expect(res.status).toBe(404)
    expect(res.headers.get('x-request-id')).toMatch(/^req_[A-Za-z0-9]{24}$/)
  })

  it('never takes the client request id as its own', async () => {
    const res = await app.request('/healthz', { headers: { 'x-request-id': 'req_mine' } }, env)
    expect(res.headers.get('x-request-id')).not.toBe('req_mine')
  })

  it('answers 401, 415, 413 and 400 before touching Redis', async () => {
    expect((await app.request('/v1/models', {}, env)).status).toBe(401)
    expect(
      (await post('/v1/chat/completions', JSON.stringify(chat), { 'content-type': 'text/plain' })).status,
    ).toBe(415)
    expect(
      (await post('/v1/chat/completions', JSON.stringify({ ...chat, pad: 'x'.repeat(2000) }))).status,
    ).toBe(413)
    expect((await post('/v1/chat/completions', '{oops')).status).toBe(400)
    const r = await post(
      '/v1/route',
      JSON.stringify({ messages: [{ role: 'user', content: 'fix this python bug' }] }),
    )
    // Code prompt, but this tenant maps nothing: its default pool.
    expect(r.status).toBe(200)
    expect(await r.json()).toMatchObject({ task: 'code', pool: 'general', pool_via: 'default' })
    expect(r.headers.get('x-moe-pool')).toBe('general')
  })

  it('a Redis at maxmemory (OOM) is a 503 with Retry-After, not a 500', async () => {
    const oom = new Error("OOM command not allowed when used memory > 'maxmemory'.")
    const admission = { admit: () => Promise.reject(oom) }
    const withDo = {
      ...env,
      TENANT_ADMISSION: { idFromName: (n: string) => n, get: () => admission },
    }
    const res = await app.request(
      '/v1/chat/completions',
      {
        method: 'POST',
        body: JSON.stringify({ ...chat, temperature: 0.7 }),
        headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      },
      withDo,
    )
    expect(res.status).toBe(503)
    expect(res.headers.get('retry-after')).not.toBeNull()
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('overloaded')
  })
})

describe('finish reasons clients can type', () => {
  it('reports a cancelled job as "stop" with moe.cancelled, never "cancelled"', () => {
    const answer = {
      text: 'x',
      finishReason: 'cancelled' as const,
      usage: { promptTokens: 1, completionTokens: 1 },
    }
    const moe = { request_id: 'r', pool: 'p', task: 't', modality: 'text', cache: 'BYPASS' as const }
    const chatObj = completionObject('chat', 'id', 1, 'm', answer, moe) as {
      choices: Array<{ finish_reason: string }>
      moe: { cancelled?: boolean }
    }
    expect(chatObj.choices[0]!.finish_reason).toBe('stop')
    expect(chatObj.moe.cancelled).toBe(true)
    const chunk = chunkObject('completion', 'id', 1, 'm', { finishReason: 'cancelled' }, false) as {
      choices: Array<{ finish_reason: string }>
    }
    expect(chunk.choices[0]!.finish_reason).toBe('stop')
    expect(openAiFinishReason('length')).toBe('length')
    const finished = completionObject('chat', 'id', 1, 'm', { ...answer, finishReason: 'stop' }, moe) as {
      moe: { cancelled?: boolean }
    }
    expect(finished.moe.cancelled).toBeUndefined()
  })
})
