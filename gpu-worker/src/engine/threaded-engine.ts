import { Worker } from 'node:worker_threads'
import type { EngineReply, EngineRequest } from './engine-thread.ts'
import { openModelDir } from './model-dir.ts'
import { type EngineOptions, loadPlan, StepEngine, type StepOutput, type StepRow } from './step-engine.ts'
import { ChatTokenizer } from './tokenizer.ts'

/**
 * The engine with its forward passes on a worker thread. ONNX Runtime's Node
 * binding runs a session synchronously, so in the main thread every step
 * would stall the event loop: queue fetches, token-stream writes and cancel
 * notices would wait for the step to end. Here they proceed during it.
 * Sampling, detokenising and stop rules stay on the main thread.
 */
export class ThreadedEngine extends StepEngine {
  ep: 'cpu' | 'cuda' = 'cpu'
  kvBytes = 0
  private readonly worker: Worker
  private nextId = 0
  private readonly pending = new Map<
    number,
    { resolve: (o: StepOutput) => void; reject: (e: Error) => void }
  >()
  private failure: Error | null = null
  private closing = false
  private readonly deathListeners: Array<(e: Error) => void> = []

  private constructor(init: ConstructorParameters<typeof StepEngine>[0] & { worker: Worker }) {
    super(init)
    this.worker = init.worker
  }

  static async load(opts: EngineOptions): Promise<ThreadedEngine> {
    const log = opts.log ?? ((msg: string) => console.error(msg))
    const model = openModelDir(opts.modelDir) // validated here too, so errors surface in this thread
    const { maxBatch, maxContext } = loadPlan(model, opts) // and a model too large for memory
    const tokenizer = await ChatTokenizer.fromFiles(model.dir)
    const { log: _log, ...workerOpts } = opts
    const worker = new Worker(new URL('./engine-thread.ts', import.meta.url), { workerData: workerOpts })
    const engine = new ThreadedEngine({ model, tokenizer, maxBatch, maxContext, worker })
    await new Promise<void>((resolve, reject) => {
      worker.on('message', (r: EngineReply) => {
        switch (r.type) {
          case 'ready':
            engine.ep = r.ep
            engine.kvBytes = r.kvBytes
            resolve()
            return
          case 'log':
            log(r.msg, r.fields)
            return
          case 'fatal':
            reject(new Error(r.message))
            return
          default:
            engine.settle(r)
        }
      })
      worker.on('error', (e) => {
        engine.fail(e)
        reject(e)
      })
      worker.on('exit', (code) => engine.fail(new Error(`engine thread exited (${code})`)))
    })
    return engine
  }

  private settle(r: Extract<EngineReply, { type: 'forward' } | { type: 'failed' }>): void {
    const p = this.pending.get(r.id)
    if (!p) return
    this.pending.delete(r.id)
    if (r.type === 'failed') {
      p.reject(new Error(r.message))
      return
    }
    const { type: _t, id: _i, kvBytes, ...out } = r
    this.kvBytes = kvBytes
    p.resolve(out)
  }

  private fail(e: Error): void {
    const first = this.failure === null
    this.failure ??= e
    for (const p of this.pending.values()) p.reject(e)
    this.pending.clear()
    if (first && !this.closing) for (const listener of this.deathListeners) listener(e)
  }

  /**
   * Calls `listener` once if the engine thread dies other than by close(): every forward
   * pass would fail from then on, so the process should stop taking work.
   */
  onDeath(listener: (e: Error) => void): void {
    this.deathListeners.push(listener)
  }

  /** Stops the thread at once, without waiting for a pass in flight (which then fails). */
  async terminate(): Promise<void> {
    await this.worker.terminate()
  }

  private send(m: EngineRequest): void {
    this.worker.postMessage(m)
  }

  forward(rows: readonly StepRow[]): Promise<StepOutput> {
    if (this.failure) return Promise.reject(this.failure)
    const id = this.nextId++
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject })
      this.send({ op: 'forward', id, rows: rows.map((r) => ({ ...r, tokens: [...r.tokens] })) })
    })
  }

  moveSlot(from: number, to: number, length: number): void {
    this.send({ op: 'moveSlot', from, to, length })
  }

  // Like moveSlot, these are ordered before the next forward pass; an error there fails that pass.
  reserve(slots: number, length: number): void {
    this.send({ op: 'reserve', slots, length })
  }

  savePrefix(key: number, slot: number, length: number): void {
    this.send({ op: 'savePrefix', key, slot, length })
  }

  loadPrefix(key: number, slot: number, length: number): void {
    this.send({ op: 'loadPrefix', key, slot, length })
  }

  dropPrefix(key: number): void {
    this.send({ op: 'dropPrefix', key })
  }

  async close(): Promise<void> {
    if (this.failure) return
    this.closing = true
    this.send({ op: 'close' })
    await new Promise((r) => this.worker.once('exit', r))
  }
}
