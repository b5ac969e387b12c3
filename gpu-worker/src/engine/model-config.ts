import { z } from 'zod'

// Hugging Face `config.json` of each supported MoE family, read with that
// family's defaults (transformers' configuration_*.py) and normalised into one
// ModelConfig the loader, exporter and KV cache share.

export const SUPPORTED_FAMILIES = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'granitemoe'] as const
export type ModelFamily = (typeof SUPPORTED_FAMILIES)[number]

export interface ModelConfig {
  model_type: ModelFamily
  hidden_size: number
  num_hidden_layers: number
  num_attention_heads: number
  num_key_value_heads: number
  head_dim: number
  num_local_experts: number
  num_experts_per_tok: number
  /** Width of each routed expert. */
  moe_intermediate_size: number
  /** Width of the dense MLP in layers without experts. */
  intermediate_size: number
  /** Width of the always-on shared expert; 0 when the family has none. */
  shared_expert_intermediate_size: number
  /** Renormalise the top-k routing weights to sum to 1 (else: softmax over all experts). */
  norm_topk_prob: boolean
  /** Per layer: true when it routes to experts, false for a dense MLP. */
  moe_layers: boolean[]
  /** RMSNorm on q and k before rotary: per head (qwen3_moe) or over the whole projection (olmoe). */
  qk_norm: 'none' | 'per_head' | 'whole'
  qkv_bias: boolean
  o_bias: boolean
  /** olmoe's optional clamp of q, k and v. */
  clip_qkv: number | null
  /** Multiplies q.k in attention (1/sqrt(head_dim) unless the family sets it). */
  attention_scale: number
  embedding_multiplier: number
  residual_multiplier: number
  /** Logits are divided by this. */
  logits_scaling: number
  rms_norm_eps: number
  rope_theta: number
  vocab_size: number
  max_position_embeddings: number
  tie_word_embeddings: boolean
  bos_token_id?: number | null
  eos_token_id?: number | number[] | null
}

/** The old name, from when Mixtral was the only family. */
export type MixtralConfig = ModelConfig

const int = () => z.number().int().positive()
const tokenId = z.number().int().min(0).nullish()

// Fields every family shares; defaults differ per family and are applied below.
const common = {
  hidden_size: int(),
  num_hidden_layers: int(),
  num_attention_heads: int(),
  num_key_value_heads: int().nullish(),
  head_dim: int().nullish(),
  rms_norm_eps: z.number().positive().optional(),
  rope_theta: z.number().positive().nullish(),
  // Newer transformers nest rope_theta here; scaled variants (yarn, linear...) are not implemented.
  rope_parameters: z
    .object({ rope_type: z.literal('default').optional(), rope_theta: z.number().positive().optional() })
    .nullish(),
  rope_scaling: z.null({ error: 'rope_scaling is not supported (only plain RoPE)' }).optional(),
  hidden_act: z.literal('silu', { error: 'hidden_act must be "silu"' }).optional(),
  vocab_size: int(),
  max_position_embeddings: int(),
  tie_word_embeddings: z.boolean().optional(),
  num_experts_per_tok: int(),
  bos_token_id: tokenId,
  eos_token_id: z.union([z.number().int().min(0), z.array(z.number().int().min(0))]).nullish(),
}
const commonObject = z.object(common)
type Common = z.output<typeof commonObject>

/** Decoder layers with experts, by transformers' rule for the Qwen MoE families. */
function sparseLayers(layers: number, step: number, mlpOnly: readonly number[]): boolean[] {
  return Array.from({ length: layers }, (_, l) => !mlpOnly.includes(l) && (l + 1) % step === 0)
}

function base(
  c: Common,
  family: ModelFamily,
  defaults: { rope_theta: number; rms_norm_eps: number },
): Omit<
  ModelConfig,
  | 'num_local_experts'
  | 'moe_intermediate_size'
  | 'intermediate_size'
  | 'norm_topk_prob'
  | 'moe_layers'
  | 'shared_expert_intermediate_size'
