import { type ExpertPool, JobPayload, type MoeError } from '@moe/shared'
import { Hono } from 'hono'
import { describe, expect, it } from 'vitest'
import type { CachedAnswer } from '../../src/cache.ts'
import { canonicalRequest } from '../../src/cache.ts'
import { replaySse } from '../../src/completions/relay.ts'
import { effectiveSampling, inputOf, jobPayload, tokenCostOf } from '../../src/completions/submit.ts'
import { completionObject, type MoeSummary } from '../../src/openai-format.ts'
import { validateBody } from '../../src/validate.ts'

// n, prompt arrays, penalties, logit_bias, min_p and logprobs: validated at the edge with clear
// 400s, carried in the job payload, and answered in OpenAI's shapes.

function thrown(f: () => unknown): MoeError {
  try {
    f()
  } catch (e) {
    return e as MoeError
  }
  throw new Error('did not throw')
}

const chat = { model: 'auto', messages: [{ role: 'user', content: 'hi' }] }
const pool = { name: 'general', modelId: 'm', maxTokensLimit: 512 } as ExpertPool
const moe = { request_id: 'r', pool: 'general', task: 't', modality: 'text', cache: 'MISS' } as MoeSummary

describe('sampling parameters at the edge', () => {
  it('accepts the OpenAI and vLLM ranges and puts them in the job payload', () => {
    const req = validateBody('chat', {
      ...chat,
      presence_penalty: 1.5,
      frequency_penalty: -0.5,
      repetition_penalty: 1.1,
      min_p: 0.05,
      logit_bias: { '50256': -100, '7': 3 },
      logprobs: true,
      top_logprobs: 3,
      n: 2,
    })
    const sampling = effectiveSampling({ req, pool })
    expect(sampling).toMatchObject({
      presencePenalty: 1.5,
      frequencyPenalty: -0.5,
      repetitionPenalty: 1.1,
      minP: 0.05,
      logitBias: { '50256': -100, '7': 3 },
      logprobs: 3,
      n: 2,
    })
    const payload = jobPayload('job-1', 't', { req, pool, sampling }, 1, 2, 'live')
    expect(JobPayload.parse(payload).sampling).toMatchObject({ n: 2, logprobs: 3, minP: 0.05 })
  })

  it('leaves neutral values out, so they change neither the payload nor the cache key', () => {
    const plain = validateBody('chat', chat)
    const neutral = validateBody('chat', {
      ...chat,
      presence_penalty: 0,
      frequency_penalty: 0,
      repetition_penalty: 1,
      min_p: 0,
      logit_bias: {},
      logprobs: false,
      n: 1,
    })
    expect(effectiveSampling({ req: neutral, pool })).toEqual(effectiveSampling({ req: plain, pool }))
    const s = effectiveSampling({ req: plain, pool })
    const biased = validateBody('chat', { ...chat, logit_bias: { '1': 5 } })
    expect(canonicalRequest('chat', biased, effectiveSampling({ req: biased, pool }))).not.toEqual(
      canonicalRequest('chat', plain, s),
    )
  })

  it.each([
    ['presence_penalty', 2.5, 'presence_penalty'],
    ['frequency_penalty', -3, 'frequency_penalty'],
    ['repetition_penalty', 0, 'repetition_penalty'],
    ['min_p', 1.5, 'min_p'],
    ['logit_bias', { abc: 1 }, 'logit_bias.abc'],
    ['logit_bias', { '5': 101 }, 'logit_bias.5'],
    ['top_logprobs', 21, 'top_logprobs'],
    ['n', 0, 'n'],
    ['n', 9, 'n'],
  ])('refuses %s = %j with a 400 naming it', (key, value, param) => {
    const e = thrown(() => validateBody('chat', { ...chat, logprobs: true, [key]: value }))
    expect(e.status).toBe(400)
    expect(e.param).toBe(param)
  })

  it('top_logprobs needs logprobs, and completions take logprobs as an integer up to 5', () => {
    const e = thrown(() => validateBody('chat', { ...chat, top_logprobs: 2 }))
    expect(e.param).toBe('top_logprobs')
    expect(e.message).toContain('set logprobs to true')
    expect(thrown(() => validateBody('completion', { model: 'm', prompt: 'x', logprobs: 6 })).param).toBe(
      'logprobs',
    )
    const ok = validateBody('completion', { model: 'm', prompt: 'x', logprobs: 0 })
    expect(effectiveSampling({ req: ok, pool }).logprobs).toBe(0)
  })
})

describe('prompt arrays', () => {
  it('one prompt, a token-id array, or several prompts of either kind', () => {
    const one = validateBody('completion', { model: 'm', prompt: ['only'] })
    expect(inputOf(one)).toEqual({ kind: 'text', prompt: 'only' })
    const ids = validateBody('completion', { model: 'm', prompt: [5, 6, 7] })
    expect(inputOf(ids)).toEqual({ kind: 'tokens', inputIds: [5, 6, 7] })
    const many = validateBody('completion', { model: 'm', prompt: ['a', [1, 2], 'b'], n: 2, max_tokens: 10 })
    expect(inputOf(many)).toEqual({ kind: 'prompts', prompts: ['a', [1, 2], 'b'] })
    // Admission charges every choice's max_tokens: 3 prompts x n = 2 x 10, plus the prompts.
    expect(tokenCostOf(many, effectiveSampling({ req: many, pool }))).toBe(60 + 1 + 2 + 1)
  })

  it('answers bad shapes with a 400 that says what a prompt may be', () => {
    for (const prompt of [[], [1, 'a'], [[]], [{}], [[1.5]], [-1]]) {
      const e = thrown(() => validateBody('completion', { model: 'm', prompt }))
      expect(e.status).toBe(400)
      expect(e.param).toMatch(/^prompt/)
      expect(e.message).toMatch(/array of prompts|token id/)
    }
    const tooMany = thrown(() =>
      validateBody('completion', { model: 'm', prompt: Array.from({ length: 9 }, () => 'x'), n: 4 }),
    )
    expect(tooMany.message).toContain('36 choices')
    expect(tooMany.param).toBe('n')
  })
})

