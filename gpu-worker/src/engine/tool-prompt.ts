import type { ChatMessage, ChatRenderOptions, ChatTokenizer } from './tokenizer.ts'

// Puts function tools and tool-call history into a chat prompt. A template that renders tools
// (HF's tool-use templates read `tools`, assistant `tool_calls` and `tool` messages) gets them as
// it expects. For any other template the functions are described in a system message, past calls
// become the assistant's JSON document of calls, and tool results become user messages, so a
// template that knows only system, user and assistant turns still renders the round trip.

/** A function as the job carries it (OpenAI's `function` object). */
export interface ToolFunction {
  name: string
  description?: string
  parameters?: Record<string, unknown>
}

interface HistoryCall {
  id: string
  function: { name: string; arguments: string }
}

const parseArguments = (args: string): unknown => {
  try {
    return JSON.parse(args)
  } catch {
    return args
  }
}

/** The instructions the fallback adds: the functions, and the document a call is written as. */
export function toolSystemPrompt(tools: readonly ToolFunction[]): string {
  const list = tools
    .map((t) =>
      JSON.stringify({ name: t.name, description: t.description ?? '', parameters: t.parameters ?? {} }),
    )
    .join('\n')
  return (
    `You can call these functions:\n${list}\n` +
    'To call functions, answer with only a JSON array of calls, each {"name": <function name>, "arguments": <object>}. ' +
    'Otherwise answer in text.'
  )
}

/** The document the fallback writes a past call as: the same shape the model is asked to produce. */
const callsDocument = (calls: readonly HistoryCall[]) =>
  JSON.stringify(
    calls.map((c) => ({ name: c.function.name, arguments: parseArguments(c.function.arguments) })),
  )

/** Messages and render options for a chat with tools (or with tool history and no tools). */
export function toolChat(
  tokenizer: ChatTokenizer,
  messages: readonly ChatMessage[],
  tools: readonly ToolFunction[] | undefined,
): { messages: ChatMessage[]; options: ChatRenderOptions } {
  const offered = tools ?? []
  const hasHistory = messages.some((m) => m.role === 'tool' || (m.tool_calls?.length ?? 0) > 0)
  if (offered.length === 0 && !hasHistory) return { messages: [...messages], options: {} }

  if (tokenizer.templateRendersTools) {
    const rendered = messages.map((m) =>
      m.tool_calls
        ? {
            ...m,
            tool_calls: (m.tool_calls as HistoryCall[]).map((c) => ({
              ...c,
              function: { name: c.function.name, arguments: parseArguments(c.function.arguments) },
            })),
          }
        : m,
    )
    return {
      messages: rendered,
      options: { tools: offered.map((f) => ({ type: 'function', function: f })) },
    }
  }

  const names = new Map<string, string>()
  const out: ChatMessage[] = []
  for (const m of messages) {
    if (m.role === 'assistant' && m.tool_calls && m.tool_calls.length > 0) {
      const calls = m.tool_calls as HistoryCall[]
      for (const c of calls) names.set(c.id, c.function.name)
      const text = typeof m.content === 'string' ? m.content : ''
      out.push({
        role: 'assistant',
        content: text ? `${text}\n${callsDocument(calls)}` : callsDocument(calls),
      })
    } else if (m.role === 'tool') {
      const name = names.get(m.tool_call_id ?? '') ?? 'a function'
      const content =
        typeof m.content === 'string' ? m.content : m.content.map((p) => p.text ?? '').join('\n')
      out.push({ role: 'user', content: `Result of ${name} (call ${m.tool_call_id}):\n${content}` })
    } else out.push({ role: m.role, content: m.content, ...(m.name ? { name: m.name } : {}) })
  }
  if (offered.length > 0) out.unshift({ role: 'system', content: toolSystemPrompt(offered) })
  return { messages: out, options: {} }
}

/** Prompt ids for a chat job, with its tools. */
export function encodeToolChat(
  tokenizer: ChatTokenizer,
  messages: readonly ChatMessage[],
  tools: readonly ToolFunction[] | undefined,
): number[] {
  const chat = toolChat(tokenizer, messages, tools)
  return tokenizer.encodeChat(chat.messages, chat.options)
}
