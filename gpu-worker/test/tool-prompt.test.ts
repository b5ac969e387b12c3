import { describe, expect, it } from 'vitest'
import { byteLevelTokenizerFiles } from '../src/engine/tiny-tokenizer.ts'
import { ChatTokenizer } from '../src/engine/tokenizer.ts'
import { encodeToolChat, toolChat } from '../src/engine/tool-prompt.ts'

// Tools reach the prompt through the chat template when it renders them, else through a system
// message; tool-call history renders either way.

const files = byteLevelTokenizerFiles()
const plain = new ChatTokenizer(files.tokenizerJson, files.tokenizerConfig)

const TOOL_TEMPLATE = [
  '{%- if tools %}<tools>{{ tools | tojson }}</tools>{% endif -%}',
  '{%- for m in messages -%}',
  "{%- if m.role == 'tool' -%}<tool_response id={{ m.tool_call_id }}>{{ m.content }}</tool_response>",
  '{%- elif m.tool_calls -%}{%- for c in m.tool_calls -%}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor -%}',
  '{%- else -%}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{%- endif -%}',
  '{%- endfor -%}',
].join('')
const withTools = new ChatTokenizer(files.tokenizerJson, {
  ...files.tokenizerConfig,
  chat_template: TOOL_TEMPLATE,
})

const weather = {
  name: 'get_weather',
  description: 'The weather in a city',
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
}
const history = [
  { role: 'user', content: 'Weather in Oslo?' },
  {
    role: 'assistant',
    content: '',
    tool_calls: [
      { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Oslo"}' } },
    ],
  },
  { role: 'tool', content: 'sunny', tool_call_id: 'call_1' },
]

describe('tools in the prompt', () => {
  it('a template that renders tools gets them, and the history with arguments as objects', () => {
    expect(withTools.templateRendersTools).toBe(true)
    expect(plain.templateRendersTools).toBe(false)
    const chat = toolChat(withTools, history, [weather])
    const text = withTools.applyChatTemplate(chat.messages, chat.options)
    // tojson writes as Python's json.dumps does, with a space after `,` and `:`.
    expect(text).toContain('<tools>[{"type": "function", "function": {"name": "get_weather"')
    expect(text).toContain('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    expect(text).toContain('<tool_response id=call_1>sunny</tool_response>')
  })

  it('any other template: functions in a system message, calls as the JSON document, results as user turns', () => {
    const chat = toolChat(plain, history, [weather])
    expect(chat.options).toEqual({})
    expect(chat.messages[0]!.role).toBe('system')
    expect(chat.messages[0]!.content).toContain('"name":"get_weather"')
    expect(chat.messages[2]).toEqual({
      role: 'assistant',
      content: '[{"name":"get_weather","arguments":{"city":"Oslo"}}]',
    })
    expect(chat.messages[3]).toEqual({ role: 'user', content: 'Result of get_weather (call call_1):\nsunny' })
    // The model's own template renders it: it knows no `tool` role and would refuse one.
    const text = plain.decode(encodeToolChat(plain, history, [weather]))
    expect(text).toContain('You can call these functions')
    expect(text).toContain('Result of get_weather')
  })

  it('a chat without tools or tool history is left as it is', () => {
    const messages = [{ role: 'user', content: 'hi' }]
    expect(toolChat(plain, messages, undefined)).toEqual({ messages, options: {} })
  })
})
