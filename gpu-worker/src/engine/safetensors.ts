import { closeSync, fstatSync, openSync, readSync, writeSync } from 'node:fs'

// safetensors: 8-byte little-endian header length, a JSON header naming each
// tensor's dtype, shape and byte range, then the raw little-endian data.
// Tensors are read one at a time at their offsets, so a checkpoint is never
// held twice in memory.

export type SafetensorsDtype = 'F32' | 'F16' | 'BF16'
const SUPPORTED: ReadonlySet<string> = new Set(['F32', 'F16', 'BF16'])
const BYTES: Record<SafetensorsDtype, number> = { F32: 4, F16: 2, BF16: 2 }

export interface TensorEntry {
  name: string
  file: string
  dtype: SafetensorsDtype
  shape: number[]
  /** Absolute byte offset of the data in the file. */
  offset: number
  byteLength: number
}

export class SafetensorsError extends Error {
  override name = 'SafetensorsError'
}

const MAX_HEADER_BYTES = 100 * 1024 * 1024

/** Reads a safetensors file's header: the tensors it holds, without their data. */
export function readSafetensorsHeader(file: string): { tensors: TensorEntry[]; headerBytes: Buffer } {
  const fd = openSync(file, 'r')
  try {
    const size = fstatSync(fd).size
    const lenBuf = Buffer.alloc(8)
    if (size < 8 || readSync(fd, lenBuf, 0, 8, 0) !== 8)
      throw new SafetensorsError(`${file}: too short to be safetensors`)
    const headerLen = Number(lenBuf.readBigUInt64LE(0))
    if (headerLen > MAX_HEADER_BYTES || 8 + headerLen > size)
      throw new SafetensorsError(`${file}: header length ${headerLen} does not fit a file of ${size} bytes`)
    const headerBytes = Buffer.alloc(headerLen)
    readSync(fd, headerBytes, 0, headerLen, 8)
    let header: Record<string, unknown>
    try {
      header = JSON.parse(headerBytes.toString('utf8'))
    } catch {
      throw new SafetensorsError(`${file}: header is not valid JSON`)
    }
    const dataStart = 8 + headerLen
    const tensors: TensorEntry[] = []
    for (const [name, raw] of Object.entries(header)) {
      if (name === '__metadata__') continue
      const info = raw as { dtype?: string; shape?: number[]; data_offsets?: [number, number] }
      if (!info.dtype || !Array.isArray(info.shape) || !Array.isArray(info.data_offsets))
        throw new SafetensorsError(`${file}: tensor ${name} has a malformed header entry`)
      if (!SUPPORTED.has(info.dtype))
        throw new SafetensorsError(
          `${file}: tensor ${name} has dtype ${info.dtype}; supported are F32, F16 and BF16`,
        )
      const dtype = info.dtype as SafetensorsDtype
      const [start, end] = info.data_offsets
      const count = info.shape.reduce((a, b) => a * b, 1)
      if (end - start !== count * BYTES[dtype] || dataStart + end > size)
        throw new SafetensorsError(
          `${file}: tensor ${name} byte range disagrees with its shape or the file size`,
        )
      tensors.push({
        name,
        file,
        dtype,
        shape: info.shape,
        offset: dataStart + start,
        byteLength: end - start,
      })
    }
    return { tensors, headerBytes }
  } finally {
    closeSync(fd)
  }
}

/** Reads one tensor's data and converts it to fp32. */
export function readTensorF32(entry: TensorEntry): Float32Array {
  return readBytesF32(entry, 0, entry.byteLength)
}

/**
 * Reads rows [row0, row0 + rows) of a tensor (along its first axis) as fp32,
 * so a large matrix can be processed a block of rows at a time.
 */
export function readTensorRowsF32(entry: TensorEntry, row0: number, rows: number): Float32Array {
  const first = entry.shape[0] ?? 1
  if (row0 < 0 || rows < 0 || row0 + rows > first)
    throw new SafetensorsError(`${entry.name}: rows ${row0}..${row0 + rows} outside its ${first}`)
  const rowBytes = first === 0 ? 0 : entry.byteLength / first
  return readBytesF32(entry, row0 * rowBytes, rows * rowBytes)
}

