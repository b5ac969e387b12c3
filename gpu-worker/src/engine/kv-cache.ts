import type { MixtralConfig } from './model-config.ts'

/**
 * The KV cache: per layer, one preallocated key and one value buffer of
 * [maxSlots, kvHeads, maxContext, headDim] (BNSH, as GroupQueryAttention
 * wants). A sequence owns one slot; its tokens fill the slot left-aligned.
 * The rows of one forward pass must be contiguous slots, so the graph reads
 * and writes the cache in place through subarray views - no copy per step.
 */
export class KvCache {
  readonly maxSlots: number
  readonly maxContext: number
  readonly layers: number
  readonly kvHeads: number
  readonly headDim: number
  /** Elements per slot per layer per K or V. */
  readonly slotElems: number
  readonly keys: Float32Array[] | Uint16Array[]
  readonly values: Float32Array[] | Uint16Array[]
  readonly dtype: 'float32' | 'float16'

  constructor(
    config: MixtralConfig,
    maxSlots: number,
    maxContext: number,
    dtype: 'float32' | 'float16' = 'float32',
  ) {
    if (maxSlots < 1) throw new Error('KV cache needs at least one slot')
    if (maxContext < 2 || maxContext > config.max_position_embeddings)
      throw new Error(
        `max context ${maxContext} must be between 2 and the model's max_position_embeddings (${config.max_position_embeddings})`,
      )
    this.maxSlots = maxSlots
    this.maxContext = maxContext
    this.layers = config.num_hidden_layers
    this.kvHeads = config.num_key_value_heads
    this.headDim = config.head_dim
    this.dtype = dtype
    this.slotElems = this.kvHeads * maxContext * this.headDim
    const make = () =>
      dtype === 'float16'
        ? new Uint16Array(maxSlots * this.slotElems)
        : new Float32Array(maxSlots * this.slotElems)
    this.keys = Array.from({ length: this.layers }, make) as Float32Array[] | Uint16Array[]
    this.values = Array.from({ length: this.layers }, make) as Float32Array[] | Uint16Array[]
  }

  /** Views of `count` slots from `first`, for one layer. */
  view(
    layer: number,
    first: number,
    count: number,
  ): { key: Float32Array | Uint16Array; value: Float32Array | Uint16Array } {
    if (first < 0 || count < 1 || first + count > this.maxSlots)
      throw new Error(`slots ${first}..${first + count - 1} are outside the cache's ${this.maxSlots}`)
    const a = first * this.slotElems
    const b = (first + count) * this.slotElems
    return { key: this.keys[layer]!.subarray(a, b), value: this.values[layer]!.subarray(a, b) }
  }

  /** Copies one slot's cache over another (to keep active slots contiguous when one leaves). */
  moveSlot(from: number, to: number, length: number = this.maxContext): void {
    if (from === to) return
    const n = this.headDim * Math.min(length, this.maxContext)
    for (const buffers of [this.keys, this.values]) {
      for (const buf of buffers) {
        for (let h = 0; h < this.kvHeads; h++) {
          const src = from * this.slotElems + h * this.maxContext * this.headDim
          const dst = to * this.slotElems + h * this.maxContext * this.headDim
          buf.copyWithin(dst, src, src + n)
        }
      }
    }
  }

  /** Bytes the cache holds. */
  get bytes(): number {
    return 2 * this.layers * this.maxSlots * this.slotElems * (this.dtype === 'float16' ? 2 : 4)
  }
}
