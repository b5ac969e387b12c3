import type { OnnxGraphWriter } from './onnx-graph.ts'

// Weight-only quantization for the CPU: symmetric blocks of 32 along each
// output row's input dimension, one fp32 scale per block, stored as
// com.microsoft.MatMulNBits wants it (no zero points: the op's default zero
// point, 2^(bits-1), makes the blocks symmetric). accuracy_level=4 lets it
// multiply in int8, which is what makes it fast on the CPU.

export type QuantBits = 4 | 8
export const BLOCK = 32

export interface QuantizedMatrix {
  /** [N, K/BLOCK, BLOCK*bits/8] */
  packed: Uint8Array
  /** [N * K/BLOCK] */
  scales: Float32Array
  N: number
  K: number
  bits: QuantBits
}

/** True when a matrix with K inputs can be quantized in whole blocks. */
export const quantizable = (K: number) => K % BLOCK === 0

/** Quantizes W [N, K] (HF's [out, in] layout, row-major). */
export function quantizeMatrix(w: Float32Array, N: number, K: number, bits: QuantBits): QuantizedMatrix {
  if (!quantizable(K)) throw new Error(`cannot quantize a matrix with ${K} inputs in blocks of ${BLOCK}`)
  const blocks = K / BLOCK
  const blob = (BLOCK * bits) / 8
  const qmax = (1 << (bits - 1)) - 1
  const zero = 1 << (bits - 1)
  const packed = new Uint8Array(N * blocks * blob)
  const scales = new Float32Array(N * blocks)
  for (let n = 0; n < N; n++) {
    for (let b = 0; b < blocks; b++) {
      const src = n * K + b * BLOCK
      let max = 0
      for (let i = 0; i < BLOCK; i++) max = Math.max(max, Math.abs(w[src + i]!))
      const scale = max / qmax || 1
      scales[n * blocks + b] = scale
      const dst = (n * blocks + b) * blob
      for (let i = 0; i < BLOCK; i++) {
        const q = Math.max(-qmax, Math.min(qmax, Math.round(w[src + i]! / scale))) + zero
        if (bits === 8) packed[dst + i] = q
        else packed[dst + (i >> 1)]! |= i & 1 ? q << 4 : q // even element in the low nibble
      }
    }
  }
  return { packed, scales, N, K, bits }
}

/** The values a quantized matrix stands for, [N, K] (for tests and error measurement). */
export function dequantizeMatrix(q: QuantizedMatrix): Float32Array {
  const blocks = q.K / BLOCK
  const blob = (BLOCK * q.bits) / 8
  const zero = 1 << (q.bits - 1)
  const out = new Float32Array(q.N * q.K)
  for (let n = 0; n < q.N; n++)
    for (let b = 0; b < blocks; b++)
      for (let i = 0; i < BLOCK; i++) {
        const byte = q.packed[(n * blocks + b) * blob + (q.bits === 8 ? i : i >> 1)]!
        const v = q.bits === 8 ? byte : i & 1 ? byte >> 4 : byte & 15
        out[n * q.K + b * BLOCK + i] = (v - zero) * q.scales[n * blocks + b]!
      }
  return out
}

/** x [.., K] times W^T as a MatMulNBits node. */
export function matMulNBits(g: OnnxGraphWriter, x: string, name: string, q: QuantizedMatrix): string {
  const blocks = q.K / BLOCK
  const packed = g.initializer(`${name}.q${q.bits}`, 'uint8', [q.N, blocks, (BLOCK * q.bits) / 8], q.packed)
  const scales = g.initializer(`${name}.scales`, 'float32', [q.N * blocks], q.scales)
  return g.op(
    'MatMulNBits',
    [x, packed, scales],
    { K: q.K, N: q.N, bits: q.bits, block_size: BLOCK, accuracy_level: 4 },
    'com.microsoft',
  )
}

/** One routed expert, quantized: gate and up stacked [2I, H], down [H, I]. */
export interface QuantizedExpert {
  gateUp: QuantizedMatrix
  down: QuantizedMatrix
}

/**
 * Routed experts on MatMulNBits. No fused op takes per-expert MatMulNBits
 * weights (QMoE's CPU kernel was several times slower), so the routing is
 * spelled out: top-k per token, then for each expert gather the tokens that
 * chose it, run its SwiGLU, and scatter-add the weighted result. Experts no
 * token chose run on zero rows.
 */
export function routedExpertsNBits(
  g: OnnxGraphWriter,
  flat: string,
  logits: string,
  experts: QuantizedExpert[],
  opts: { k: number; normTopK: boolean; I: number; prefix: string },
): string {
  const { k, I } = opts
  // Weights as the MoE op computes them: softmax over the top-k logits, or top-k of the softmax over all.
  let weights: string
  let indices: string
  if (opts.normTopK) {
    const [v, i] = g.node('TopK', [logits, g.constInt64([k])], 2, { axis: -1 })
    weights = g.op('Softmax', [v!], { axis: -1 })
    indices = i!
  } else {
    const [v, i] = g.node('TopK', [g.op('Softmax', [logits], { axis: -1 }), g.constInt64([k])], 2, {
      axis: -1,
    })
    weights = v!
    indices = i!
  }
  let out = g.op('Mul', [flat, g.initializer(g.fresh('zero'), 'float32', [], Float32Array.of(0))])
  const splits = g.constInt64([I, I])
  experts.forEach((e, j) => {
    // (token, slot) pairs that chose expert j; each token chooses an expert at most once.
    const pairs = g.op('Transpose', [g.op('NonZero', [g.op('Equal', [indices, g.constInt64([j], [])])])])
    const rows = g.op('Gather', [pairs, g.constInt64([0], [])], { axis: 1 })
    const w = g.op('GatherND', [weights, pairs])
    const x = g.op('Gather', [flat, rows], { axis: 0 })
    const [gate, up] = g.node(
      'Split',
      [matMulNBits(g, x, `${opts.prefix}.${j}.gate_up`, e.gateUp), splits],
      2,
      {
        axis: -1,
      },
    )
    const act = g.op('Mul', [g.op('Mul', [gate!, g.op('Sigmoid', [gate!])]), up!])
    const y = g.op('Mul', [
      matMulNBits(g, act, `${opts.prefix}.${j}.down`, e.down),
      g.op('Unsqueeze', [w, g.constInt64([1])]),
    ])
    out = g.op('ScatterND', [out, g.op('Unsqueeze', [rows, g.constInt64([1])]), y], { reduction: 'add' })
  })
  return out
}
