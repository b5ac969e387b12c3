import { totalmem } from 'node:os'
import type { ModelConfig } from './model-config.ts'

// How much memory a model needs at a dtype, batch and context, from
// config.json alone: the weights as the exported graph holds them plus the KV
// cache at its full size. `moe plan` prints it, and the engine refuses to load
// a model whose plan does not fit the machine.

export const PLAN_DTYPES = ['fp32', 'fp16', 'int8', 'int4'] as const
export type PlanDtype = (typeof PLAN_DTYPES)[number]

/** Weight-only quantization: symmetric blocks of this many weights, one fp32 scale each. */
export const QUANT_BLOCK = 32

export interface WeightComponents {
  embedding: number
  /** The output projection; counted when tied too, since the graph holds its own transposed copy. */
  lm_head: number
  attention: number
  router: number
  experts: number
  shared_experts: number
  dense_mlp: number
  /** RMSNorm weights and the rotary tables. */
  norms_and_rope: number
}

export interface MemoryPlan {
  model_type: string
  dtype: PlanDtype
  kv_dtype: 'fp32' | 'fp16'
  max_batch: number
  max_context: number
  parameters: number
  /** Bytes per component at this dtype. */
  components: WeightComponents
  weights_bytes: number
  kv_bytes_per_token: number
  kv_bytes: number
  /** Positions the prefix cache may hold (MOE_PREFIX_CACHE_TOKENS), and their bytes. */
  prefix_cache_tokens: number
  prefix_cache_bytes: number
  total_bytes: number
  memory_bytes: number
  fits: boolean
  /** The most precise dtype whose plan fits, or null when none does. */
  suggested_dtype: PlanDtype | null
  message: string
}

/** Parameter counts per component. */
export function parameterCounts(c: ModelConfig): WeightComponents {
  const H = c.hidden_size
  const D = c.head_dim
  const q = c.num_attention_heads * D
  const kv = c.num_key_value_heads * D
  const moeLayers = c.moe_layers.filter(Boolean).length
  const denseLayers = c.num_hidden_layers - moeLayers
  const qkNorm = c.qk_norm === 'per_head' ? 2 * D : c.qk_norm === 'whole' ? q + kv : 0
  const attentionPerLayer = 2 * q * H + 2 * kv * H + (c.qkv_bias ? q + 2 * kv : 0) + (c.o_bias ? H : 0)
  const S = c.shared_expert_intermediate_size
  return {
    embedding: c.vocab_size * H,
    lm_head: c.vocab_size * H,
    attention: c.num_hidden_layers * attentionPerLayer,
    router: moeLayers * c.num_local_experts * H,
    experts: moeLayers * c.num_local_experts * 3 * c.moe_intermediate_size * H,
    shared_experts: S > 0 ? moeLayers * (3 * S * H + H) : 0,
    dense_mlp: denseLayers * 3 * c.intermediate_size * H,
    norms_and_rope: c.num_hidden_layers * (2 * H + qkNorm) + H + c.max_position_embeddings * D,
  }
}

const QUANTIZED: ReadonlySet<keyof WeightComponents> = new Set([
  'lm_head',
  'attention',
  'experts',
  'shared_experts',
  'dense_mlp',
])

/** Bytes per weight: fp16 graphs for fp16; int8/int4 keep the small tensors and the embedding in fp32. */
function bytesPerWeight(dtype: PlanDtype, component: keyof WeightComponents): number {
  if (dtype === 'fp16') return 2
  if (dtype === 'fp32' || !QUANTIZED.has(component)) return 4
  return (dtype === 'int8' ? 1 : 0.5) + 4 / QUANT_BLOCK
}

