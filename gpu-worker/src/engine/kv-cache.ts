import type { ModelConfig } from './model-config.ts'

type KvBuffer = Float32Array | Uint16Array

/** Positions 0..length-1 of one slot, per layer, as [kvHeads, length, headDim]. */
export interface KvPrefix {
  length: number
  keys: KvBuffer[]
  values: KvBuffer[]
}

/** Capacities grow and shrink in multiples of this many positions. */
const CAPACITY_STEP = 64

/**
 * The KV cache: per layer, one key and one value buffer of
 * [slots, kvHeads, capacity, headDim] (BNSH). A sequence owns one slot; its
 * tokens fill the slot left-aligned. The rows of one forward pass are
 * contiguous slots, so the graph reads the cache in place through subarray
 * views; it returns each step's new keys and values, which write() appends.
 *
 * `capacity` follows the longest live sequence rather than the context limit:
 * attention scans every row's whole capacity (masked past its length), so a
 * step costs in proportion to rows x capacity. Growing geometrically (x1.25)
 * re-lays the buffers out rarely (amortised O(1) per token).
 */
export class KvCache {
  readonly maxSlots: number
  readonly maxContext: number
  readonly layers: number
  readonly kvHeads: number
  readonly headDim: number
  readonly dtype: 'float32' | 'float16'
  capacity: number
  /** Slots the buffers hold now; grows (doubling) with the live batch, up to maxSlots. */
  slots: number
  keys: KvBuffer[]
  values: KvBuffer[]

  constructor(
    config: ModelConfig,
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
    this.slots = 1
    this.keys = this.allocate(this.capacity, this.slots)
    this.values = this.allocate(this.capacity, this.slots)
  }

  private allocate(capacity: number, slots: number): KvBuffer[] {
    const n = slots * this.kvHeads * capacity * this.headDim
    return Array.from({ length: this.layers }, () =>
      this.dtype === 'float16' ? new Uint16Array(n) : new Float32Array(n),
    )
  }

  /** Elements per slot per layer per K or V at the current capacity. */
  get slotElems(): number {
    return this.kvHeads * this.capacity * this.headDim
  }

  /**
   * Makes room for sequences of `length` positions in `liveSlots` slots, and
   * gives memory back when the longest live sequence has shrunk far below the
   * capacity. Only the first `liveSlots` slots hold data worth moving.
   */
  fit(length: number, liveSlots: number): void {
    if (length > this.maxContext)
      throw new Error(`length ${length} exceeds the context limit ${this.maxContext}`)
    if (liveSlots > this.maxSlots)
      throw new Error(`${liveSlots} live sequences exceed the cache's ${this.maxSlots} slots`)
    const round = (n: number) => Math.min(this.maxContext, Math.ceil(n / CAPACITY_STEP) * CAPACITY_STEP)
    let capacity = this.capacity
    if (length > capacity) capacity = round(Math.max(length * 1.25, capacity + CAPACITY_STEP))
    // Shrink with hysteresis, so sequences that come and go do not re-lay the cache each time.
    else if (capacity > CAPACITY_STEP && length * 8 <= capacity) capacity = round(length * 2)
    const slots =
      liveSlots > this.slots ? Math.min(this.maxSlots, Math.max(liveSlots, this.slots * 2)) : this.slots
    if (capacity !== this.capacity || slots !== this.slots) this.relayout(capacity, slots, liveSlots)
  }

  private relayout(capacity: number, slots: number, liveSlots: number): void {
    const keep = Math.min(capacity, this.capacity) * this.headDim
    const rows = Math.min(liveSlots, this.slots) * this.kvHeads
    const move = (old: KvBuffer[]) => {
      const fresh = this.allocate(capacity, slots)
      old.forEach((src, l) => {
        for (let r = 0; r < rows; r++) {
          const from = r * this.capacity * this.headDim
          fresh[l]!.set(src.subarray(from, from + keep), r * capacity * this.headDim)
        }
      })
      return fresh
    }
    this.keys = move(this.keys)
    this.values = move(this.values)
    this.capacity = capacity
    this.slots = slots
  }

  /** Views of `count` slots from `first`, for one layer. */
  view(layer: number, first: number, count: number): { key: KvBuffer; value: KvBuffer } {
    if (first < 0 || count < 1 || first + count > this.slots)
      throw new Error(
        `slots ${first}..${first + count - 1} are outside the cache's ${this.slots} allocated slots`,
      )
    const a = first * this.slotElems
    const b = (first + count) * this.slotElems
    return { key: this.keys[layer]!.subarray(a, b), value: this.values[layer]!.subarray(a, b) }
  }

