import { z } from 'zod'

// Structured output and tools: the OpenAI request fields, the JSON Schema subset constrained
// decoding supports (OpenAI's strict mode subset), the schema a tool call is generated under, and
// how the generated document becomes `tool_calls`.

export type JsonSchema = Record<string, unknown>

const SchemaObject = z.record(z.string(), z.unknown())

export const ResponseFormat = z.discriminatedUnion('type', [
  z.object({ type: z.literal('text') }),
  z.object({ type: z.literal('json_object') }),
  z.object({
    type: z.literal('json_schema'),
    json_schema: z.object({
      name: z
        .string()
        .regex(/^[a-zA-Z0-9_-]{1,64}$/, 'name must be 1 to 64 letters, digits, underscores or dashes'),
      description: z.string().optional(),
      schema: SchemaObject.optional(),
      strict: z.boolean().nullable().optional(),
    }),
  }),
])
export type ResponseFormat = z.infer<typeof ResponseFormat>

export const FunctionDefinition = z.object({
  name: z
    .string()
    .regex(/^[a-zA-Z0-9_-]{1,64}$/, 'a function name must be 1 to 64 letters, digits, underscores or dashes'),
  description: z.string().optional(),
  parameters: SchemaObject.optional(),
  strict: z.boolean().nullable().optional(),
})
export type FunctionDefinition = z.infer<typeof FunctionDefinition>

export const FunctionTool = z.object({ type: z.literal('function'), function: FunctionDefinition })
export type FunctionTool = z.infer<typeof FunctionTool>

export const ToolChoice = z.union([
  z.enum(['none', 'auto', 'required']),
  z.object({ type: z.literal('function'), function: z.object({ name: z.string() }) }),
])
export type ToolChoice = z.infer<typeof ToolChoice>

/** A call in an assistant message of the history, as OpenAI returns it. */
export const ToolCall = z.object({
  id: z.string().min(1).max(256),
  type: z.literal('function'),
  function: z.object({ name: z.string(), arguments: z.string() }),
})
export type ToolCall = z.infer<typeof ToolCall>

/** Keywords that only annotate: accepted and ignored by the grammar. */
const ANNOTATIONS = new Set(['title', 'description', '$schema', '$id', '$comment', 'default', 'examples'])

/** Keywords constrained decoding enforces, per JSON type they apply to. */
const ENFORCED = new Set([
  'type',
  'properties',
  'required',
  'additionalProperties',
  'items',
  'enum',
  'const',
  'anyOf',
  'minItems',
  'maxItems',
  'minLength',
  'maxLength',
  'pattern',
  'format',
  'minimum',
  'maximum',
  'exclusiveMinimum',
  'exclusiveMaximum',
  '$ref',
  '$defs',
  'definitions',
])

const TYPES = new Set(['object', 'array', 'string', 'number', 'integer', 'boolean', 'null'])

export const SUPPORTED_FORMATS = [
  'date-time',
  'date',
  'time',
  'email',
  'uuid',
  'ipv4',
  'ipv6',
  'uri',
] as const

export const SUPPORTED_SCHEMA_KEYWORDS = [...ENFORCED].sort()

/** Why a schema cannot be enforced: the keyword (or value) and where it sits (a JSON pointer). */
export interface SchemaProblem {
  keyword: string
  pointer: string
  message: string
}

/**
 * The first part of `schema` that constrained decoding cannot enforce, or null. Refusing is
 * better than generating output the schema would reject.
 */
