import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { MoeEngine, type StepRow } from '../src/engine/engine.ts'
import { parseModelConfig } from '../src/engine/model-config.ts'
import { type HfConfig, type RandomModelOptions, writeRandomModel } from '../src/engine/random-model.ts'
import { argmax, maxAbsDiff } from './fixtures.ts'
import { ReferenceModel, referenceGreedy } from './reference-model.ts'

// Each supported family, on a small random checkpoint with that family's real
// tensor names and layout, held to the plain TypeScript reference
// (test/reference-model.ts): logits to 1e-4 at prefill and at every decode
// step, the same experts, and the same greedy sequence.

const shared = {
  hidden_size: 64,
  num_attention_heads: 4,
  vocab_size: 259,
  max_position_embeddings: 256,
  rms_norm_eps: 1e-6,
  rope_theta: 10000,
  bos_token_id: 1,
  eos_token_id: 2,
  tie_word_embeddings: false,
}

interface Family {
  config: HfConfig
  opts?: RandomModelOptions
  /** An expert subset to restrict routing to (at least top-k of them). */
  subset: number[]
}

const FAMILIES: Record<string, Family> = {
  // head_dim 32 with 4 heads of a 64-wide model: head_dim independent of hidden/heads.
  // Layer 1 is dense (mlp_only_layers); renormalised top-3.
  qwen3_moe: {
    config: {
      ...shared,
      model_type: 'qwen3_moe',
      num_hidden_layers: 3,
      num_key_value_heads: 2,
      head_dim: 32,
      intermediate_size: 96,
      moe_intermediate_size: 48,
      num_experts: 8,
      num_experts_per_tok: 3,
      norm_topk_prob: true,
      decoder_sparse_step: 1,
      mlp_only_layers: [1],
    },
    subset: [0, 3, 5, 6],
  },
  // q/k/v biases, a sigmoid-gated shared expert, norm_topk_prob left at its default (false),
  // and decoder_sparse_step 2 (layers 1 and 3 routed, 0 and 2 dense).
  qwen2_moe: {
    config: {
      ...shared,
      model_type: 'qwen2_moe',
      num_hidden_layers: 4,
      num_key_value_heads: 2,
      intermediate_size: 80,
      moe_intermediate_size: 32,
      shared_expert_intermediate_size: 96,
      num_experts: 6,
      num_experts_per_tok: 2,
      decoder_sparse_step: 2,
    },
    subset: [1, 4, 5],
  },
  // 64 experts, top-8, q/k norms over the whole projection, clip_qkv; a bf16 checkpoint.
  olmoe: {
    config: {
      ...shared,
      model_type: 'olmoe',
      num_hidden_layers: 2,
      num_key_value_heads: 4,
      intermediate_size: 32,
      num_experts: 64,
      num_experts_per_tok: 8,
      norm_topk_prob: false,
      clip_qkv: 8,
      rms_norm_eps: 1e-5,
    },
    opts: { dtype: 'BF16' },
    subset: [0, 2, 4, 8, 16, 32, 33, 40, 63],
  },
  // Stacked experts, the router at router.layer, the four multipliers, tied embeddings; sharded.
  granitemoe: {
    config: {
      ...shared,
      model_type: 'granitemoe',
      num_hidden_layers: 2,
      num_key_value_heads: 2,
      intermediate_size: 64,
      num_local_experts: 8,
      num_experts_per_tok: 2,
      embedding_multiplier: 12,
      attention_multiplier: 0.0625 / 2,
      residual_multiplier: 0.22,
      logits_scaling: 6,
      tie_word_embeddings: true,
    },
    opts: { shards: 3 },
    subset: [1, 2, 7],
  },
}

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
