import {
  answerChoices,
  type DoneEvent,
  type ErrorEvent,
  MoeError,
  publicErrorMessage,
  type SampledLogprob,
  type StreamEvent,
} from '@moe/shared'
import { type SSEStreamingApi, streamSSE } from 'hono/streaming'
import { type Ctx, log } from '../http.ts'
import { closeReader, jobEvents } from '../job-events.ts'
import {
  type Answer,
  answerSummary,
  type ChunkPart,
  chunkObject,
  type MoeSummary,
  toolCallDeltas,
  usageChunk,
} from '../openai-format.ts'
import { readToolCalls, ToolCallStream, type ToolReading } from '../tool-calls.ts'
import type { Endpoint } from '../validate.ts'

// Relays a job's token stream to the client as OpenAI-style SSE chunks, waits for a non-streamed
// answer, or replays a cached answer as SSE.

/** What every chunk of one streamed answer carries. */
export interface SseFrame {
  endpoint: Endpoint
  /** The completion id (chatcmpl-... or cmpl-...). */
  id: string
  created: number
  model: string
  includeUsage: boolean
  /** The answer may be tool calls (chat with tools): how to read it. */
  tools?: ToolReading
}

/** A live job this request reads: its stream, what to do when it ends, how to cancel it. */
export interface LiveJob {
  jobId: string
  deadline: number
  reader: Parameters<typeof jobEvents>[0]
  summary: (done: DoneEvent) => MoeSummary
  /** The job finished: settle its token charge, cache its answer. */
  finished: (done: DoneEvent) => void
  cancel: (why: 'client disconnected' | 'deadline') => void
  /** The reader is closed: give back the request's live-stream slot. Called once. */
  released: () => void
}

/** A job's error event as the client sees it: an internal error's detail goes to the log only. */
export function jobError(jobId: string, ev: Pick<ErrorEvent, 'code' | 'message'>): MoeError {
  if (ev.code === 'internal_error')
    log('error', 'job failed', { job: jobId, code: ev.code, error: ev.message })
  return new MoeError(ev.code, publicErrorMessage(ev.code, ev.message, jobId))
}

/** Closes the job's reader and gives back its slot, once however many paths end it. */
function release(job: LiveJob): void {
  closeReader(job.reader)
  const released = job.released
  job.released = () => {}
  released()
}

const writeChunk = (sse: SSEStreamingApi, f: SseFrame, part: ChunkPart) =>
  sse.writeSSE({
    data: JSON.stringify(chunkObject(f.endpoint, f.id, f.created, f.model, part, f.includeUsage)),
  })

/** What one choice of a streamed answer has sent so far. */
interface ChoiceState {
  started: boolean
  sent: string
  /** Logprobs of tokens whose text has not been sent yet (a partial character, a held stop string). */
  pending: SampledLogprob[]
  logprobsSent: number
}

class ChoiceStates {
  readonly #states = new Map<number, ChoiceState>()
  get(index: number): ChoiceState {
    let st = this.#states.get(index)
    if (!st) {
      st = { started: false, sent: '', pending: [], logprobsSent: 0 }
      this.#states.set(index, st)
    }
    return st
  }
}

/** A choice's first chunk carries the assistant role, as OpenAI's do. */
async function startChoice(sse: SSEStreamingApi, f: SseFrame, index: number, st: ChoiceState) {
  if (st.started) return
  st.started = true
  await writeChunk(sse, f, { index, role: 'assistant', text: '' })
}

/** A text delta of one choice, with the logprobs of the tokens it completes. */
async function writeText(sse: SSEStreamingApi, f: SseFrame, index: number, st: ChoiceState, text: string) {
  const logprobs = st.pending.length > 0 ? st.pending : undefined
  await writeChunk(sse, f, { index, text, textOffset: st.sent.length, ...(logprobs ? { logprobs } : {}) })
  st.sent += text
  st.logprobsSent += st.pending.length
  st.pending = []
}

/**
 * Each choice's rest (text the stream did not carry: a stream trimmed by retention, a cached answer)
 * and closing chunk, the usage chunk when asked for, and [DONE].
 */
async function writeEnd(
  sse: SSEStreamingApi,
  f: SseFrame,
  answer: Answer,
  moe: MoeSummary,
  states = new ChoiceStates(),
) {
  for (const ch of answerChoices(answer)) {
    const st = states.get(ch.index)
    await startChoice(sse, f, ch.index, st)
    if (answer.toolCalls && ch.index === 0) {
      // The answer's document became tool calls: they are sent instead of its text.
      for (const delta of toolCallDeltas(answer.toolCalls))
        await writeChunk(sse, f, { index: 0, toolCalls: delta })
      await writeChunk(sse, f, { index: 0, finishReason: 'tool_calls' })
      continue
    }
    const rest =
      ch.text.length > st.sent.length && ch.text.startsWith(st.sent) ? ch.text.slice(st.sent.length) : ''
    if (ch.logprobs) st.pending = ch.logprobs.slice(st.logprobsSent)
    if (rest !== '' || st.pending.length > 0) await writeText(sse, f, ch.index, st, rest)
    await writeChunk(sse, f, { index: ch.index, finishReason: ch.finishReason })
  }
  if (f.includeUsage) {
    await sse.writeSSE({
      data: JSON.stringify(
        usageChunk(f.endpoint, f.id, f.created, f.model, answer.usage, answerSummary(answer, moe)),
      ),
    })
  }
  await sse.writeSSE({ data: '[DONE]' })
}