export function unsupportedSchemaPart(
  schema: unknown,
  root: unknown = schema,
  pointer = '',
): SchemaProblem | null {
  const at = pointer || '/'
  if (typeof schema === 'boolean') return null
  if (typeof schema !== 'object' || schema === null || Array.isArray(schema))
    return { keyword: '(schema)', pointer: at, message: `the schema at ${at} must be an object` }
  const s = schema as Record<string, unknown>
  for (const key of Object.keys(s)) {
    if (ANNOTATIONS.has(key)) continue
    if (!ENFORCED.has(key))
      return {
        keyword: key,
        pointer: at,
        message: `the JSON Schema keyword '${key}' (at ${at}) is not supported by constrained decoding; supported keywords: ${SUPPORTED_SCHEMA_KEYWORDS.join(', ')}`,
      }
  }
  if ('type' in s) {
    const types = Array.isArray(s.type) ? s.type : [s.type]
    for (const t of types)
      if (typeof t !== 'string' || !TYPES.has(t))
        return {
          keyword: 'type',
          pointer: at,
          message: `'type' at ${at} must be one of ${[...TYPES].join(', ')}`,
        }
  }
  if ('format' in s && !(SUPPORTED_FORMATS as readonly unknown[]).includes(s.format))
    return {
      keyword: 'format',
      pointer: at,
      message: `the string format ${JSON.stringify(s.format)} (at ${at}) is not supported; supported formats: ${SUPPORTED_FORMATS.join(', ')}`,
    }
  if ('additionalProperties' in s && typeof s.additionalProperties !== 'boolean')
    return {
      keyword: 'additionalProperties',
      pointer: at,
      message: `'additionalProperties' at ${at} must be true or false (a schema for extra properties is not supported)`,
    }
  if ('required' in s && !(Array.isArray(s.required) && s.required.every((r) => typeof r === 'string')))
    return {
      keyword: 'required',
      pointer: at,
      message: `'required' at ${at} must be an array of property names`,
    }
  if ('enum' in s && !(Array.isArray(s.enum) && s.enum.length > 0))
    return { keyword: 'enum', pointer: at, message: `'enum' at ${at} must be a non-empty array` }
  if ('pattern' in s) {
    try {
      if (typeof s.pattern !== 'string') throw new Error('not a string')
      new RegExp(s.pattern, 'u')
    } catch {
      return {
        keyword: 'pattern',
        pointer: at,
        message: `'pattern' at ${at} is not a valid regular expression`,
      }
    }
    // The grammar engine compiles regular languages only.
    if (/\(\?<?[=!]|\\[1-9]|\\k</.test(s.pattern as string))
      return {
        keyword: 'pattern',
        pointer: at,
        message: `'pattern' at ${at} uses lookaround or a backreference, which constrained decoding does not support`,
      }
  }
  for (const k of ['minItems', 'maxItems', 'minLength', 'maxLength'])
    if (k in s && !(Number.isInteger(s[k]) && (s[k] as number) >= 0))
      return { keyword: k, pointer: at, message: `'${k}' at ${at} must be a non-negative integer` }
  for (const k of ['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum'])
    if (k in s && typeof s[k] !== 'number')
      return { keyword: k, pointer: at, message: `'${k}' at ${at} must be a number` }
  if ('$ref' in s) {
    const ref = s.$ref
    if (typeof ref !== 'string' || resolveLocalRef(root, ref) === undefined)
      return {
        keyword: '$ref',
        pointer: at,
        message: `'$ref' at ${at} must point into this schema's $defs or definitions (got ${JSON.stringify(ref)})`,
      }
  }
  const children: [unknown, string][] = []
  if (s.properties !== undefined) {
    if (typeof s.properties !== 'object' || s.properties === null || Array.isArray(s.properties))
      return { keyword: 'properties', pointer: at, message: `'properties' at ${at} must be an object` }
    for (const [k, v] of Object.entries(s.properties))
      children.push([v, `${pointer}/properties/${escapePointer(k)}`])
  }
  if (s.items !== undefined) children.push([s.items, `${pointer}/items`])
  for (const key of ['$defs', 'definitions'] as const) {
    const defs = s[key]
    if (defs === undefined) continue
    if (typeof defs !== 'object' || defs === null || Array.isArray(defs))
      return { keyword: key, pointer: at, message: `'${key}' at ${at} must be an object` }
    for (const [k, v] of Object.entries(defs)) children.push([v, `${pointer}/${key}/${escapePointer(k)}`])
  }
  if (s.anyOf !== undefined) {
    if (!Array.isArray(s.anyOf) || s.anyOf.length === 0)
      return { keyword: 'anyOf', pointer: at, message: `'anyOf' at ${at} must be a non-empty array` }
    for (const [i, v] of s.anyOf.entries()) children.push([v, `${pointer}/anyOf/${i}`])
  }
  for (const [child, p] of children) {
    const problem = unsupportedSchemaPart(child, root, p)
    if (problem) return problem
  }
  return null
}

const escapePointer = (k: string) => k.replaceAll('~', '~0').replaceAll('/', '~1')

function resolveLocalRef(root: unknown, ref: string): unknown {
  if (ref === '#') return root
  if (!ref.startsWith('#/')) return undefined
  let node: unknown = root
  for (const raw of ref.slice(2).split('/')) {
    const part = decodeURIComponent(raw).replaceAll('~1', '/').replaceAll('~0', '~')
    if (typeof node !== 'object' || node === null || !(part in node)) return undefined
    node = (node as Record<string, unknown>)[part]
  }
  return node
}

/**
 * Most calls in one parallel tool-call answer. Without a bound the array could grow until
 * max_tokens cuts it, and a cut document is no call at all.
 */
export const MAX_PARALLEL_TOOL_CALLS = 4

/** A function's parameters when it declares none: an empty object. */
const NO_PARAMETERS: JsonSchema = { type: 'object', properties: {}, additionalProperties: false }

/**
 * The document a tool call is generated as: a JSON array of `{"name", "arguments"}` objects, each
 * naming one of `tools` with arguments valid for its parameters; one call only when calls may not
 * run in parallel, at most MAX_PARALLEL_TOOL_CALLS when they may.
 */
export function toolCallSchema(tools: readonly FunctionDefinition[], parallel: boolean): JsonSchema {
  const call = (f: FunctionDefinition): JsonSchema => ({
    type: 'object',
    properties: { name: { const: f.name }, arguments: f.parameters ?? NO_PARAMETERS },
    required: ['name', 'arguments'],
    additionalProperties: false,
  })
  const items = tools.length === 1 ? call(tools[0]!) : { anyOf: tools.map(call) }
  return { type: 'array', items, minItems: 1, maxItems: parallel ? MAX_PARALLEL_TOOL_CALLS : 1 }
}

export interface GeneratedCall {
  name: string
  /** The arguments as a JSON string, as OpenAI's `function.arguments`. */
  arguments: string
}

/**
 * The tool calls in a generated text, or null when it is not a tool-call document naming only
 * offered functions (then it is the assistant's text answer).
 */
export function parseToolCalls(text: string, tools: readonly FunctionDefinition[]): GeneratedCall[] | null {
  let doc: unknown
  try {
    doc = JSON.parse(text)
  } catch {
    return null
  }
  const list = Array.isArray(doc) ? doc : [doc]
  if (list.length === 0) return null
  const names = new Set(tools.map((t) => t.name))
  const calls: GeneratedCall[] = []
  for (const item of list) {
    if (typeof item !== 'object' || item === null || Array.isArray(item)) return null
    const { name, arguments: args } = item as Record<string, unknown>
    if (typeof name !== 'string' || !names.has(name)) return null
    if (typeof args !== 'object' || args === null || Array.isArray(args)) return null
    calls.push({ name, arguments: JSON.stringify(args) })
  }
  return calls
}

/**
 * What a chat request asks of structured output, once validated: the schema its output is held
 * to (null: any JSON object), and the functions offered, if any.
 */
export interface StructuredPlan {
  /** Output must be a JSON document for this schema (`schema` null: any object); absent: free text. */
  json?: { schema: JsonSchema | null }
  /** Functions the prompt offers (tool_choice none offers none). */
  tools?: FunctionDefinition[]
  /** The output is read as tool calls: always (forced), or when it is a tool-call document (auto). */
  toolCalls?: 'forced' | 'auto'
}

/** The plan for a chat request's response_format, tools, tool_choice and parallel_tool_calls. */
export function structuredPlan(req: {
  response_format?: ResponseFormat | null
  tools?: FunctionTool[] | null
  tool_choice?: ToolChoice | null
  parallel_tool_calls?: boolean | null
}): StructuredPlan {
  const plan: StructuredPlan = {}
  const offered = (req.tools ?? []).map((t) => t.function)
  const choice = req.tool_choice ?? 'auto'
  if (offered.length > 0 && choice !== 'none') {
    const parallel = req.parallel_tool_calls ?? true
    if (choice === 'auto') {
      plan.tools = offered
      plan.toolCalls = 'auto'
    } else {
      const named =
        typeof choice === 'object' ? offered.filter((f) => f.name === choice.function.name) : offered
      plan.tools = offered
      plan.toolCalls = 'forced'
      plan.json = { schema: toolCallSchema(named, parallel && typeof choice !== 'object') }
      return plan
    }
  }
  const format = req.response_format
  if (format?.type === 'json_object') plan.json = { schema: null }
  else if (format?.type === 'json_schema') plan.json = { schema: format.json_schema.schema ?? null }
  return plan
}
