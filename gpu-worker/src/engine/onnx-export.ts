import { accessSync, constants, existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { MixtralConfig } from './model-config.ts'
import { type ModelDir, tensorEntry } from './model-dir.ts'
import { type ElemType, OnnxGraphWriter } from './onnx-graph.ts'
import { readTensorF32, toF16Bits } from './safetensors.ts'

// Exports a Mixtral checkpoint to one ONNX graph that ONNX Runtime runs with
// its fused kernels: GroupQueryAttention (rotary + KV cache) and the sparse
// com.microsoft.MoE (top-k experts per token, interleaved SwiGLU).
//
// Graph I/O (the onnxruntime-genai / transformers.js convention, plus two):
//   input_ids [B,S] int64, attention_mask [B,T] int64 (right-padded rows),
//   past_key_values.N.{key,value} [B,kvH,P,D], expert_bias [B|1,E] (0 or -inf
//   per expert; a [1,E] row of zeros allows every expert)
//   -> logits [B,1,V] for each row's last valid token, present.N.{key,value},
//      expert_indices [L, B*S, k] int64: the experts the router picked.

export type ExportDtype = 'fp32' | 'fp16'

export interface ExportedModel {
  modelPath: string
  dtype: ExportDtype
  /** True when the export was found in the cache. */
  cached: boolean
}

export const graphNames = {
  inputIds: 'input_ids',
  attentionMask: 'attention_mask',
  expertBias: 'expert_bias',
  pastKey: (l: number) => `past_key_values.${l}.key`,
  pastValue: (l: number) => `past_key_values.${l}.value`,
  presentKey: (l: number) => `present.${l}.key`,
  presentValue: (l: number) => `present.${l}.value`,
  logits: 'logits',
  expertIndices: 'expert_indices',
} as const

/** Bump when the graph this file builds changes, so cached exports are rebuilt. */
export const EXPORT_FORMAT = 2

/** Where the export of this model lives: next to the model, else in the temp dir if that is read-only. */
export function exportDir(model: ModelDir, dtype: ExportDtype): string {
  const key = `${model.fingerprint}-${dtype}-v${EXPORT_FORMAT}`
  let base = join(model.dir, '.onnx-cache')
  try {
    accessSync(model.dir, constants.W_OK)
  } catch {
    base = join(process.env.MOE_EXPORT_CACHE ?? join(tmpdir(), 'moe-edge-onnx-cache'), model.fingerprint)
  }
  return join(base, key)
}

/** Returns the cached export, building it first if needed. */
export function ensureExported(model: ModelDir, dtype: ExportDtype = 'fp32'): ExportedModel {
  const dir = exportDir(model, dtype)
  const modelPath = join(dir, 'model.onnx')
  if (existsSync(modelPath)) return { modelPath, dtype, cached: true }
  const staging = `${dir}.tmp-${process.pid}-${Date.now()}`
  mkdirSync(staging, { recursive: true })
  try {
    const bytes = buildGraph(model, dtype, join(staging, 'model.onnx.data'))
    writeFileSync(join(staging, 'model.onnx'), bytes)
    try {
      renameSync(staging, dir) // atomic: a concurrent exporter either wins or finds ours
    } catch (e) {
      if (!existsSync(modelPath)) throw e
      rmSync(staging, { recursive: true, force: true })
    }
  } catch (e) {
    rmSync(staging, { recursive: true, force: true })
    throw e
  }
  return { modelPath, dtype, cached: false }
}

function transpose(src: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols)
  for (let r = 0; r < rows; r++) {
    const base = r * cols
    for (let c = 0; c < cols; c++) out[c * rows + r] = src[base + c]!
  }
  return out
}

