import type { TenantConfig } from '@moe/shared'
import { describe, expect, it } from 'vitest'
import { BatchInputLine, validateBatchFile } from '../../src/batches/input-file.ts'
import { edgeConfigOf } from '../../src/config.ts'

const tenant: TenantConfig = {
  id: 'unit',
  name: 'unit',
  allowedPools: ['general', 'code'],
  defaultPool: 'general',
  poolMap: { code: 'code' },
  routes: [],
  rateLimits: { requestsPerMinute: 10, tokensPerMinute: 1000 },
  cacheTtlSeconds: 60,
  maxLiveStreams: 16,
  batchQueueTokens: 100_000,
  queueShare: 0.5,
  webhooks: [],
}
const config = edgeConfigOf({
  ENVIRONMENT: 'test',
  REDIS_URL: 'redis://127.0.0.1:6379',
  FILES_MAX_LINES: '3',
})
const line = (i: number, extra: Record<string, unknown> = {}) => ({
  custom_id: `r${i}`,
  method: 'POST',
  url: '/v1/chat/completions',
  body: { model: 'auto', messages: [{ role: 'user', content: `hello ${i}` }] },
  ...extra,
})
const file = (...lines: unknown[]) =>
  lines.map((l) => (typeof l === 'string' ? l : JSON.stringify(l))).join('\n')
const messageOf = (text: string): string => {
  try {
    validateBatchFile(text, tenant, config)
  } catch (e) {
    return (e as Error).message
  }
  throw new Error('did not throw')
}

describe('batch input files', () => {
  it('routes every line as the live path would, skipping blank lines', () => {
    const lines = validateBatchFile(
      file(
        line(1),
        '',
        line(2, { body: { model: 'auto', messages: [{ role: 'user', content: 'fix this python bug' }] } }),
      ),
      tenant,
      config,
    )
    expect(lines.map((l) => [l.line, l.customId, l.pool.name])).toEqual([
      [1, 'r1', 'general'],
      [3, 'r2', 'code'],
    ])
    expect(lines[0]!.sampling.maxTokens).toBe(256)
  })

  it('names the first problem and its line', () => {
    expect(messageOf(file(line(1), '{oops'))).toMatch(/^Line 2: not valid JSON/)
    expect(messageOf(file(line(1), '[1]'))).toBe('Line 2: each line must be a JSON object')
    expect(messageOf(file(line(1, { custom_id: '' })))).toBe(
      'Line 1: custom_id must be a non-empty string (at most 512 characters)',
    )
    expect(messageOf(file(line(1), line(1, { method: 'GET' })))).toBe(
      "Line 2: duplicate custom_id 'r1' (first used on line 1)",
    )
    expect(messageOf(file(line(1, { method: 'GET' })))).toBe("Line 1: method must be 'POST'")
    expect(messageOf(file(line(1, { url: '/v1/embeddings' })))).toBe(
      'Line 1: url must be one of /v1/chat/completions, /v1/completions (got "/v1/embeddings")',
    )
    expect(messageOf(file(line(1), line(2, { url: '/v1/completions' })))).toContain(
      'a batch file holds one endpoint',
    )
    expect(messageOf(file(line(1, { body: { ...line(1).body, stream: true } })))).toBe(
      'Line 1: stream is not supported in a batch',
    )
    expect(messageOf(file(line(1), line(2), line(3), line(4)))).toMatch(
      /^Line 4: the file has more than 3 requests/,
    )
    expect(messageOf('\n\n')).toBe('The file holds no requests')
  })

  it('describes a line with a zod schema', () => {
    expect(BatchInputLine.safeParse(line(1)).success).toBe(true)
    expect(BatchInputLine.safeParse({ ...line(1), custom_id: 'x'.repeat(513) }).success).toBe(false)
  })
})
