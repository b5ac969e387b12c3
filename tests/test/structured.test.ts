import { createOpenAICompatible } from '@ai-sdk/openai-compatible'
import { tool } from '@langchain/core/tools'
import { ChatOpenAI } from '@langchain/openai'
import { generateObject, streamObject } from 'ai'
import OpenAI from 'openai'
import { beforeAll, describe, expect, inject, it } from 'vitest'
import { z } from 'zod'
import { devTenant, type TestTenant } from '../src/stack.ts'

// Structured output and tools through real clients, against edge + worker + Redis on the demo
// model: whatever it samples, the answer parses and validates, because decoding is constrained.

const stack = inject('stack')
const noStore = { 'cache-control': 'no-store' }
let tenant: TestTenant
let client: OpenAI

// Bounded strings and numbers, so a document always ends inside max_tokens.
const Person = z.object({
  name: z.string().max(12),
  age: z.number().int().min(0).max(120),
  role: z.enum(['admin', 'user', 'guest']),
  active: z.boolean(),
  tags: z.array(z.string().max(6)).max(3),
})

const weatherTool: OpenAI.ChatCompletionFunctionTool = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: {
      type: 'object',
      properties: {
        city: { type: 'string', maxLength: 16 },
        unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
      },
      required: ['city', 'unit'],
      additionalProperties: false,
    },
    strict: true,
  },
}

beforeAll(async () => {
  tenant = await devTenant(stack)
  client = new OpenAI({
    apiKey: tenant.key,
    baseURL: `${stack.url}/v1`,
    maxRetries: 0,
    timeout: 120_000,
    defaultHeaders: noStore,
  })
})

describe('response_format', () => {
  it('AI SDK generateObject with a Zod schema (json_schema, strict)', async () => {
    const provider = createOpenAICompatible({
      name: 'moe',
      baseURL: `${stack.url}/v1`,
      apiKey: tenant.key,
      supportsStructuredOutputs: true,
      headers: noStore,
    })
    for (const seed of [1, 2, 3]) {
      const { object, finishReason } = await generateObject({
        model: provider.chatModel('auto'),
        schema: Person,
        prompt: 'Describe a person.',
        temperature: 1,
        seed,
        maxRetries: 0,
      })
      expect(finishReason).toBe('stop')
      expect(Person.parse(object)).toEqual(object)
    }
    // streamObject reads the same document from streamed content deltas.
    const streamed = streamObject({
      model: provider.chatModel('auto'),
      schema: Person,
      prompt: 'Describe a person.',
      temperature: 1,
      seed: 4,
      maxRetries: 0,
    })
    const partials: unknown[] = []
    for await (const partial of streamed.partialObjectStream) partials.push(partial)
    const object = await streamed.object
    expect(Person.parse(object)).toEqual(object)
    expect(partials.length).toBeGreaterThan(1)
  })

  it('LangChain withStructuredOutput, by JSON schema and by function calling', async () => {
    const model = new ChatOpenAI({
      model: 'auto',
      apiKey: tenant.key,
      temperature: 1,
      maxRetries: 0,
      configuration: { baseURL: `${stack.url}/v1`, defaultHeaders: noStore },
    })
    const viaSchema = await model
      .withStructuredOutput(Person, { method: 'jsonSchema' })
      .invoke('Describe a person.')
    expect(Person.parse(viaSchema)).toEqual(viaSchema)
    const viaTool = await model
      .withStructuredOutput(Person, { method: 'functionCalling' })
      .invoke('Describe a person.')
    expect(Person.parse(viaTool)).toEqual(viaTool)
  })

  it('json_object: every answer that ends is a JSON object', async () => {
    // Free-form keys and strings are unbounded, so a small model may run into max_tokens: that
    // answer ends with "length", as at OpenAI; every other one must be an object.
    for (const seed of [1, 2, 3, 4, 5]) {
      const res = await client.chat.completions.create({
        model: 'auto',
        messages: [{ role: 'user', content: 'Answer in JSON.' }],
        response_format: { type: 'json_object' },
        max_tokens: 64,
        temperature: 1,
        seed,
      })
      const choice = res.choices[0]!
      if (choice.finish_reason === 'length') continue
      expect(choice.finish_reason).toBe('stop')
      const doc = JSON.parse(choice.message.content!)
      expect(typeof doc === 'object' && doc !== null && !Array.isArray(doc)).toBe(true)
    }
  })

  it('a document cut by max_tokens ends with finish_reason length', async () => {
    const res = await client.chat.completions.create({
      model: 'auto',
      messages: [{ role: 'user', content: 'Describe a person.' }],
      max_tokens: 5,
      response_format: {
        type: 'json_schema',
        json_schema: { name: 'person', schema: z.toJSONSchema(Person) },
      },
    })
    expect(res.choices[0]!.finish_reason).toBe('length')
    expect(() => JSON.parse(res.choices[0]!.message.content!)).toThrow()
  })

  it('a schema keyword it cannot enforce is a 400 naming it', async () => {
    const err = await client.chat.completions
      .create({
        model: 'auto',
        messages: [{ role: 'user', content: 'hi' }],
        response_format: {
          type: 'json_schema',
          json_schema: { name: 'x', schema: { oneOf: [{ type: 'string' }, { type: 'number' }] } },
        },
      })
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(OpenAI.BadRequestError)
    const e = err as InstanceType<typeof OpenAI.BadRequestError>
    expect(e.message).toMatch(/'oneOf'/)
    expect(e.param).toBe('response_format.json_schema.schema')
  })
})

