import type { MixtralConfig } from './model-config.ts'

type KvBuffer = Float32Array | Uint16Array

/** Capacities grow and shrink in multiples of this many positions. */
const CAPACITY_STEP = 64

/**
 * The KV cache: per layer, one key and one value buffer of
 * [maxSlots, kvHeads, capacity, headDim] (BNSH, as GroupQueryAttention wants).
 * A sequence owns one slot; its tokens fill the slot left-aligned. The rows of
 * one forward pass are contiguous slots, so the graph reads and appends to the
 * cache in place through subarray views.
 *
 * `capacity` follows the longest live sequence rather than the context limit:
 * the runtime's binding moves every past/present tensor across the JS boundary
 * on each run, so a step costs in proportion to rows x capacity. Growing
 * geometrically (x1.25) re-lays the buffers out rarely (amortised O(1) per token).
 */
export class KvCache {
  readonly maxSlots: number
  readonly maxContext: number
  readonly layers: number
  readonly kvHeads: number
  readonly headDim: number
  readonly dtype: 'float32' | 'float16'
  capacity: number
  keys: KvBuffer[]
  values: KvBuffer[]

  constructor(
    config: MixtralConfig,
    maxSlots: number,
    maxContext: number,
    dtype: 'float32' | 'float16' = 'float32',
  ) {
    if (!Number.isInteger(maxSlots) || maxSlots < 1) throw new Error('KV cache needs at least one slot')
    if (!Number.isInteger(maxContext) || maxContext < 2 || maxContext > config.max_position_embeddings)
      throw new Error(
        `max context ${maxContext} must be an integer between 2 and the model's max_position_embeddings (${config.max_position_embeddings})`,
      )
    this.maxSlots = maxSlots
    this.maxContext = maxContext
    this.layers = config.num_hidden_layers
    this.kvHeads = config.num_key_value_heads
    this.headDim = config.head_dim
    this.dtype = dtype
    this.capacity = Math.min(CAPACITY_STEP, maxContext)
    this.keys = this.allocate(this.capacity)
    this.values = this.allocate(this.capacity)
  }

  private allocate(capacity: number): KvBuffer[] {
    const n = this.maxSlots * this.kvHeads * capacity * this.headDim
    return Array.from({ length: this.layers }, () =>
      this.dtype === 'float16' ? new Uint16Array(n) : new Float32Array(n),
    )
  }

  /** Elements per slot per layer per K or V at the current capacity. */
  get slotElems(): number {
    return this.kvHeads * this.capacity * this.headDim
  }

  /**
   * Makes room for sequences of `length` positions, and gives memory back when
   * the longest live sequence (`length`) has shrunk far below the capacity.
   */
  fit(length: number): void {
    if (length > this.maxContext)
      throw new Error(`length ${length} exceeds the context limit ${this.maxContext}`)
    const round = (n: number) => Math.min(this.maxContext, Math.ceil(n / CAPACITY_STEP) * CAPACITY_STEP)
    if (length > this.capacity) this.relayout(round(Math.max(length * 1.25, this.capacity + CAPACITY_STEP)))
    else if (this.capacity > CAPACITY_STEP && length * 4 <= this.capacity) this.relayout(round(length * 2))
  }

  private relayout(capacity: number): void {
    const keep = Math.min(capacity, this.capacity) * this.headDim
    const move = (old: KvBuffer[]) => {
      const fresh = this.allocate(capacity)
      old.forEach((src, l) => {
        for (let s = 0; s < this.maxSlots * this.kvHeads; s++) {
          const from = s * this.capacity * this.headDim
          fresh[l]!.set(src.subarray(from, from + keep), s * capacity * this.headDim)
        }
      })
      return fresh
    }
    this.keys = move(this.keys)
    this.values = move(this.values)
    this.capacity = capacity
  }

  /** Views of `count` slots from `first`, for one layer. */
  view(layer: number, first: number, count: number): { key: KvBuffer; value: KvBuffer } {
    if (first < 0 || count < 1 || first + count > this.maxSlots)
      throw new Error(`slots ${first}..${first + count - 1} are outside the cache's ${this.maxSlots}`)
    const a = first * this.slotElems
    const b = (first + count) * this.slotElems
    return { key: this.keys[layer]!.subarray(a, b), value: this.values[layer]!.subarray(a, b) }
  }

  /** Copies one slot's first `length` positions over another's (to keep live slots contiguous). */
  moveSlot(from: number, to: number, length: number = this.capacity): void {
    if (from === to) return
    const n = this.headDim * Math.min(length, this.capacity)
    const stride = this.capacity * this.headDim
    for (const buf of [...this.keys, ...this.values]) {
      for (let h = 0; h < this.kvHeads; h++) {
        const src = from * this.slotElems + h * stride
        buf.copyWithin(to * this.slotElems + h * stride, src, src + n)
      }
    }
  }

  /** Bytes the cache holds now. */
  get bytes(): number {
    return 2 * this.layers * this.maxSlots * this.slotElems * (this.dtype === 'float16' ? 2 : 4)
  }
}
