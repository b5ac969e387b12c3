import { accessSync, constants, existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { attention, DecoderGraph, mlp, ropeCaches } from './decoder-graph.ts'
import { type ModelDir, tensorEntry } from './model-dir.ts'
import { layerTensors } from './model-layout.ts'
import { OnnxGraphWriter } from './onnx-graph.ts'
import { matMulNBits, quantizable, quantizeRows } from './quantize.ts'
import { readTensorRowsF32, type TensorEntry } from './safetensors.ts'

// Exports a MoE checkpoint (any family in model-config.ts) to one ONNX graph
// that ONNX Runtime runs with its fused kernels: GroupQueryAttention (rotary +
// KV cache) and the sparse com.microsoft.MoE (top-k experts per token,
// interleaved SwiGLU). The layer pieces live in decoder-graph.ts.
//
// Graph I/O (the onnxruntime-genai / transformers.js convention, plus two):
//   input_ids [B,S] int64, attention_mask [B,T] int64 (right-padded rows),
//   past_key_values.N.{key,value} [B,kvH,P,D], expert_bias [B|1,E] (0 or -inf
//   per expert; a [1,E] row of zeros allows every expert)
//   -> logits [B,1,V] for each row's last valid token, present.N.{key,value},
//      expert_indices [L, B*S, k] int64: the experts the router picked (-1 in
//      layers with a dense MLP).

/** fp32/fp16 graphs, or fp32 graphs whose attention and MLP matrices are int8/int4 weight-only. */
export type ExportDtype = 'fp32' | 'fp16' | 'int8' | 'int4'

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
export const EXPORT_FORMAT = 4

/**
 * Where the export of this model lives: under `cacheDir` when one is given (MOE_EXPORT_CACHE,
 * e.g. a volume beside a read-only model mount), else next to the model, else in the temp dir
 * if the model directory is read-only.
 */
export function exportDir(model: ModelDir, dtype: ExportDtype, cacheDir?: string): string {
  const key = `${model.fingerprint}-${dtype}-v${EXPORT_FORMAT}`
  if (cacheDir) return join(cacheDir, model.fingerprint, key)
  try {
    accessSync(model.dir, constants.W_OK)
    return join(model.dir, '.onnx-cache', key)
  } catch {
    return join(tmpdir(), 'moe-edge-onnx-cache', model.fingerprint, key)
  }
}

/** Returns the cached export, building it first if needed. */
export function ensureExported(
  model: ModelDir,
  dtype: ExportDtype = 'fp32',
  cacheDir?: string,
): ExportedModel {
  const dir = exportDir(model, dtype, cacheDir)
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

function buildGraph(model: ModelDir, dtype: ExportDtype, dataFile: string): Uint8Array {
  const c = model.config
  const g = new OnnxGraphWriter(dataFile)
  const d = new DecoderGraph(g, model, dtype)
  const T = d.T
  const { hidden_size: H, head_dim: D, num_local_experts: E, num_key_value_heads: kvH } = c
  const L = c.num_hidden_layers

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
  const cos = d.weight('rope.cos', [c.max_position_embeddings, D / 2], rope.cos)
  const sin = d.weight('rope.sin', [c.max_position_embeddings, D / 2], rope.sin)

  // Scalar multipliers (granitemoe) are folded into the weights they follow. The
  // embedding is written and let go before the layers (a tied head reads it again).
  let x: string
  {
    const embed = d.read('model.embed_tokens.weight')
    if (c.embedding_multiplier !== 1)
      for (let i = 0; i < embed.length; i++) embed[i]! *= c.embedding_multiplier
    const table = d.weight('model.embed_tokens.weight', [c.vocab_size, H], embed)
    x = g.op('Gather', [table, inputIds], { axis: 0 })
  }
  const biasRows = g.op('Reshape', [expertBias, g.constInt64([-1, 1, E])])
  const chosen: string[] = []

  for (let l = 0; l < L; l++) {
    const t = layerTensors(c, l)
    const io = {
      pastK: g.input(graphNames.pastKey(l), T, ['batch', kvH, 'past_sequence', D]),
      pastV: g.input(graphNames.pastValue(l), T, ['batch', kvH, 'past_sequence', D]),
      presentK: g.output(graphNames.presentKey(l), T, ['batch', kvH, 'present_sequence', D]),
      presentV: g.output(graphNames.presentValue(l), T, ['batch', kvH, 'present_sequence', D]),
      seqlensK,
      totalLen,
      cos,
      sin,
    }
    x = g.op('Add', [x, attention(d, t, d.rmsNorm(x, t.inputNorm), io)])
    const m = mlp(d, t.mlp, d.rmsNorm(x, t.postNorm), l, biasRows)
    x = g.op('Add', [x, m.out])
    chosen.push(m.chosen)
  }

  // Logits only for each row's last valid token: min(valid length - 1, S - 1).
  const xn = d.rmsNorm(x, 'model.norm.weight')
  const seqLen = g.op('Gather', [g.op('Shape', [inputIds]), g.constInt64([1], [])], { axis: 0 })
  const lastIndex = g.op('Min', [lastPos, g.op('Sub', [seqLen, one])])
  const last = g.op('GatherND', [xn, g.op('Unsqueeze', [lastIndex, axis1])], { batch_dims: 1 })
  const lmSrc = tensorEntry(model, c.tie_word_embeddings ? 'model.embed_tokens.weight' : 'lm_head.weight')
  let logits: string
  if (d.bits && quantizable(H)) {
    // The head is the largest matrix a decode step reads (vocab x hidden): quantized like the rest.
    const rows: Float32Array[] = []
    for (let r0 = 0; r0 < c.vocab_size; r0 += 1024)
      rows.push(readTensorRowsF32(lmSrc, r0, Math.min(1024, c.vocab_size - r0)))
    logits = matMulNBits(g, last, 'lm_head.weight', quantizeRows(rows, H, d.bits, 1 / c.logits_scaling))
  } else {
    const lmW = transposeHead(lmSrc, c.vocab_size, H, c.logits_scaling)
    logits = g.op('MatMul', [last, d.weight('lm_head.weight_t', [H, c.vocab_size], lmW)])
  }
  if (dtype === 'fp16') logits = g.op('Cast', [logits], { to: 1 })
  g.node('Unsqueeze', [logits, axis1], [graphNames.logits])
  g.output(graphNames.logits, 'float32', ['batch', 1, c.vocab_size])
  g.node('Concat', chosen, [graphNames.expertIndices], { axis: 0 })
  g.output(graphNames.expertIndices, 'int64', [L, 'tokens', c.num_experts_per_tok])
  return g.finish(c.model_type)
}

/**
 * The head [V, H] transposed to [H, V] and divided by `divisor`, read a block
 * of rows at a time: only the output is held whole, not the fp32 source too.
 */
function transposeHead(entry: TensorEntry, rows: number, cols: number, divisor: number): Float32Array {
  const out = new Float32Array(rows * cols)
  const step = 1024
  for (let r0 = 0; r0 < rows; r0 += step) {
    const n = Math.min(step, rows - r0)
    const part = readTensorRowsF32(entry, r0, n)
    for (let r = 0; r < n; r++) {
      const base = r * cols
      for (let col = 0; col < cols; col++) out[col * rows + r0 + r] = part[base + col]! / divisor
    }
  }
  return out
}
