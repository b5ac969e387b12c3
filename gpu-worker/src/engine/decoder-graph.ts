import { routedExpertsDispatch } from './expert-dispatch.ts'
import type { ModelConfig } from './model-config.ts'
import { type ModelDir, tensorEntry } from './model-dir.ts'
import {
  biasOf,
  type ExpertTensors,
  type LayerTensors,
  type MlpTensors,
  type SwiGluTensors,
} from './model-layout.ts'
import type { ExpertKernel, ExportDtype } from './onnx-export.ts'
import type { ElemType, OnnxGraphWriter } from './onnx-graph.ts'
import {
  matMulNBits,
  type QuantBits,
  quantizable,
  quantizeMatrix,
  quantizeRows,
  routedExpertsNBits,
} from './quantize.ts'
import { readTensorF32, readTensorRowsF32, toF16Bits } from './safetensors.ts'

// The pieces of one decoder layer as ONNX nodes: attention (rotary, a cache
// that is only read), routed experts (a per-expert dispatch, or com.microsoft.MoE), and
// what those fused ops cannot express (q/k norms, biases, the shared expert,
// dense MLP layers) from standard ONNX ops around them.

export function transpose(src: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols)
  for (let r = 0; r < rows; r++) {
    const base = r * cols
    for (let c = 0; c < cols; c++) out[c * rows + r] = src[base + c]!
  }
  return out
}

export function ropeCaches(c: ModelConfig): { cos: Float32Array; sin: Float32Array } {
  const half = c.head_dim / 2
  const cos = new Float32Array(c.max_position_embeddings * half)
  const sin = new Float32Array(c.max_position_embeddings * half)
  for (let p = 0; p < c.max_position_embeddings; p++) {
    for (let i = 0; i < half; i++) {
      const angle = p / c.rope_theta ** ((2 * i) / c.head_dim)
      cos[p * half + i] = Math.cos(angle)
      sin[p * half + i] = Math.sin(angle)
    }
  }
  return { cos, sin }
}

const scaled = (a: Float32Array, s: number) => (s === 1 ? a : a.map((v) => v * s))

/** The graph under construction plus the checkpoint it reads from. */
export class DecoderGraph {
  readonly c: ModelConfig
  readonly T: ElemType
  readonly g: OnnxGraphWriter
  readonly model: ModelDir
  readonly dtype: ExportDtype
  /** Weight-only quantization of the attention and MLP matrices (int8/int4 exports). */
  readonly bits: QuantBits | null
  /** How fp32 exports run routed experts (quantized ones always dispatch per expert). */
  readonly expertKernel: ExpertKernel

  constructor(
    g: OnnxGraphWriter,
    model: ModelDir,
    dtype: ExportDtype,
    expertKernel: ExpertKernel = 'per-expert',
  ) {
    this.g = g
    this.model = model
    this.dtype = dtype
    this.expertKernel = expertKernel
    this.c = model.config
    this.T = dtype === 'fp16' ? 'float16' : 'float32'
    this.bits = dtype === 'int8' ? 8 : dtype === 'int4' ? 4 : null
  }

  read(name: string): Float32Array {
    return readTensorF32(tensorEntry(this.model, name))
  }

  /** An initializer in the graph's float type. */
  weight(name: string, dims: number[], data: Float32Array): string {
    return this.g.initializer(name, this.T, dims, this.dtype === 'fp16' ? toF16Bits(data) : data)
  }

  /**
   * x W^T (+ b) for HF weights [rows, cols] stacked by rows, each times
   * `scale`. Quantized exports use MatMulNBits unless `exact` (the router and
   * the shared-expert gate: tiny, and routing is sensitive to them).
   */
  linear(
    x: string,
    names: string[],
    cols: number,
    opts: { bias?: boolean; scale?: number; exact?: boolean } = {},
  ): string {
    const parts = names.map((n) => this.read(n))
    const rows = parts.reduce((a, p) => a + p.length / cols, 0)
    const w = new Float32Array(rows * cols)
    let at = 0
    for (const p of parts) {
      w.set(p, at)
      at += p.length
    }
    const scale = opts.scale ?? 1
    const y =
      this.bits && !opts.exact && quantizable(cols)
        ? matMulNBits(this.g, x, names[0]!, quantizeMatrix(scaled(w, scale), rows, cols, this.bits))
        : this.g.op('MatMul', [
            x,
            this.weight(`${names[0]}_t`, [cols, rows], scaled(transpose(w, rows, cols), scale)),
          ])
    if (!opts.bias) return y
    const b = new Float32Array(rows)
    at = 0
    for (const n of names) {
      const part = this.read(biasOf(n))
      b.set(part, at)
      at += part.length
    }
    return this.g.op('Add', [y, this.weight(`${biasOf(names[0]!)}_packed`, [rows], scaled(b, scale))])
  }

