import { mkdirSync, writeFileSync } from 'node:fs'
import { cpus } from 'node:os'
import { join } from 'node:path'
import { describe, expect, inject, it } from 'vitest'
import { type SseResult, streamRequest } from '../src/sse.ts'
import { devTenant } from '../src/stack.ts'

// Load: 64 concurrent streaming clients for a fixed time against the tiny model. Asserts zero
// errors and [DONE] on every stream; the figures are written to tests/results/, never asserted.
// MOE_LOAD_SECONDS (default 10) and MOE_LOAD_CLIENTS (default 64) size the run.

const stack = inject('stack')
const SECONDS = Number(process.env.MOE_LOAD_SECONDS ?? 10)
const CLIENTS = Number(process.env.MOE_LOAD_CLIENTS ?? 64)
const MAX_TOKENS = Number(process.env.MOE_LOAD_MAX_TOKENS ?? 32)

const percentile = (xs: number[], p: number): number => {
  if (xs.length === 0) return Number.NaN
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!
}
const round = (x: number) => Math.round(x * 10) / 10

describe('load', () => {
  it(`${CLIENTS} concurrent streaming clients for ${SECONDS} s: zero errors, every stream ends with [DONE]`, async () => {
    const tenant = await devTenant(stack, {
      rateLimits: { requestsPerMinute: 1_000_000, tokensPerMinute: 1_000_000_000 },
    })
    const results: SseResult[] = []
    const errors: string[] = []
    const t0 = performance.now()
    const until = t0 + SECONDS * 1000
    let n = 0
    await Promise.all(
      Array.from({ length: CLIENTS }, async (_, c) => {
        while (performance.now() < until) {
          const i = n++
          try {
            const r = await streamRequest(
              `${stack.url}/v1/chat/completions`,
              tenant.key,
              {
                model: 'auto',
                messages: [{ role: 'user', content: `Client ${c}, request ${i}: tell me about experts.` }],
                max_tokens: MAX_TOKENS,
                temperature: 1,
                stream_options: { include_usage: true },
              },
              { timeoutMs: 120_000 },
            )
            results.push(r)
            if (r.status !== 200) errors.push(`request ${i}: ${r.status} ${JSON.stringify(r.body)}`)
            else if (r.error) errors.push(`request ${i}: stream error ${JSON.stringify(r.error)}`)
            else if (!r.done) errors.push(`request ${i}: stream ended without [DONE]`)
            else if (r.completionTokens === null) errors.push(`request ${i}: no usage chunk`)
          } catch (e) {
            errors.push(`request ${i}: ${(e as Error).message}`)
          }
        }
      }),
    )
    const elapsed = (performance.now() - t0) / 1000
    const ok = results.filter((r) => r.done && !r.error && r.status === 200)
    const ttft = ok.map((r) => r.ttftMs).filter((x): x is number => x !== null)
    const tokens = ok.reduce((a, r) => a + (r.completionTokens ?? 0), 0)
    const figures = {
      date: new Date().toISOString(),
      clients: CLIENTS,
      seconds: SECONDS,
      elapsed_s: round(elapsed),
      max_tokens: MAX_TOKENS,
      workers: stack.workerPids.length || 'reused stack',
      cpus: cpus().length,
      requests: results.length,
      errors: errors.length,
      requests_per_s: round(ok.length / elapsed),
      ttft_ms: { p50: round(percentile(ttft, 50)), p99: round(percentile(ttft, 99)) },
      total_ms: {
        p50: round(
          percentile(
            ok.map((r) => r.totalMs),
            50,
          ),
        ),
        p99: round(
          percentile(
            ok.map((r) => r.totalMs),
            99,
          ),
        ),
      },
      completion_tokens: tokens,
      tokens_per_s: round(tokens / elapsed),
    }
    const dir = join(import.meta.dirname, '..', 'results')
    mkdirSync(dir, { recursive: true })
    const file = join(dir, `load-${figures.date.replace(/[:.]/g, '-')}.json`)
    writeFileSync(file, `${JSON.stringify(figures, null, 2)}\n`)
    console.log(`load figures (${file}):\n${JSON.stringify(figures, null, 2)}`)
    expect(errors.slice(0, 10)).toEqual([])
    expect(ok.length).toBe(results.length)
    expect(ok.length).toBeGreaterThan(0)
  })
})
