import { closeSync, openSync, writeSync } from 'node:fs'
import { f32ToF16 } from '../engine/safetensors.ts'

// A GGUF (version 3) writer, enough to hand llama.cpp the weights the engine
// runs: typed metadata, then tensor infos, then the tensors' data, each
// aligned. Tensors in F32, Q8_0 and Q4_0, quantized here with ggml's
// reference block quantizers (ggml-quants.c), so llama.cpp reads the same
// values its own tools would write.

/** GGUF metadata value types (gguf.h). */
const VALUE_TYPE = {
  uint8: 0,
  int8: 1,
  uint16: 2,
  int16: 3,
  uint32: 4,
  int32: 5,
  float32: 6,
  bool: 7,
  string: 8,
  array: 9,
  uint64: 10,
  int64: 11,
  float64: 12,
} as const

type ScalarType = 'uint32' | 'int32' | 'float32' | 'bool' | 'string' | 'uint64'

export type GgufValue =
  | { type: 'uint32' | 'int32' | 'float32'; value: number }
  | { type: 'uint64'; value: bigint }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string }
  | { type: 'array'; itemType: 'string'; value: readonly string[] }
  | { type: 'array'; itemType: 'uint32' | 'int32' | 'float32'; value: readonly number[] }

export const gguf = {
  u32: (value: number): GgufValue => ({ type: 'uint32', value }),
  i32: (value: number): GgufValue => ({ type: 'int32', value }),
  f32: (value: number): GgufValue => ({ type: 'float32', value }),
  bool: (value: boolean): GgufValue => ({ type: 'bool', value }),
  str: (value: string): GgufValue => ({ type: 'string', value }),
  strings: (value: readonly string[]): GgufValue => ({ type: 'array', itemType: 'string', value }),
  i32s: (value: readonly number[]): GgufValue => ({ type: 'array', itemType: 'int32', value }),
  f32s: (value: readonly number[]): GgufValue => ({ type: 'array', itemType: 'float32', value }),
}

/** The ggml tensor types this writer produces, with their ggml_type ids. */
export const GGML_TYPE = { F32: 0, Q4_0: 2, Q8_0: 8 } as const
export type GgmlTensorType = keyof typeof GGML_TYPE

/** Values per quantization block of Q8_0 and Q4_0. */
export const QK = 32
const BLOCK_BYTES = { Q8_0: 2 + QK, Q4_0: 2 + QK / 2 }

/** Bytes a tensor of `count` values takes in `type`. */
export function tensorBytes(type: GgmlTensorType, count: number): number {
  if (type === 'F32') return count * 4
  if (count % QK !== 0) throw new Error(`${type} needs a multiple of ${QK} values, got ${count}`)
  return (count / QK) * BLOCK_BYTES[type]
}

export interface GgufTensor {
  name: string
  /** ggml order: dims[0] is the innermost (contiguous) one, i.e. an HF [out, in] matrix is [in, out]. */
  dims: readonly number[]
  type: GgmlTensorType
  /** The tensor's values in row-major order (ggml's), asked for only when the tensor is written. */
  data: () => Float32Array
}

/** C's roundf: halves away from zero (Math.round sends -2.5 to -2). */
const roundf = (x: number) => Math.sign(x) * Math.round(Math.abs(x))

/** ggml's quantize_row_q8_0_ref: per block of 32, an fp16 scale amax/127 and 32 int8s. */
export function quantizeQ8_0(x: Float32Array): Uint8Array {
  const blocks = tensorBytes('Q8_0', x.length) / BLOCK_BYTES.Q8_0
  const out = new Uint8Array(blocks * BLOCK_BYTES.Q8_0)
  const view = new DataView(out.buffer)
  for (let b = 0; b < blocks; b++) {
    const src = b * QK
    let amax = 0
    for (let j = 0; j < QK; j++) amax = Math.max(amax, Math.abs(x[src + j]!))
    const d = Math.fround(amax / 127)
    const id = d ? Math.fround(1 / d) : 0
    const dst = b * BLOCK_BYTES.Q8_0
    view.setUint16(dst, f32ToF16(d), true)
    for (let j = 0; j < QK; j++) view.setInt8(dst + 2 + j, roundf(Math.fround(x[src + j]! * id)))
  }
  return out
}

/**
 * ggml's quantize_row_q4_0_ref: per block of 32, an fp16 scale d = (the value
 * of largest magnitude) / -8 and 16 bytes of nibbles q in 0..15 standing for
 * (q - 8) * d; byte j holds element j in its low nibble and element j + 16 in
 * its high one.
 */
