import { MoeError } from '@moe/shared'
import { z } from 'zod'
import { zodToMoeError } from '../validate.ts'

// A Responses API request (POST /v1/responses), text in and text out, and the chat completion
// request it runs as. What the Responses API has beyond that (stored conversations, built-in
// tools, background runs) is refused by name rather than ignored.

const TextContent = z.object({
  type: z.enum(['input_text', 'output_text']),
  text: z.string(),
  // An assistant turn copied from an earlier response carries these; they add nothing to the prompt.
  annotations: z.array(z.unknown()).optional(),
  logprobs: z.array(z.unknown()).optional(),
})

const MessageItem = z.strictObject({
  type: z.literal('message').optional(),
  role: z.enum(['user', 'system', 'developer', 'assistant']),
  content: z.union([z.string(), z.array(TextContent)]),
  // Output messages of an earlier response, sent back as history.
  id: z.string().optional(),
  status: z.enum(['in_progress', 'completed', 'incomplete']).optional(),
})

const TextFormat = z.discriminatedUnion('type', [
  z.object({ type: z.literal('text') }),
  z.object({ type: z.literal('json_object') }),
  z.object({
    type: z.literal('json_schema'),
    name: z.string(),
    schema: z.record(z.string(), z.unknown()),
    description: z.string().optional(),
    strict: z.boolean().nullable().optional(),
  }),
])

export const ResponsesRequest = z.strictObject({
  model: z.string().min(1).max(256),
  input: z.union([z.string(), z.array(z.unknown()).min(1)]),
  instructions: z.string().nullable().optional(),
  max_output_tokens: z.number().int().positive().nullable().optional(),
  temperature: z.number().min(0).max(2).nullable().optional(),
  top_p: z.number().gt(0).max(1).nullable().optional(),
  stream: z.boolean().nullable().optional(),
  stream_options: z.object({ include_obfuscation: z.boolean().optional() }).nullable().optional(),
  text: z
    .object({ format: TextFormat.optional(), verbosity: z.enum(['medium']).nullable().optional() })
    .nullable()
    .optional(),
  metadata: z.record(z.string().max(64), z.string().max(512)).nullable().optional(),
  user: z.string().max(256).nullable().optional(),
  // Accepted at the values that ask for nothing; anything else is refused below.
  store: z.unknown().optional(),
  previous_response_id: z.unknown().optional(),
  conversation: z.unknown().optional(),
  background: z.unknown().optional(),
  tools: z.unknown().optional(),
  tool_choice: z.unknown().optional(),
  parallel_tool_calls: z.boolean().nullable().optional(),
  max_tool_calls: z.unknown().optional(),
  include: z.unknown().optional(),
  reasoning: z.unknown().optional(),
  truncation: z.unknown().optional(),
  top_logprobs: z.unknown().optional(),
  prompt: z.unknown().optional(),
  service_tier: z.unknown().optional(),
  prompt_cache_key: z.string().nullable().optional(),
  safety_identifier: z.string().nullable().optional(),
})
export type ResponsesRequest = z.infer<typeof ResponsesRequest>

const isEmpty = (v: unknown) => v === undefined || v === null || (Array.isArray(v) && v.length === 0)

/** Parameters this service does not implement, with the values that ask for nothing, and why not. */
const REFUSED: Array<[keyof ResponsesRequest, (v: unknown) => boolean, string]> = [
  ['store', (v) => isEmpty(v) || v === false, 'responses are not stored; send store: false'],
  ['previous_response_id', isEmpty, 'responses are not stored; send the earlier turns in input'],
  ['conversation', isEmpty, 'conversations are not stored; send the earlier turns in input'],
  ['background', (v) => isEmpty(v) || v === false, 'use Prefer: respond-async on /v1/chat/completions'],
  ['tools', isEmpty, 'tools are served on /v1/chat/completions only'],
  ['tool_choice', (v) => isEmpty(v) || v === 'auto' || v === 'none', 'no tools are offered here'],
  ['max_tool_calls', isEmpty, 'no tools are offered here'],
  ['include', isEmpty, 'no extra output is available'],
  [
    'reasoning',
    (v) => isEmpty(v) || (typeof v === 'object' && Object.values(v as object).every((x) => x == null)),
    'the models served do not reason separately',
  ],
  ['truncation', (v) => isEmpty(v) || v === 'disabled', 'input is never truncated'],
  ['top_logprobs', (v) => isEmpty(v) || v === 0, 'logprobs are served on /v1/chat/completions'],
  ['prompt', isEmpty, 'stored prompts are not supported'],
  ['service_tier', (v) => isEmpty(v) || v === 'auto' || v === 'default', 'there is one service tier'],
]