describe('choices and logprobs in responses', () => {
  const lp = (token: string, logprob: number) => ({
    token,
    bytes: [...new TextEncoder().encode(token)],
    logprob,
    top: [
      { token, bytes: [...new TextEncoder().encode(token)], logprob },
      { token: '?', bytes: [63], logprob: -3 },
    ],
  })
  const answer: CachedAnswer = {
    v: 1,
    text: 'Hi',
    finishReason: 'stop',
    usage: { promptTokens: 4, completionTokens: 3 },
    choices: [
      {
        index: 0,
        text: 'Hi',
        finishReason: 'stop',
        completionTokens: 2,
        logprobs: [lp('H', -0.1), lp('i', -0.2)],
      },
      { index: 1, text: 'Yo', finishReason: 'length', completionTokens: 1, logprobs: [lp('Yo', -0.5)] },
    ],
    requestId: 'r',
    createdAt: 0,
    expiresAt: 1,
    moe: {},
  }

  it('chat: one choice per index, logprobs.content with token, logprob, bytes, top_logprobs', () => {
    const body = completionObject('chat', 'chatcmpl-x', 1, 'm', answer, moe) as {
      choices: Array<{
        index: number
        message: { content: string }
        finish_reason: string
        logprobs: unknown
      }>
    }
    expect(body.choices.map((c) => [c.index, c.message.content, c.finish_reason])).toEqual([
      [0, 'Hi', 'stop'],
      [1, 'Yo', 'length'],
    ])
    expect(body.choices[0]!.logprobs).toEqual({
      content: [
        {
          token: 'H',
          logprob: -0.1,
          bytes: [72],
          top_logprobs: [
            { token: 'H', logprob: -0.1, bytes: [72] },
            { token: '?', logprob: -3, bytes: [63] },
          ],
        },
        {
          token: 'i',
          logprob: -0.2,
          bytes: [105],
          top_logprobs: [
            { token: 'i', logprob: -0.2, bytes: [105] },
            { token: '?', logprob: -3, bytes: [63] },
          ],
        },
      ],
      refusal: null,
    })
  })

  it('text completion: the legacy tokens / token_logprobs / top_logprobs / text_offset shape', () => {
    const body = completionObject('completion', 'cmpl-x', 1, 'm', answer, moe) as {
      choices: Array<{ index: number; text: string; logprobs: unknown }>
    }
    expect(body.choices[0]!.logprobs).toEqual({
      tokens: ['H', 'i'],
      token_logprobs: [-0.1, -0.2],
      top_logprobs: [
        { H: -0.1, '?': -3 },
        { i: -0.2, '?': -3 },
      ],
      text_offset: [0, 1],
    })
    expect(body.choices[1]!.text).toBe('Yo')
  })

  it('without logprobs or choices the response is as before: one choice, logprobs null', () => {
    const { choices: _, ...single } = answer
    const body = completionObject('chat', 'c', 1, 'm', single, moe) as {
      choices: Array<{ index: number; logprobs: unknown; message: { content: string } }>
    }
    expect(body.choices).toHaveLength(1)
    expect(body.choices[0]).toMatchObject({ index: 0, logprobs: null, message: { content: 'Hi' } })
  })

  it('a streamed answer sends each choice its role, text with logprobs, and finish; usage totals them', async () => {
    const app = new Hono()
    const frame = { endpoint: 'chat' as const, id: 'chatcmpl-x', created: 1, model: 'm', includeUsage: true }
    app.get('/', (c) => replaySse(c as never, frame, answer, moe))
    const text = await (await app.request('/')).text()
    const events = text
      .split('\n')
      .filter((l) => l.startsWith('data: '))
      .map((l) => l.slice(6))
    expect(events.at(-1)).toBe('[DONE]')
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e))
    const usage = chunks.at(-1)
    expect(usage.choices).toEqual([])
    expect(usage.usage).toEqual({ prompt_tokens: 4, completion_tokens: 3, total_tokens: 7 })
    const byChoice = (i: number) => chunks.slice(0, -1).filter((c) => c.choices[0].index === i)
    for (const [i, content, finish, tokens] of [
      [0, 'Hi', 'stop', 2],
      [1, 'Yo', 'length', 1],
    ] as const) {
      const cs = byChoice(i)
      expect(cs[0].choices[0].delta.role).toBe('assistant')
      expect(cs.map((c) => c.choices[0].delta.content ?? '').join('')).toBe(content)
      expect(cs.at(-1).choices[0].finish_reason).toBe(finish)
      expect(cs.flatMap((c) => c.choices[0].logprobs?.content ?? [])).toHaveLength(tokens)
    }
  })
})
