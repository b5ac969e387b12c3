import { describe, expect, it } from 'vitest'
import { batchErrorLine } from '../src/batch.ts'
import { publicErrorMessage } from '../src/errors.ts'

// An internal error's own text never reaches a client: a generic message with the request id.

describe('public error messages', () => {
  it('an internal error is generic and names the request id', () => {
    const msg = publicErrorMessage('internal_error', 'Maximum call stack size exceeded', 'req_1')
    expect(msg).not.toContain('stack')
    expect(msg).toContain('req_1')
  })

  it('other codes keep the message written for the client', () => {
    const msg = 'prompt (2000 tokens) plus max_tokens (4) exceeds the context limit of 1024 tokens'
    expect(publicErrorMessage('context_length_exceeded', msg, 'req_1')).toBe(msg)
  })

  it('a batch error line carries no internal detail', () => {
    const line = JSON.parse(
      batchErrorLine(
        { j: 'batch_x-3', c: 'my-3' } as Parameters<typeof batchErrorLine>[0],
        { code: 'internal_error', message: 'ECONNREFUSED 10.0.0.7:6379 at /srv/app/pool.ts:12' },
        500,
      ),
    ) as { response: { body: { error: { message: string } } } }
    expect(line.response.body.error.message).not.toMatch(/ECONNREFUSED|\/srv\//)
    expect(line.response.body.error.message).toContain('batch_x-3')
  })
})
