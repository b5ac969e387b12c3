import type { ModelConfig } from './model-config.ts'

// Where each family keeps its weights: the Hugging Face tensor names of one
// decoder layer, and every tensor's shape as config.json implies it.

/** A SwiGLU MLP's three projections, HF layout: gate and up [I,H], down [H,I]. */
export interface SwiGluTensors {
  gate: string
  up: string
  down: string
}

/** Routed experts: one tensor per expert and projection, or granite's two stacked ones. */
export type ExpertTensors =
  | { layout: 'per_expert'; experts: SwiGluTensors[] }
  /** gateUp [E, 2I, H] (gate rows first), down [E, H, I]. */
  | { layout: 'stacked'; gateUp: string; down: string }

export type MlpTensors =
  | { kind: 'dense'; mlp: SwiGluTensors }
  | {
      kind: 'moe'
      router: string
      experts: ExpertTensors
      /** qwen2_moe: an always-on expert scaled by sigmoid(shared_gate x). */
      shared: (SwiGluTensors & { gate_scale: string }) | null
    }

export interface LayerTensors {
  inputNorm: string
  postNorm: string
  q: string
  k: string
  v: string
  o: string
  qNorm: string | null
  kNorm: string | null
  mlp: MlpTensors
}

const swiglu = (p: string, names: [string, string, string]): SwiGluTensors => ({
  gate: `${p}.${names[0]}.weight`,
  up: `${p}.${names[1]}.weight`,
  down: `${p}.${names[2]}.weight`,
})
const HF_MLP: [string, string, string] = ['gate_proj', 'up_proj', 'down_proj']

export function layerTensors(c: ModelConfig, l: number): LayerTensors {
  const p = `model.layers.${l}`
  const attn = (n: string) => `${p}.self_attn.${n}.weight`
  const qk = c.qk_norm !== 'none'
  return {
    inputNorm: `${p}.input_layernorm.weight`,
    postNorm: `${p}.post_attention_layernorm.weight`,
    q: attn('q_proj'),
    k: attn('k_proj'),
    v: attn('v_proj'),
    o: attn('o_proj'),
    qNorm: qk ? attn('q_norm') : null,
    kNorm: qk ? attn('k_norm') : null,
    mlp: mlpTensors(c, l, p),
  }
}

function mlpTensors(c: ModelConfig, l: number, p: string): MlpTensors {
  const E = c.num_local_experts
  if (!c.moe_layers[l]) return { kind: 'dense', mlp: swiglu(`${p}.mlp`, HF_MLP) }
  if (c.model_type === 'mixtral') {
    const m = `${p}.block_sparse_moe`
    const experts = Array.from({ length: E }, (_, e) => swiglu(`${m}.experts.${e}`, ['w1', 'w3', 'w2']))
    return {
      kind: 'moe',
      router: `${m}.gate.weight`,
      experts: { layout: 'per_expert', experts },
      shared: null,
    }
  }
  if (c.model_type === 'granitemoe') {
    const m = `${p}.block_sparse_moe`
    return {
      kind: 'moe',
      router: `${m}.router.layer.weight`,
      experts: { layout: 'stacked', gateUp: `${m}.input_linear.weight`, down: `${m}.output_linear.weight` },
      shared: null,
    }
  }
  const m = `${p}.mlp`
  const experts = Array.from({ length: E }, (_, e) => swiglu(`${m}.experts.${e}`, HF_MLP))
  const shared =
    c.shared_expert_intermediate_size > 0
      ? { ...swiglu(`${m}.shared_expert`, HF_MLP), gate_scale: `${m}.shared_expert_gate.weight` }
      : null
  return { kind: 'moe', router: `${m}.gate.weight`, experts: { layout: 'per_expert', experts }, shared }
}

/** The name of a projection's bias ("x.weight" -> "x.bias"). */
export const biasOf = (weight: string) => weight.replace(/\.weight$/, '.bias')

export interface TensorSpec {
  name: string
  shape: number[]
}

function swigluSpecs(t: SwiGluTensors, I: number, H: number): TensorSpec[] {
  return [
    { name: t.gate, shape: [I, H] },
    { name: t.up, shape: [I, H] },
    { name: t.down, shape: [H, I] },
  ]
}

/** Every tensor the engine reads, with the shape config.json implies. */
export function expectedTensors(c: ModelConfig): TensorSpec[] {
  const H = c.hidden_size
  const D = c.head_dim
  const qRows = c.num_attention_heads * D
  const kvRows = c.num_key_value_heads * D
  const out: TensorSpec[] = [
    { name: 'model.embed_tokens.weight', shape: [c.vocab_size, H] },
    { name: 'model.norm.weight', shape: [H] },
  ]
  if (!c.tie_word_embeddings) out.push({ name: 'lm_head.weight', shape: [c.vocab_size, H] })
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const t = layerTensors(c, l)
    out.push(
      { name: t.inputNorm, shape: [H] },
      { name: t.postNorm, shape: [H] },
      { name: t.q, shape: [qRows, H] },
      { name: t.k, shape: [kvRows, H] },
      { name: t.v, shape: [kvRows, H] },
      { name: t.o, shape: [H, qRows] },
    )
    if (c.qkv_bias)
      out.push(
        { name: biasOf(t.q), shape: [qRows] },
        { name: biasOf(t.k), shape: [kvRows] },
        { name: biasOf(t.v), shape: [kvRows] },
      )
    if (c.o_bias) out.push({ name: biasOf(t.o), shape: [H] })
    if (t.qNorm && t.kNorm) {
      const perHead = c.qk_norm === 'per_head'
      out.push(
        { name: t.qNorm, shape: [perHead ? D : qRows] },
        { name: t.kNorm, shape: [perHead ? D : kvRows] },
      )
    }
    const m = t.mlp
    if (m.kind === 'dense') {
      out.push(...swigluSpecs(m.mlp, c.intermediate_size, H))
      continue
    }
    const E = c.num_local_experts
    const I = c.moe_intermediate_size
    out.push({ name: m.router, shape: [E, H] })
    if (m.experts.layout === 'stacked')
      out.push({ name: m.experts.gateUp, shape: [E, 2 * I, H] }, { name: m.experts.down, shape: [E, H, I] })
    else for (const e of m.experts.experts) out.push(...swigluSpecs(e, I, H))
    if (m.shared)
      out.push(...swigluSpecs(m.shared, c.shared_expert_intermediate_size, H), {
        name: m.shared.gate_scale,
        shape: [1, H],
      })
  }
  return out
}