  /** RMSNorm over the last axis, computed in fp32 as HF does. */
  rmsNorm(x: string, name: string): string {
    const w = this.read(name)
    return this.g.op('SimplifiedLayerNormalization', [x, this.weight(name, [w.length], w)], {
      axis: -1,
      epsilon: { float: this.c.rms_norm_eps },
      stash_type: 1,
    })
  }

  /** down(silu(gate x) * up x) from standard ops (the fused MoE op has no dense or gated-shared form). */
  swiglu(x: string, t: SwiGluTensors, I: number, scale: number): string {
    const H = this.c.hidden_size
    const gu = this.linear(x, [t.gate, t.up], H)
    const [gate, up] = this.g.node('Split', [gu, this.g.constInt64([I, I])], 2, { axis: -1 })
    const act = this.g.op('Mul', [this.g.op('Mul', [gate!, this.g.op('Sigmoid', [gate!])]), up!])
    return this.linear(act, [t.down], I, { scale })
  }
}

export interface AttentionIo {
  /** This layer's cache, [B,kvH,1,P,D]: read, never written by the graph. */
  pastK: string
  pastV: string
  /** Graph outputs: this step's keys (after rotary) and values, [B,kvH,1,S,D]. */
  newK: string
  newV: string
  /** [P, S]: the scores' split between past and new keys. */
  keySplit: string
  /** Each token's position, [B,S] int64. */
  positions: string
  /** Additive mask over past then new keys (0 or -inf), [B,1,1,S,P+S], shared by every layer. */
  mask: string
  /** attention_scale as a scalar of the graph's type. */
  scale: string
  cos: string
  sin: string
}

/**
 * Self-attention of one layer on normed input h; returns its output already
 * scaled for the residual. Standard ops plus RotaryEmbedding and FusedMatMul
 * rather than GroupQueryAttention: GQA appends to its cache through a present
 * output, which would have to be bound to the cache buffer and so crosses the
 * Node binding (copied into a fresh buffer) on every step, in proportion to the
 * whole cache. Here the cache is only an input and the graph returns just the
 * step's new keys and values, which the engine writes into the cache itself.
 */
export function attention(d: DecoderGraph, t: LayerTensors, h: string, io: AttentionIo): string {
  const { c, g } = d
  const H = c.hidden_size
  const D = c.head_dim
  const nH = c.num_attention_heads
  const kvH = c.num_key_value_heads
  const group = nH / kvH
  const packed = d.linear(h, [t.q, t.k, t.v], H, { bias: c.qkv_bias })
  let [q, k, v] = g.node('Split', [packed, g.constInt64([nH * D, kvH * D, kvH * D])], 3, { axis: -1 }) as [
    string,
    string,
    string,
  ]
  if (c.qk_norm === 'whole') {
    q = d.rmsNorm(q, t.qNorm!)
    k = d.rmsNorm(k, t.kNorm!)
  } else if (c.qk_norm === 'per_head') {
    const perHead = (x: string, heads: number, norm: string) => {
      const split = g.op('Reshape', [x, g.constInt64([0, 0, heads, D])])
      return g.op('Reshape', [d.rmsNorm(split, norm), g.constInt64([0, 0, heads * D])])
    }
    q = perHead(q, nH, t.qNorm!)
    k = perHead(k, kvH, t.kNorm!)
  }
  if (c.clip_qkv !== null) {
    const lo = d.weight(g.fresh('clip_min'), [], Float32Array.of(-c.clip_qkv))
    const hi = d.weight(g.fresh('clip_max'), [], Float32Array.of(c.clip_qkv))
    ;[q, k, v] = [q, k, v].map((x) => g.op('Clip', [x, lo, hi])) as [string, string, string]
  }
  const rotary = (x: string) =>
    g.op('RotaryEmbedding', [x, io.positions, io.cos, io.sin], { interleaved: 0 }, 'com.microsoft')
  // [B,S,kvH*D] -> [B,kvH,1,S,D]: the new keys and values, already shaped to broadcast over each group.
  const kvHeads = (x: string, out: string) =>
    g.node('Transpose', [g.op('Reshape', [x, g.constInt64([0, 0, kvH, 1, D])])], [out], {
      perm: [0, 2, 3, 1, 4],
    })
  kvHeads(rotary(k), io.newK)
  kvHeads(v, io.newV)
  // Queries grouped by the KV head they share, [B,kvH,group,S,D], against keys and values
  // broadcast over the group, [B,kvH,1,P,D]: at decode each product is one row (S=1) with
  // alpha 1, which MLAS runs without packing the cache (so q is scaled beforehand).
  const qScaled = g.op('Mul', [rotary(q), io.scale])
  const qg = g.op('Transpose', [g.op('Reshape', [qScaled, g.constInt64([0, 0, kvH, group, D])])], {
    perm: [0, 2, 3, 1, 4],
  })
  const scores = (keys: string) => g.op('FusedMatMul', [qg, keys], { transA: 0, transB: 1 }, 'com.microsoft')
  const probs = g.op(
    'Softmax',
    [g.op('Add', [g.op('Concat', [scores(io.pastK), scores(io.newK)], { axis: -1 }), io.mask])],
    { axis: -1 },
  )
  const [pPast, pNew] = g.node('Split', [probs, io.keySplit], 2, { axis: -1 })
  const ctx = g.op('Add', [g.op('MatMul', [pPast!, io.pastV]), g.op('MatMul', [pNew!, io.newV])])
  // [B,kvH,group,S,D] -> [B,S,nH*D] with head index kvHead*group + j, as GQA numbers them.
  const merged = g.op('Reshape', [
    g.op('Transpose', [ctx], { perm: [0, 3, 1, 2, 4] }),
    g.constInt64([0, 0, nH * D]),
  ])
  return d.linear(merged, [t.o], nH * D, { bias: c.o_bias, scale: c.residual_multiplier })
}

