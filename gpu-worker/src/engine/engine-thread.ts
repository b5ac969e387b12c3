// The worker-thread side of ThreadedEngine: owns the ORT session and the KV
// cache, and runs one forward pass per message, in message order.
import { parentPort, workerData } from 'node:worker_threads'
import { type EngineOptions, MoeEngine, type StepOutput, type StepRow } from './engine.ts'

export type EngineRequest =
  | { op: 'forward'; id: number; rows: StepRow[] }
  | { op: 'moveSlot'; from: number; to: number; length: number }
  | { op: 'reserve'; slots: number; length: number }
  | { op: 'savePrefix'; key: number; slot: number; length: number }
  | { op: 'loadPrefix'; key: number; slot: number; length: number }
  | { op: 'dropPrefix'; key: number }
  | { op: 'close' }

export type EngineReply =
  | { type: 'ready'; ep: 'cpu' | 'cuda'; kvBytes: number }
  | { type: 'log'; msg: string; fields?: Record<string, unknown> }
  | ({ type: 'forward'; id: number; kvBytes: number } & StepOutput)
  | { type: 'failed'; id: number; message: string }
  | { type: 'fatal'; message: string }

const port = parentPort!
const post = (reply: EngineReply, transfer: ArrayBuffer[] = []) => port.postMessage(reply, transfer)

try {
  const opts = workerData as Omit<EngineOptions, 'log'>
  const engine = await MoeEngine.load({ ...opts, log: (msg, fields) => post({ type: 'log', msg, fields }) })
  // A cache operation that failed fails the next forward pass, whose caller can act on it.
  let cacheError: string | null = null
  const cacheOp = (run: () => void) => {
    try {
      run()
    } catch (e) {
      cacheError ??= (e as Error).message
    }
  }
  port.on('message', async (m: EngineRequest) => {
    if (m.op === 'moveSlot') cacheOp(() => engine.moveSlot(m.from, m.to, m.length))
    else if (m.op === 'reserve') cacheOp(() => engine.reserve(m.slots, m.length))
    else if (m.op === 'savePrefix') cacheOp(() => engine.savePrefix(m.key, m.slot, m.length))
    else if (m.op === 'loadPrefix') cacheOp(() => engine.loadPrefix(m.key, m.slot, m.length))
    else if (m.op === 'dropPrefix') engine.dropPrefix(m.key)
    else if (m.op === 'close') {
      await engine.close()
      port.close()
    } else if (cacheError !== null) {
      post({ type: 'failed', id: m.id, message: cacheError })
      cacheError = null
    } else {
      try {
        const out = await engine.forward(m.rows)
        // Copies: ORT's output buffers belong to ORT and cannot be transferred.
        const logits = out.logits.slice()
        const chosen = out.chosenExperts.slice()
        post(
          {
            type: 'forward',
            id: m.id,
            logits,
            expertCounts: out.expertCounts,
            chosenExperts: chosen,
            seqLen: out.seqLen,
            runMs: out.runMs,
            stepMs: out.stepMs,
            kvBytes: engine.kvBytes,
          },
          [logits.buffer, chosen.buffer, out.expertCounts.buffer as ArrayBuffer],
        )
      } catch (e) {
        post({ type: 'failed', id: m.id, message: (e as Error).message })
      }
    }
  })
  post({ type: 'ready', ep: engine.ep, kvBytes: engine.kvBytes })
} catch (e) {
  post({ type: 'fatal', message: (e as Error).message })
}