export function quantizeQ4_0(x: Float32Array): Uint8Array {
  const blocks = tensorBytes('Q4_0', x.length) / BLOCK_BYTES.Q4_0
  const out = new Uint8Array(blocks * BLOCK_BYTES.Q4_0)
  const view = new DataView(out.buffer)
  for (let b = 0; b < blocks; b++) {
    const src = b * QK
    let amax = 0
    let max = 0
    for (let j = 0; j < QK; j++) {
      const v = x[src + j]!
      if (amax < Math.abs(v)) {
        amax = Math.abs(v)
        max = v
      }
    }
    const d = Math.fround(max / -8)
    const id = d ? Math.fround(1 / d) : 0
    const dst = b * BLOCK_BYTES.Q4_0
    view.setUint16(dst, f32ToF16(d), true)
    // (int8_t)(x + 8.5f) truncates; x + 8.5 is positive here, so truncation is floor.
    const nibble = (v: number) => Math.min(15, Math.trunc(Math.fround(Math.fround(v * id) + 8.5)))
    for (let j = 0; j < QK / 2; j++)
      out[dst + 2 + j] = nibble(x[src + j]!) | (nibble(x[src + QK / 2 + j]!) << 4)
  }
  return out
}

/** The bytes of `values` as a tensor of `type`. */
export function encodeTensor(type: GgmlTensorType, values: Float32Array): Uint8Array {
  if (type === 'Q8_0') return quantizeQ8_0(values)
  if (type === 'Q4_0') return quantizeQ4_0(values)
  return new Uint8Array(values.buffer, values.byteOffset, values.byteLength)
}

/** Little-endian byte sink for the header. */
class HeaderBytes {
  private readonly chunks: Uint8Array[] = []
  length = 0

  private push(bytes: Uint8Array) {
    this.chunks.push(bytes)
    this.length += bytes.length
  }

  private fixed(size: number, set: (v: DataView) => void) {
    const b = new Uint8Array(size)
    set(new DataView(b.buffer))
    this.push(b)
  }

  u32(v: number) {
    this.fixed(4, (d) => d.setUint32(0, v, true))
  }

  u64(v: number | bigint) {
    this.fixed(8, (d) => d.setBigUint64(0, BigInt(v), true))
  }

  string(s: string) {
    const bytes = Buffer.from(s, 'utf8')
    this.u64(bytes.length)
    this.push(bytes)
  }

  scalar(type: ScalarType, v: number | bigint | boolean | string) {
    switch (type) {
      case 'uint32':
        return this.u32(v as number)
      case 'int32':
        return this.fixed(4, (d) => d.setInt32(0, v as number, true))
      case 'float32':
        return this.fixed(4, (d) => d.setFloat32(0, v as number, true))
      case 'bool':
        return this.fixed(1, (d) => d.setUint8(0, v ? 1 : 0))
      case 'uint64':
        return this.u64(v as bigint)
      case 'string':
        return this.string(v as string)
    }
  }

  pad(alignment: number) {
    const n = (alignment - (this.length % alignment)) % alignment
    if (n) this.push(new Uint8Array(n))
  }

  bytes(): Buffer {
    return Buffer.concat(this.chunks)
  }
}

const align = (n: number, a: number) => Math.ceil(n / a) * a

/**
 * Writes a GGUF file: the metadata in the order given, then the tensors, each
 * encoded (and quantized) only when it is written, so a model is never held in
 * memory whole. Returns the file's size in bytes.
 */
export function writeGguf(
  file: string,
  metadata: Record<string, GgufValue>,
  tensors: readonly GgufTensor[],
  alignment = 32,
): number {
  if ('general.alignment' in metadata) throw new Error('pass the alignment as an argument, not as metadata')
  const h = new HeaderBytes()
  h.scalar('uint32', 0x46554747) // "GGUF", little-endian
  h.u32(3)
  h.u64(tensors.length)
  const kv = alignment === 32 ? metadata : { ...metadata, 'general.alignment': gguf.u32(alignment) }
  h.u64(Object.keys(kv).length)
  for (const [key, value] of Object.entries(kv)) {
    h.string(key)
    h.u32(VALUE_TYPE[value.type])
    if (value.type === 'array') {
      h.u32(VALUE_TYPE[value.itemType])
      h.u64(value.value.length)
      for (const item of value.value) h.scalar(value.itemType, item)
    } else h.scalar(value.type, value.value)
  }
  let offset = 0
  for (const t of tensors) {
    const count = t.dims.reduce((a, b) => a * b, 1)
    if (t.type !== 'F32' && (t.dims[0] ?? 0) % QK !== 0)
      throw new Error(`${t.name}: ${t.type} needs rows of a multiple of ${QK} values, got ${t.dims[0]}`)
    const bytes = tensorBytes(t.type, count)
    h.string(t.name)
    h.u32(t.dims.length)
    for (const d of t.dims) h.u64(d)
    h.u32(GGML_TYPE[t.type])
    h.u64(offset)
    offset = align(offset + bytes, alignment)
  }
  h.pad(alignment)
  const fd = openSync(file, 'w')
  try {
    const header = h.bytes()
    writeSync(fd, header)
    let written = 0
    const padding = new Uint8Array(alignment)
    for (const t of tensors) {
      const values = t.data()
      const expected = t.dims.reduce((a, b) => a * b, 1)
      if (values.length !== expected)
        throw new Error(`${t.name}: ${values.length} values for dims [${t.dims.join(', ')}]`)
      const bytes = encodeTensor(t.type, values)
      writeSync(fd, bytes)
      written += bytes.length
      const pad = align(written, alignment) - written
      if (pad) writeSync(fd, padding, 0, pad)
      written += pad
    }
    return header.length + written
  } finally {
    closeSync(fd)
  }
}