/**
 * Readers of each routed expert's gate and up [I,H] and down [H,I], whichever
 * way the checkpoint stores them. Each reads its expert when called, so one
 * expert at a time need be in memory (a layer's experts are GBs at full size).
 */
function expertReaders(
  d: DecoderGraph,
  t: ExpertTensors,
): Array<() => { gate: Float32Array; up: Float32Array; down: Float32Array }> {
  const { hidden_size: H, moe_intermediate_size: I, num_local_experts: E } = d.c
  if (t.layout === 'per_expert')
    return t.experts.map((x) => () => ({ gate: d.read(x.gate), up: d.read(x.up), down: d.read(x.down) }))
  // Stacked [E, 2I, H] (gate rows first) and [E, H, I]: expert e is row e of the first axis.
  const gu = tensorEntry(d.model, t.gateUp)
  const down = tensorEntry(d.model, t.down)
  return Array.from({ length: E }, (_, e) => () => {
    const both = readTensorRowsF32(gu, e, 1)
    return { gate: both.subarray(0, I * H), up: both.subarray(I * H), down: readTensorRowsF32(down, e, 1) }
  })
}

/** The valid (unpadded) tokens of a pass as indices into its flat [B*S] rows: [T] and [T,1]. */
export interface ValidTokens {
  index: string
  index2d: string
}

/**
 * The layer's MLP on normed input h [B,S,H]: routed experts (+ a gated shared
 * expert), or a dense MLP. Returns its output (residual-scaled) and the
 * experts chosen per token, [1, B*S, k] (-1 in dense layers). The routed
 * experts run on the valid tokens only (zeros elsewhere): a pass whose rows are
 * padded to its longest, e.g. decode rows beside a prompt chunk, would
 * otherwise route every padding position through them.
 */
export function mlp(
  d: DecoderGraph,
  t: MlpTensors,
  h: string,
  layer: number,
  expertBias: string,
  valid: ValidTokens,
): { out: string; chosen: string } {
  const { c, g } = d
  const H = c.hidden_size
  const E = c.num_local_experts
  const k = c.num_experts_per_tok
  const rs = c.residual_multiplier
  const flat = g.op('Reshape', [h, g.constInt64([-1, H])])
  if (t.kind === 'dense') {
    const tokens = g.op('Slice', [g.op('Shape', [flat]), g.constInt64([0]), g.constInt64([1])])
    const shape = g.op('Concat', [g.constInt64([1]), tokens, g.constInt64([k])], { axis: 0 })
    const none = g.op('Expand', [g.constInt64(Array(k).fill(-1), [1, 1, k]), shape])
    return { out: d.swiglu(h, t.mlp, c.intermediate_size, rs), chosen: none }
  }
  // Router logits plus the pool's expert bias (0 or -inf per expert).
  const logits = g.op('Reshape', [
    g.op('Add', [d.linear(h, [t.router], H, { exact: true }), expertBias]),
    g.constInt64([-1, E]),
  ])
  const packed = routedExperts(
    d,
    t.experts,
    g.op('Gather', [flat, valid.index], { axis: 0 }),
    g.op('Gather', [logits, valid.index], { axis: 0 }),
    `model.layers.${layer}.experts`,
  )
  const zeros = g.op('Expand', [d.weight(g.fresh('zero'), [], Float32Array.of(0)), g.op('Shape', [flat])])
  let out = g.op('Reshape', [g.op('ScatterND', [zeros, valid.index2d, packed]), g.op('Shape', [h])])
  if (t.shared) {
    const shared = d.swiglu(h, t.shared, c.shared_expert_intermediate_size, rs)
    const gate = g.op('Sigmoid', [d.linear(h, [t.shared.gate_scale], H, { exact: true })])
    out = g.op('Add', [out, g.op('Mul', [shared, gate])])
  }
  // The same top-k the MoE kernel takes, exported for expert-load telemetry.
  const [, indices] = g.node('TopK', [logits, g.constInt64([k])], 2, { axis: -1 })
  return { out, chosen: g.op('Unsqueeze', [indices!, g.constInt64([0])]) }
}

