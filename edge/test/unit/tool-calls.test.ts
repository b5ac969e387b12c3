import { MoeError } from '@moe/shared'
import { describe, expect, it } from 'vitest'
import { readToolCalls, ToolCallStream, toolReading } from '../../src/tool-calls.ts'
import { validateBody } from '../../src/validate.ts'

const weather = {
  name: 'get_weather',
  parameters: { type: 'object', properties: { city: { type: 'string' } } },
}
const chat = { model: 'auto', messages: [{ role: 'user', content: 'hi' }] }
const call = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'

function thrown(f: () => unknown): MoeError {
  try {
    f()
  } catch (e) {
    if (e instanceof MoeError) return e
    throw e
  }
  throw new Error('did not throw')
}

describe('structured output and tools at the edge', () => {
  it('refuses schemas it cannot enforce with a 400 naming the keyword and the parameter', () => {
    const format = thrown(() =>
      validateBody('chat', {
        ...chat,
        response_format: {
          type: 'json_schema',
          json_schema: { name: 'x', schema: { not: { type: 'string' } } },
        },
      }),
    )
    expect(format.status).toBe(400)
    expect(format.message).toContain("'not'")
    expect(format.param).toBe('response_format.json_schema.schema')
    const tool = thrown(() =>
      validateBody('chat', {
        ...chat,
        tools: [
          { type: 'function', function: { name: 'f', parameters: { type: 'object', minProperties: 1 } } },
        ],
      }),
    )
    expect(tool.message).toContain("'minProperties'")
    expect(tool.param).toBe('tools.0.function.parameters')
  })

  it('refuses a tool_choice that names no offered function, or requires a call without tools', () => {
    const tools = [{ type: 'function', function: weather }]
    expect(
      thrown(() =>
        validateBody('chat', { ...chat, tools, tool_choice: { type: 'function', function: { name: 'g' } } }),
      ).param,
    ).toBe('tool_choice')
    expect(thrown(() => validateBody('chat', { ...chat, tool_choice: 'required' })).param).toBe('tool_choice')
    expect(validateBody('chat', { ...chat, tools, tool_choice: 'required' }).tools).toHaveLength(1)
  })

  it('reads call ids as call_..., stable per request', () => {
    const reading = toolReading({ tools: [weather], toolCalls: 'forced' }, 'req-abc123')!
    const calls = readToolCalls(call, reading)!
    expect(calls).toEqual([
      {
        id: 'call_reqabc1230',
        type: 'function',
        function: { name: 'get_weather', arguments: '{"city":"Oslo"}' },
      },
    ])
  })

  it('auto: text that cannot be a call streams at once; a call document is held and read at the end', () => {
    const reading = toolReading({ tools: [weather], toolCalls: 'auto' }, 'r1')!
    const text = new ToolCallStream(reading)
    expect(text.push('  ')).toBe('')
    expect(text.push('Hello')).toBe('  Hello')
    expect(text.push(' there')).toBe(' there')
    expect(text.finish('  Hello there')).toEqual({ text: '' })

    const doc = new ToolCallStream(reading)
    expect(doc.push(call.slice(0, 10))).toBe('')
    expect(doc.push(call.slice(10))).toBe('')
    const end = doc.finish(call)
    expect('toolCalls' in end && end.toolCalls[0]!.function.name).toBe('get_weather')

    // A document that turns out not to be a call is sent as text.
    const notCall = new ToolCallStream(reading)
    notCall.push('{"a": 1}')
    expect(notCall.finish('{"a": 1}')).toEqual({ text: '{"a": 1}' })
  })
})
