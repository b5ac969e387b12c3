import { z } from 'zod'

/** The subset of a Hugging Face Mixtral `config.json` the engine uses. */
export const MixtralConfig = z
  .object({
    model_type: z.literal('mixtral', {
      error: (issue) => `model_type must be "mixtral" (got ${JSON.stringify(issue.input)})`,
    }),
    hidden_size: z.number().int().positive(),
    intermediate_size: z.number().int().positive(),
    num_hidden_layers: z.number().int().positive(),
    num_attention_heads: z.number().int().positive(),
    num_key_value_heads: z.number().int().positive(),
    head_dim: z.number().int().positive().nullish(),
    num_local_experts: z.number().int().min(2),
    num_experts_per_tok: z.number().int().positive(),
    rms_norm_eps: z.number().positive(),
    rope_theta: z.number().positive(),
    vocab_size: z.number().int().positive(),
    max_position_embeddings: z.number().int().positive(),
    tie_word_embeddings: z.boolean().default(false),
    bos_token_id: z.number().int().min(0).nullish(),
    eos_token_id: z.union([z.number().int().min(0), z.array(z.number().int().min(0))]).nullish(),
  })
  .transform((c) => ({ ...c, head_dim: c.head_dim ?? c.hidden_size / c.num_attention_heads }))
  .superRefine((c, ctx) => {
    const fail = (message: string) => ctx.addIssue({ code: 'custom', message })
    if (!Number.isInteger(c.head_dim))
      fail('hidden_size must divide by num_attention_heads when head_dim is absent')
    if (c.num_attention_heads % c.num_key_value_heads !== 0)
      fail('num_attention_heads must be a multiple of num_key_value_heads')
    if (c.num_experts_per_tok > c.num_local_experts) fail('num_experts_per_tok exceeds num_local_experts')
    // GroupQueryAttention's rotary kernel works on head_dim multiples of 16.
    if (c.head_dim % 16 !== 0)
      fail(`head_dim ${c.head_dim} is not a multiple of 16, which the attention kernel needs`)
  })
export type MixtralConfig = z.output<typeof MixtralConfig>
