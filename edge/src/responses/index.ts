import { MoeError } from '@moe/shared'
import { Hono } from 'hono'
import { handleCompletion } from '../completions/index.ts'
import { type AppEnv, type Ctx, EdgeError, jsonBody, limitBody, requireJson } from '../http.ts'
import { tenantAuth } from '../middleware/tenant-auth/index.ts'
import { chatRequestOf, parseResponsesRequest, type ResponsesRequest, responsesParam } from './request.ts'

// POST /v1/responses: OpenAI's Responses API, text in and text out. A request runs as the chat
// completion it translates to (routing, admission, cache, relay are the chat path's), and the
// chat answer or chunk stream is reshaped into a `response` object or Responses events.

export const responses = new Hono<AppEnv>()

responses.use('/responses', tenantAuth({ keys: (c) => c.env.AUTH }))
responses.on(['POST', 'PUT', 'PATCH'], '/responses', requireJson, limitBody)

interface ChatUsage {
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
}

/** What every event of one response repeats. */
export interface ResponseFrame {
  id: string
  itemId: string
  createdAt: number
  model: string
  req: ResponsesRequest
}

const usageOf = (u: ChatUsage | undefined) =>
  u && {
    input_tokens: u.prompt_tokens,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens: u.completion_tokens,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: u.total_tokens,
  }

type Status = 'in_progress' | 'completed' | 'incomplete' | 'failed'

const outputText = (text: string) => ({ type: 'output_text', text, annotations: [], logprobs: [] })

const messageItem = (f: ResponseFrame, status: Exclude<Status, 'failed'>, text: string | null) => ({
  id: f.itemId,
  type: 'message',
  status,
  role: 'assistant',
  content: text === null ? [] : [outputText(text)],
})

/** The `response` object; `text` null while nothing has been output yet. */
function responseObject(
  f: ResponseFrame,
  status: Status,
  text: string | null,
  extra: { usage?: ChatUsage; moe?: unknown; error?: { code: string; message: string } } = {},
): Record<string, unknown> {
  const format = f.req.text?.format ?? { type: 'text' }
  return {
    id: f.id,
    object: 'response',
    created_at: f.createdAt,
    status,
    background: false,
    error: extra.error ?? null,
    incomplete_details: status === 'incomplete' ? { reason: 'max_output_tokens' } : null,
    instructions: f.req.instructions ?? null,
    max_output_tokens: f.req.max_output_tokens ?? null,
    metadata: f.req.metadata ?? {},
    model: f.model,
    output: text === null ? [] : [messageItem(f, status === 'incomplete' ? 'incomplete' : 'completed', text)],
    parallel_tool_calls: f.req.parallel_tool_calls ?? true,
    previous_response_id: null,
    reasoning: { effort: null, summary: null },
    service_tier: 'default',
    store: false,
    temperature: f.req.temperature ?? 1,
    text: { format },
    tool_choice: 'auto',
    tools: [],
    top_p: f.req.top_p ?? 1,
    truncation: 'disabled',
    usage: usageOf(extra.usage) ?? null,
    user: f.req.user ?? null,
    ...(extra.moe ? { moe: extra.moe } : {}),
  }
}

interface ChatCompletion {
  model: string
  choices: Array<{ message: { content: string | null }; finish_reason: string }>
  usage: ChatUsage
  moe?: unknown
}

/** The chat answer as a `response` object. */
function fromChatCompletion(f: ResponseFrame, chat: ChatCompletion): Record<string, unknown> {
  const choice = chat.choices[0]
  const status = choice?.finish_reason === 'length' ? 'incomplete' : 'completed'
  return responseObject(f, status, choice?.message.content ?? '', { usage: chat.usage, moe: chat.moe })
}

/** One Responses SSE event: `event:` names it, as OpenAI's stream does. */
const sseEvent = (data: Record<string, unknown>) => `event: ${data.type}\ndata: ${JSON.stringify(data)}\n\n`

/**
 * Reshapes the chat chunk stream (with include_usage) into the Responses event sequence: created,
 * in_progress, the message item and its text part opened, text deltas, then each closed and
 * completed (or incomplete when max_output_tokens cut it, or failed on an error).
 */
