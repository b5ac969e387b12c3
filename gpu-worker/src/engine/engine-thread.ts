// The worker-thread side of ThreadedEngine: owns the ORT session and the KV
// cache, and runs one forward pass per message, in message order.
import { parentPort, workerData } from 'node:worker_threads'
import { type EngineOptions, MoeEngine, type StepOutput, type StepRow } from './engine.ts'

export type EngineRequest =
  | { op: 'forward'; id: number; rows: StepRow[] }
  | { op: 'moveSlot'; from: number; to: number; length: number }
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
  port.on('message', async (m: EngineRequest) => {
    if (m.op === 'moveSlot') engine.moveSlot(m.from, m.to, m.length)
    else if (m.op === 'close') {
      await engine.close()
      port.close()
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
