import { z } from 'zod'
import { ErrorCode } from './errors.ts'
import { ChatMessage } from './openai.ts'

// POST /tokenize and /detokenize (vLLM's routes). The edge has no tokenizer, and the workers are
// reachable only through Redis (they open no port the edge could call), so the request travels as
// a small job on the pool's own queue: the worker that serves the model answers with its tokenizer,
// the one generation uses, and pushes the answer to a list the edge waits on (BLPOP). The job has
// no BullMQ priority, so a worker takes it ahead of the prioritised generation jobs waiting.

/** BullMQ job name of a tokenizer request on `pool.<name>` (generation jobs are 'generate'). */
export const TOKENIZE_JOB = 'tokenize'

/** How long the answer waits for the edge to read it. */
export const TOKENIZE_RESULT_TTL_SECONDS = 60

/** The list the worker pushes one tokenizer answer to (tagged by the job id, as a job's stream). */
export const tokenizeResultKey = (jobId: string): string => `moe:job:{${jobId}}:tokenize`

export const TokenizeOp = z.discriminatedUnion('op', [
  z.object({ op: z.literal('tokenize'), prompt: z.string(), addSpecialTokens: z.boolean() }),
  z.object({
    op: z.literal('tokenize_chat'),
    messages: z.array(ChatMessage).min(1),
    addGenerationPrompt: z.boolean(),
  }),
  z.object({ op: z.literal('detokenize'), tokens: z.array(z.number().int().min(0)) }),
])
export type TokenizeOp = z.infer<typeof TokenizeOp>

export const TokenizeJobPayload = z.object({
  version: z.literal(1),
  requestId: z.string().min(1).max(128),
  pool: z.string().min(1).max(64),
  model: z.string().min(1).max(256),
  /** Epoch ms after which nobody waits for the answer. */
  deadline: z.number().int().positive(),
  request: TokenizeOp,
})
export type TokenizeJobPayload = z.infer<typeof TokenizeJobPayload>

export const TokenizeResult = z.discriminatedUnion('ok', [
  z.object({
    ok: z.literal(true),
    /** The served context length (vLLM's max_model_len). */
    maxModelLen: z.number().int().positive(),
    tokens: z.array(z.number().int().min(0)).optional(),
    prompt: z.string().optional(),
  }),
  z.object({ ok: z.literal(false), code: ErrorCode, message: z.string() }),
])
export type TokenizeResult = z.infer<typeof TokenizeResult>

/** BullMQ options of a tokenizer job: run once, its record gone as soon as it ends. */
export const tokenizeJobOptions = (jobId: string) => ({
  jobId,
  attempts: 1,
  removeOnComplete: true,
  removeOnFail: true,
})
