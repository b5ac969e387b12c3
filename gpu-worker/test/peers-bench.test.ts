import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { describe, expect, it } from 'vitest'

// The peers bench end to end in its quick mode (tiny model, few tokens, one
// thread): both engines, the service path through Redis and a worker process,
// and the JSON line other tools read. Figures are never judged here.

const BENCH = fileURLToPath(new URL('../src/bench/peers-bench.ts', import.meta.url))
const run = promisify(execFile)

describe('bench:peers --quick', () => {
  it('ends with one JSON line of positive engine / llama.cpp ratios, the peers agreeing at fp32', async () => {
    const { stdout } = await run(process.execPath, [BENCH, '--quick', '--threads', '1'], {
      timeout: 150_000,
      maxBuffer: 16 * 2 ** 20,
    })
    const lines = stdout.trimEnd().split('\n')
    expect(lines.some((l) => l.startsWith('- peers agree at fp32: yes'))).toBe(true)
    const result = JSON.parse(lines.at(-1)!) as Record<string, unknown>
    expect(Object.keys(result).sort()).toEqual([
      'concurrent16_ratio',
      'ctx1024_ratio',
      'decode_b1_ratio',
      'int4_decode_b1_ratio',
      'prefill_ratio',
    ])
    for (const v of Object.values(result)) {
      expect(typeof v).toBe('number')
      expect(Number.isFinite(v) && (v as number) > 0).toBe(true)
    }
  }, 180_000)

  it('refuses an unknown flag or a bad thread count with a usage line', async () => {
    const bad = run(process.execPath, [BENCH, '--threads', 'two'])
    await expect(bad).rejects.toMatchObject({
      code: 2,
      stderr: expect.stringContaining('--threads must be an integer from 1 to 256 (got "two")'),
    })
    await expect(run(process.execPath, [BENCH, '--fast'])).rejects.toMatchObject({
      code: 2,
      stderr: expect.stringContaining("Unknown option '--fast'"),
    })
  }, 60_000)
})
