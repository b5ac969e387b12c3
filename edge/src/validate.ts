import {
  ChatCompletionRequest,
  CompletionRequest,
  MAX_CHOICES,
  MoeError,
  promptList,
  UNSUPPORTED_PARAMETERS,
  unsupportedSchemaPart,
} from '@moe/shared'
import type { z } from 'zod'

export type Endpoint = 'chat' | 'completion'

/** Parses a JSON body text; invalid JSON is a 400 in the OpenAI shape. */
export function parseJson(text: string): unknown {
  try {
    return JSON.parse(text)
  } catch (e) {
    throw new MoeError(
      'invalid_json',
      `We could not parse the JSON body of your request. (${(e as Error).message})`,
    )
  }
}

const UNSUPPORTED = new Set<string>(UNSUPPORTED_PARAMETERS)

/**
 * Values of unsupported parameters that ask for nothing: the defaults clients and UIs send on
 * every request. They are accepted as "not set" instead of refused.
 */
const NEUTRAL: Partial<
  Record<(typeof UNSUPPORTED_PARAMETERS)[number], (v: unknown, body: Record<string, unknown>) => boolean>
> = {
  echo: (v) => v === false,
  best_of: (v) => v === 1,
  store: (v) => v === false,
  service_tier: (v) => v === 'auto' || v === 'default',
  functions: (v) => Array.isArray(v) && v.length === 0,
}

/** A zod issue as an OpenAI-style message and param path. */
export function zodToMoeError(error: z.ZodError): MoeError {
  const issue = error.issues[0]
  if (!issue) return new MoeError('invalid_request', 'Invalid request')
  const path = issue.path.map(String).join('.')
  if (issue.code === 'unrecognized_keys') {
    const keys = (issue as { keys: string[] }).keys
    return new MoeError(
      'invalid_request',
      `Unrecognized request argument supplied: ${keys.join(', ')}`,
      keys[0] ?? null,
    )
  }
  const where = path === '' ? 'body' : `'${path}'`
  return new MoeError('invalid_request', `Invalid value for ${where}: ${issue.message}`, path || null)
}

/**
 * Validates a chat or text completion body. OpenAI parameters we do not implement are named in
 * a 400 (`unsupported_parameter`) rather than ignored.
 */
export function validateBody(endpoint: 'chat', body: unknown): ChatCompletionRequest
export function validateBody(endpoint: 'completion', body: unknown): CompletionRequest
export function validateBody(endpoint: Endpoint, body: unknown): ChatCompletionRequest | CompletionRequest
export function validateBody(endpoint: Endpoint, body: unknown): ChatCompletionRequest | CompletionRequest {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new MoeError('invalid_request', 'The request body must be a JSON object')
  }
  const obj = { ...(body as Record<string, unknown>) }
  const unsupported: string[] = []
  const sent = { ...obj }
  for (const k of Object.keys(obj)) {
    if (!UNSUPPORTED.has(k)) continue
    // Clients that send an unsupported parameter as null, or at its neutral default, mean "not set".
    const neutral = NEUTRAL[k as keyof typeof NEUTRAL]
    if (obj[k] === null || obj[k] === undefined || neutral?.(obj[k], sent)) delete obj[k]
    else unsupported.push(k)
  }
  if (unsupported.length > 0) {
    throw new MoeError(
      'unsupported_parameter',
      `Unsupported parameter${unsupported.length > 1 ? 's' : ''}: ${unsupported.join(', ')} ${unsupported.length > 1 ? 'are' : 'is'} not supported by this service`,
      unsupported[0]!,
    )
  }
  const schema = endpoint === 'chat' ? ChatCompletionRequest : CompletionRequest
  const parsed = schema.safeParse(obj)
  if (!parsed.success) throw zodToMoeError(parsed.error)
  const data = parsed.data
  if (endpoint === 'completion') {
    const choices = promptList((data as CompletionRequest).prompt).length * (data.n ?? 1)
    if (choices > MAX_CHOICES)
      throw new MoeError(
        'invalid_request',
        `This request asks for ${choices} choices (prompts times n); at most ${MAX_CHOICES} are allowed`,
        (data.n ?? 1) > 1 ? 'n' : 'prompt',
      )
  }
  if (endpoint === 'chat') {
    const chat = data as ChatCompletionRequest
    if ((chat.top_logprobs ?? 0) > 0 && chat.logprobs !== true)
      throw new MoeError(
        'invalid_request',
        'top_logprobs needs logprobs: set logprobs to true to get the most likely alternatives of each token',
        'top_logprobs',
      )
    if (
      chat.max_tokens != null &&
      chat.max_completion_tokens != null &&
      chat.max_tokens !== chat.max_completion_tokens
    ) {
      throw new MoeError(
        'invalid_request',
        'max_tokens and max_completion_tokens disagree; set only one',
        'max_completion_tokens',
      )
    }
    validateStructured(chat)
  }
  return data
}

/** The requested completion length, if any (chat: max_completion_tokens wins over max_tokens). */
export function requestedMaxTokens(req: ChatCompletionRequest | CompletionRequest): number | null {
  if ('max_completion_tokens' in req && req.max_completion_tokens != null) return req.max_completion_tokens
  return req.max_tokens ?? null
}

/**
 * Checks what constrained decoding will enforce: every schema uses only keywords it supports,
 * and tool_choice names an offered function.
 */
function validateStructured(req: ChatCompletionRequest): void {
  const format = req.response_format
  if (format?.type === 'json_schema' && format.json_schema.schema !== undefined) {
    const problem = unsupportedSchemaPart(format.json_schema.schema)
    if (problem)
      throw new MoeError(
        'invalid_request',
        `Invalid schema for response_format '${format.json_schema.name}': ${problem.message}`,
        'response_format.json_schema.schema',
      )
  }
  const tools = req.tools ?? []
  const names = new Set<string>()
  tools.forEach((tool, i) => {
    const f = tool.function
    if (names.has(f.name))
      throw new MoeError(
        'invalid_request',
        `Duplicate function name '${f.name}' in tools`,
        `tools.${i}.function.name`,
      )
    names.add(f.name)
    if (f.parameters === undefined) return
    const problem = unsupportedSchemaPart(f.parameters)
    if (problem)
      throw new MoeError(
        'invalid_request',
        `Invalid schema for function '${f.name}': ${problem.message}`,
        `tools.${i}.function.parameters`,
      )
  })
  const choice = req.tool_choice
  // Tool calls are read from one answer's document; several choices each calling tools is not built.
  if (tools.length > 0 && choice !== 'none' && (req.n ?? 1) > 1)
    throw new MoeError(
      'invalid_request',
      'n > 1 cannot be combined with tools; send n: 1, or tool_choice: "none" to answer in text',
      'n',
    )
  if (choice === 'required' && tools.length === 0)
    throw new MoeError(
      'invalid_request',
      "tool_choice 'required' needs at least one tool in tools",
      'tool_choice',
    )
  if (typeof choice === 'object' && choice !== null && !names.has(choice.function.name))
    throw new MoeError(
      'invalid_request',
      `tool_choice names function '${choice.function.name}', which is not in tools`,
      'tool_choice',
    )
}
