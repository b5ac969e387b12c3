import * as ort from 'onnxruntime-node'
import { KvCache, type KvPrefix } from './kv-cache.ts'
import { type ModelDir, openModelDir } from './model-dir.ts'
import { type ExportDtype, ensureExported, graphNames } from './onnx-export.ts'
import { createModelSession } from './session.ts'
import { type EngineOptions, loadPlan, StepEngine, type StepOutput, type StepRow } from './step-engine.ts'
import { ChatTokenizer } from './tokenizer.ts'

// The step API's types and the shared engine base live in step-engine.ts;
// they are re-exported here, where the rest of the worker imports them from.
export {
  cudaAvailable,
  DEFAULT_GENERATION,
  type EngineOptions,
  type GenerateRequest,
  type GenerationResult,
  StepEngine,
  type StepOutput,
  type StepRow,
  sequenceResult,
} from './step-engine.ts'

/**
 * A float32 tensor, or a float16 one over IEEE-half bits in a Uint16Array.
 * Where the runtime has Float16Array (Node 24), ort.Tensor rewraps the bits
 * as one, which onnxruntime-node 1.30's native binding reads as 0 bytes ("not
 * enough space: expected 16, got 0"); handing it back the Uint16Array works.
 */
function floatTensor(
  type: 'float32' | 'float16',
  data: Float32Array | Uint16Array,
  dims: number[],
): ort.Tensor {
  const t = new ort.Tensor(type, data, dims)
  if (type === 'float16') (t as unknown as { cpuData: Uint16Array }).cpuData = data as Uint16Array
  return t
}

/**
 * The MoE engine: one exported graph, one ORT session, one KV cache. It knows
 * nothing of queues or HTTP. forward() runs one pass over a batch of rows;
 * generate() decodes one sequence on top of it.
 */
export class MoeEngine extends StepEngine {
  readonly kv: KvCache
  readonly ep: 'cpu' | 'cuda'
  readonly dtype: ExportDtype
  private readonly session: ort.InferenceSession
  private readonly layers: number
  private readonly experts: number
  /** KV copies of prompt prefixes, outside the batch's slots (the scheduler's prefix cache). */
  private readonly prefixes = new Map<number, KvPrefix>()
  private reserved = { slots: 0, length: 0 }

  private constructor(init: {
    model: ModelDir
    tokenizer: ChatTokenizer
    session: ort.InferenceSession
    ep: 'cpu' | 'cuda'
    dtype: ExportDtype
    maxBatch: number
    maxContext: number
  }) {
    super(init)
    this.session = init.session
    this.ep = init.ep
    this.dtype = init.dtype
    const c = init.model.config
    this.layers = c.num_hidden_layers
    this.experts = c.num_local_experts
    this.kv = new KvCache(c, init.maxBatch, init.maxContext, init.dtype === 'fp16' ? 'float16' : 'float32')
  }

  static async load(opts: EngineOptions): Promise<MoeEngine> {
    const log = opts.log ?? ((msg: string) => console.error(msg))
    const model = openModelDir(opts.modelDir)
    const tokenizer = await ChatTokenizer.fromFiles(model.dir)
    const { wantCuda, dtype, maxBatch, maxContext } = loadPlan(model, opts)
    const t0 = performance.now()
    const exported = ensureExported(model, dtype, opts.exportCacheDir, opts.expertKernel)
    log(exported.cached ? 'export: reusing cached ONNX graph' : 'export: built ONNX graph', {
      path: exported.modelPath,
      ms: Math.round(performance.now() - t0),
    })
    const { session, ep } = await createModelSession(exported.modelPath, {
      ep: wantCuda ? (opts.ep ?? 'auto') : 'cpu',
      intraOpThreads: opts.intraOpThreads,
      spin: opts.spin,
      log,
    })
    return new MoeEngine({ model, tokenizer, session, ep, dtype, maxBatch, maxContext })
  }

  get kvBytes(): number {
    return this.kv.bytes
  }

  moveSlot(from: number, to: number, length: number): void {
    this.kv.moveSlot(from, to, length)
  }

  reserve(slots: number, length: number): void {
    this.reserved = { slots, length }
    if (slots > 0) this.kv.fit(Math.max(length, this.kv.capacity), slots)
  }

  savePrefix(key: number, slot: number, length: number): void {
    this.prefixes.set(key, this.kv.readPrefix(slot, length))
  }

  loadPrefix(key: number, slot: number, length: number): void {
    const prefix = this.prefixes.get(key)
    if (!prefix) throw new Error(`no stored prefix ${key}`)
    this.kv.writePrefix(prefix, slot, length)
  }

  dropPrefix(key: number): void {
    this.prefixes.delete(key)
  }

  async close(): Promise<void> {
    await this.session.release()
  }

