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
// that ONNX Runtime runs with its fused kernels where they pay: RotaryEmbedding
// and FusedMatMul in attention, the sparse com.microsoft.MoE (top-k experts per
// token, interleaved SwiGLU). The layer pieces live in decoder-graph.ts.
//
// Graph I/O:
//   input_ids [B,S] int64 (rows right-padded to S), past_lengths [B] int64
//   (positions each row's cache holds), input_lengths [B] int64 (valid tokens
//   per row), past_key_values.N.{key,value} [B,kvH,1,P,D] (P: the cache's
//   capacity, or 0 when no row has a past; the 1 broadcasts over the query
//   heads that share a KV head), expert_bias [B|1,E] (0 or -inf
//   per expert; a [1,E] row of zeros allows every expert)
//   -> logits [B,1,V] for each row's last valid token,
//      new_key_values.N.{key,value} [B,kvH,1,S,D]: this step's keys (after
//      rotary) and values, which the caller writes into its cache,
//      expert_indices [L, B*S, k] int64: the experts the router picked (-1 in
//      layers with a dense MLP).

/** fp32/fp16 graphs, or fp32 graphs whose attention and MLP matrices are int8/int4 weight-only. */
export type ExportDtype = 'fp32' | 'fp16' | 'int8' | 'int4'

/**
 * How an fp32 export runs routed experts: a per-expert dispatch of MatMuls
 * that reads each chosen expert's weights once per step however many tokens
 * chose it (the default; quantized exports always dispatch), or the fused
 * com.microsoft.MoE op, whose CPU kernel reads them once per token. fp16
 * exports (CUDA) always use the fused op.
 */
export type ExpertKernel = 'fused' | 'per-expert'
export const EXPERT_KERNELS: readonly ExpertKernel[] = ['fused', 'per-expert']

export interface ExportedModel {
  modelPath: string
  dtype: ExportDtype
  /** True when the export was found in the cache. */
  cached: boolean
}

export const graphNames = {
  inputIds: 'input_ids',
  pastLengths: 'past_lengths',
  inputLengths: 'input_lengths',
  expertBias: 'expert_bias',
  pastKey: (l: number) => `past_key_values.${l}.key`,
  pastValue: (l: number) => `past_key_values.${l}.value`,
  newKey: (l: number) => `new_key_values.${l}.key`,
  newValue: (l: number) => `new_key_values.${l}.value`,
  logits: 'logits',
  expertIndices: 'expert_indices',
} as const

/** Bump when the graph this file builds changes, so cached exports are rebuilt. */
export const EXPORT_FORMAT = 10

/**
 * Where the export of this model lives: under `cacheDir` when one is given (MOE_EXPORT_CACHE,
 * e.g. a volume beside a read-only model mount), else next to the model, else in the temp dir
 * if the model directory is read-only.
 */
