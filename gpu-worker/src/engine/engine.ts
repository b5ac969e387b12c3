import { existsSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import * as ort from 'onnxruntime-node'
import { KvCache } from './kv-cache.ts'
import { type ModelDir, openModelDir } from './model-dir.ts'
import { type ExportDtype, ensureExported, graphNames } from './onnx-export.ts'
import { type FinishReason, type GenerationParams, Sequence, type TokenOutput } from './sequence.ts'
import { createModelSession, type ExecutionProviderChoice } from './session.ts'
import { ChatTokenizer } from './tokenizer.ts'

export interface EngineOptions {
  modelDir: string
  ep?: ExecutionProviderChoice
  intraOpThreads?: number
  /** ORT thread spinning (see SessionOptions.spin); default on. */
  spin?: boolean
  /** Most sequences decoded together (KV-cache slots). */
  maxBatch?: number
  /** Most tokens (prompt + completion) per sequence. */
  maxContext?: number
  log?: (msg: string, fields?: Record<string, unknown>) => void
}

/** One row of a forward pass: a sequence's KV slot, the tokens to feed, and what the cache already holds. */
export interface StepRow {
  slot: number
  tokens: readonly number[]
  pastLength: number
  allowedExperts: readonly number[] | null
}

export interface StepOutput {
  /** Last-position logits, [rows, vocab]. */
  logits: Float32Array
  /** Per row, tokens routed to each expert: [rows, layers, experts] (padding excluded). */
  expertCounts: Uint32Array
  /** The router's picks as the graph returned them: [layers, rows * seqLen, k]. */
  chosenExperts: BigInt64Array
  /** Tokens per row in this pass (padded prefill rows share the longest length). */
  seqLen: number
  /** Wall time inside session.run. */
  runMs: number
  /** Wall time of the whole step (feeds, run, telemetry). */
  stepMs: number
}

export interface GenerateRequest extends Partial<GenerationParams> {
  inputIds: readonly number[]
  onToken?: (token: TokenOutput) => void
}

export interface GenerationResult {
  outputIds: number[]
  text: string
  finishReason: FinishReason | 'cancelled'
  usage: { promptTokens: number; completionTokens: number }
  timings: {
    timeToFirstTokenMs: number
    totalMs: number
    tokensPerSecond: number
    decodeTokensPerSecond: number
  }
  /** expertLoad[layer][expert]: tokens (prompt and generated) routed to each expert. */
  expertLoad: number[][]
}

export const DEFAULT_GENERATION: Omit<GenerationParams, 'seed'> = {
  maxTokens: 16,
  temperature: 0,
  topP: 1,
  topK: 0,
  stop: [],
  allowedExperts: null,
}

/** True when the CUDA build of onnxruntime-node is installed and an NVIDIA device is visible. */
export function cudaAvailable(): boolean {
  const binDir = join(
    dirname(createRequire(import.meta.url).resolve('onnxruntime-node')),
    '..',
    'bin',
    'napi-v6',
    'linux',
    'x64',
  )
  return existsSync(join(binDir, 'libonnxruntime_providers_cuda.so')) && existsSync('/dev/nvidiactl')
}

/**
 * What the scheduler drives: one forward pass at a time over rows in KV
 * slots, plus the sequence bookkeeping that needs only the config and the
 * tokenizer. MoeEngine runs the passes in this thread; ThreadedEngine runs
 * them in a worker thread so the event loop stays free for I/O meanwhile.
 */
export abstract class StepEngine {
  readonly model: ModelDir
  readonly tokenizer: ChatTokenizer
  readonly maxBatch: number
  readonly maxContext: number
  abstract readonly ep: 'cpu' | 'cuda'
  /** Bytes the KV cache holds now. */
  abstract readonly kvBytes: number
  abstract forward(rows: readonly StepRow[]): Promise<StepOutput>
  /** Copies one KV slot over another (ordered before the next forward pass). */
  abstract moveSlot(from: number, to: number, length: number): void
  abstract close(): Promise<void>

  constructor(init: { model: ModelDir; tokenizer: ChatTokenizer; maxBatch: number; maxContext: number }) {
    this.model = init.model
    this.tokenizer = init.tokenizer
    this.maxBatch = init.maxBatch
    this.maxContext = init.maxContext
  }

  get config() {
    return this.model.config
  }

  /** Builds a Sequence for this model with defaults filled in. */
  createSequence(
    id: string,
    promptIds: readonly number[],
    params: Partial<GenerationParams> & { seed: number },
  ): Sequence {
    return new Sequence({
      id,
      promptIds,
      params: { ...DEFAULT_GENERATION, ...params },
      tokenizer: this.tokenizer,
      layers: this.config.num_hidden_layers,
      experts: this.config.num_local_experts,
      maxContext: this.maxContext,
    })
  }

  /** Checks that a subset of experts can serve top-k routing on this model. */
  validateExperts(allowed: readonly number[] | null): void {
    if (allowed === null) return
    const k = this.config.num_experts_per_tok
    if (new Set(allowed).size < k)
      throw new Error(`an expert subset needs at least ${k} distinct experts (top-${k} routing)`)
    for (const e of allowed)
      if (!Number.isInteger(e) || e < 0 || e >= this.config.num_local_experts)
        throw new Error(
          `expert ${e} does not exist; the model has experts 0..${this.config.num_local_experts - 1}`,
        )
  }

  /**
   * Feeds one step's output back into its sequences: samples a token for
   * each and adds its expert counts. Rows and sequences are in the same order.
   */
  acceptStep(seqs: readonly Sequence[], rows: readonly StepRow[], out: StepOutput): TokenOutput[] {
    return seqs.map((seq, i) => this.acceptRow(seq, rows[i]!, out, i))
  }

  /** acceptStep for row `i` alone, so one bad row can fail without the others. */
  acceptRow(seq: Sequence, row: StepRow, out: StepOutput, i: number): TokenOutput {
    const V = this.config.vocab_size
    const LE = this.config.num_hidden_layers * this.config.num_local_experts
    const counts = out.expertCounts.subarray(i * LE, (i + 1) * LE)
    for (let j = 0; j < LE; j++) seq.expertLoad[j]! += counts[j]!
    return seq.accept(out.logits.subarray(i * V, (i + 1) * V), row.tokens.length)
  }

  /** Decodes one sequence alone (slot 0). Not for use while a scheduler drives this engine. */
  async generate(req: GenerateRequest): Promise<GenerationResult> {
    const { inputIds, onToken, ...params } = req
    this.validateExperts(params.allowedExperts ?? null)
    if (inputIds.length >= this.maxContext)
      throw new Error(
        `prompt of ${inputIds.length} tokens leaves no room in the context of ${this.maxContext}`,
      )
    const seq = this.createSequence('generate', inputIds, { ...params, seed: params.seed ?? 0 })
    seq.slot = 0
    while (!seq.finished) {
      const row: StepRow = {
        slot: 0,
        tokens: seq.nextInput(),
        pastLength: seq.pastLength,
        allowedExperts: seq.params.allowedExperts,
      }
      const out = await this.forward([row])
      const [token] = this.acceptStep([seq], [row], out)
      onToken?.(token!)
    }
    return sequenceResult(seq, this.config.num_local_experts)
  }
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
    const wantCuda = opts.ep === 'cuda' || ((opts.ep ?? 'auto') === 'auto' && cudaAvailable())
    const dtype: ExportDtype = wantCuda ? 'fp16' : 'fp32'
    const t0 = performance.now()
    const exported = ensureExported(model, dtype)
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
    const maxContext = Math.min(opts.maxContext ?? 2048, model.config.max_position_embeddings)
    return new MoeEngine({ model, tokenizer, session, ep, dtype, maxBatch: opts.maxBatch ?? 32, maxContext })
  }

  get kvBytes(): number {
    return this.kv.bytes
  }

  moveSlot(from: number, to: number, length: number): void {
    this.kv.moveSlot(from, to, length)
  }

  async close(): Promise<void> {
    await this.session.release()
  }

  /**
   * One forward pass. Rows must sit in contiguous, ascending KV slots. Either
   * every row feeds one token (decode), or every row starts from an empty
   * cache (prefill; rows of different lengths are right-padded).
   */
  async forward(rows: readonly StepRow[]): Promise<StepOutput> {
    const start = performance.now()
    const n = rows.length
    if (n === 0) throw new Error('forward() needs at least one row')
    const first = rows[0]!.slot
    rows.forEach((r, i) => {
      if (r.slot !== first + i) throw new Error('forward() rows must occupy contiguous ascending KV slots')
      if (r.tokens.length === 0) throw new Error('every row needs at least one token')
    })
    const decode = rows.every((r) => r.tokens.length === 1)
    if (!decode && rows.some((r) => r.pastLength !== 0))
      throw new Error('prefill rows must start from an empty cache; decode rows feed exactly one token')
    const S = decode ? 1 : Math.max(...rows.map((r) => r.tokens.length))
    const total = decode ? Math.max(...rows.map((r) => r.pastLength)) + 1 : S
    if (total > this.maxContext)
      throw new Error(`sequence length ${total} exceeds the context limit ${this.maxContext}`)

    const ids = new BigInt64Array(n * S)
    const mask = new BigInt64Array(n * total)
    rows.forEach((r, i) => {
      r.tokens.forEach((t, j) => {
        ids[i * S + j] = BigInt(t)
      })
      mask.fill(1n, i * total, i * total + r.pastLength + r.tokens.length)
    })
    const feeds: Record<string, ort.Tensor> = {
      [graphNames.inputIds]: new ort.Tensor('int64', ids, [n, S]),
      [graphNames.attentionMask]: new ort.Tensor('int64', mask, [n, total]),
    }
    feeds[graphNames.expertBias] = this.expertBias(rows)
    // Live sequences sit in slots 0..first+n-1: a prefill's rows are the newest, a decode's are all.
    // A decode covers every live row, so it may shrink the cache; a prefill's rows are only the
    // newest, and shrinking to their length would cut off the older sequences' positions.
    this.kv.fit(decode ? total : Math.max(total, this.kv.capacity), first + n)
    const kvType = this.kv.dtype
    const kvDims = [n, this.kv.kvHeads, this.kv.capacity, this.kv.headDim]
    const fetches: Record<string, ort.Tensor | null> = {
      [graphNames.logits]: null,
      [graphNames.expertIndices]: null,
    }
    for (let l = 0; l < this.layers; l++) {
      const { key, value } = this.kv.view(l, first, n)
      // The same buffer as past input and present output: GQA appends in place.
      const k = new ort.Tensor(kvType, key, kvDims)
      const v = new ort.Tensor(kvType, value, kvDims)
      feeds[graphNames.pastKey(l)] = k
      feeds[graphNames.pastValue(l)] = v
      fetches[graphNames.presentKey(l)] = k
      fetches[graphNames.presentValue(l)] = v
    }
    const runStart = performance.now()
    const out = await this.session.run(feeds, fetches as ort.InferenceSession.FetchesType)
    const runMs = performance.now() - runStart

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
        ? new ort.Tensor('float16', new Uint16Array(E), [1, E])
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
      return new ort.Tensor('float16', half, [rows.length, E])
    }
    return new ort.Tensor('float32', bias, [rows.length, E])
  }
}

/** The summary of a finished sequence. */
export function sequenceResult(seq: Sequence, experts: number): GenerationResult {
  const end = seq.finishedAt ?? performance.now()
  const totalMs = end - seq.startedAt
  const ttft = (seq.firstTokenAt ?? end) - seq.startedAt
  const decodeMs = end - (seq.firstTokenAt ?? end)
  const n = seq.outputIds.length
  return {
    outputIds: [...seq.outputIds],
    text: seq.text,
    finishReason: seq.finishReason ?? 'length',
    usage: { promptTokens: seq.promptIds.length, completionTokens: n },
    timings: {
      timeToFirstTokenMs: ttft,
      totalMs,
      tokensPerSecond: totalMs > 0 ? (n * 1000) / totalMs : 0,
      decodeTokensPerSecond: n > 1 && decodeMs > 0 ? ((n - 1) * 1000) / decodeMs : 0,
    },
    expertLoad: seq.expertLoadMatrix(experts),
  }
}
