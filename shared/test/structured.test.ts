import { describe, expect, it } from 'vitest'
import {
  ChatCompletionRequest,
  MAX_PARALLEL_TOOL_CALLS,
  parseToolCalls,
  structuredPlan,
  toolCallSchema,
  unsupportedSchemaPart,
} from '../src/index.ts'

const weather = {
  name: 'get_weather',
  parameters: {
    type: 'object',
    properties: { city: { type: 'string' } },
    required: ['city'],
    additionalProperties: false,
  },
}

describe('the JSON Schema subset constrained decoding enforces', () => {
  it('accepts strict-mode schemas: nesting, enums, const, anyOf, refs into $defs', () => {
    const schema = {
      $schema: 'https://json-schema.org/draft/2020-12/schema',
      type: 'object',
      properties: {
        name: { type: 'string', description: 'who', maxLength: 10 },
        kind: { enum: ['a', 'b'] },
        fixed: { const: 1 },
        maybe: { anyOf: [{ type: 'integer', minimum: 0 }, { type: 'null' }] },
        list: { type: 'array', items: { $ref: '#/$defs/item' }, minItems: 1 },
        nullable: { type: ['string', 'null'] },
      },
      required: ['name'],
      additionalProperties: false,
      $defs: { item: { type: 'object', properties: { ok: { type: 'boolean' } } } },
    }
    expect(unsupportedSchemaPart(schema)).toBeNull()
  })

  it('names the first keyword it cannot enforce, and where', () => {
    const p = unsupportedSchemaPart({ type: 'object', properties: { x: { oneOf: [{ type: 'string' }] } } })
    expect(p).toMatchObject({ keyword: 'oneOf', pointer: '/properties/x' })
    expect(p!.message).toContain("'oneOf'")
    expect(unsupportedSchemaPart({ type: 'string', format: 'hostname-ish' })?.keyword).toBe('format')
    expect(unsupportedSchemaPart({ type: 'object', additionalProperties: { type: 'string' } })?.keyword).toBe(
      'additionalProperties',
    )
    expect(unsupportedSchemaPart({ $ref: '#/$defs/missing' })?.keyword).toBe('$ref')
    expect(unsupportedSchemaPart({ type: 'strng' })?.keyword).toBe('type')
    expect(unsupportedSchemaPart({ type: 'string', pattern: '^(?!x)' })?.message).toContain('lookaround')
    expect(unsupportedSchemaPart({ type: 'string', pattern: '(a)\\1' })?.keyword).toBe('pattern')
    expect(unsupportedSchemaPart({ type: 'string', pattern: '^[a-z]+(?:-[a-z]+)*$' })).toBeNull()
    expect(unsupportedSchemaPart({ type: 'array', items: { uniqueItems: true } })).toMatchObject({
      keyword: 'uniqueItems',
      pointer: '/items',
    })
  })
})

describe('tool calls', () => {
  it('a forced call is an array of {name, arguments}, one when not parallel', () => {
    expect(toolCallSchema([weather], false)).toEqual({
      type: 'array',
      minItems: 1,
      maxItems: 1,
      items: {
        type: 'object',
        properties: { name: { const: 'get_weather' }, arguments: weather.parameters },
        required: ['name', 'arguments'],
        additionalProperties: false,
      },
    })
    const two = toolCallSchema([weather, { name: 'now' }], true)
    expect(two.maxItems).toBe(MAX_PARALLEL_TOOL_CALLS)
    expect((two.items as { anyOf: unknown[] }).anyOf).toHaveLength(2)
  })

  it('reads generated calls, and only documents that name offered functions', () => {
    expect(parseToolCalls('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', [weather])).toEqual([
      { name: 'get_weather', arguments: '{"city":"Oslo"}' },
    ])
    expect(parseToolCalls('{"name": "get_weather", "arguments": {}}', [weather])).toHaveLength(1)
    expect(parseToolCalls('[{"name": "rm_rf", "arguments": {}}]', [weather])).toBeNull()
    expect(parseToolCalls('Sunny, 18 degrees.', [weather])).toBeNull()
    expect(parseToolCalls('[]', [weather])).toBeNull()
  })

  it('plans what a request asks: forced, named, auto, none, and response_format', () => {
    const base = { model: 'm', messages: [{ role: 'user', content: 'hi' }] }
    const tools = [
      { type: 'function', function: weather },
      { type: 'function', function: { name: 'now' } },
    ]
    const req = (extra: object) => ChatCompletionRequest.parse({ ...base, ...extra })
    expect(structuredPlan(req({ tools, tool_choice: 'required' }))).toMatchObject({ toolCalls: 'forced' })
    const named = structuredPlan(req({ tools, tool_choice: { type: 'function', function: { name: 'now' } } }))
    expect(named.json?.schema).toMatchObject({
      maxItems: 1,
      items: { properties: { name: { const: 'now' } } },
    })
    expect(structuredPlan(req({ tools }))).toEqual({ tools: tools.map((t) => t.function), toolCalls: 'auto' })
    expect(structuredPlan(req({ tools, tool_choice: 'none' }))).toEqual({})
    expect(structuredPlan(req({ response_format: { type: 'json_object' } }))).toEqual({
      json: { schema: null },
    })
    expect(structuredPlan(req({ response_format: { type: 'text' } }))).toEqual({})
  })

  it('accepts tool-call history: assistant tool_calls with null content, and tool messages', () => {
    const ok = ChatCompletionRequest.safeParse({
      model: 'm',
      messages: [
        { role: 'user', content: 'weather?' },
        {
          role: 'assistant',
          content: null,
          tool_calls: [
            { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{}' } },
          ],
        },
        { role: 'tool', tool_call_id: 'call_1', content: 'sunny' },
      ],
    })
    expect(ok.success).toBe(true)
    const noId = ChatCompletionRequest.safeParse({
      model: 'm',
      messages: [{ role: 'tool', content: 'sunny' }],
    })
    expect(noId.success).toBe(false)
  })
})
