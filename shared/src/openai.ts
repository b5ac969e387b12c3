import { z } from 'zod'
import { FunctionTool, ResponseFormat, ToolCall, ToolChoice } from './structured.ts'

// The OpenAI-compatible request bodies the service accepts. Parameters that
// OpenAI has but we do not implement are listed so a request using them gets a
// 400 naming them, never silence.

const TextPart = z.object({ type: z.literal('text'), text: z.string() })
const ImagePart = z.object({
  type: z.literal('image_url'),
  image_url: z.object({ url: z.string(), detail: z.enum(['auto', 'low', 'high']).optional() }),
})
const AudioPart = z.object({
  type: z.literal('input_audio'),
  input_audio: z.object({ data: z.string(), format: z.string() }),
})
export const ContentPart = z.discriminatedUnion('type', [TextPart, ImagePart, AudioPart])
export type ContentPart = z.infer<typeof ContentPart>

export const ChatMessage = z
  .object({
    role: z.enum(['system', 'developer', 'user', 'assistant', 'tool']),
    // OpenAI allows an assistant turn with null content (it carried tool calls); it reads as empty.
    content: z.union([z.string(), z.array(ContentPart).min(1)]).nullable(),
    name: z.string().max(256).optional(),
    /** The calls an assistant turn made (history of a tool-call round trip). */
    tool_calls: z.array(ToolCall).optional(),
    /** Which call a `tool` message answers. */
    tool_call_id: z.string().min(1).max(256).optional(),
  })
  .superRefine((m, ctx) => {
    if (m.role === 'tool' && m.tool_call_id === undefined)
      ctx.addIssue({
        code: 'custom',
        path: ['tool_call_id'],
        message: 'a tool message needs the tool_call_id of the call it answers',
      })
    if (m.tool_calls !== undefined && m.role !== 'assistant')
      ctx.addIssue({
        code: 'custom',
        path: ['tool_calls'],
        message: 'only assistant messages carry tool_calls',
      })
    if (m.content === null && m.role !== 'assistant')
      ctx.addIssue({
        code: 'custom',
        path: ['content'],
        message: `content may be null only in an assistant message, not a ${m.role} one`,
      })
  })
  .transform((m) => ({ ...m, content: m.content ?? '' }))
export type ChatMessage = z.infer<typeof ChatMessage>

export const Stop = z
  .union([z.string().min(1), z.array(z.string().min(1)).max(4)], {
    error: 'stop must be a non-empty string or an array of at most 4 non-empty strings',
  })
  .nullable()

/** Most choices one request may ask for (prompts times n, for a text completion). */
export const MAX_N = 8
export const MAX_CHOICES = 32
/** Most alternatives per token: chat's top_logprobs (OpenAI's limit), and text completions' logprobs. */
export const MAX_TOP_LOGPROBS = 20
export const MAX_COMPLETION_LOGPROBS = 5

/** Token id (as a JSON object key) to a bias added to its logit: -100 bans it, 100 all but forces it. */
export const LogitBias = z
  .record(
    z
      .string()
      .regex(/^(0|[1-9]\d{0,9})$/, { error: 'logit_bias keys must be token ids (non-negative integers)' }),
    z.number().min(-100, { error: 'logit_bias values must be from -100 to 100' }).max(100, {
      error: 'logit_bias values must be from -100 to 100',
    }),
  )
  .refine((b) => Object.keys(b).length <= 1024, { error: 'logit_bias may name at most 1024 tokens' })

/** Sampling parameters shared by chat and text completions. */
const SamplingFields = {
  model: z.string().min(1).max(256),
  max_tokens: z.number().int().positive().nullable().optional(),
  temperature: z.number().min(0).max(2).nullable().optional(),
  top_p: z.number().gt(0).max(1).nullable().optional(),
  /** Not in OpenAI's API, but in vLLM's and most open servers'. */
  top_k: z.number().int().min(0).nullable().optional(),
  seed: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER).nullable().optional(),
  stop: Stop.optional(),
  stream: z.boolean().nullable().optional(),
  stream_options: z.object({ include_usage: z.boolean().optional() }).nullable().optional(),
  user: z.string().max(256).optional(),
  metadata: z.record(z.string().max(64), z.string().max(512)).nullable().optional(),
  /** Choices to generate per prompt. */
  n: z
    .number()
    .int()
    .min(1)
    .max(MAX_N, { error: `n must be at most ${MAX_N}` })
    .nullable()
    .optional(),
  /** OpenAI semantics: subtracted once from the logit of every token already generated. */
  presence_penalty: z.number().min(-2).max(2).nullable().optional(),
  /** OpenAI semantics: subtracted from a token's logit once per time it was generated. */
  frequency_penalty: z.number().min(-2).max(2).nullable().optional(),
  /** vLLM/Hugging Face semantics, over prompt and generated tokens; 1 is off. Not in OpenAI's API. */
  repetition_penalty: z.number().gt(0).max(10).nullable().optional(),
  /** Drops tokens less likely than min_p times the most likely one (vLLM). Not in OpenAI's API. */
  min_p: z.number().min(0).max(1).nullable().optional(),
  logit_bias: LogitBias.nullable().optional(),
}

export const ChatCompletionRequest = z.strictObject({
  ...SamplingFields,
  messages: z.array(ChatMessage).min(1),
  max_completion_tokens: z.number().int().positive().nullable().optional(),
  logprobs: z.boolean().nullable().optional(),
  top_logprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS).nullable().optional(),
  response_format: ResponseFormat.nullable().optional(),
  tools: z.array(FunctionTool).max(128).nullable().optional(),
  tool_choice: ToolChoice.nullable().optional(),
  parallel_tool_calls: z.boolean().nullable().optional(),
})
export type ChatCompletionRequest = z.infer<typeof ChatCompletionRequest>

const TokenIds = z
  .array(z.number().int().min(0, { error: 'token ids are non-negative integers' }), {
    error: 'expected a string or an array of token ids',
  })
  .min(1, { error: 'a token-id prompt holds at least one token id' })

/**
 * A text completion's prompt: a string, token ids, or an array of either (one choice per prompt, as
 * LangChain's text-completion class sends it).
 */
export const CompletionPrompt = z.union(
  [z.string(), TokenIds, z.array(z.union([z.string(), TokenIds])).min(1)],
  {
    error:
      'prompt must be a string, an array of token ids, or an array of prompts (strings or non-empty token-id arrays)',
  },
)
export type CompletionPrompt = z.infer<typeof CompletionPrompt>

/** The prompts of a text completion, one per choice group: a single token-id array is one prompt. */
export function promptList(prompt: CompletionPrompt): Array<string | number[]> {
  if (typeof prompt === 'string') return [prompt]
  if (prompt.every((p) => typeof p === 'number')) return [prompt as number[]]
  return prompt as Array<string | number[]>
}

export const CompletionRequest = z.strictObject({
  ...SamplingFields,
  prompt: CompletionPrompt,
  /** Legacy logprobs: how many alternatives to list per token (0 lists only the sampled one). */
  logprobs: z.number().int().min(0).max(MAX_COMPLETION_LOGPROBS).nullable().optional(),
})
export type CompletionRequest = z.infer<typeof CompletionRequest>

/** OpenAI parameters we know but do not support; a request that sets one gets a 400 naming it. */
export const UNSUPPORTED_PARAMETERS = [
  'functions',
  'function_call',
  'audio',
  'modalities',
  'prediction',
  'best_of',
  'echo',
  'suffix',
  'web_search_options',
  'store',
  'service_tier',
] as const

export type FinishReason = 'stop' | 'length' | 'cancelled' | 'error'

export interface Usage {
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
}
