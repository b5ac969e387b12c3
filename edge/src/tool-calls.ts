import { type FunctionDefinition, parseToolCalls, type StructuredPlan, type ToolCall } from '@moe/shared'

// Reads a generated answer as tool calls: always when tool_choice forced a call (the output was
// constrained to a tool-call document), or when an `auto` answer is such a document.

/** How a request's answer is read for tool calls. */
export interface ToolReading {
  mode: 'forced' | 'auto'
  tools: FunctionDefinition[]
  /** Call ids are `call_<base><index>`, stable for one request (a cached replay repeats them). */
  idBase: string
}

export function toolReading(plan: StructuredPlan, requestId: string): ToolReading | undefined {
  if (!plan.toolCalls || !plan.tools) return undefined
  const idBase = requestId.replace(/[^a-zA-Z0-9]/g, '').slice(-24)
  return { mode: plan.toolCalls, tools: plan.tools, idBase }
}

/** The tool calls an answer's text makes, or null when it is a text answer. */
export function readToolCalls(text: string, reading: ToolReading): ToolCall[] | null {
  const calls = parseToolCalls(text, reading.tools)
  if (!calls) return null
  return calls.map((c, i) => ({ id: `call_${reading.idBase}${i}`, type: 'function', function: c }))
}

/**
 * Streams an answer that may be a tool-call document: text that may still become one is held back
 * (all of it when the call is forced; in `auto`, while it is blank or opens with `[` or `{`), and
 * sent as text as soon as it cannot.
 */
export class ToolCallStream {
  readonly #reading: ToolReading
  #held = ''
  #isText = false

  constructor(reading: ToolReading) {
    this.#reading = reading
  }

  /** Text to send now for this delta ('' while held back). */
  push(delta: string): string {
    if (this.#isText) return delta
    this.#held += delta
    if (this.#reading.mode === 'forced') return ''
    const start = this.#held.trimStart()
    if (start === '' || start.startsWith('[') || start.startsWith('{')) return ''
    this.#isText = true
    const out = this.#held
    this.#held = ''
    return out
  }

  /** At the end: the calls, or the held text still to send. */
  finish(fullText: string): { toolCalls: ToolCall[] } | { text: string } {
    if (!this.#isText) {
      const calls = readToolCalls(fullText, this.#reading)
      if (calls) return { toolCalls: calls }
    }
    const text = this.#held
    this.#held = ''
    return { text }
  }
}
