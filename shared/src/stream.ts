import { z } from 'zod'
import { ErrorCode } from './errors.ts'

// Events on `moe:job:{<id>}:events`. Every token carries its index, so a consumer
// that reconnects, or reads a job retried after a crash, keeps each index once.

/** One token's log-probability under the distribution it was sampled from. */
export const TokenLogprob = z.object({
  token: z.string(),
  /** The token's UTF-8 bytes (a byte-level token may hold part of a character). */
  bytes: z.array(z.number().int().min(0).max(255)),
  logprob: z.number(),
})
export type TokenLogprob = z.infer<typeof TokenLogprob>

/** The sampled token's log-probability and the most likely alternatives, best first. */
export const SampledLogprob = TokenLogprob.extend({ top: z.array(TokenLogprob) })
export type SampledLogprob = z.infer<typeof SampledLogprob>

export const TokenEvent = z.object({
  type: z.literal('token'),
  /** The token's position in its choice. */
  index: z.number().int().min(0),
  text: z.string(),
  tokenId: z.number().int().min(0),
  /** Which choice the token belongs to (n > 1, or several prompts); absent means 0. */
  choice: z.number().int().min(0).optional(),
  /** Present when the request asked for logprobs. */
  logprobs: SampledLogprob.optional(),
})
export type TokenEvent = z.infer<typeof TokenEvent>

export const UsageStats = z.object({
  promptTokens: z.number().int().min(0),
  completionTokens: z.number().int().min(0),
})
export type UsageStats = z.infer<typeof UsageStats>

export const Timings = z.object({
  queueWaitMs: z.number().min(0),
  timeToFirstTokenMs: z.number().min(0),
  totalMs: z.number().min(0),
  tokensPerSecond: z.number().min(0),
})
export type Timings = z.infer<typeof Timings>

/** Tokens routed to each expert, per MoE layer: expertLoad[layer][expert]. */
export const RoutingStats = z.object({
  expertLoad: z.array(z.array(z.number().int().min(0))),
  allowedExperts: z.array(z.number().int().min(0)).nullable(),
})
export type RoutingStats = z.infer<typeof RoutingStats>

export const FinishReasonValue = z.enum(['stop', 'length', 'cancelled'])

/** One choice's result. */
export const ChoiceResult = z.object({
  index: z.number().int().min(0),
  text: z.string(),
  finishReason: FinishReasonValue,
  completionTokens: z.number().int().min(0),
  /** One entry per generated token (EOS excluded), when the request asked for logprobs. */
  logprobs: z.array(SampledLogprob).optional(),
})
export type ChoiceResult = z.infer<typeof ChoiceResult>

export const DoneEvent = z.object({
  type: z.literal('done'),
  /** Choice 0's finish reason and text (the only choice of most jobs); `choices` has them all. */
  finishReason: FinishReasonValue,
  text: z.string(),
  usage: UsageStats,
  timings: Timings,
  routing: RoutingStats,
  seed: z.number().int().min(0),
  /** Every choice, in index order, when there are several or logprobs were asked for. Usage totals them. */
  choices: z.array(ChoiceResult).optional(),
})
export type DoneEvent = z.infer<typeof DoneEvent>

export const ErrorEvent = z.object({
  type: z.literal('error'),
  code: ErrorCode,
  message: z.string(),
})
export type ErrorEvent = z.infer<typeof ErrorEvent>

export const StreamEvent = z.discriminatedUnion('type', [TokenEvent, DoneEvent, ErrorEvent])
export type StreamEvent = z.infer<typeof StreamEvent>

/** Redis stream entries carry one field, `e`, holding the event as JSON. */
export const STREAM_FIELD = 'e'

export const encodeStreamEvent = (event: StreamEvent): string => JSON.stringify(event)

export const decodeStreamEvent = (raw: string): StreamEvent => StreamEvent.parse(JSON.parse(raw))

/** The field/value list of one XADD entry holding `event`. */
export const streamEntryFields = (event: StreamEvent): [string, string] => [
  STREAM_FIELD,
  encodeStreamEvent(event),
]

/**
 * The event of one XRANGE/XREAD entry's field list, validated; null for an entry without the
 * event field. A malformed event throws: a stream is written only by workers, so it is a bug.
 */
export function streamEntryEvent(fields: readonly string[]): StreamEvent | null {
  for (let i = 0; i + 1 < fields.length; i += 2)
    if (fields[i] === STREAM_FIELD) return decodeStreamEvent(fields[i + 1]!)
  return null
}
