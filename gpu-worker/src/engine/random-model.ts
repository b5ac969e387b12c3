import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { parseModelConfig } from './model-config.ts'
import { expectedTensors } from './model-layout.ts'
import { SeededRandom } from './random.ts'
import { writeSafetensors } from './safetensors.ts'
import { byteLevelTokenizerFiles } from './tiny-tokenizer.ts'

// Deterministic random-weight MoE checkpoints in the Hugging Face layout (any
// supported family): the committed tiny test model, the benchmark model and
// the per-family test models come from here.

/** A config.json as Hugging Face writes it. */
export type HfConfig = { model_type: string; [key: string]: unknown }

/** A Mixtral config.json (the presets below). */
export interface MixtralConfigInput {
  model_type: 'mixtral'
  hidden_size: number
  intermediate_size: number
  num_hidden_layers: number
  num_attention_heads: number
  num_key_value_heads: number
  head_dim?: number
  num_local_experts: number
  num_experts_per_tok: number
  rms_norm_eps: number
  rope_theta: number
  vocab_size: number
  max_position_embeddings: number
  tie_word_embeddings: boolean
  bos_token_id: number
  eos_token_id: number
}

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

/** Initial values: norms near 1, projections scaled by fan-in. */
function randomTensor(normal: () => number, name: string, shape: number[]): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1)
  const out = new Float32Array(n)
  if (name.endsWith('norm.weight')) {
    for (let i = 0; i < n; i++) out[i] = 1 + 0.1 * normal()
    return out
  }
  // Scales chosen so logits and router scores are well separated: ties
  // would make greedy decoding and top-k routing fragile under rounding.
  const fanIn = shape[shape.length - 1]!
  let std = 1 / Math.sqrt(fanIn)
  if (name === 'model.embed_tokens.weight') std = 1
  else if (name.endsWith('.bias')) std = 0.5
  else if (name.endsWith('.gate.weight') || name.endsWith('router.layer.weight')) std = 4 / Math.sqrt(fanIn)
  else if (name === 'lm_head.weight') std = 3 / Math.sqrt(fanIn)
  for (let i = 0; i < n; i++) out[i] = std * normal()
  return out
}

export interface RandomModelOptions {
  /** Weight file dtype (default F32). */
  dtype?: 'F32' | 'BF16'
  /** Split the weights over this many files with model.safetensors.index.json (default 1). */
  shards?: number
}

/** Writes config.json, the weights and the tokenizer files of a random model of config's family to `dir`. */
export function writeRandomModel(
  dir: string,
  config: HfConfig | MixtralConfigInput,
  seed: number,
  opts: RandomModelOptions = {},
): void {
  const parsed = parseModelConfig(config)
  if (!parsed.success) throw new Error(`random model config: ${parsed.issues.join('; ')}`)
  mkdirSync(dir, { recursive: true })
  const normal = normalSource(seed)
  const data = (name: string, shape: number[]) => randomTensor(normal, name, shape)
  const specs = expectedTensors(parsed.data)
  const shards = opts.shards ?? 1
  if (shards === 1) writeSafetensors(join(dir, 'model.safetensors'), specs, data, opts.dtype)
  else {
    const weightMap: Record<string, string> = {}
    const per = Math.ceil(specs.length / shards)
    for (let s = 0; s < shards; s++) {
      const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`
      const part = specs.slice(s * per, (s + 1) * per)
      for (const t of part) weightMap[t.name] = file
      writeSafetensors(join(dir, file), part, data, opts.dtype)
    }
    writeFileSync(
      join(dir, 'model.safetensors.index.json'),
      `${JSON.stringify({ metadata: {}, weight_map: weightMap }, null, 2)}\n`,
    )
  }
  const architectures: Record<string, string> = {
    mixtral: 'MixtralForCausalLM',
    qwen2_moe: 'Qwen2MoeForCausalLM',
    qwen3_moe: 'Qwen3MoeForCausalLM',
    olmoe: 'OlmoeForCausalLM',
    granitemoe: 'GraniteMoeForCausalLM',
  }
  writeFileSync(
    join(dir, 'config.json'),
    `${JSON.stringify({ architectures: [architectures[config.model_type]], ...config }, null, 2)}\n`,
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

/** The old name, from when every random model was a Mixtral. */
export const writeRandomMixtral = writeRandomModel