export function formatBytes(n: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB']
  let i = 0
  let v = n
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000
    i++
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`
}

export interface PlanOptions {
  dtype: PlanDtype
  maxBatch: number
  maxContext: number
  /** Memory to fit in; defaults to this machine's (os.totalmem). */
  memoryBytes?: number
  /** Prompt positions the prefix cache keeps beside the batch's KV (default 0). */
  prefixCacheTokens?: number
}

function sizeAt(c: ModelConfig, dtype: PlanDtype, maxBatch: number, maxContext: number, prefixTokens = 0) {
  const counts = parameterCounts(c)
  const components = {} as WeightComponents
  let weights = 0
  for (const [k, n] of Object.entries(counts) as Array<[keyof WeightComponents, number]>) {
    components[k] = Math.ceil(n * bytesPerWeight(dtype, k))
    weights += components[k]
  }
  // The KV cache takes the graph's float type: fp16 only in fp16 graphs.
  const kvDtype: 'fp32' | 'fp16' = dtype === 'fp16' ? 'fp16' : 'fp32'
  const perToken = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * (kvDtype === 'fp16' ? 2 : 4)
  const kv = perToken * maxBatch * maxContext
  const prefix = perToken * prefixTokens
  const parameters = Object.values(counts).reduce((a, b) => a + b, 0)
  return { components, weights, kvDtype, perToken, kv, prefix, total: weights + kv + prefix, parameters }
}

/** The memory plan of a model at one dtype, with the dtype that would fit when this one does not. */
export function planMemory(c: ModelConfig, opts: PlanOptions): MemoryPlan {
  const memory = opts.memoryBytes ?? totalmem()
  const maxContext = Math.min(opts.maxContext, c.max_position_embeddings)
  const prefixTokens = opts.prefixCacheTokens ?? 0
  const s = sizeAt(c, opts.dtype, opts.maxBatch, maxContext, prefixTokens)
  const fits = s.total <= memory
  const suggested =
    PLAN_DTYPES.find((d) => sizeAt(c, d, opts.maxBatch, maxContext, prefixTokens).total <= memory) ?? null
  const prefix = prefixTokens > 0 ? ` + prefix cache ${formatBytes(s.prefix)} for ${prefixTokens} tokens` : ''
  const need = `${c.model_type} at ${opts.dtype} needs ${formatBytes(s.total)} (weights ${formatBytes(s.weights)} + KV cache ${formatBytes(s.kv)} for ${opts.maxBatch} x ${maxContext} tokens${prefix})`
  const advice =
    suggested === null
      ? 'no dtype fits; lower the batch or context, or use a machine with more memory'
      : `${suggested} would fit`
  const message = fits
    ? `${need}; fits in ${formatBytes(memory)}`
    : `${need}, more than the ${formatBytes(memory)} available; ${advice}`
  return {
    model_type: c.model_type,
    dtype: opts.dtype,
    kv_dtype: s.kvDtype,
    max_batch: opts.maxBatch,
    max_context: maxContext,
    parameters: s.parameters,
    components: s.components,
    weights_bytes: s.weights,
    kv_bytes_per_token: s.perToken,
    kv_bytes: s.kv,
    prefix_cache_tokens: prefixTokens,
    prefix_cache_bytes: s.prefix,
    total_bytes: s.total,
    memory_bytes: memory,
    fits,
    suggested_dtype: suggested,
    message,
  }
}

export class ModelMemoryError extends Error {
  override name = 'ModelMemoryError'
  readonly code = 'model_too_large'
  readonly plan: MemoryPlan
  constructor(plan: MemoryPlan) {
    super(`model does not fit in memory: ${plan.message}`)
    this.plan = plan
  }
}

/** Throws ModelMemoryError carrying the plan when the model would not fit. */
export function assertFits(c: ModelConfig, opts: PlanOptions): MemoryPlan {
  const plan = planMemory(c, opts)
  if (!plan.fits) throw new ModelMemoryError(plan)
  return plan
}

/** The plan as a short table for people. */
export function formatPlan(p: MemoryPlan): string {
  const rows = Object.entries(p.components)
    .filter(([, b]) => b > 0)
    .map(([k, b]) => `  ${k.padEnd(16)} ${formatBytes(b).padStart(10)}`)
  return [
    `${p.model_type}: ${(p.parameters / 1e9).toFixed(2)}B parameters at ${p.dtype} (KV cache ${p.kv_dtype})`,
    'weights:',
    ...rows,
    `  ${'total'.padEnd(16)} ${formatBytes(p.weights_bytes).padStart(10)}`,
    `KV cache: ${formatBytes(p.kv_bytes_per_token)} per token; ${p.max_batch} x ${p.max_context} tokens = ${formatBytes(p.kv_bytes)}`,
    p.prefix_cache_tokens > 0
      ? `prefix cache: ${p.prefix_cache_tokens} tokens = ${formatBytes(p.prefix_cache_bytes)}`
      : '',
    `total: ${formatBytes(p.total_bytes)} of ${formatBytes(p.memory_bytes)}: ${p.fits ? 'fits' : 'does not fit'}`,
    p.fits ? '' : `suggested dtype: ${p.suggested_dtype ?? 'none fits'}`,
  ]
    .filter(Boolean)
    .join('\n')
}
