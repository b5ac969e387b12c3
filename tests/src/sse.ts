// A plain SSE reader for the suites that must see the wire: every `data:` line, the final [DONE],
// error events, and when the first token arrived.

export interface SseResult {
  status: number
  headers: Headers
  /** Parsed JSON of every data line except [DONE]. */
  chunks: Record<string, unknown>[]
  /** Concatenated `delta.content` (chat) or `text` (completion) of the chunks. */
  text: string
  /** Chunks that carried text, in order. */
  pieces: string[]
  /** Whether the stream ended with `data: [DONE]`. */
  done: boolean
  /** An error event in the stream, if any. */
  error: unknown
  /** Milliseconds from the request to the first non-empty text piece (null: none). */
  ttftMs: number | null
  totalMs: number
  /** completion_tokens of the usage chunk, when include_usage was asked for. */
  completionTokens: number | null
  /** The error body when the answer was not a stream. */
  body: unknown
}

export function pieceOf(chunk: Record<string, unknown>): string | undefined {
  const choice = (chunk.choices as Array<Record<string, unknown>> | undefined)?.[0]
  if (!choice) return undefined
  if (typeof choice.text === 'string') return choice.text
  const delta = choice.delta as { content?: unknown } | undefined
  return typeof delta?.content === 'string' ? delta.content : undefined
}

export async function streamRequest(
  url: string,
  key: string,
  body: Record<string, unknown>,
  opts: { headers?: Record<string, string>; timeoutMs?: number; onChunk?: () => void } = {},
): Promise<SseResult> {
  const t0 = performance.now()
  const res = await fetch(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', ...opts.headers },
    body: JSON.stringify({ ...body, stream: true }),
    signal: AbortSignal.timeout(opts.timeoutMs ?? 120_000),
  })
  const out: SseResult = {
    status: res.status,
    headers: res.headers,
    chunks: [],
    text: '',
    pieces: [],
    done: false,
    error: null,
    ttftMs: null,
    totalMs: 0,
    completionTokens: null,
    body: null,
  }
  if (!res.headers.get('content-type')?.startsWith('text/event-stream')) {
    out.body = await res.json().catch(() => null)
    out.totalMs = performance.now() - t0
    return out
  }
  const decoder = new TextDecoder()
  let buf = ''
  const onLine = (line: string) => {
    if (!line.startsWith('data:')) return
    const data = line.slice(5).trim()
    if (out.done) throw new Error(`data after [DONE]: ${data}`)
    if (data === '[DONE]') {
      out.done = true
      return
    }
    const chunk = JSON.parse(data) as Record<string, unknown>
    if ('error' in chunk) {
      out.error = chunk.error
      return
    }
    out.chunks.push(chunk)
    const usage = chunk.usage as { completion_tokens?: number } | null | undefined
    if (usage?.completion_tokens !== undefined) out.completionTokens = usage.completion_tokens
    const piece = pieceOf(chunk)
    if (piece) {
      if (out.ttftMs === null) out.ttftMs = performance.now() - t0
      out.pieces.push(piece)
      out.text += piece
    }
    opts.onChunk?.()
  }
  for await (const bytes of res.body as AsyncIterable<Uint8Array>) {
    buf += decoder.decode(bytes, { stream: true })
    let nl = buf.indexOf('\n')
    while (nl >= 0) {
      onLine(buf.slice(0, nl).replace(/\r$/, ''))
      buf = buf.slice(nl + 1)
      nl = buf.indexOf('\n')
    }
  }
  if (buf) onLine(buf)
  out.totalMs = performance.now() - t0
  return out
}

/** Every error answer must be in the OpenAI shape: `{error: {message, type, param, code}}`. */
export function isOpenAiError(body: unknown): boolean {
  if (typeof body !== 'object' || body === null) return false
  const e = (body as { error?: unknown }).error as Record<string, unknown> | undefined
  if (typeof e !== 'object' || e === null) return false
  return (
    typeof e.message === 'string' &&
    typeof e.type === 'string' &&
    (e.param === null || typeof e.param === 'string') &&
    (e.code === null || typeof e.code === 'string')
  )
}