> {
  const head_dim = c.head_dim ?? c.hidden_size / c.num_attention_heads
  return {
    model_type: family,
    hidden_size: c.hidden_size,
    num_hidden_layers: c.num_hidden_layers,
    num_attention_heads: c.num_attention_heads,
    num_key_value_heads: c.num_key_value_heads ?? c.num_attention_heads,
    head_dim,
    num_experts_per_tok: c.num_experts_per_tok,
    qk_norm: 'none',
    qkv_bias: false,
    o_bias: false,
    clip_qkv: null,
    attention_scale: 1 / Math.sqrt(head_dim),
    embedding_multiplier: 1,
    residual_multiplier: 1,
    logits_scaling: 1,
    rms_norm_eps: c.rms_norm_eps ?? defaults.rms_norm_eps,
    rope_theta: c.rope_theta ?? c.rope_parameters?.rope_theta ?? defaults.rope_theta,
    vocab_size: c.vocab_size,
    max_position_embeddings: c.max_position_embeddings,
    tie_word_embeddings: c.tie_word_embeddings ?? false,
    bos_token_id: c.bos_token_id,
    eos_token_id: c.eos_token_id,
  }
}

const mixtral = z.object({ ...common, intermediate_size: int(), num_local_experts: int() }).transform(
  (c): ModelConfig => ({
    ...base(c, 'mixtral', { rope_theta: 1e6, rms_norm_eps: 1e-5 }),
    num_local_experts: c.num_local_experts,
    moe_intermediate_size: c.intermediate_size,
    intermediate_size: c.intermediate_size,
    shared_expert_intermediate_size: 0,
    norm_topk_prob: true,
    moe_layers: Array(c.num_hidden_layers).fill(true),
  }),
)

const qwenSparse = {
  intermediate_size: int(),
  moe_intermediate_size: int(),
  num_experts: int(),
  norm_topk_prob: z.boolean().optional(),
  decoder_sparse_step: int().optional(),
  mlp_only_layers: z.array(z.number().int().min(0)).nullish(),
  attention_bias: z.boolean().optional(),
  use_sliding_window: z.literal(false, { error: 'sliding-window attention is not supported' }).optional(),
}

const qwen3Moe = z.object({ ...common, ...qwenSparse }).transform(
  (c): ModelConfig => ({
    ...base(c, 'qwen3_moe', { rope_theta: 10000, rms_norm_eps: 1e-6 }),
    num_local_experts: c.num_experts,
    moe_intermediate_size: c.moe_intermediate_size,
    intermediate_size: c.intermediate_size,
    shared_expert_intermediate_size: 0,
    norm_topk_prob: c.norm_topk_prob ?? false,
    moe_layers: sparseLayers(c.num_hidden_layers, c.decoder_sparse_step ?? 1, c.mlp_only_layers ?? []),
    qk_norm: 'per_head',
    qkv_bias: c.attention_bias ?? false,
    o_bias: c.attention_bias ?? false,
  }),
)

const qwen2Moe = z
  .object({
    ...common,
    ...qwenSparse,
    shared_expert_intermediate_size: int(),
    qkv_bias: z.boolean().optional(),
  })
  .transform(
    (c): ModelConfig => ({
      ...base(c, 'qwen2_moe', { rope_theta: 10000, rms_norm_eps: 1e-6 }),
      num_local_experts: c.num_experts,
      moe_intermediate_size: c.moe_intermediate_size,
      intermediate_size: c.intermediate_size,
      shared_expert_intermediate_size: c.shared_expert_intermediate_size,
      norm_topk_prob: c.norm_topk_prob ?? false,
      moe_layers: sparseLayers(c.num_hidden_layers, c.decoder_sparse_step ?? 1, c.mlp_only_layers ?? []),
      qkv_bias: c.qkv_bias ?? true,
    }),
  )