/** The request, validated; an unsupported parameter or input item is a 400 naming it. */
export function parseResponsesRequest(body: unknown): ResponsesRequest {
  if (typeof body !== 'object' || body === null || Array.isArray(body))
    throw new MoeError('invalid_request', 'The request body must be a JSON object')
  const parsed = ResponsesRequest.safeParse(body)
  if (!parsed.success) throw zodToMoeError(parsed.error)
  const req = parsed.data
  for (const [name, neutral, why] of REFUSED) {
    if (!neutral(req[name]))
      throw new MoeError(
        'unsupported_parameter',
        `Unsupported parameter: ${name} is not supported by this service (${why})`,
        name,
      )
  }
  return req
}

type ChatTurn = { role: 'user' | 'system' | 'developer' | 'assistant'; content: string }

/** The input's items as chat messages; only text messages can be read. */
function inputMessages(input: ResponsesRequest['input']): ChatTurn[] {
  if (typeof input === 'string') return [{ role: 'user', content: input }]
  return input.map((item, i) => {
    const type = (item as { type?: unknown } | null)?.type
    if (type !== undefined && type !== 'message')
      throw new MoeError(
        'invalid_request',
        `Invalid value for 'input.${i}.type': input items of type ${JSON.stringify(type)} are not supported; send messages with input_text content`,
        `input.${i}.type`,
      )
    const parsed = MessageItem.safeParse(item)
    if (!parsed.success) {
      const e = zodToMoeError(parsed.error)
      const param = e.param ? `input.${i}.${e.param}` : `input.${i}`
      throw new MoeError(
        'invalid_request',
        `Invalid value for '${param}': ${e.message.replace(/^Invalid value for [^:]+: /, '')}; input messages hold input_text or output_text parts`,
        param,
      )
    }
    const m = parsed.data
    const content = typeof m.content === 'string' ? m.content : m.content.map((p) => p.text).join('')
    return { role: m.role, content }
  })
}

/** The chat completion request a Responses request runs as. */
export function chatRequestOf(req: ResponsesRequest): Record<string, unknown> {
  const messages: ChatTurn[] = []
  if (req.instructions) messages.push({ role: 'system', content: req.instructions })
  messages.push(...inputMessages(req.input))
  const format = req.text?.format
  return {
    model: req.model,
    messages,
    ...(req.max_output_tokens != null ? { max_completion_tokens: req.max_output_tokens } : {}),
    ...(req.temperature != null ? { temperature: req.temperature } : {}),
    ...(req.top_p != null ? { top_p: req.top_p } : {}),
    ...(req.stream ? { stream: true, stream_options: { include_usage: true } } : {}),
    ...(req.metadata ? { metadata: req.metadata } : {}),
    ...(req.user ? { user: req.user } : {}),
    ...(format?.type === 'json_schema'
      ? {
          response_format: {
            type: 'json_schema',
            json_schema: {
              name: format.name,
              schema: format.schema,
              ...(format.description !== undefined ? { description: format.description } : {}),
              ...(format.strict != null ? { strict: format.strict } : {}),
            },
          },
        }
      : format?.type === 'json_object'
        ? { response_format: { type: 'json_object' } }
        : {}),
  }
}

/** A chat request's parameter as the Responses request named it, for errors the chat path raises. */
export function responsesParam(param: string | null): string | null {
  if (param === null) return null
  if (param === 'max_completion_tokens' || param === 'max_tokens') return 'max_output_tokens'
  if (param.startsWith('response_format')) return 'text.format'
  if (param.startsWith('messages')) return 'input'
  return param
}