  /**
   * One forward pass. Rows must sit in contiguous, ascending KV slots. Each
   * row feeds one or more tokens on top of what its slot holds (pastLength
   * positions): decode, prefill, or a chunk of a prompt whose start is cached.
   * Rows shorter than the longest are right-padded.
   */
  async forward(rows: readonly StepRow[]): Promise<StepOutput> {
    const start = performance.now()
    const n = rows.length
    if (n === 0) throw new Error('forward() needs at least one row')
    const first = rows[0]!.slot
    rows.forEach((r, i) => {
      if (r.slot !== first + i) throw new Error('forward() rows must occupy contiguous ascending KV slots')
      if (r.tokens.length === 0) throw new Error('every row needs at least one token')
      if (!Number.isInteger(r.pastLength) || r.pastLength < 0)
        throw new Error(`pastLength ${r.pastLength} must be a non-negative integer`)
    })
    const S = Math.max(...rows.map((r) => r.tokens.length))
    const total = Math.max(...rows.map((r) => r.pastLength + r.tokens.length))
    if (total > this.maxContext)
      throw new Error(`sequence length ${total} exceeds the context limit ${this.maxContext}`)

    const ids = new BigInt64Array(n * S)
    const pastLengths = new BigInt64Array(n)
    const inputLengths = new BigInt64Array(n)
    rows.forEach((r, i) => {
      r.tokens.forEach((t, j) => {
        ids[i * S + j] = BigInt(t)
      })
      pastLengths[i] = BigInt(r.pastLength)
      inputLengths[i] = BigInt(r.tokens.length)
    })
    const feeds: Record<string, ort.Tensor> = {
      [graphNames.inputIds]: new ort.Tensor('int64', ids, [n, S]),
      [graphNames.pastLengths]: new ort.Tensor('int64', pastLengths, [n]),
      [graphNames.inputLengths]: new ort.Tensor('int64', inputLengths, [n]),
    }
    feeds[graphNames.expertBias] = this.expertBias(rows)
    // Live sequences sit in slots 0..first+n-1. A pass of single-token rows is a decode of every
    // live row, so it may shrink the cache; any other pass may cover only the newest rows, and
    // shrinking to their length would cut off the older sequences' positions. Reserved slots (see
    // reserve()) hold live KV that this pass's rows may not cover.
    const decode = rows.every((r) => r.tokens.length === 1)
    this.kv.fit(
      Math.max(decode ? total : Math.max(total, this.kv.capacity), this.reserved.length),
      Math.max(first + n, this.reserved.slots),
    )
    const kvType = this.kv.dtype
    // Rows with no past read an empty cache rather than scanning masked capacity.
    const anyPast = rows.some((r) => r.pastLength > 0)
    const kvDims = [n, this.kv.kvHeads, 1, anyPast ? this.kv.capacity : 0, this.kv.headDim]
    const empty = kvType === 'float16' ? new Uint16Array(0) : new Float32Array(0)
    for (let l = 0; l < this.layers; l++) {
      // The cache is only read: the graph returns the step's keys and values, written below.
      const { key, value } = anyPast ? this.kv.view(l, first, n) : { key: empty, value: empty }
      feeds[graphNames.pastKey(l)] = floatTensor(kvType, key, kvDims)
      feeds[graphNames.pastValue(l)] = floatTensor(kvType, value, kvDims)
    }
    const runStart = performance.now()
    const out = await this.session.run(feeds)
    const runMs = performance.now() - runStart
    const data = (name: string) => out[name]!.data as ArrayBufferView
    for (let l = 0; l < this.layers; l++)
      this.kv.write(l, first, rows, S, data(graphNames.newKey(l)), data(graphNames.newValue(l)))

    const logits = out[graphNames.logits]!.data as Float32Array
    const chosen = out[graphNames.expertIndices]!.data as BigInt64Array
    const k = this.config.num_experts_per_tok
    const counts = new Uint32Array(n * this.layers * this.experts)
    for (let l = 0; l < this.layers; l++) {
      for (let i = 0; i < n; i++) {
        const valid = rows[i]!.tokens.length
        for (let j = 0; j < valid; j++) {
          const base = ((l * n + i) * S + j) * k
          for (let q = 0; q < k; q++) {
            const e = Number(chosen[base + q])
            if (e >= 0) counts[(i * this.layers + l) * this.experts + e]!++ // -1: a dense layer
          }
        }
      }
    }
    return {
      logits,
      expertCounts: counts,
      chosenExperts: chosen,
      seqLen: S,
      runMs,
      stepMs: performance.now() - start,
    }
  }

  /** Per-row expert bias (0 allowed, -inf masked); one broadcast row of zeros when nothing is restricted. */
  private expertBias(rows: readonly StepRow[]): ort.Tensor {
    const E = this.experts
    if (rows.every((r) => r.allowedExperts === null))
      return this.dtype === 'fp16'
        ? floatTensor('float16', new Uint16Array(E), [1, E])
        : new ort.Tensor('float32', new Float32Array(E), [1, E])
    const bias = new Float32Array(rows.length * E)
    rows.forEach((r, i) => {
      if (r.allowedExperts === null) return
      bias.fill(Number.NEGATIVE_INFINITY, i * E, (i + 1) * E)
      for (const e of r.allowedExperts) bias[i * E + e] = 0
    })
    if (this.dtype === 'fp16') {
      const half = new Uint16Array(bias.length)
      bias.forEach((v, i) => {
        half[i] = v === 0 ? 0 : 0xfc00 // -inf in IEEE half
      })
      return floatTensor('float16', half, [rows.length, E])
    }
    return new ort.Tensor('float32', bias, [rows.length, E])
  }
}
