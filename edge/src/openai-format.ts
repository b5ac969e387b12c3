import {
  answerChoices,
  type ChoiceResult,
  chatLogprobs,
  completionLogprobs,
  type DoneEvent,
  type FinishReason,
  type RoutingStats,
  type SampledLogprob,
  type Timings,
  type ToolCall,
  type Usage,
} from '@moe/shared'

// Builds the OpenAI response objects (chat.completion, chat.completion.chunk, text_completion)
// from a job's result. `moe` is an extra object OpenAI clients ignore.

export interface MoeSummary {
  request_id: string
  pool: string
  task: string
  modality: string
  cache: 'HIT' | 'MISS' | 'BYPASS'
  seed?: number
  /** Tokens routed to each expert, summed over layers. */
  expert_load?: number[]
  allowed_experts?: number[] | null
  timings?: Timings
  /** The job was cancelled before it finished (finish_reason then says "stop"). */
  cancelled?: true
}

export interface Answer {
  text: string
  finishReason: FinishReason
  usage: { promptTokens: number; completionTokens: number }
  /** Every choice (n > 1, several prompts, logprobs); else the one above. */
  choices?: ChoiceResult[] | undefined
  /** The answer is these tool calls (its text was their document): finish_reason "tool_calls". */
  toolCalls?: ToolCall[]
}

/**
 * The finish reason OpenAI's clients know. A job cancelled before it finished (a cancel, a
 * deadline) stopped: strictly typed clients reject other values, so the cancellation travels in
 * the `moe` object (`cancelled: true`).
 */
export const openAiFinishReason = (r: FinishReason): 'stop' | 'length' => (r === 'length' ? 'length' : 'stop')

/** The moe summary of an answer, marked when the job was cancelled. */
export const answerSummary = (answer: Pick<Answer, 'finishReason'>, moe: MoeSummary): MoeSummary =>
  answer.finishReason === 'cancelled' ? { ...moe, cancelled: true } : moe

export const usageOf = (u: Answer['usage']): Usage => ({
  prompt_tokens: u.promptTokens,
  completion_tokens: u.completionTokens,
  total_tokens: u.promptTokens + u.completionTokens,
})

/** Per-expert totals over all MoE layers. */
export function expertLoadSummary(routing: RoutingStats): number[] {
  const totals: number[] = []
  for (const layer of routing.expertLoad) {
    for (let e = 0; e < layer.length; e++) totals[e] = (totals[e] ?? 0) + layer[e]!
  }
  return totals
}

/** What a finished job adds to its summary: seed, expert load and timings. */
export const doneSummary = (
  done: DoneEvent,
): Pick<MoeSummary, 'seed' | 'expert_load' | 'allowed_experts' | 'timings'> => ({
  seed: done.seed,
  expert_load: expertLoadSummary(done.routing),
  allowed_experts: done.routing.allowedExperts,
  timings: done.timings,
})

/** The summary of a routed request, with the job's result once it is done. */
export const moeSummary = (
  requestId: string,
  r: { pool: { name: string }; task: { task: string }; modality: string },
  cache: MoeSummary['cache'],
  done?: DoneEvent,
): MoeSummary => ({
  request_id: requestId,
  pool: r.pool.name,
  task: r.task.task,
  modality: r.modality,
  cache,
  ...(done ? doneSummary(done) : {}),
})

export const completionId = (kind: 'chat' | 'completion', requestId: string): string =>
  `${kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${requestId}`

export function completionObject(
  kind: 'chat' | 'completion',
  id: string,
  created: number,
  model: string,
  answer: Answer,
  moe: MoeSummary,
): Record<string, unknown> {
  const base = { id, created, model, system_fingerprint: null }
  const usage = usageOf(answer.usage)
  if (kind === 'chat') {
    return {
      ...base,
      object: 'chat.completion',
      choices: answerChoices(answer).map((ch) => ({
        index: ch.index,
        // A single answer whose document was read as tool calls carries them instead of text.
        message:
          answer.toolCalls && ch.index === 0
            ? { role: 'assistant', content: null, refusal: null, tool_calls: answer.toolCalls }
            : { role: 'assistant', content: ch.text, refusal: null },
        finish_reason:
          answer.toolCalls && ch.index === 0 ? 'tool_calls' : openAiFinishReason(ch.finishReason),
        logprobs: chatLogprobs(ch.logprobs),
      })),
      usage,
      moe: answerSummary(answer, moe),
    }
  }
  return {
    ...base,
    object: 'text_completion',
    choices: answerChoices(answer).map((ch) => ({
      index: ch.index,
      text: ch.text,
      finish_reason: openAiFinishReason(ch.finishReason),
      logprobs: completionLogprobs(ch.logprobs),
    })),
    usage,
    moe: answerSummary(answer, moe),
  }
}

/** A streamed piece of a tool call: the first names it, the next carry its arguments. */
export interface ToolCallDelta {
  index: number
  id?: string
  type?: 'function'
  function: { name?: string; arguments: string }
}

export interface ChunkPart {
  /** The choice this chunk belongs to (0 when absent). */
  index?: number
  role?: 'assistant'
  text?: string
  finishReason?: FinishReason | 'tool_calls' | null
  /** The tokens this chunk's text came from, when logprobs were asked for. */
  logprobs?: SampledLogprob[]
  /** Where this chunk's text starts in its choice (text completions' text_offset). */
  textOffset?: number
  toolCalls?: ToolCallDelta[]
}

/** One streamed chunk; `delta` null with a finish reason closes the choice. */
export function chunkObject(
  kind: 'chat' | 'completion',
  id: string,
  created: number,
  model: string,
  part: ChunkPart,
  includeUsage: boolean,
): Record<string, unknown> {
  const finish =
    part.finishReason === 'tool_calls'
      ? 'tool_calls'
      : part.finishReason
        ? openAiFinishReason(part.finishReason)
        : null
  const base = { id, created, model, system_fingerprint: null }
  const usage = includeUsage ? { usage: null } : {}
  if (kind === 'chat') {
    const delta: Record<string, unknown> = {}
    if (part.role) delta.role = part.role
    if (part.text !== undefined) delta.content = part.text
    if (part.toolCalls) delta.tool_calls = part.toolCalls
    return {
      ...base,
      object: 'chat.completion.chunk',
      choices: [
        { index: part.index ?? 0, delta, finish_reason: finish, logprobs: chatLogprobs(part.logprobs) },
      ],
      ...usage,
    }
  }
  return {
    ...base,
    object: 'text_completion',
    choices: [
      {
        index: part.index ?? 0,
        text: part.text ?? '',
        finish_reason: finish,
        logprobs: completionLogprobs(part.logprobs, part.textOffset),
      },
    ],
    ...usage,
  }
}

/** The final usage-only chunk of `stream_options.include_usage`. */
export function usageChunk(
  kind: 'chat' | 'completion',
  id: string,
  created: number,
  model: string,
  usage: Answer['usage'],
  moe: MoeSummary,
): Record<string, unknown> {
  return {
    id,
    created,
    model,
    system_fingerprint: null,
    object: kind === 'chat' ? 'chat.completion.chunk' : 'text_completion',
    choices: [],
    usage: usageOf(usage),
    moe,
  }
}

/** OpenAI streams each call as a chunk naming it, then chunks of its arguments. */
export function toolCallDeltas(calls: readonly ToolCall[]): ToolCallDelta[][] {
  return calls.flatMap((call, index) => [
    [
      {
        index,
        id: call.id,
        type: 'function' as const,
        function: { name: call.function.name, arguments: '' },
      },
    ],
    [{ index, function: { arguments: call.function.arguments } }],
  ])
}
