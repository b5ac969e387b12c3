import type { JobsOptions } from 'bullmq'
import { z } from 'zod'
import { ErrorCode } from './errors.ts'
import { JOB_STREAM_TTL_SECONDS } from './keys.ts'
import { ChatMessage, LogitBias, MAX_CHOICES, MAX_N, MAX_TOP_LOGPROBS } from './openai.ts'

import { FunctionDefinition } from './structured.ts'

/** What the worker should generate from: chat messages (templated by the model) or a raw prompt. */
export const JobInput = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('chat'), messages: z.array(ChatMessage).min(1) }),
  z.object({ kind: z.literal('text'), prompt: z.string() }),
  z.object({ kind: z.literal('tokens'), inputIds: z.array(z.number().int().min(0)).min(1) }),
  /** Several text prompts (strings or token ids), each generating its own choices. */
  z.object({
    kind: z.literal('prompts'),
    prompts: z
      .array(z.union([z.string(), z.array(z.number().int().min(0)).min(1)]))
      .min(1)
      .max(MAX_CHOICES),
  }),
])
export type JobInput = z.infer<typeof JobInput>

/** Sampling, already normalised from the OpenAI request (defaults applied at the edge). */
export const SamplingParams = z.object({
  maxTokens: z.number().int().positive(),
  temperature: z.number().min(0).max(2),
  topP: z.number().gt(0).max(1),
  topK: z.number().int().min(0),
  /**
   * The request's seed, or one the edge derived from the request id. When
   * absent the worker derives it from the job id: either way a retry repeats
   * itself, and the `done` event records the seed used.
   */
  seed: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER).optional(),
  stop: z.array(z.string().min(1)).max(4),
  /** Generate past EOS until maxTokens (vLLM's ignore_eos); meant for benchmarks. */
  ignoreEos: z.boolean().optional(),
  /** Choices per prompt; each after the first samples with its own seed (choiceSeed). */
  n: z.number().int().min(1).max(MAX_N).optional(),
  presencePenalty: z.number().min(-2).max(2).optional(),
  frequencyPenalty: z.number().min(-2).max(2).optional(),
  repetitionPenalty: z.number().gt(0).max(10).optional(),
  minP: z.number().min(0).max(1).optional(),
  logitBias: LogitBias.optional(),
  /** Report each sampled token's log-probability, with this many most likely alternatives. */
  logprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS).optional(),
})
export type SamplingParams = z.infer<typeof SamplingParams>

/** The BullMQ job payload on `pool.<name>`. The job id is the request id. */
export const JobPayload = z.object({
  version: z.literal(1),
  requestId: z.string().min(1).max(128),
  tenantId: z.string().min(1).max(128),
  pool: z.string().min(1).max(64),
  model: z.string().min(1).max(256),
  input: JobInput,
  sampling: SamplingParams,
  /** Epoch ms after which the job is not worth running. */
  deadline: z.number().int().positive(),
  /** Epoch ms when the edge accepted the request (queue-wait metrics). */
  createdAt: z.number().int().positive(),
  /** Live requests run first, then asynchronous jobs, then batch lines. */
  priority: z.enum(['live', 'async', 'batch']).default('live'),
  /**
   * Whether token events are written to the job's stream. Batch lines set false: nobody reads
   * their tokens (the result is the job's return value), and a stream entry per token of a
   * 50,000-line batch is Redis memory for nothing. The final event is written either way.
   */
  streamTokens: z.boolean().default(true),
  /**
   * What admission charged this job against tokens-per-minute (the minute window and the
   * estimate), when nobody at the edge waits to settle it (async jobs): the worker settles it
   * to the real usage when the job is done.
   */
  charge: z.object({ window: z.number().int().min(0), tokens: z.number().int().min(0) }).optional(),
  /**
   * Structured output: the completion must be a JSON document valid for `schema` (null: any JSON
   * object), enforced token by token. Absent: free text.
   */
  jsonOutput: z.object({ schema: z.record(z.string(), z.unknown()).nullable() }).optional(),
  /** Functions offered to the model: rendered by its chat template, or described in a system message. */
  tools: z.array(FunctionDefinition).optional(),
})
export type JobPayload = z.infer<typeof JobPayload>
export type JobPayloadInput = z.input<typeof JobPayload>

/**
 * BullMQ priorities: lower runs first. Asynchronous jobs have deadlines (an hour) and so run
 * ahead of batch lines (a 24 h window), which would otherwise hold them back.
 */
export const JOB_PRIORITY = { live: 1, async: 5, batch: 10 } as const

/**
 * BullMQ options for a generate job, live or batch. The job id is the request id (a retried
 * submission is not run twice); one retry covers a worker that died mid-job, and the job record
 * lives as long as its stream.
 */
export const generateJobOptions = (jobId: string, priority: JobPayload['priority']): JobsOptions => ({
  jobId,
  priority: JOB_PRIORITY[priority],
  attempts: 2,
  backoff: { type: 'fixed', delay: 500 },
  removeOnComplete: { age: JOB_STREAM_TTL_SECONDS },
  removeOnFail: { age: JOB_STREAM_TTL_SECONDS },
})

const MASK64 = (1n << 64n) - 1n

/**
 * The seed of a request that named none: FNV-1a 64 of the job id's UTF-8 bytes, top 53 bits.
 * The edge records it in the payload; a worker given a payload without one derives the same.
 */
export function seedFromJobId(jobId: string): number {
  let hash = 0xcbf29ce484222325n
  for (const byte of new TextEncoder().encode(jobId)) hash = ((hash ^ BigInt(byte)) * 0x100000001b3n) & MASK64
  return Number(hash >> 11n)
}

/**
 * The seed of choice `index` of a job seeded with `seed`: choice 0 uses the job's seed (so n = 1 is
 * unchanged), the others a SplitMix64 mix of both, top 53 bits. Deterministic: a retry repeats itself.
 */
export function choiceSeed(seed: number, index: number): number {
  if (index === 0) return seed
  let z = (BigInt(seed) + BigInt(index) * 0x9e3779b97f4a7c15n) & MASK64
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64
  return Number((z ^ (z >> 31n)) >> 11n)
}

/** How many choices a job generates: prompts times n. */
export const choiceCount = (p: Pick<JobPayload, 'input' | 'sampling'>): number =>
  (p.input.kind === 'prompts' ? p.input.prompts.length : 1) * (p.sampling.n ?? 1)

/** Why a job failed, as it travels through BullMQ's `failedReason` (JSON of this shape). */
export const JobFailure = z.object({ code: ErrorCode, message: z.string() })
export type JobFailure = z.infer<typeof JobFailure>

export const encodeJobFailure = (failure: JobFailure): string => JSON.stringify(JobFailure.parse(failure))

/**
 * The failure a worker recorded. BullMQ writes reasons of its own (a job stalled too often, a
 * lock lost): those are internal errors, with BullMQ's text as the message.
 */
export function decodeJobFailure(reason: string | null | undefined): JobFailure {
  if (!reason) return { code: 'internal_error', message: 'The job failed' }
  try {
    const parsed = JobFailure.safeParse(JSON.parse(reason))
    if (parsed.success) return parsed.data
  } catch {}
  return { code: 'internal_error', message: reason }
}