function readBytesF32(entry: TensorEntry, start: number, byteLength: number): Float32Array {
  const raw = Buffer.allocUnsafe(byteLength)
  const fd = openSync(entry.file, 'r')
  try {
    let done = 0
    while (done < byteLength) {
      const n = readSync(fd, raw, done, byteLength - done, entry.offset + start + done)
      if (n <= 0) throw new SafetensorsError(`${entry.file}: short read of tensor ${entry.name}`)
      done += n
    }
  } finally {
    closeSync(fd)
  }
  return toF32(raw, entry.dtype)
}

function toF32(raw: Buffer, dtype: SafetensorsDtype): Float32Array {
  if (dtype === 'F32') {
    // Copy into an aligned buffer (the pool's Buffer may be unaligned for Float32Array).
    const out = new Float32Array(raw.byteLength / 4)
    new Uint8Array(out.buffer).set(raw)
    return out
  }
  const n = raw.byteLength / 2
  const out = new Float32Array(n)
  if (dtype === 'BF16') {
    const bits = new Uint32Array(out.buffer)
    for (let i = 0; i < n; i++) bits[i] = raw.readUInt16LE(i * 2) << 16
    return out
  }
  for (let i = 0; i < n; i++) out[i] = f16ToF32(raw.readUInt16LE(i * 2))
  return out
}

const f32Scratch = new Float32Array(1)
const u32Scratch = new Uint32Array(f32Scratch.buffer)

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1
  const exp = (h >> 10) & 0x1f
  const frac = h & 0x3ff
  if (exp === 0) return sign * frac * 2 ** -24
  if (exp === 0x1f) return frac ? Number.NaN : sign * Number.POSITIVE_INFINITY
  return sign * (1 + frac / 1024) * 2 ** (exp - 15)
}

/** fp32 -> IEEE half bits, round to nearest even. */
export function f32ToF16(value: number): number {
  f32Scratch[0] = value
  const x = u32Scratch[0]!
  const sign = (x >>> 16) & 0x8000
  const exp = (x >>> 23) & 0xff
  let mant = x & 0x7fffff
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0)
  const e = exp - 127 + 15
  if (e >= 0x1f) return sign | 0x7c00
  if (e <= 0) {
    if (e < -10) return sign
    mant |= 0x800000
    const shift = 14 - e
    let half = mant >> shift
    const rem = mant & ((1 << shift) - 1)
    const mid = 1 << (shift - 1)
    if (rem > mid || (rem === mid && half & 1)) half++
    return sign | half
  }
  let half = (e << 10) | (mant >> 13)
  const rem = mant & 0x1fff
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++
  return sign | half
}

export function toF16Bits(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length)
  for (let i = 0; i < src.length; i++) out[i] = f32ToF16(src[i]!)
  return out
}

/** fp32 -> bfloat16 bits, round to nearest even. */
export function toBf16Bits(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length)
  const out = new Uint16Array(src.length)
  for (let i = 0; i < src.length; i++) {
    const b = bits[i]!
    out[i] = (b + 0x7fff + ((b >>> 16) & 1)) >>> 16
  }
  return out
}

/**
 * Writes tensors given as fp32 to one safetensors file in F32 or BF16, asking
 * for each tensor's data only when it is written (used by the model generators).
 */
export function writeSafetensors(
  file: string,
  specs: Array<{ name: string; shape: number[] }>,
  data: (name: string, shape: number[]) => Float32Array,
  dtype: 'F32' | 'BF16' = 'F32',
) {
  const elem = BYTES[dtype]
  const header: Record<string, unknown> = {}
  let offset = 0
  for (const t of specs) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * elem
    header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes] }
    offset += bytes
  }
  let json = JSON.stringify(header)
  json += ' '.repeat((8 - (json.length % 8)) % 8) // keep data 8-byte aligned
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)))
  const fd = openSync(file, 'w')
  try {
    writeSync(fd, len)
    writeSync(fd, Buffer.from(json))
    for (const t of specs) {
      const d = data(t.name, t.shape)
      if (d.length !== t.shape.reduce((a, b) => a * b, 1))
        throw new Error(`${t.name}: data length disagrees with shape`)
      const out = dtype === 'BF16' ? toBf16Bits(d) : d
      writeSync(fd, new Uint8Array(out.buffer, out.byteOffset, out.byteLength))
    }
  } finally {
    closeSync(fd)
  }
}