  /**
   * Appends a forward pass's new keys and values for one layer: `keys` and
   * `values` are [rows, kvHeads, seqLen, headDim]; row i (slot first + i) keeps
   * its first tokens.length positions, after its pastLength cached ones.
   */
  write(
    layer: number,
    first: number,
    rows: ReadonlyArray<{ pastLength: number; tokens: { length: number } }>,
    seqLen: number,
    keys: ArrayBufferView,
    values: ArrayBufferView,
  ): void {
    const D = this.headDim
    const stride = this.capacity * D
    // Half-precision outputs may arrive as Float16Array: copy their bits, not their values.
    const bits = (a: ArrayBufferView) =>
      this.dtype === 'float16'
        ? new Uint16Array(a.buffer, a.byteOffset, a.byteLength / 2)
        : new Float32Array(a.buffer, a.byteOffset, a.byteLength / 4)
    const pairs: Array<[KvBuffer, KvBuffer]> = [
      [this.keys[layer]!, bits(keys)],
      [this.values[layer]!, bits(values)],
    ]
    rows.forEach((r, i) => {
      const len = r.tokens.length
      if (r.pastLength + len > this.capacity)
        throw new Error(`row ${i} needs ${r.pastLength + len} positions; the cache holds ${this.capacity}`)
      for (const [dst, src] of pairs) {
        for (let h = 0; h < this.kvHeads; h++) {
          const from = (i * this.kvHeads + h) * seqLen * D
          dst.set(
            src.subarray(from, from + len * D),
            (first + i) * this.slotElems + h * stride + r.pastLength * D,
          )
        }
      }
    })
  }

  /** Copies one slot's first `length` positions over another's (to keep live slots contiguous). */
  moveSlot(from: number, to: number, length: number = this.capacity): void {
    if (from === to) return
    if (from >= this.slots || to >= this.slots) throw new Error(`slot ${Math.max(from, to)} is not allocated`)
    const n = this.headDim * Math.min(length, this.capacity)
    const stride = this.capacity * this.headDim
    for (const buf of [...this.keys, ...this.values]) {
      for (let h = 0; h < this.kvHeads; h++) {
        const src = from * this.slotElems + h * stride
        buf.copyWithin(to * this.slotElems + h * stride, src, src + n)
      }
    }
  }

  /** A copy of one slot's first `length` positions, kept outside the cache (a cached prompt prefix). */
  readPrefix(slot: number, length: number): KvPrefix {
    if (slot >= this.slots) throw new Error(`slot ${slot} is not allocated`)
    if (length > this.capacity) throw new Error(`prefix of ${length} exceeds the capacity ${this.capacity}`)
    const stride = this.capacity * this.headDim
    const n = length * this.headDim
    const copy = (buf: KvBuffer) => {
      const out =
        this.dtype === 'float16' ? new Uint16Array(this.kvHeads * n) : new Float32Array(this.kvHeads * n)
      for (let h = 0; h < this.kvHeads; h++) {
        const src = slot * this.slotElems + h * stride
        out.set(buf.subarray(src, src + n), h * n)
      }
      return out
    }
    return { length, keys: this.keys.map(copy), values: this.values.map(copy) }
  }

  /** Writes a prefix's first `length` positions into a slot (which must be allocated, with room). */
  writePrefix(prefix: KvPrefix, slot: number, length: number): void {
    if (length > prefix.length) throw new Error(`prefix holds ${prefix.length} positions, not ${length}`)
    if (slot >= this.slots || length > this.capacity)
      throw new Error(
        `slot ${slot} cannot take ${length} positions (${this.slots} slots of ${this.capacity})`,
      )
    const stride = this.capacity * this.headDim
    const n = length * this.headDim
    const m = prefix.length * this.headDim
    const paste = (dst: KvBuffer, src: KvBuffer) => {
      for (let h = 0; h < this.kvHeads; h++)
        dst.set(src.subarray(h * m, h * m + n), slot * this.slotElems + h * stride)
    }
    for (let l = 0; l < this.layers; l++) {
      paste(this.keys[l]!, prefix.keys[l]!)
      paste(this.values[l]!, prefix.values[l]!)
    }
  }

  /** Bytes the cache holds now. */
  get bytes(): number {
    return 2 * this.layers * this.slots * this.slotElems * (this.dtype === 'float16' ? 2 : 4)
  }
}