describe('tools', () => {
  const ask: OpenAI.ChatCompletionMessageParam = { role: 'user', content: 'What is the weather in Paris?' }

  it('openai SDK round trip: a required call, the tool result, then a text answer', async () => {
    const first = await client.chat.completions.create({
      model: 'auto',
      messages: [ask],
      tools: [weatherTool],
      tool_choice: 'required',
      temperature: 1,
      seed: 7,
      // Byte-level tokens: up to four parallel calls of about 85 bytes each.
      max_tokens: 400,
    })
    const choice = first.choices[0]!
    expect(choice.finish_reason).toBe('tool_calls')
    expect(choice.message.content).toBeNull()
    const calls = choice.message.tool_calls!
    expect(calls.length).toBeGreaterThanOrEqual(1)
    for (const call of calls) {
      expect(call.id).toMatch(/^call_/)
      expect(call.type).toBe('function')
      if (call.type !== 'function') continue
      expect(call.function.name).toBe('get_weather')
      const args = JSON.parse(call.function.arguments) as { city: string; unit: string }
      expect(typeof args.city).toBe('string')
      expect(['celsius', 'fahrenheit']).toContain(args.unit)
    }
    const second = await client.chat.completions.create({
      model: 'auto',
      messages: [
        ask,
        choice.message,
        ...calls.map((c) => ({ role: 'tool' as const, tool_call_id: c.id, content: '18 degrees, sunny' })),
      ],
      tools: [weatherTool],
      tool_choice: 'none',
      max_tokens: 24,
    })
    expect(second.choices[0]!.message.tool_calls).toBeUndefined()
    expect(typeof second.choices[0]!.message.content).toBe('string')
    expect(['stop', 'length']).toContain(second.choices[0]!.finish_reason)
  })

  it('streams delta.tool_calls as OpenAI does, for a named function, one call when not parallel', async () => {
    const stream = client.chat.completions.stream({
      model: 'auto',
      messages: [ask],
      tools: [weatherTool, { ...weatherTool, function: { ...weatherTool.function, name: 'get_time' } }],
      tool_choice: { type: 'function', function: { name: 'get_weather' } },
      parallel_tool_calls: false,
      temperature: 1,
    })
    const done = await stream.finalChatCompletion()
    const choice = done.choices[0]!
    expect(choice.finish_reason).toBe('tool_calls')
    const calls = choice.message.tool_calls!
    expect(calls).toHaveLength(1)
    const call = calls[0]!
    if (call.type !== 'function') throw new Error('expected a function call')
    expect(call.function.name).toBe('get_weather')
    expect(JSON.parse(call.function.arguments)).toHaveProperty('city')
  })

  it('streamed chunks: a delta naming each call, then deltas of its arguments, then finish_reason tool_calls', async () => {
    const stream = await client.chat.completions.create({
      model: 'auto',
      messages: [ask],
      tools: [weatherTool],
      tool_choice: 'required',
      parallel_tool_calls: false,
      stream: true,
      seed: 3,
    })
    const deltas: OpenAI.ChatCompletionChunk.Choice.Delta.ToolCall[] = []
    const finishes: (string | null)[] = []
    for await (const chunk of stream) {
      const choice = chunk.choices[0]
      if (!choice) continue
      // No text while the answer is a call.
      expect(choice.delta.content ?? '').toBe('')
      deltas.push(...(choice.delta.tool_calls ?? []))
      finishes.push(choice.finish_reason)
    }
    expect(finishes.at(-1)).toBe('tool_calls')
    expect(deltas[0]).toMatchObject({
      index: 0,
      type: 'function',
      function: { name: 'get_weather', arguments: '' },
    })
    expect(deltas[0]!.id).toMatch(/^call_/)
    const args = deltas
      .slice(1)
      .map((d) => d.function?.arguments ?? '')
      .join('')
    expect(deltas.slice(1).every((d) => d.index === 0 && d.id === undefined)).toBe(true)
    expect(JSON.parse(args)).toHaveProperty('unit')
  })

  it('an asynchronous job (Prefer: respond-async) reads its answer as tool calls too', async () => {
    const { data } = await client.chat.completions
      .create(
        {
          model: 'auto',
          messages: [ask],
          tools: [weatherTool],
          tool_choice: 'required',
          parallel_tool_calls: false,
        },
        { headers: { prefer: 'respond-async' } },
      )
      .withResponse()
    const id = (data as unknown as { id: string }).id
    let job: { status: string; result?: OpenAI.ChatCompletion } = { status: 'queued' }
    for (let i = 0; i < 240 && (job.status === 'queued' || job.status === 'running'); i++) {
      await new Promise((r) => setTimeout(r, 250))
      job = await client.get(`/jobs/${id}`)
    }
    expect(job.status).toBe('completed')
    const choice = job.result!.choices[0]!
    expect(choice.finish_reason).toBe('tool_calls')
    expect(choice.message.tool_calls).toHaveLength(1)
  })

  it('tool_choice auto: a text answer stays text', async () => {
    const res = await client.chat.completions.create({
      model: 'auto',
      messages: [{ role: 'user', content: 'Say hello.' }],
      tools: [weatherTool],
      temperature: 0,
      max_tokens: 16,
    })
    const choice = res.choices[0]!
    // The small model does not write call documents unasked; what it writes is its answer.
    if (choice.finish_reason === 'tool_calls') expect(choice.message.tool_calls!.length).toBeGreaterThan(0)
    else {
      expect(choice.message.tool_calls).toBeUndefined()
      expect(typeof choice.message.content).toBe('string')
    }
  })

  it('LangChain bindTools with a forced tool gives tool_calls with parsed arguments', async () => {
    const model = new ChatOpenAI({
      model: 'auto',
      apiKey: tenant.key,
      temperature: 1,
      maxRetries: 0,
      configuration: { baseURL: `${stack.url}/v1`, defaultHeaders: noStore },
    })
    const getWeather = tool(async ({ city }) => `sunny in ${city}`, {
      name: 'get_weather',
      description: 'The weather in a city',
      schema: z.object({ city: z.string().max(16) }),
    })
    const msg = await model.bindTools([getWeather], { tool_choice: 'get_weather' }).invoke('Weather in Oslo?')
    expect(msg.tool_calls?.length).toBeGreaterThanOrEqual(1)
    expect(msg.tool_calls![0]!.name).toBe('get_weather')
    expect(typeof msg.tool_calls![0]!.args.city).toBe('string')
  })
})
