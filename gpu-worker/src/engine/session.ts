import * as ort from 'onnxruntime-node'

export type ExecutionProviderChoice = 'cpu' | 'cuda' | 'auto'

export interface SessionOptions {
  ep: ExecutionProviderChoice
  intraOpThreads?: number
  interOpThreads?: number
  /**
   * Let ORT's idle intra-op threads spin (lower latency on a dedicated machine)
   * instead of sleeping (leaves the cores to Redis and the edge on a shared one).
   */
  spin?: boolean
  log?: (msg: string, fields?: Record<string, unknown>) => void
}

export interface ModelSession {
  session: ort.InferenceSession
  /** The execution provider actually in use. */
  ep: 'cpu' | 'cuda'
}

/**
 * Creates the ORT session on the chosen execution provider. `auto` tries CUDA
 * and falls back to CPU; `cuda` fails loudly when CUDA cannot be used.
 */
export async function createModelSession(modelPath: string, opts: SessionOptions): Promise<ModelSession> {
  const log = opts.log ?? ((msg: string) => console.error(msg))
  const base: ort.InferenceSession.SessionOptions = {
    graphOptimizationLevel: 'all',
    executionMode: 'sequential',
    ...(opts.intraOpThreads ? { intraOpNumThreads: opts.intraOpThreads } : {}),
    ...(opts.interOpThreads ? { interOpNumThreads: opts.interOpThreads } : {}),
    extra: { session: { intra_op: { allow_spinning: opts.spin === false ? '0' : '1' } } },
  }
  if (opts.ep !== 'cpu') {
    try {
      const session = await ort.InferenceSession.create(modelPath, { ...base, executionProviders: ['cuda'] })
      log('execution provider: CUDA', { ep: 'cuda' })
      return { session, ep: 'cuda' }
    } catch (e) {
      const why = (e as Error).message.split('\n')[0]
      if (opts.ep === 'cuda')
        throw new Error(
          `MOE_EP=cuda but the CUDA execution provider could not start: ${why}. Install the CUDA build of onnxruntime-node (see README) or use MOE_EP=cpu`,
        )
      log(`execution provider: CPU (CUDA unavailable: ${why})`, { ep: 'cpu' })
    }
  } else {
    log('execution provider: CPU (MOE_EP=cpu)', { ep: 'cpu' })
  }
  const session = await ort.InferenceSession.create(modelPath, { ...base, executionProviders: ['cpu'] })
  return { session, ep: 'cpu' }
}
