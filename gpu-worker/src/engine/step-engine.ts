import { existsSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { assertFits, type MemoryPlan } from './memory-plan.ts'
import type { ModelDir } from './model-dir.ts'
import type { ExpertKernel, ExportDtype } from './onnx-export.ts'
import {
  type FinishReason,
  type GenerationParams,
  Sequence,
  type TokenConstraint,
  type TokenOutput,
} from './sequence.ts'
import type { ExecutionProviderChoice } from './session.ts'
import type { ChatTokenizer } from './tokenizer.ts'

// The engine as the scheduler sees it: the step API (one forward pass over
// rows in KV slots), its typed inputs and outputs, and the sequence
// bookkeeping that needs only the config and the tokenizer. engine.ts runs
// the passes on ONNX Runtime; threaded-engine.ts runs them on a worker thread.

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
  /** Graph dtype; default fp16 on CUDA, else fp32. int8/int4 quantize the weights (see quantize.ts). */
  dtype?: ExportDtype
  /** Prompt positions the scheduler's prefix cache may keep (counted in the memory plan). */
  prefixCacheTokens?: number
  /** fp32 routed experts: a per-expert dispatch (default) or the fused MoE op (see onnx-export.ts). */
  expertKernel?: ExpertKernel
  /** Memory the model must fit in (weights + full KV cache); default: this machine's. */
  memoryBytes?: number
  /** Root of the ONNX export cache (default: beside the model, or the temp dir). */
  exportCacheDir?: string
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
  /** Restricts the tokens sampled (structured output). */
  constraint?: TokenConstraint
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

/** What loading a model will use: the graph dtype, EP choice and limits, checked against memory. */
export interface LoadPlan {
  wantCuda: boolean
  dtype: ExportDtype
  maxBatch: number
  maxContext: number
  memory: MemoryPlan
}

/** Decides dtype and limits for a model and refuses (ModelMemoryError) one that does not fit. */
export function loadPlan(model: ModelDir, opts: EngineOptions): LoadPlan {
  const wantCuda = opts.ep === 'cuda' || ((opts.ep ?? 'auto') === 'auto' && cudaAvailable())
  const dtype: ExportDtype = opts.dtype ?? (wantCuda ? 'fp16' : 'fp32')
  const maxBatch = opts.maxBatch ?? 32
  const maxContext = Math.min(opts.maxContext ?? 2048, model.config.max_position_embeddings)
  const memory = assertFits(model.config, {
    dtype,
    maxBatch,
    maxContext,
    memoryBytes: opts.memoryBytes,
    prefixCacheTokens: opts.prefixCacheTokens,
  })
  return { wantCuda, dtype, maxBatch, maxContext, memory }
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
  /**
   * Keeps slots 0..slots-1 allocated with room for `length` positions, across passes whose
   * rows do not cover them (a prompt prefilled in chunks between decode steps). 0 releases.
   */
  abstract reserve(slots: number, length: number): void
  /** Copies a slot's first `length` positions into stored prefix `key` (outside the batch's slots). */
  abstract savePrefix(key: number, slot: number, length: number): void
  /** Copies stored prefix `key`'s first `length` positions into a slot (reserve() it first). */
  abstract loadPrefix(key: number, slot: number, length: number): void
  abstract dropPrefix(key: number): void
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
    constraint?: TokenConstraint,
  ): Sequence {
    return new Sequence({
      constraint,
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
    this.addExpertCounts(seq, out, i)
    return seq.accept(out.logits.subarray(i * V, (i + 1) * V), row.tokens.length)
  }

  /** For row `i` that fed part of a prompt (a chunk): its positions are cached, nothing is sampled. */
  acceptChunk(seq: Sequence, row: StepRow, out: StepOutput, i: number): void {
    this.addExpertCounts(seq, out, i)
    seq.pastLength += row.tokens.length
  }

  private addExpertCounts(seq: Sequence, out: StepOutput, i: number): void {
    const LE = this.config.num_hidden_layers * this.config.num_local_experts
    const counts = out.expertCounts.subarray(i * LE, (i + 1) * LE)
    for (let j = 0; j < LE; j++) seq.expertLoad[j]! += counts[j]!
  }

  /** Decodes one sequence alone (slot 0). Not for use while a scheduler drives this engine. */
  async generate(req: GenerateRequest): Promise<GenerationResult> {
    const { inputIds, onToken, constraint, ...params } = req
    this.validateExperts(params.allowedExperts ?? null)
    if (inputIds.length >= this.maxContext)
      throw new Error(
        `prompt of ${inputIds.length} tokens leaves no room in the context of ${this.maxContext}`,
      )
    const seq = this.createSequence('generate', inputIds, { ...params, seed: params.seed ?? 0 }, constraint)
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
