import type { ChoiceResult, DoneEvent, ErrorCode, ExpertPool } from '@moe/shared'
import type { GenerationResult } from '../engine/engine.ts'

/** What a completed job returns to BullMQ (the stream's `done` event carries the rest). */
export interface JobResult {
  finishReason: DoneEvent['finishReason']
  text: string
  usage: { promptTokens: number; completionTokens: number }
  /** Every choice, when the job had several or logprobs were asked for (batch output lines). */
  choices?: ChoiceResult[]
}

/** A job failure with a stable code; permanent ones are never retried. */
export class JobError extends Error {
  readonly code: ErrorCode
  readonly permanent: boolean
  constructor(code: ErrorCode, message: string, permanent = true) {
    super(message)
    this.code = code
    this.permanent = permanent
  }
}

/** Where a job stands when its `done` event is written. */
export interface JobContext {
  pool: ExpertPool
  /** Epoch ms the edge accepted the request, and the worker took it. */
  createdAt: number
  takenAt: number
  seed: number
}

/**
 * The one place a `done` event is built: from a generation's result, or, for a job cancelled
 * before it started (`result` null), with no output and the prompt's length as usage.
 */
export function doneEvent(
  ctx: JobContext,
  result: GenerationResult | null,
  promptTokens = 0,
  choices?: ChoiceResult[],
): DoneEvent {
  return {
    type: 'done',
    finishReason: result?.finishReason ?? 'cancelled',
    text: result?.text ?? '',
    usage: result?.usage ?? { promptTokens, completionTokens: 0 },
    timings: {
      queueWaitMs: Math.max(0, ctx.takenAt - ctx.createdAt),
      timeToFirstTokenMs: result?.timings.timeToFirstTokenMs ?? 0,
      totalMs: result?.timings.totalMs ?? 0,
      tokensPerSecond: result?.timings.tokensPerSecond ?? 0,
    },
    routing: { expertLoad: result?.expertLoad ?? [], allowedExperts: ctx.pool.experts },
    seed: ctx.seed,
    ...(choices ? { choices } : {}),
  }
}

/** BullMQ's return value for a job whose stream ended with `done`. */
export const jobResultOf = (done: DoneEvent): JobResult => ({
  finishReason: done.finishReason,
  text: done.text,
  usage: done.usage,
  ...(done.choices ? { choices: done.choices } : {}),
})