/**
 * Routed experts on flat [N,H] rows: the fused MoE op, or a per-expert
 * dispatch (MatMulNBits when quantizing, MatMul on fp32 when asked for).
 */
function routedExperts(d: DecoderGraph, t: ExpertTensors, flat: string, logits: string, p: string): string {
  const { c, g } = d
  const { hidden_size: H, moe_intermediate_size: I, num_local_experts: E } = c
  const rs = c.residual_multiplier
  const experts = expertReaders(d, t)
  if (d.bits && quantizable(H) && quantizable(I)) {
    const bits = d.bits
    // Read, quantized and written one expert at a time (routedExpertsNBits calls each in turn).
    const sources = experts.map((read) => () => {
      const x = read()
      return { gateUp: quantizeRows([x.gate, x.up], H, bits), down: quantizeRows([x.down], I, bits, rs) }
    })
    const opts = { k: c.num_experts_per_tok, normTopK: c.norm_topk_prob, I, prefix: p }
    return routedExpertsNBits(g, flat, logits, sources, opts)
  }
  if (d.expertKernel === 'per-expert' && d.dtype === 'fp32') {
    // One matrix product per projection over every token that chose the expert: its weights
    // are read once per step, where the fused op's CPU kernel reads them once per token.
    const projections = experts.map((read, j) => () => {
      const x = read()
      const gateUp = new Float32Array(2 * I * H)
      gateUp.set(x.gate)
      gateUp.set(x.up, I * H)
      const wGateUp = d.weight(`${p}.${j}.gate_up_t`, [H, 2 * I], transpose(gateUp, 2 * I, H))
      const wDown = d.weight(`${p}.${j}.down_t`, [I, H], scaled(transpose(x.down, H, I), rs))
      return {
        gateUp: (h: string) => g.op('MatMul', [h, wGateUp]),
        down: (h: string) => g.op('MatMul', [h, wDown]),
      }
    })
    return routedExpertsDispatch(g, flat, logits, projections, {
      k: c.num_experts_per_tok,
      normTopK: c.norm_topk_prob,
      I,
    })
  }
  // swiglu_fusion=1 wants gate and up rows interleaved: row 2i = gate[i], row 2i+1 = up[i].
  const fc1 = new Float32Array(E * 2 * I * H)
  const fc2 = new Float32Array(E * H * I)
  experts.forEach((read, e) => {
    const x = read()
    for (let i = 0; i < I; i++) {
      fc1.set(x.gate.subarray(i * H, (i + 1) * H), (e * 2 * I + 2 * i) * H)
      fc1.set(x.up.subarray(i * H, (i + 1) * H), (e * 2 * I + 2 * i + 1) * H)
    }
    fc2.set(scaled(x.down, rs), e * H * I)
  })
  return g.op(
    'MoE',
    [flat, logits, d.weight(`${p}.fc1`, [E, 2 * I, H], fc1), '', d.weight(`${p}.fc2`, [E, H, I], fc2)],
    {
      k: c.num_experts_per_tok,
      activation_type: 'swiglu',
      swiglu_fusion: 1,
      // 1: softmax over the top-k logits; 0: softmax over all experts, top-k taken unrenormalised
      // (checked against the reference: it is not applied to raw logits).
      normalize_routing_weights: c.norm_topk_prob ? 1 : 0,
      activation_alpha: { float: 1.0 },
      activation_beta: { float: 0.0 },
      swiglu_limit: { float: 1e30 },
    },
    'com.microsoft',
  )
}