export function exportDir(
  model: ModelDir,
  dtype: ExportDtype,
  cacheDir?: string,
  expertKernel: ExpertKernel = 'per-expert',
): string {
  const kernel = expertKernel === 'fused' && dtype === 'fp32' ? '-fused-moe' : ''
  const key = `${model.fingerprint}-${dtype}${kernel}-v${EXPORT_FORMAT}`
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
  expertKernel: ExpertKernel = 'per-expert',
): ExportedModel {
  const dir = exportDir(model, dtype, cacheDir, expertKernel)
  const modelPath = join(dir, 'model.onnx')
  if (existsSync(modelPath)) return { modelPath, dtype, cached: true }
  const staging = `${dir}.tmp-${process.pid}-${Date.now()}`
  mkdirSync(staging, { recursive: true })
  try {
    const bytes = buildGraph(model, dtype, join(staging, 'model.onnx.data'), expertKernel)
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

function buildGraph(
  model: ModelDir,
  dtype: ExportDtype,
  dataFile: string,
  expertKernel: ExpertKernel,
): Uint8Array {
  const c = model.config
  const g = new OnnxGraphWriter(dataFile)
  const d = new DecoderGraph(g, model, dtype, expertKernel)
  const T = d.T
  const { hidden_size: H, head_dim: D, num_local_experts: E, num_key_value_heads: kvH } = c
  const L = c.num_hidden_layers

  // Inputs
  const inputIds = g.input(graphNames.inputIds, 'int64', ['batch', 'sequence'])
  const pastLengths = g.input(graphNames.pastLengths, 'int64', ['batch'])
  const inputLengths = g.input(graphNames.inputLengths, 'int64', ['batch'])
  // A plain input rather than an overridable initializer: ORT's session does
  // not list initializer-backed inputs, so feeds to them are silently dropped.
  const expertBias = g.input(graphNames.expertBias, T, ['bias_batch', E])
  const pastKeys = Array.from({ length: L }, (_, l) =>
    g.input(graphNames.pastKey(l), T, ['batch', kvH, 1, 'past_sequence', D]),
  )
  const pastValues = Array.from({ length: L }, (_, l) =>
    g.input(graphNames.pastValue(l), T, ['batch', kvH, 1, 'past_sequence', D]),
  )

  // Positions and the attention mask, once for every layer.
  const zero = g.constInt64([0], [])
  const one = g.constInt64([1], [])
  const axis1 = g.constInt64([1])
  const axis0 = g.constInt64([0])
  const dim = (x: string, i: number) =>
    g.op('Gather', [g.op('Shape', [x]), g.constInt64([i], [])], { axis: 0 })
  const S = dim(inputIds, 1)
  const P = dim(pastKeys[0]!, 3)
  const keySplit = g.op('Concat', [g.op('Unsqueeze', [P, axis0]), g.op('Unsqueeze', [S, axis0])], { axis: 0 })
  const newPos = g.op('Range', [zero, S, one]) // [S]
  const past = g.op('Unsqueeze', [pastLengths, axis1]) // [B,1]
  // Padding positions can run past the table (a short row in a long pass): clamp them.
  const positions = g.op('Min', [
    g.op('Add', [past, g.op('Unsqueeze', [newPos, axis0])]),
    g.constInt64([c.max_position_embeddings - 1], []),
  ])
  // Key p of the past is visible to row b iff p < past_lengths[b]; new key i to
  // query j iff i <= j and i < input_lengths[b] (padded queries see only valid keys).
  const pastVisible = g.op('Less', [g.op('Unsqueeze', [g.op('Range', [zero, P, one]), axis0]), past]) // [B,P]
  const causal = g.op('LessOrEqual', [g.op('Unsqueeze', [newPos, axis0]), g.op('Unsqueeze', [newPos, axis1])]) // [S(j),S(i)]
  const newValid = g.op('Less', [
    g.op('Unsqueeze', [newPos, axis0]),
    g.op('Unsqueeze', [inputLengths, axis1]),
  ]) // [B,S(i)]
  const B = dim(inputIds, 0)
  const validIndex = g.op('Reshape', [
    g.op('NonZero', [g.op('Reshape', [newValid, g.constInt64([-1])])]),
    g.constInt64([-1]),
  ])
  const valid = { index: validIndex, index2d: g.op('Unsqueeze', [validIndex, axis1]) }
  const visible = g.op(
    'Concat',
    [
      g.op('Expand', [
        g.op('Unsqueeze', [pastVisible, axis1]),
        g.op(
          'Concat',
          [g.op('Unsqueeze', [B, axis0]), g.op('Unsqueeze', [S, axis0]), g.op('Unsqueeze', [P, axis0])],
          {
            axis: 0,
          },
        ),
      ]),
      g.op('And', [g.op('Unsqueeze', [causal, axis0]), g.op('Unsqueeze', [newValid, axis1])]),
    ],
    { axis: 2 },
  ) // [B,S,P+S]
  const negInf = d.weight(g.fresh('neg_inf'), [], Float32Array.of(Number.NEGATIVE_INFINITY))
  const zeroT = d.weight(g.fresh('zero'), [], Float32Array.of(0))
  const attnScale = d.weight('attention_scale', [], Float32Array.of(c.attention_scale))
  // [B,1,1,S,P+S]: broadcast over KV heads and the query heads that share each.
  const attnMask = g.op('Unsqueeze', [g.op('Where', [visible, zeroT, negInf]), g.constInt64([1, 2])])

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
      pastK: pastKeys[l]!,
      pastV: pastValues[l]!,
      newK: g.output(graphNames.newKey(l), T, ['batch', kvH, 1, 'sequence', D]),
      newV: g.output(graphNames.newValue(l), T, ['batch', kvH, 1, 'sequence', D]),
      keySplit,
      positions,
      mask: attnMask,
      scale: attnScale,
      cos,
      sin,
    }
    x = g.op('Add', [x, attention(d, t, d.rmsNorm(x, t.inputNorm), io)])
    const m = mlp(d, t.mlp, d.rmsNorm(x, t.postNorm), l, biasRows, valid)
    x = g.op('Add', [x, m.out])
    chosen.push(m.chosen)
  }

  // Logits only for each row's last valid token.
  const xn = d.rmsNorm(x, 'model.norm.weight')
  const lastIndex = g.op('Sub', [inputLengths, one])
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