export function ropeCaches(c: MixtralConfig): { cos: Float32Array; sin: Float32Array } {
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

function buildGraph(model: ModelDir, dtype: ExportDtype, dataFile: string): Uint8Array {
  const c = model.config
  const g = new OnnxGraphWriter(dataFile)
  const T: ElemType = dtype === 'fp16' ? 'float16' : 'float32'
  const H = c.hidden_size
  const I = c.intermediate_size
  const D = c.head_dim
  const E = c.num_local_experts
  const nH = c.num_attention_heads
  const kvH = c.num_key_value_heads
  const L = c.num_hidden_layers
  const read = (name: string) => readTensorF32(tensorEntry(model, name))
  const weight = (name: string, dims: number[], data: Float32Array) =>
    g.initializer(name, T, dims, dtype === 'fp16' ? toF16Bits(data) : data)

  // Inputs
  const inputIds = g.input(graphNames.inputIds, 'int64', ['batch', 'sequence'])
  const mask = g.input(graphNames.attentionMask, 'int64', ['batch', 'total_sequence'])
  // A plain input rather than an overridable initializer: ORT's session does
  // not list initializer-backed inputs, so feeds to them are silently dropped.
  const expertBias = g.input(graphNames.expertBias, T, ['bias_batch', E])

  // seqlens_k = valid tokens per row - 1; total_sequence_length = mask width (GQA's contract).
  const one = g.constInt64([1], [])
  const axis1 = g.constInt64([1])
  const validLen = g.op('ReduceSum', [mask, axis1], { keepdims: 0 })
  const lastPos = g.op('Sub', [validLen, one])
  const seqlensK = g.op('Cast', [lastPos], { to: 6 /* int32 */ })
  const maskShape = g.op('Shape', [mask])
  const totalLen = g.op('Cast', [g.op('Gather', [maskShape, g.constInt64([1], [])], { axis: 0 })], { to: 6 })

  const rope = ropeCaches(c)
  const cosCache = weight('rope.cos', [c.max_position_embeddings, D / 2], rope.cos)
  const sinCache = weight('rope.sin', [c.max_position_embeddings, D / 2], rope.sin)

  const embed = read('model.embed_tokens.weight')
  const embedName = weight('model.embed_tokens.weight', [c.vocab_size, H], embed)
  let x = g.op('Gather', [embedName, inputIds], { axis: 0 })
  const xShape = g.op('Shape', [x])
  const rmsNorm = (input: string, name: string) =>
    g.op('SimplifiedLayerNormalization', [input, weight(name, [H], read(name))], {
      axis: -1,
      epsilon: { float: c.rms_norm_eps },
      stash_type: 1, // compute in fp32 as HF does
    })
  const biasRows = g.op('Reshape', [expertBias, g.constInt64([-1, 1, E])])
  const flatRows = g.constInt64([-1, E])
  const flatHidden = g.constInt64([-1, H])
  const chosen: string[] = []

  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`
    // Attention: one packed QKV MatMul, GQA applies rotary and appends to the KV cache.
    const h = rmsNorm(x, `${p}.input_layernorm.weight`)
    const q = read(`${p}.self_attn.q_proj.weight`)
    const k = read(`${p}.self_attn.k_proj.weight`)
    const v = read(`${p}.self_attn.v_proj.weight`)
    const qkvRows = (nH + 2 * kvH) * D
    const qkv = new Float32Array(qkvRows * H)
    qkv.set(q, 0)
    qkv.set(k, nH * D * H)
    qkv.set(v, (nH + kvH) * D * H)
    const qkvW = weight(`${p}.self_attn.qkv_proj.weight_t`, [H, qkvRows], transpose(qkv, qkvRows, H))
    const packed = g.op('MatMul', [h, qkvW])
    const pastK = g.input(graphNames.pastKey(l), T, ['batch', kvH, 'past_sequence', D])
    const pastV = g.input(graphNames.pastValue(l), T, ['batch', kvH, 'past_sequence', D])
    const presentK = g.output(graphNames.presentKey(l), T, ['batch', kvH, 'present_sequence', D])
    const presentV = g.output(graphNames.presentValue(l), T, ['batch', kvH, 'present_sequence', D])
    const [attn] = g.node(
      'GroupQueryAttention',
      [packed, '', '', pastK, pastV, seqlensK, totalLen, cosCache, sinCache],
      [g.fresh('attn'), presentK, presentV],
      { num_heads: nH, kv_num_heads: kvH, do_rotary: 1, rotary_interleaved: 0 },
      'com.microsoft',
    )
    const oW = weight(
      `${p}.self_attn.o_proj.weight_t`,
      [nH * D, H],
      transpose(read(`${p}.self_attn.o_proj.weight`), H, nH * D),
    )
    x = g.op('Add', [x, g.op('MatMul', [attn!, oW])])

    // Sparse MoE: router logits (+ the pool's expert bias) -> top-k experts per token.
    const h2 = rmsNorm(x, `${p}.post_attention_layernorm.weight`)
    const gateW = weight(
      `${p}.block_sparse_moe.gate.weight_t`,
      [H, E],
      transpose(read(`${p}.block_sparse_moe.gate.weight`), E, H),
    )
    const routerLogits = g.op('Reshape', [g.op('Add', [g.op('MatMul', [h2, gateW]), biasRows]), flatRows])
    const fc1 = new Float32Array(E * 2 * I * H)
    const fc2 = new Float32Array(E * H * I)
    for (let e = 0; e < E; e++) {
      const q2 = `${p}.block_sparse_moe.experts.${e}`
      const w1 = read(`${q2}.w1.weight`)
      const w3 = read(`${q2}.w3.weight`)
      // swiglu_fusion=1 wants gate and up rows interleaved: row 2i = w1[i], row 2i+1 = w3[i].
      const base = e * 2 * I * H
      for (let i = 0; i < I; i++) {
        fc1.set(w1.subarray(i * H, (i + 1) * H), base + 2 * i * H)
        fc1.set(w3.subarray(i * H, (i + 1) * H), base + (2 * i + 1) * H)
      }
      fc2.set(read(`${q2}.w2.weight`), e * H * I)
    }
    const fc1W = weight(`${p}.block_sparse_moe.fc1`, [E, 2 * I, H], fc1)
    const fc2W = weight(`${p}.block_sparse_moe.fc2`, [E, H, I], fc2)
    const moe = g.op(
      'MoE',
      [g.op('Reshape', [h2, flatHidden]), routerLogits, fc1W, '', fc2W],
      {
        k: c.num_experts_per_tok,
        activation_type: 'swiglu',
        swiglu_fusion: 1,
        normalize_routing_weights: 1,
        activation_alpha: { float: 1.0 },
        activation_beta: { float: 0.0 },
        swiglu_limit: { float: 1e30 },
      },
      'com.microsoft',
    )
    x = g.op('Add', [x, g.op('Reshape', [moe, xShape])])
    // The same top-k the MoE kernel takes, exported for expert-load telemetry.
    const [, indices] = g.node('TopK', [routerLogits, g.constInt64([c.num_experts_per_tok])], 2, { axis: -1 })
    chosen.push(g.op('Unsqueeze', [indices!, g.constInt64([0])]))
  }

  // Logits only for each row's last valid token: min(valid length - 1, S - 1).
  const xn = rmsNorm(x, 'model.norm.weight')
  const seqLen = g.op('Gather', [g.op('Shape', [inputIds]), g.constInt64([1], [])], { axis: 0 })
  const lastIndex = g.op('Min', [lastPos, g.op('Sub', [seqLen, one])])
  const last = g.op('GatherND', [xn, g.op('Unsqueeze', [lastIndex, axis1])], { batch_dims: 1 })
  const lmSrc = c.tie_word_embeddings ? embed : read('lm_head.weight')
  const lmW = weight('lm_head.weight_t', [H, c.vocab_size], transpose(lmSrc, c.vocab_size, H))
  let logits = g.op('MatMul', [last, lmW])
  if (dtype === 'fp16') logits = g.op('Cast', [logits], { to: 1 })
  g.node('Unsqueeze', [logits, axis1], [graphNames.logits])
  g.output(graphNames.logits, 'float32', ['batch', 1, c.vocab_size])
  g.node('Concat', chosen, [graphNames.expertIndices], { axis: 0 })
  g.output(graphNames.expertIndices, 'int64', [L, 'tokens', c.num_experts_per_tok])
  return g.finish('mixtral')
}
