import type { HfConfig, RandomModelOptions } from '../src/engine/random-model.ts'

// Small checkpoints of each supported family with its real structure (names,
// layouts, the features that set it apart), for tests to write and load.

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

export interface Family {
  config: HfConfig
  opts?: RandomModelOptions
  /** An expert subset to restrict routing to (at least top-k of them). */
  subset: number[]
}

export const FAMILIES: Record<string, Family> = {
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