export function relaySse(c: Ctx, f: SseFrame, job: LiveJob): Response {
  const { reader } = job
  return streamSSE(c, async (sse) => {
    let finished = false
    let started = false
    sse.onAbort(() => {
      if (!finished) job.cancel('client disconnected')
      release(job)
    })
    // workerd reports a client that went away through request.signal (enable_request_signal);
    // one that left while the request was being admitted has already aborted it.
    if (c.req.raw.signal?.aborted) {
      sse.abort()
      return
    }
    c.req.raw.signal?.addEventListener('abort', () => sse.abort())
    // Flush the headers now: a comment line, which SSE clients ignore. Keep-alive comments while
    // the job waits also let a disconnect surface (a write to a closed client cancels the stream).
    await sse.write(': queued\n\n')
    const keepAlive = setInterval(() => {
      if (!started && !sse.aborted) void sse.write(': waiting\n\n')
    }, 1000)
    sse.onAbort(() => clearInterval(keepAlive))
    // What each choice has been sent: a stream trimmed to its final event (retention) holds no
    // tokens, and the `done` event's text supplies the rest.
    const choices = new ChoiceStates()
    // Text that may be a tool-call document is held back until it is known to be text.
    const toolStream = f.tools ? new ToolCallStream(f.tools) : null
    try {
      for await (const ev of jobEvents(reader, job.jobId, job.deadline)) {
        if (sse.aborted) break
        if (!started) {
          started = true
          await startChoice(sse, f, 0, choices.get(0))
        }
        if (ev.type === 'token') {
          const index = ev.choice ?? 0
          const st = choices.get(index)
          await startChoice(sse, f, index, st)
          if (ev.logprobs) st.pending.push(ev.logprobs)
          // The detokeniser may hold text back (a partial UTF-8 sequence): OpenAI sends no empty deltas.
          if (ev.text === '') continue
          const text = toolStream ? toolStream.push(ev.text) : ev.text
          if (text !== '') await writeText(sse, f, index, st, text)
        } else if (ev.type === 'done') {
          finished = true
          const end = toolStream?.finish(ev.text)
          const answer: Answer = end && 'toolCalls' in end ? { ...ev, toolCalls: end.toolCalls } : ev
          await writeEnd(sse, f, answer, job.summary(ev), choices)
          job.finished(ev)
        } else {
          finished = true
          await sse.writeSSE({ data: JSON.stringify(jobError(job.jobId, ev).toBody()) })
        }
      }
    } catch (e) {
      if (!sse.aborted) {
        finished = true
        const err = e instanceof MoeError ? e : new MoeError('internal_error', 'The job stream failed')
        if (err.code === 'deadline_exceeded') job.cancel('deadline')
        await sse.writeSSE({ data: JSON.stringify(err.toBody()) })
      }
    } finally {
      clearInterval(keepAlive)
      release(job)
    }
  })
}

/** Waits for the job's final event (non-streaming); a job that failed throws its error. */
export async function awaitAnswer(c: Ctx, job: LiveJob): Promise<DoneEvent> {
  const onAbort = () => {
    job.cancel('client disconnected')
    release(job)
  }
  // A client that left while the request was being admitted: nobody waits for this answer.
  if (c.req.raw.signal?.aborted) {
    onAbort()
    throw new MoeError('cancelled', 'The client disconnected before the answer was ready')
  }
  c.req.raw.signal?.addEventListener('abort', onAbort)
  let final: StreamEvent | null = null
  try {
    for await (const ev of jobEvents(job.reader, job.jobId, job.deadline)) if (ev.type !== 'token') final = ev
  } catch (e) {
    if (e instanceof MoeError && e.code === 'deadline_exceeded') job.cancel('deadline')
    throw e
  } finally {
    c.req.raw.signal?.removeEventListener('abort', onAbort)
    release(job)
  }
  if (!final) throw new MoeError('internal_error', 'The job ended without a result')
  if (final.type === 'error') throw jobError(job.jobId, final)
  if (final.type !== 'done') throw new MoeError('internal_error', 'Unexpected job event')
  job.finished(final)
  return final
}

/** A cached answer as the SSE stream a live one would have been. */
export function replaySse(c: Ctx, f: SseFrame, hit: Answer, moe: MoeSummary): Response {
  const toolCalls = f.tools ? readToolCalls(hit.text, f.tools) : null
  return streamSSE(c, async (sse) => writeEnd(sse, f, toolCalls ? { ...hit, toolCalls } : hit, moe))
}
