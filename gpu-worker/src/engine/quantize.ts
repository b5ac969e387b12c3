import { routedExpertsDispatch } from './expert-dispatch.ts'
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
  return quantizeRows([w.length === N * K ? w : w.subarray(0, N * K)], K, bits)
}

/**
 * Quantizes the row-wise stack of `parts` (each [rows_i, K], row-major) times
 * `scale`, as quantizeMatrix would quantize their concatenation, without
 * building the concatenated or scaled fp32 copy (an expert's gate and up
 * projections of a large model are hundreds of MB each).
 */
export function quantizeRows(parts: Float32Array[], K: number, bits: QuantBits, scale = 1): QuantizedMatrix {
  if (!quantizable(K)) throw new Error(`cannot quantize a matrix with ${K} inputs in blocks of ${BLOCK}`)
  for (const w of parts)
    if (w.length % K !== 0) throw new Error(`a part of ${w.length} values is not a whole number of ${K}-rows`)
  const N = parts.reduce((a, w) => a + w.length / K, 0)
  const blocks = K / BLOCK
  const blob = (BLOCK * bits) / 8
  const qmax = (1 << (bits - 1)) - 1
  const zero = 1 << (bits - 1)
  const packed = new Uint8Array(N * blocks * blob)
  const scales = new Float32Array(N * blocks)
  let row = 0
  for (const w of parts) {
    const rows = w.length / K
    for (let r = 0; r < rows; r++, row++) {
      for (let b = 0; b < blocks; b++) {
        const src = r * K + b * BLOCK
        let max = 0
        // fround: the same fp32 products a scaled copy would hold, so scale != 1 quantizes as before.
        for (let i = 0; i < BLOCK; i++) max = Math.max(max, Math.abs(Math.fround(w[src + i]! * scale)))
        const s = max / qmax || 1
        scales[row * blocks + b] = s
        const dst = (row * blocks + b) * blob
        for (let i = 0; i < BLOCK; i++) {
          const q = Math.max(-qmax, Math.min(qmax, Math.round(Math.fround(w[src + i]! * scale) / s))) + zero
          if (bits === 8) packed[dst + i] = q
          else packed[dst + (i >> 1)]! |= i & 1 ? q << 4 : q // even element in the low nibble
        }
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
 * An expert, or a function that reads and quantizes it when called. The
 * routed-experts builder calls each function once, in order, and writes its
 * weights before calling the next, so a layer's experts need never be in
 * memory together (at Mixtral-8x7B's size one layer's experts are 5.6 GB in fp32).
 */
export type ExpertSource = QuantizedExpert | (() => QuantizedExpert)

/**
 * Routed experts on MatMulNBits. No fused op takes per-expert MatMulNBits
 * weights (QMoE's CPU kernel was several times slower), so the routing is
 * spelled out by routedExpertsDispatch.
 */
export function routedExpertsNBits(
  g: OnnxGraphWriter,
  flat: string,
  logits: string,
  experts: readonly ExpertSource[],
  opts: { k: number; normTopK: boolean; I: number; prefix: string },
): string {
  const projections = experts.map((source, j) => () => {
    const e = typeof source === 'function' ? source() : source
    return {
      gateUp: (x: string) => matMulNBits(g, x, `${opts.prefix}.${j}.gate_up`, e.gateUp),
      down: (x: string) => matMulNBits(g, x, `${opts.prefix}.${j}.down`, e.down),
    }
  })
  return routedExpertsDispatch(g, flat, logits, projections, opts)
}