const olmoe = z
  .object({
    ...common,
    intermediate_size: int(),
    num_experts: int(),
    norm_topk_prob: z.boolean().optional(),
    attention_bias: z.boolean().optional(),
    clip_qkv: z.number().positive().nullish(),
  })
  .transform(
    (c): ModelConfig => ({
      ...base(c, 'olmoe', { rope_theta: 10000, rms_norm_eps: 1e-5 }),
      num_local_experts: c.num_experts,
      moe_intermediate_size: c.intermediate_size,
      intermediate_size: c.intermediate_size,
      shared_expert_intermediate_size: 0,
      norm_topk_prob: c.norm_topk_prob ?? false,
      moe_layers: Array(c.num_hidden_layers).fill(true),
      qk_norm: 'whole',
      qkv_bias: c.attention_bias ?? false,
      o_bias: c.attention_bias ?? false,
      clip_qkv: c.clip_qkv ?? null,
    }),
  )

const granite = z
  .object({
    ...common,
    intermediate_size: int(),
    num_local_experts: int(),
    attention_bias: z.boolean().optional(),
    embedding_multiplier: z.number().positive().optional(),
    residual_multiplier: z.number().positive().optional(),
    attention_multiplier: z.number().positive().optional(),
    logits_scaling: z.number().positive().optional(),
  })
  .transform(
    (c): ModelConfig => ({
      ...base(c, 'granitemoe', { rope_theta: 10000, rms_norm_eps: 1e-6 }),
      num_local_experts: c.num_local_experts,
      moe_intermediate_size: c.intermediate_size,
      intermediate_size: c.intermediate_size,
      shared_expert_intermediate_size: 0,
      // Softmax over the top-k logits, which is what renormalising the top-k probabilities gives.
      norm_topk_prob: true,
      moe_layers: Array(c.num_hidden_layers).fill(true),
      qkv_bias: c.attention_bias ?? false,
      o_bias: c.attention_bias ?? false,
      attention_scale: c.attention_multiplier ?? 1,
      embedding_multiplier: c.embedding_multiplier ?? 1,
      residual_multiplier: c.residual_multiplier ?? 1,
      logits_scaling: c.logits_scaling ?? 1,
    }),
  )

const FAMILIES: Record<ModelFamily, z.ZodType<ModelConfig>> = {
  mixtral,
  qwen2_moe: qwen2Moe,
  qwen3_moe: qwen3Moe,
  olmoe,
  granitemoe: granite,
}

/** Checks that hold for every family: what the fused kernels can run. */
function checkShape(c: ModelConfig): string[] {
  const fail: string[] = []
  if (!Number.isInteger(c.head_dim))
    fail.push('hidden_size must divide by num_attention_heads when head_dim is absent')
  if (c.num_attention_heads % c.num_key_value_heads !== 0)
    fail.push('num_attention_heads must be a multiple of num_key_value_heads')
  if (c.num_experts_per_tok > c.num_local_experts)
    fail.push('num_experts_per_tok exceeds the number of experts')
  if (c.num_local_experts < 2) fail.push('a MoE model needs at least 2 experts')
  // Needed by the GroupQueryAttention graph this replaced; not yet tested without it on RotaryEmbedding.
  if (c.head_dim % 16 !== 0)
    fail.push(`head_dim ${c.head_dim} is not a multiple of 16, which the attention kernel needs`)
  return fail
}

export type ConfigParse = { success: true; data: ModelConfig } | { success: false; issues: string[] }

/** Validates a parsed config.json of any supported family. */
export function parseModelConfig(raw: unknown): ConfigParse {
  const type = (raw as { model_type?: unknown } | null)?.model_type
  if (!SUPPORTED_FAMILIES.includes(type as ModelFamily))
    return {
      success: false,
      issues: [
        `model_type: ${JSON.stringify(type)} is not supported; supported are ${SUPPORTED_FAMILIES.join(', ')}`,
      ],
    }
  const parsed = FAMILIES[type as ModelFamily].safeParse(raw)
  if (!parsed.success)
    return {
      success: false,
      issues: parsed.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`),
    }
  const problems = checkShape(parsed.data)
  return problems.length ? { success: false, issues: problems } : { success: true, data: parsed.data }
}
