import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { MoeEngine, type StepRow } from '../src/engine/engine.ts'
import { parseModelConfig } from '../src/engine/model-config.ts'
import { type HfConfig, writeRandomModel } from '../src/engine/random-model.ts'
import { FAMILIES } from './family-configs.ts'
import { argmax, maxAbsDiff, TINY_MODEL_DIR } from './fixtures.ts'
import { ReferenceModel, referenceGreedy } from './reference-model.ts'

// Each supported family, on a small random checkpoint with that family's real
// tensor names and layout, held to the plain TypeScript reference
// (test/reference-model.ts): logits to 1e-4 at prefill and at every decode
// step, the same experts, and the same greedy sequence.

const PROMPT = [1, 72, 111, 119, 32, 97, 114, 101, 32, 121, 111, 117, 63]
const row = (tokens: number[], pastLength = 0, allowed: number[] | null = null): StepRow => ({
  slot: 0,
  tokens,
  pastLength,
  allowedExperts: allowed,
})

describe.each(Object.entries(FAMILIES))('%s', (family, spec) => {
  let engine: MoeEngine
  let ref: ReferenceModel

  beforeAll(async () => {
    const dir = join(mkdtempSync(join(tmpdir(), `moe-${family}-`)), 'model')
    writeRandomModel(dir, spec.config, 4242, spec.opts)
    engine = await MoeEngine.load({ modelDir: dir, ep: 'cpu', maxBatch: 1, maxContext: 128, log: () => {} })
    ref = new ReferenceModel(dir)
  })
  afterAll(async () => {
    await engine?.close()
  })

  it('loads as its own family', () => {
    expect(engine.config.model_type).toBe(family)
  })

  it('matches the reference at prefill and at every decode step, experts included', async () => {
    const ids = [...PROMPT]
    let out = await engine.forward([row(ids)])
    const k = engine.config.num_experts_per_tok
    const first = ref.forward(ids)
    expect(maxAbsDiff(out.logits, first.logits)).toBeLessThan(1e-4)
    for (let l = 0; l < engine.config.num_hidden_layers; l++)
      for (let pos = 0; pos < ids.length; pos++) {
        const base = (l * ids.length + pos) * k
        const got = Array.from(out.chosenExperts.subarray(base, base + k), Number).filter((e) => e >= 0)
        expect(new Set(got)).toEqual(new Set(first.experts[l]![pos]))
      }
    for (let step = 0; step < 8; step++) {
      const next = argmax(out.logits)
      const past = ids.length
      ids.push(next)
      out = await engine.forward([row([next], past)])
      expect(maxAbsDiff(out.logits, ref.forward(ids).logits)).toBeLessThan(1e-4)
    }
  })

  it('greedy-generates the same whole sequence as the reference', async () => {
    const result = await engine.generate({ inputIds: PROMPT, maxTokens: 20, seed: 1, ignoreEos: true })
    expect(result.outputIds).toEqual(referenceGreedy(ref, PROMPT, 20, () => false))
  })

  it('routes only to an allowed subset and matches the reference with the others removed', async () => {
    const out = await engine.forward([row(PROMPT, 0, spec.subset)])
    for (const e of out.chosenExperts) if (e >= 0) expect(spec.subset).toContain(Number(e))
    expect(maxAbsDiff(out.logits, ref.forward(PROMPT, spec.subset).logits)).toBeLessThan(1e-4)
  })
})

// The fp16 graph is what the engine loads on CUDA; ORT's CPU kernels run it too.
describe('fp16 graphs, on the CPU', () => {
  const dirs: Array<[string, string]> = [['mixtral', TINY_MODEL_DIR]]
  beforeAll(() => {
    for (const [family, spec] of Object.entries(FAMILIES)) {
      const dir = join(mkdtempSync(join(tmpdir(), `moe-fp16-${family}-`)), 'model')
      writeRandomModel(dir, spec.config, 4242, spec.opts)
      dirs.push([family, dir])
    }
  })

  it('stay within 0.05 of the reference logits and keep its greedy sequence', async () => {
    for (const [family, dir] of dirs) {
      const engine = await MoeEngine.load({
        modelDir: dir,
        ep: 'cpu',
        dtype: 'fp16',
        maxBatch: 1,
        maxContext: 64,
        log: () => {},
      })
      try {
        expect(engine.kv.dtype).toBe('float16')
        const ref = new ReferenceModel(dir)
        const out = await engine.forward([row(PROMPT)])
        expect(maxAbsDiff(out.logits, ref.forward(PROMPT).logits), family).toBeLessThan(0.05)
        const got = await engine.generate({ inputIds: PROMPT, maxTokens: 12, seed: 1, ignoreEos: true })
        expect(got.outputIds, family).toEqual(referenceGreedy(ref, PROMPT, 12, () => false))
      } finally {
        await engine.close()
      }
    }
  })
})

describe('config.json per family', () => {
  const parse = (c: HfConfig) => parseModelConfig(c)

  it("applies each family's transformers defaults", () => {
    const q2 = parse(FAMILIES.qwen2_moe!.config)
    expect(q2.success && q2.data).toMatchObject({
      norm_topk_prob: false,
      qkv_bias: true,
      o_bias: false,
      head_dim: 16,
      moe_layers: [false, true, false, true],
    })
    const q3 = parse(FAMILIES.qwen3_moe!.config)
    expect(q3.success && q3.data).toMatchObject({
      head_dim: 32,
      qk_norm: 'per_head',
      moe_layers: [true, false, true],
    })
    const granite = parse(FAMILIES.granitemoe!.config)
    expect(granite.success && granite.data).toMatchObject({ norm_topk_prob: true, attention_scale: 0.03125 })
  })

  it('names the supported families when model_type is another', () => {
    const r = parse({ ...FAMILIES.olmoe!.config, model_type: 'deepseek_v3' })
    expect(r.success).toBe(false)
    expect(!r.success && r.issues.join()).toMatch(
      /"deepseek_v3" is not supported; supported are mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoe/,
    )
  })

  it('refuses what the graph does not implement, saying what', () => {
    const scaled = parse({ ...FAMILIES.qwen3_moe!.config, rope_scaling: { type: 'yarn', factor: 4 } })
    expect(!scaled.success && scaled.issues.join()).toMatch(/rope_scaling is not supported/)
    const narrow = parse({ ...FAMILIES.qwen3_moe!.config, head_dim: 24 })
    expect(!narrow.success && narrow.issues.join()).toMatch(/head_dim 24 is not a multiple of 16/)
  })
})
