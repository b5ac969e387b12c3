import { describe, expect, it } from 'vitest'
import poolsJson from '../../infra/config/pools.json' with { type: 'json' }
import {
  ChatCompletionRequest,
  decodeJobFailure,
  decodeStreamEvent,
  encodeJobFailure,
  encodeStreamEvent,
  generateJobOptions,
  JOB_PRIORITY,
  JobPayload,
  jobCancelKey,
  jobEventsKey,
  MoeError,
  PoolsFile,
  poolQueueName,
  seedFromJobId,
  streamEntryEvent,
  streamEntryFields,
} from '../src/index.ts'

describe('contracts', () => {
  it('names queues and keys as ARCHITECTURE.md says', () => {
    expect(poolQueueName('code')).toBe('pool.code')
    expect(jobEventsKey('r1')).toBe('moe:job:{r1}:events')
    expect(jobCancelKey('r1')).toBe('moe:job:{r1}:cancel')
  })

  it('accepts the shipped pools file and rejects duplicate names', () => {
    const pools = PoolsFile.parse(poolsJson)
    expect(pools.pools.some((p) => p.experts !== null)).toBe(true)
    const dup = { pools: [pools.pools[0], pools.pools[0]] }
    expect(PoolsFile.safeParse(dup).success).toBe(false)
  })

  it('rejects unknown chat parameters instead of ignoring them', () => {
    const ok = ChatCompletionRequest.safeParse({ model: 'm', messages: [{ role: 'user', content: 'hi' }] })
    expect(ok.success).toBe(true)
    const bad = ChatCompletionRequest.safeParse({
      model: 'm',
      messages: [{ role: 'user', content: 'hi' }],
      functions: [],
    })
    expect(bad.success).toBe(false)
  })

  it('validates job payloads and fills the priority default', () => {
    const job = JobPayload.parse({
      version: 1,
      requestId: 'r1',
      tenantId: 't',
      pool: 'general',
      model: 'tiny',
      input: { kind: 'text', prompt: 'hello' },
      sampling: { maxTokens: 8, temperature: 0, topP: 1, topK: 0, seed: 1, stop: [] },
      deadline: Date.now() + 1000,
      createdAt: Date.now(),
    })
    expect(job.priority).toBe('live')
    expect(JobPayload.safeParse({ ...job, sampling: { ...job.sampling, maxTokens: -1 } }).success).toBe(false)
  })

  it('round-trips stream events and refuses malformed ones', () => {
    const ev = { type: 'token', index: 3, text: 'a', tokenId: 97 } as const
    expect(decodeStreamEvent(encodeStreamEvent(ev))).toEqual(ev)
    expect(() => decodeStreamEvent('{"type":"token","index":-1}')).toThrow()
  })

  it('maps errors to the OpenAI error shape', () => {
    const err = new MoeError('invalid_api_key', 'bad key')
    expect(err.status).toBe(401)
    expect(err.toBody()).toEqual({
      error: { message: 'bad key', type: 'authentication_error', param: null, code: 'invalid_api_key' },
    })
  })
})

describe('seedFromJobId', () => {
  it('is FNV-1a 64 of the id, cut to 53 bits', () => {
    expect(seedFromJobId('a')).toBe(Number(0xaf63dc4c8601ec8cn >> 11n))
    expect(seedFromJobId('')).toBe(Number(0xcbf29ce484222325n >> 11n))
    expect(seedFromJobId('chatcmpl-123')).toBe(seedFromJobId('chatcmpl-123'))
    expect(seedFromJobId('chatcmpl-123')).not.toBe(seedFromJobId('chatcmpl-124'))
    expect(Number.isSafeInteger(seedFromJobId('job-😀'))).toBe(true)
  })
})

describe('the queue protocol', () => {
  it('reads stream entries by field name, validated', () => {
    const ev = { type: 'error', code: 'cancelled', message: 'stop' } as const
    expect(streamEntryEvent(streamEntryFields(ev))).toEqual(ev)
    expect(streamEntryEvent(['other', 'x', ...streamEntryFields(ev)])).toEqual(ev)
    expect(streamEntryEvent(['other', 'x'])).toBeNull()
    expect(() => streamEntryEvent(['e', '{"type":"token","index":"1"}'])).toThrow()
  })

  it('carries job failures as {code, message}, and reads BullMQ reasons as internal errors', () => {
    const failure = { code: 'max_tokens_exceeded', message: 'max_tokens 9: too many' } as const
    expect(decodeJobFailure(encodeJobFailure(failure))).toEqual(failure)
    expect(decodeJobFailure('job stalled more than allowable limit')).toEqual({
      code: 'internal_error',
      message: 'job stalled more than allowable limit',
    })
    expect(decodeJobFailure('{"code":"no_such_code","message":"m"}').code).toBe('internal_error')
    expect(decodeJobFailure(undefined).code).toBe('internal_error')
    expect(() => encodeJobFailure({ code: 'bogus' as 'internal_error', message: '' })).toThrow()
  })

  it('gives live and batch generate jobs the same options but their priority', () => {
    const live = generateJobOptions('r1', 'live')
    const batch = generateJobOptions('r1', 'batch')
    expect(live.jobId).toBe('r1')
    expect(live.priority).toBe(JOB_PRIORITY.live)
    expect(batch.priority).toBe(JOB_PRIORITY.batch)
    expect({ ...batch, priority: live.priority }).toEqual(live)
  })
})
