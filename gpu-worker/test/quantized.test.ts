import { mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { MoeEngine } from '../src/engine/engine.ts'
import { type ExportDtype, ensureExported } from '../src/engine/onnx-export.ts'
import { dequantizeMatrix, quantizeMatrix } from '../src/engine/quantize.ts'
import { writeRandomModel } from '../src/engine/random-model.ts'
import { FAMILIES } from './family-configs.ts'
import { argmax, TINY_MODEL_DIR } from './fixtures.ts'

// int8/int4 weight-only exports held to the fp32 export of the same model:
// teacher-forced along fp32's greedy sequence, how often the quantized model
// picks the same next token, and the mean KL(fp32 || quantized) of the
// next-token distributions.

const PROMPT = [1, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110]
const STEPS = 48

const load = (modelDir: string, dtype: ExportDtype) =>
  MoeEngine.load({ modelDir, ep: 'cpu', dtype, maxBatch: 1, maxContext: 128, log: () => {} })

function logSoftmax(logits: Float32Array): Float64Array {
  let max = -Infinity
  for (const v of logits) max = Math.max(max, v)
  let sum = 0
  for (const v of logits) sum += Math.exp(v - max)
  const lse = max + Math.log(sum)
  return Float64Array.from(logits, (v) => v - lse)
}

/** Next-token logits at every step of a teacher-forced pass over `ids` after the prompt. */
async function forcedLogits(engine: MoeEngine, ids: number[]): Promise<Float32Array[]> {
  const out = [
    (await engine.forward([{ slot: 0, tokens: PROMPT, pastLength: 0, allowedExperts: null }])).logits.slice(),
  ]
  for (let i = 0; i < ids.length - 1; i++) {
    const step = { slot: 0, tokens: [ids[i]!], pastLength: PROMPT.length + i, allowedExperts: null }
    out.push((await engine.forward([step])).logits.slice())
  }
  return out
}

async function compare(modelDir: string, dtype: ExportDtype): Promise<{ agree: number; kl: number }> {
  const base = await load(modelDir, 'fp32')
  const quant = await load(modelDir, dtype)
  try {
    const greedy = (await base.generate({ inputIds: PROMPT, maxTokens: STEPS, seed: 0, ignoreEos: true }))
      .outputIds
    const want = await forcedLogits(base, greedy)
    const got = await forcedLogits(quant, greedy)
    let same = 0
    let kl = 0
    want.forEach((w, i) => {
      if (argmax(got[i]!) === argmax(w)) same++
      const p = logSoftmax(w)
      const q = logSoftmax(got[i]!)
      for (let v = 0; v < p.length; v++) kl += Math.exp(p[v]!) * (p[v]! - q[v]!)
    })
    return { agree: same / want.length, kl: kl / want.length }
  } finally {
    await base.close()
    await quant.close()
  }
}

describe('weight-only quantization', () => {
  it('round-trips symmetric blocks of 32 to within half a step', () => {
    const w = Float32Array.from({ length: 4 * 64 }, (_, i) => Math.sin(i * 1.7) * (1 + (i % 5)))
    for (const bits of [8, 4] as const) {
      const q = quantizeMatrix(w, 4, 64, bits)
      const back = dequantizeMatrix(q)
      for (let i = 0; i < w.length; i++) {
        const step = q.scales[Math.floor(i / 32)]!
        expect(Math.abs(back[i]! - w[i]!)).toBeLessThanOrEqual(step / 2 + 1e-6)
      }
    }
  })

  const results: Record<string, { agree: number; kl: number }> = {}
  afterAll(() => console.log('quantized vs fp32 (teacher-forced):', JSON.stringify(results)))

  it('exports MatMulNBits in place of the MoE op, and routes only to an allowed subset', async () => {
    const engine = await load(TINY_MODEL_DIR, 'int8')
    try {
      const graph = readFileSync(ensureExported(engine.model, 'int8').modelPath, 'latin1')
      expect(graph).toContain('MatMulNBits')
      expect(graph).not.toMatch(/\bMoE\b/)
      const out = await engine.forward([
        { slot: 0, tokens: PROMPT, pastLength: 0, allowedExperts: [2, 5, 6] },
      ])
      for (const e of out.chosenExperts) expect([2, 5, 6]).toContain(Number(e))
    } finally {
      await engine.close()
    }
  })

  it('int8 picks the fp32 greedy token at >= 95% of steps on the tiny Mixtral, int4 reported', async () => {
    results.int8 = await compare(TINY_MODEL_DIR, 'int8')
    results.int4 = await compare(TINY_MODEL_DIR, 'int4')
    expect(results.int8.agree).toBeGreaterThanOrEqual(0.95)
    expect(results.int8.kl).toBeLessThan(0.01)
    expect(results.int4.agree).toBeGreaterThanOrEqual(0.7)
    expect(results.int4.kl).toBeLessThan(results.int8.kl * 1000)
  })

  describe.each(['qwen2_moe', 'olmoe', 'granitemoe'])('%s at int8', (family) => {
    let dir: string
    beforeAll(() => {
      dir = join(mkdtempSync(join(tmpdir(), `moe-q-${family}-`)), 'model')
      writeRandomModel(dir, FAMILIES[family]!.config, 99, FAMILIES[family]!.opts)
    })
    it('agrees with fp32 at >= 95% of steps', async () => {
      results[`${family}-int8`] = await compare(dir, 'int8')
      expect(results[`${family}-int8`]!.agree).toBeGreaterThanOrEqual(0.95)
    })
  })
})