export function responsesEvents(f: ResponseFrame): TransformStream<Uint8Array, Uint8Array> {
  const decoder = new TextDecoder()
  const encoder = new TextEncoder()
  let buffer = ''
  let seq = 0
  let text = ''
  let finish: string | null = null
  let usage: ChatUsage | undefined
  let moe: unknown
  let ended = false
  const itemRef = { item_id: f.itemId, output_index: 0, content_index: 0 }
  const emit = (ctl: TransformStreamDefaultController<Uint8Array>, ev: Record<string, unknown>) =>
    ctl.enqueue(encoder.encode(sseEvent({ ...ev, sequence_number: seq++ })))

  let started = false
  // The response opens with the first chunk: it names the model the pool serves.
  const start = (ctl: TransformStreamDefaultController<Uint8Array>, model?: string) => {
    if (started) return
    started = true
    if (model) f.model = model
    const response = responseObject(f, 'in_progress', null)
    emit(ctl, { type: 'response.created', response })
    emit(ctl, { type: 'response.in_progress', response })
    emit(ctl, {
      type: 'response.output_item.added',
      output_index: 0,
      item: messageItem(f, 'in_progress', null),
    })
    emit(ctl, { type: 'response.content_part.added', ...itemRef, part: outputText('') })
  }

  const end = (ctl: TransformStreamDefaultController<Uint8Array>) => {
    if (ended) return
    ended = true
    const status = finish === 'length' ? 'incomplete' : 'completed'
    const part = outputText(text)
    emit(ctl, { type: 'response.output_text.done', ...itemRef, text, logprobs: [] })
    emit(ctl, { type: 'response.content_part.done', ...itemRef, part })
    emit(ctl, {
      type: 'response.output_item.done',
      output_index: 0,
      item: messageItem(f, status, text),
    })
    emit(ctl, {
      type: status === 'incomplete' ? 'response.incomplete' : 'response.completed',
      response: responseObject(f, status, text, { ...(usage ? { usage } : {}), moe }),
    })
  }

  const fail = (ctl: TransformStreamDefaultController<Uint8Array>, error: Record<string, unknown>) => {
    if (ended) return
    ended = true
    const message = String(error.message ?? 'The response failed')
    emit(ctl, {
      type: 'error',
      code: typeof error.code === 'string' ? error.code : null,
      message,
      param: typeof error.param === 'string' ? error.param : null,
    })
    emit(ctl, {
      type: 'response.failed',
      response: responseObject(f, 'failed', text, { error: { code: 'server_error', message } }),
    })
  }

  const onFrame = (ctl: TransformStreamDefaultController<Uint8Array>, frame: string) => {
    if (frame.startsWith(':')) {
      // Keep-alive comments: they let a client that went away be noticed while the job waits.
      ctl.enqueue(encoder.encode(`${frame}\n\n`))
      return
    }
    const data = frame
      .split('\n')
      .filter((l) => l.startsWith('data:'))
      .map((l) => l.slice(5).trimStart())
      .join('\n')
    if (data === '') return
    if (data === '[DONE]') {
      start(ctl)
      return end(ctl)
    }
    const chunk = JSON.parse(data) as {
      model?: string
      error?: Record<string, unknown>
      choices?: Array<{ delta?: { content?: string }; finish_reason?: string | null }>
      usage?: ChatUsage | null
      moe?: unknown
    }
    start(ctl, chunk.model)
    if (chunk.error) return fail(ctl, chunk.error)
    if (chunk.usage) usage = chunk.usage
    if (chunk.moe) moe = chunk.moe
    for (const choice of chunk.choices ?? []) {
      const delta = choice.delta?.content
      if (delta) {
        text += delta
        emit(ctl, { type: 'response.output_text.delta', ...itemRef, delta, logprobs: [] })
      }
      if (choice.finish_reason) finish = choice.finish_reason
    }
  }

  return new TransformStream({
    transform(bytes, ctl) {
      buffer += decoder.decode(bytes, { stream: true })
      for (let cut = buffer.indexOf('\n\n'); cut >= 0; cut = buffer.indexOf('\n\n')) {
        const frame = buffer.slice(0, cut)
        buffer = buffer.slice(cut + 2)
        onFrame(ctl, frame)
      }
    },
    flush(ctl) {
      if (buffer.trim() !== '') onFrame(ctl, buffer)
      start(ctl)
      // A chat stream always ends with [DONE] or an error; one that did not was cut short.
      if (!ended) fail(ctl, { code: 'internal_error', message: 'The response stream ended early' })
    },
  })
}

/** Runs the chat request; errors the chat path raises name the Responses request's parameters. */
async function runAsChat(c: Ctx, chat: Record<string, unknown>): Promise<Response> {
  try {
    return await handleCompletion(c, 'chat', chat, false)
  } catch (e) {
    if (!(e instanceof MoeError) || responsesParam(e.param) === e.param) throw e
    const param = responsesParam(e.param)
    const message = e.message
      .replace(/'(messages|response_format)[^']*'/, `'${param}'`)
      .replace(/\bmax_(completion_)?tokens\b/, 'max_output_tokens')
    throw new EdgeError(e.code, message, param, e instanceof EdgeError ? e.headers : {})
  }
}

responses.post('/responses', async (c) => {
  const req = parseResponsesRequest(await jsonBody(c))
  const res = await runAsChat(c, chatRequestOf(req))
  if (!res.ok) return res
  const requestId = c.get('requestId')
  const frame: ResponseFrame = {
    id: `resp_${requestId}`,
    itemId: `msg_${requestId}`,
    createdAt: Math.floor(Date.now() / 1000),
    model: req.model,
    req,
  }
  if (req.stream) {
    if (!res.body) throw new MoeError('internal_error', 'The chat stream had no body')
    return new Response(res.body.pipeThrough(responsesEvents(frame)), {
      status: res.status,
      headers: res.headers,
    })
  }
  const chat = (await res.json()) as ChatCompletion
  frame.model = chat.model
  return c.json(fromChatCompletion(frame, chat))
})
