import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { MixtralConfig } from './model-config.ts'
import { expectedTensors } from './model-dir.ts'
import { SeededRandom } from './random.ts'
import { writeSafetensors } from './safetensors.ts'
import { byteLevelTokenizerFiles } from './tiny-tokenizer.ts'

// Deterministic random-weight Mixtral checkpoints in the Hugging Face layout:
// the committed tiny test model and the larger benchmark model come from here.

export type MixtralConfigInput = Omit<MixtralConfig, 'head_dim'> & { head_dim?: number }

export const TINY_CONFIG: MixtralConfigInput = {
  model_type: 'mixtral',
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  head_dim: 16,
  num_local_experts: 8,
  num_experts_per_tok: 2,
  rms_norm_eps: 1e-5,
  rope_theta: 1_000_000,
  vocab_size: 259,
  max_position_embeddings: 1024,
  tie_word_embeddings: false,
  bos_token_id: 1,
  eos_token_id: 2,
}

export const BENCH_CONFIG: MixtralConfigInput = {
  ...TINY_CONFIG,
  hidden_size: 512,
  intermediate_size: 1408,
  num_hidden_layers: 8,
  num_attention_heads: 8,
  num_key_value_heads: 2,
  head_dim: 64,
  vocab_size: 32000,
  max_position_embeddings: 2048,
}

/** Standard normal draws (Box-Muller) from the sampler's seeded generator: same seed, same weights everywhere. */
function normalSource(seed: number): () => number {
  const rng = new SeededRandom(seed)
  let spare: number | null = null
  return () => {
    if (spare !== null) {
      const s = spare
      spare = null
      return s
    }
    const u = Math.max(rng.nextDouble(), 1e-300)
    const r = Math.sqrt(-2 * Math.log(u))
    const theta = 2 * Math.PI * rng.nextDouble()
    spare = r * Math.sin(theta)
    return r * Math.cos(theta)
  }
}

/** Writes config.json, model.safetensors and the tokenizer files of a random Mixtral to `dir`. */
export function writeRandomMixtral(dir: string, config: MixtralConfigInput, seed: number): void {
  mkdirSync(dir, { recursive: true })
  const normal = normalSource(seed)
  const H = config.hidden_size
  const specs = expectedTensors({ ...config, head_dim: config.head_dim ?? H / config.num_attention_heads })
  writeSafetensors(join(dir, 'model.safetensors'), specs, (name, shape) => {
    const n = shape.reduce((a, b) => a * b, 1)
    const out = new Float32Array(n)
    if (name.endsWith('norm.weight')) {
      for (let i = 0; i < n; i++) out[i] = 1 + 0.1 * normal()
      return out
    }
    // Scales chosen so logits and router scores are well separated: ties
    // would make greedy decoding and top-2 routing fragile under rounding.
    const fanIn = shape[shape.length - 1]!
    let std = 1 / Math.sqrt(fanIn)
    if (name === 'model.embed_tokens.weight') std = 1
    else if (name.includes('.gate.')) std = 4 / Math.sqrt(fanIn)
    else if (name === 'lm_head.weight') std = 3 / Math.sqrt(fanIn)
    for (let i = 0; i < n; i++) out[i] = std * normal()
    return out
  })
  writeFileSync(
    join(dir, 'config.json'),
    `${JSON.stringify({ architectures: ['MixtralForCausalLM'], ...config }, null, 2)}\n`,
  )
  const { tokenizerJson, tokenizerConfig } = byteLevelTokenizerFiles()
  writeFileSync(join(dir, 'tokenizer.json'), `${JSON.stringify(tokenizerJson, null, 2)}\n`)
  writeFileSync(join(dir, 'tokenizer_config.json'), `${JSON.stringify(tokenizerConfig, null, 2)}\n`)
  const generation = {
    bos_token_id: config.bos_token_id,
    eos_token_id: config.eos_token_id,
    max_new_tokens: 64,
  }
  writeFileSync(join(dir, 'generation_config.json'), `${JSON.stringify(generation, null, 2)}\n`)
}
