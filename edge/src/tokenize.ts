import {
  MoeError,
  type TokenizeJobPayload,
  type TokenizeOp,
  TokenizeResult,
  tokenizeResultKey,
} from '@moe/shared'
import { Hono } from 'hono'
import { z } from 'zod'
import { classifyRequest, routeRequest } from './completions/submit.ts'
import { type AppEnv, admissionOf, type Ctx, EdgeError, jsonBody, limitBody, requireJson } from './http.ts'
import { closeReader, openReader } from './job-events.ts'
import { tenantAuth } from './middleware/tenant-auth/index.ts'
import { validateBody, zodToMoeError } from './validate.ts'

// POST /tokenize and POST /detokenize, as vLLM's OpenAI server offers them. The edge has no
// tokenizer: each request is a small job on the queue of the pool that serves the model, answered
// by a worker with the model's own tokenizer (shared/src/tokenize.ts says why the queue).

/** Longest a tokenizer request waits for a worker's answer. */
const TOKENIZE_TIMEOUT_MS = 30_000

export const tokenizer = new Hono<AppEnv>()

for (const path of ['/tokenize', '/detokenize'] as const) {
  tokenizer.use(path, tenantAuth({ keys: (c) => c.env.AUTH }))
  tokenizer.on(['POST', 'PUT', 'PATCH'], path, requireJson, limitBody)
}

const Model = z.string().min(1).max(256).default('auto')
const TokenIds = z.array(z.number().int().min(0, { error: 'token ids are non-negative integers' }))

const TokenizeCompletion = z.strictObject({
  model: Model,
  prompt: z.string(),
  add_special_tokens: z.boolean().default(true),
})
const TokenizeChat = z.strictObject({
  model: Model,
  messages: z.array(z.unknown()).min(1),
  add_generation_prompt: z.boolean().default(true),
  // The chat template writes the special tokens a chat needs; vLLM's default here is false too.
  add_special_tokens: z.literal(false, { error: 'add_special_tokens must be false for messages' }).optional(),
})
const Detokenize = z.strictObject({ model: Model, tokens: TokenIds })

function parse<T extends z.ZodType>(schema: T, body: unknown): z.infer<T> {
  if (typeof body !== 'object' || body === null || Array.isArray(body))
    throw new MoeError('invalid_request', 'The request body must be a JSON object')
  const parsed = schema.safeParse(body)
  if (!parsed.success) throw zodToMoeError(parsed.error)
  return parsed.data
}

/**
 * The pool whose model answers: routed as the matching chat or text completion would be, so the
 * tokens are those of the model that would serve it.
 */
function poolFor(c: Ctx, model: string, asked: TokenizeOp) {
  const tenant = c.get('principal').tenant
  const req =
    asked.op === 'tokenize_chat'
      ? validateBody('chat', { model, messages: asked.messages })
      : validateBody('completion', {
          model,
          prompt: asked.op === 'tokenize' ? asked.prompt : asked.tokens.length > 0 ? asked.tokens : '',
        })
  const endpoint = asked.op === 'tokenize_chat' ? 'chat' : 'completion'
  const r = routeRequest(tenant, endpoint, req, classifyRequest(tenant, req, c.req.header('x-moe-task')))
  c.header('x-moe-pool', r.pool.name)
  c.get('logFields').pool = r.pool.name
  return r.pool
}

/** Queues the request for the pool's workers and waits for the answer. */
async function askWorker(c: Ctx, model: string, asked: TokenizeOp) {
  const pool = poolFor(c, model, asked)
  const tenant = c.get('principal').tenant
  const jobId = `tok_${c.get('requestId')}`
  const deadline = Date.now() + Math.min(TOKENIZE_TIMEOUT_MS, c.get('config').liveTimeoutMs)
  const payload: TokenizeJobPayload = {
    version: 1,
    requestId: jobId,
    pool: pool.name,
    model: pool.modelId,
    deadline,
    request: asked,
  }
  // Opened before the enqueue so the handshake overlaps it.
  const reader = openReader(c.get('config'))
  try {
    const queued = await admissionOf(c.env, tenant.id).enqueueTokenize(tenant.id, tenant.rateLimits, payload)
    if (!queued.ok)
      throw new EdgeError('rate_limited', queued.message, null, {
        'retry-after': String(queued.retryAfterSeconds),
      })
    const seconds = Math.max(1, Math.ceil((deadline - Date.now()) / 1000))
    const popped = await reader.blpop(tokenizeResultKey(jobId), seconds)
    if (!popped)
      throw new MoeError(
        'deadline_exceeded',
        `No worker of pool '${pool.name}' answered within ${seconds} s; please retry`,
      )
    const result = TokenizeResult.parse(JSON.parse(popped[1]))
    if (!result.ok) throw new MoeError(result.code, result.message)
    return { pool, result }
  } finally {
    closeReader(reader)
  }
}

/** What a /tokenize body asks: a prompt's tokens, or those of a chat as its template renders it. */
function tokenizeOpOf(body: unknown): { model: string; asked: TokenizeOp } {
  if (typeof body === 'object' && body !== null && 'messages' in body) {
    const b = parse(TokenizeChat, body)
    const { messages } = validateBody('chat', { model: b.model, messages: b.messages })
    return {
      model: b.model,
      asked: { op: 'tokenize_chat', messages, addGenerationPrompt: b.add_generation_prompt },
    }
  }
  const b = parse(TokenizeCompletion, body)
  return {
    model: b.model,
    asked: { op: 'tokenize', prompt: b.prompt, addSpecialTokens: b.add_special_tokens },
  }
}

tokenizer.post('/tokenize', async (c) => {
  const { model, asked } = tokenizeOpOf(await jsonBody(c))
  const { result } = await askWorker(c, model, asked)
  if (!result.ok || !result.tokens) throw new MoeError('internal_error', 'The worker sent no tokens')
  return c.json({ count: result.tokens.length, max_model_len: result.maxModelLen, tokens: result.tokens })
})

tokenizer.post('/detokenize', async (c) => {
  const b = parse(Detokenize, await jsonBody(c))
  const { result } = await askWorker(c, b.model, { op: 'detokenize', tokens: b.tokens })
  if (!result.ok || result.prompt === undefined)
    throw new MoeError('internal_error', 'The worker sent no text')
  return c.json({ prompt: result.prompt })
})
