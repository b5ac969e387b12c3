import {
  type ChatCompletionRequest,
  type CompletionRequest,
  type DoneEvent,
  type JobInput,
  type JobPayload,
  MoeError,
  type StreamEvent,
  seedFromJobId,
  type TenantConfig,
} from '@moe/shared'
import { Hono } from 'hono'
import { streamSSE } from 'hono/streaming'
import { sha256Hex } from './auth.ts'
import {
  type CachedAnswer,
  cacheGet,
  cacheKey,
  cacheModeOf,
  cachePut,
  canonicalRequest,
  type EffectiveSampling,
  isDeterministic,
} from './cache.ts'
import {
  type AppEnv,
  admissionOf,
  type Ctx,
  EdgeError,
  jsonBody,
  limitBody,
  log,
  requireJson,
} from './http.ts'
import { closeReader, jobEvents, openReader } from './job-events.ts'
import { tenantAuth } from './middleware/tenant-auth/index.ts'
import {
  type Answer,
  chunkObject,
  completionId,
  completionObject,
  expertLoadSummary,
  type MoeSummary,
  usageChunk,
} from './openai-format.ts'
import { POOLS } from './pools.ts'
import { choosePool, decideTask, modalitiesOf, routerFor } from './router/index.ts'
import type { AdmitRequest, JobMeta, JobStatus } from './tenant-admission.ts'
import { type Endpoint, requestedMaxTokens, validateBody } from './validate.ts'

/** max_tokens when the request sets none (capped by the pool's limit). */
export const DEFAULT_MAX_TOKENS = 256
/** A job submitted asynchronously is worth running for this long. */
const ASYNC_DEADLINE_MS = 3_600_000

export const api = new Hono<AppEnv>()

/** Bearer key -> tenant, or 401 (on the API's routes only: an unknown path stays a 404). */
const API_PATHS = ['/models', '/route', '/chat/completions', '/completions', '/jobs', '/jobs/*'] as const
for (const path of API_PATHS) {
  api.use(path, tenantAuth({ keys: (c) => c.env.AUTH }))
  api.on(['POST', 'PUT', 'PATCH'], path, requireJson, limitBody)
}

// ---------------------------------------------------------------- models

api.get('/models', (c) => {
  const tenant = c.get('principal').tenant
  const data: Record<string, unknown>[] = [
    { id: 'auto', object: 'model', created: 0, owned_by: 'moe-edge', moe: { kind: 'router' } },
  ]
  for (const name of tenant.allowedPools) {
    const p = POOLS.get(name)
    if (!p) continue
    const moe = { pool: p.name, modalities: p.modalities, experts: p.experts, max_tokens: p.maxTokensLimit }
    data.push({
      id: p.modelId,
      object: 'model',
      created: 0,
      owned_by: 'moe-edge',
      moe: { kind: 'model', ...moe },
    })
    data.push({
      id: p.name,
      object: 'model',
      created: 0,
      owned_by: 'moe-edge',
      moe: { kind: 'pool', ...moe },
    })
  }
  return c.json({ object: 'list', data })
})

// ---------------------------------------------------------------- routing

export interface Routed {
  endpoint: Endpoint
  req: ChatCompletionRequest | CompletionRequest
  task: ReturnType<typeof decideTask>
  modality: string
  pool: NonNullable<ReturnType<typeof POOLS.get>>
  via: string
}

function route(c: Ctx, tenant: TenantConfig, endpoint: Endpoint, body: unknown): Routed {
  const req = validateBody(endpoint, body)
  const messages = 'messages' in req ? req.messages : undefined
  const prompt = 'prompt' in req ? req.prompt : undefined
  const taskHint = c.req.header('x-moe-task') ?? req.metadata?.task
  const router = routerFor(tenant)
  const task = decideTask(router, { messages, prompt, taskHint })
  const { modality, required } = modalitiesOf({ messages })
  c.header('x-moe-task', task.task)
  c.header('x-moe-modality', modality)
  const { pool, via } = choosePool(tenant, POOLS, req.model, task.task, modality, required)
  c.header('x-moe-pool', pool.name)
  Object.assign(c.get('logFields'), { pool: pool.name, task: task.task, modality })
  return { endpoint, req, task, modality, pool, via }
}

/** Dry run of the router: what would happen, without enqueuing. */
api.post('/route', async (c) => {
  const body = (await jsonBody(c)) as Record<string, unknown>
  const withModel =
    typeof body === 'object' && body !== null && !Array.isArray(body) ? { model: 'auto', ...body } : body
  const endpoint: Endpoint =
    typeof withModel === 'object' && withModel && 'prompt' in withModel ? 'completion' : 'chat'
  const r = route(c, c.get('principal').tenant, endpoint, withModel)
  c.header('x-moe-cache', 'BYPASS')
  return c.json({
    object: 'route',
    task: r.task.task,
    task_source: r.task.source,
    confidence: r.task.confidence,
    modality: r.modality,
    pool: r.pool.name,
    model: r.pool.modelId,
    pool_via: r.via,
    scores: r.task.scores,
  })
})

// ---------------------------------------------------------------- completions

export function effectiveSampling(r: Pick<Routed, 'req' | 'pool'>): EffectiveSampling {
  const requested = requestedMaxTokens(r.req)
  if (requested !== null && requested > r.pool.maxTokensLimit) {
    throw new MoeError(
      'max_tokens_exceeded',
      `max_tokens is too large: ${requested}. The model '${r.pool.modelId}' supports at most ${r.pool.maxTokensLimit} completion tokens.`,
      'max_tokens',
    )
  }
  const stop = r.req.stop == null ? [] : typeof r.req.stop === 'string' ? [r.req.stop] : r.req.stop
  return {
    maxTokens: requested ?? Math.min(DEFAULT_MAX_TOKENS, r.pool.maxTokensLimit),
    temperature: r.req.temperature ?? 1,
    topP: r.req.top_p ?? 1,
    topK: r.req.top_k ?? 0,
    seed: r.req.seed ?? null,
    stop,
  }
}

/** Rough prompt size for the tokens-per-minute budget (a byte-level tokenizer's upper bound / 4). */
export function promptTokenEstimate(req: ChatCompletionRequest | CompletionRequest): number {
  if ('prompt' in req)
    return typeof req.prompt === 'string' ? Math.ceil(req.prompt.length / 4) : req.prompt.length
  let chars = 0
  for (const m of req.messages) {
    chars += 16
    if (typeof m.content === 'string') chars += m.content.length
    else for (const p of m.content) chars += p.type === 'text' ? p.text.length : 256
  }
  return Math.ceil(chars / 4)
}

export const inputOf = (req: ChatCompletionRequest | CompletionRequest): JobInput =>
  'messages' in req
    ? { kind: 'chat', messages: req.messages }
    : typeof req.prompt === 'string'
      ? { kind: 'text', prompt: req.prompt }
      : { kind: 'tokens', inputIds: req.prompt }

function moeSummary(c: Ctx, r: Routed, cache: MoeSummary['cache'], done?: DoneEvent): MoeSummary {
  const m: MoeSummary = {
    request_id: c.get('requestId'),
    pool: r.pool.name,
    task: r.task.task,
    modality: r.modality,
    cache,
  }
  if (done) {
    m.seed = done.seed
    m.expert_load = expertLoadSummary(done.routing)
    m.allowed_experts = done.routing.allowedExperts
    m.timings = done.timings
  }
  return m
}

async function handleCompletion(
  c: Ctx,
  endpoint: Endpoint,
  body: unknown,
  asyncMode: boolean,
): Promise<Response> {
  const principal = c.get('principal')
  const tenant = principal.tenant
  const r = route(c, tenant, endpoint, body)
  const sampling = effectiveSampling(r)
  const stream = !asyncMode && r.req.stream === true
  const includeUsage = stream && r.req.stream_options?.include_usage === true
  const created = Math.floor(Date.now() / 1000)
  const requestId = c.get('requestId')

  // Cache: deterministic requests only, keyed per tenant.
  const mode = cacheModeOf(c.req.header('cache-control'))
  const cacheable = !asyncMode && isDeterministic(sampling) && tenant.cacheTtlSeconds > 0
  const key = cacheable
    ? await cacheKey(tenant.id, r.pool.name, r.pool.modelId, canonicalRequest(endpoint, r.req, sampling))
    : null
  const cacheState: MoeSummary['cache'] = key && mode === 'use' ? 'MISS' : 'BYPASS'
  c.header('x-moe-cache', cacheState)
  c.get('logFields').cache = cacheState
  if (key && mode === 'use') {
    const hit = await cacheGet(c.env.RESPONSE_CACHE, key)
    if (hit) {
      c.header('x-moe-cache', 'HIT')
      c.get('logFields').cache = 'HIT'
      const moe = { ...(hit.moe as unknown as MoeSummary), request_id: requestId, cache: 'HIT' as const }
      const id = completionId(endpoint, requestId)
      if (stream) return replaySse(c, endpoint, id, created, r.pool.modelId, hit, moe, includeUsage)
      return c.json(completionObject(endpoint, id, created, r.pool.modelId, hit, moe))
    }
  }

  // Admission: rate limits, backpressure, enqueue - one RPC to the tenant's Durable Object.
  const idem = c.req.header('idempotency-key')
  const jobId = idem ? `idem_${(await sha256Hex(`${tenant.id}\u0000${idem}`)).slice(0, 40)}` : requestId
  const now = Date.now()
  const payload: JobPayload = {
    version: 1,
    requestId: jobId,
    tenantId: tenant.id,
    pool: r.pool.name,
    model: r.pool.modelId,
    input: inputOf(r.req),
    sampling: { ...sampling, seed: sampling.seed ?? seedFromJobId(jobId) },
    deadline: now + (asyncMode ? ASYNC_DEADLINE_MS : c.get('config').liveTimeoutMs),
    createdAt: now,
    priority: asyncMode ? 'batch' : 'live',
  }
  const meta: JobMeta = {
    tenantId: tenant.id,
    pool: r.pool.name,
    model: r.pool.modelId,
    endpoint,
    createdAt: now,
    async: asyncMode,
  }
  const admit: AdmitRequest = {
    payload,
    meta,
    limits: tenant.rateLimits,
    tokenCost: promptTokenEstimate(r.req) + sampling.maxTokens,
    maxQueueDepth: r.pool.maxQueueDepth,
    idempotent: idem !== undefined,
  }
  const reader = asyncMode ? null : openReader(c.get('config').redisUrl)
  const gw = admissionOf(c.env, tenant.id)
  let admitted: Awaited<ReturnType<typeof gw.admit>>
  try {
    admitted = await gw.admit(admit)
  } catch (e) {
    if (reader) closeReader(reader)
    throw e
  }
  if (!admitted.ok) {
    if (reader) closeReader(reader)
    throw new EdgeError(admitted.code, admitted.message, null, {
      'retry-after': String(admitted.retryAfterSeconds),
    })
  }
  c.get('logFields').job = jobId

  if (asyncMode || !reader) {
    c.header('location', `/v1/jobs/${jobId}`)
    return c.json(
      {
        id: jobId,
        object: 'job',
        status: 'queued',
        created_at: Math.floor(meta.createdAt / 1000),
        endpoint: endpoint === 'chat' ? '/v1/chat/completions' : '/v1/completions',
        model: r.pool.modelId,
        moe: moeSummary(c, r, 'BYPASS'),
      },
      202,
    )
  }

  const id = completionId(endpoint, requestId)
  const deadline = payload.deadline
  const store = (done: DoneEvent) => {
    const charged = admitted.ok ? admitted.window : undefined
    if (charged !== undefined) {
      const used = done.usage.promptTokens + done.usage.completionTokens
      c.executionCtx.waitUntil(gw.settleTokens(tenant.id, charged, used - admit.tokenCost).catch(() => {}))
    }
    if (!key || mode === 'off' || done.finishReason === 'cancelled') return
    const answer: CachedAnswer = {
      v: 1,
      text: done.text,
      finishReason: done.finishReason,
      usage: done.usage,
      requestId,
      createdAt: Date.now(),
      expiresAt: Date.now() + tenant.cacheTtlSeconds * 1000,
      moe: moeSummary(c, r, 'MISS', done) as unknown as Record<string, unknown>,
    }
    c.executionCtx.waitUntil(
      cachePut(c.env.RESPONSE_CACHE, key, answer, tenant.cacheTtlSeconds).catch(() => {}),
    )
  }
  const cancel = (why: string) => {
    // A request with an Idempotency-Key will be retried under the same job: a disconnect must
    // not cancel the work the retry is coming back for. Deadlines still cancel.
    if (idem && why === 'client disconnected') return
    log('info', 'cancel', { request_id: requestId, job: jobId, why })
    c.executionCtx.waitUntil(gw.cancel(jobId).catch(() => {}))
  }

  if (stream) {
    return streamSSE(c, async (sse) => {
      let finished = false
      let started = false
      sse.onAbort(() => {
        if (!finished) cancel('client disconnected')
        closeReader(reader)
      })
      // workerd reports a client that went away through request.signal (enable_request_signal).
      c.req.raw.signal?.addEventListener('abort', () => sse.abort())
      // Flush the headers now: a comment line, which SSE clients ignore. Keep-alive comments while
      // the job waits also let a disconnect surface (a write to a closed client cancels the stream).
      await sse.write(': queued\n\n')
      const keepAlive = setInterval(() => {
        if (!started && !sse.aborted) void sse.write(': waiting\n\n')
      }, 1000)
      sse.onAbort(() => clearInterval(keepAlive))
      const chunk = (delta: Parameters<typeof chunkObject>[4]) =>
        sse.writeSSE({
          data: JSON.stringify(chunkObject(endpoint, id, created, r.pool.modelId, delta, includeUsage)),
        })
      try {
        for await (const ev of jobEvents(reader, jobId, deadline)) {
          if (sse.aborted) break
          if (!started) {
            started = true
            await chunk({ role: 'assistant', text: '' })
          }
          if (ev.type === 'token') {
            // The detokeniser may hold text back (a partial UTF-8 sequence): OpenAI sends no empty deltas.
            if (ev.text === '') continue
            await chunk({ text: ev.text })
          } else if (ev.type === 'done') {
            finished = true
            await chunk({ finishReason: ev.finishReason })
            if (includeUsage) {
              await sse.writeSSE({
                data: JSON.stringify(
                  usageChunk(
                    endpoint,
                    id,
                    created,
                    r.pool.modelId,
                    ev.usage,
                    moeSummary(c, r, cacheState, ev),
                  ),
                ),
              })
            }
            await sse.writeSSE({ data: '[DONE]' })
            store(ev)
          } else {
            finished = true
            await sse.writeSSE({ data: JSON.stringify(new MoeError(ev.code, ev.message).toBody()) })
          }
        }
      } catch (e) {
        if (!sse.aborted) {
          finished = true
          const err = e instanceof MoeError ? e : new MoeError('internal_error', 'The job stream failed')
          if (err.code === 'deadline_exceeded') cancel('deadline')
          await sse.writeSSE({ data: JSON.stringify(err.toBody()) })
        }
      } finally {
        clearInterval(keepAlive)
        closeReader(reader)
      }
    })
  }

  // Non-streaming: wait for the job's final event.
  const onAbort = () => {
    cancel('client disconnected')
    closeReader(reader)
  }
  c.req.raw.signal?.addEventListener('abort', onAbort)
  let final: StreamEvent | null = null
  try {
    for await (const ev of jobEvents(reader, jobId, deadline)) if (ev.type !== 'token') final = ev
  } catch (e) {
    if (e instanceof MoeError && e.code === 'deadline_exceeded') cancel('deadline')
    throw e
  } finally {
    c.req.raw.signal?.removeEventListener('abort', onAbort)
    closeReader(reader)
  }
  if (!final) throw new MoeError('internal_error', 'The job ended without a result')
  if (final.type === 'error') throw new MoeError(final.code, final.message)
  if (final.type !== 'done') throw new MoeError('internal_error', 'Unexpected job event')
  store(final)
  return c.json(
    completionObject(endpoint, id, created, r.pool.modelId, final, moeSummary(c, r, cacheState, final)),
  )
}

function replaySse(
  c: Ctx,
  endpoint: Endpoint,
  id: string,
  created: number,
  model: string,
  hit: Answer,
  moe: MoeSummary,
  includeUsage: boolean,
): Response {
  return streamSSE(c, async (sse) => {
    const chunk = (part: Parameters<typeof chunkObject>[4]) =>
      sse.writeSSE({ data: JSON.stringify(chunkObject(endpoint, id, created, model, part, includeUsage)) })
    await chunk({ role: 'assistant', text: '' })
    if (hit.text !== '') await chunk({ text: hit.text })
    await chunk({ finishReason: hit.finishReason })
    if (includeUsage)
      await sse.writeSSE({ data: JSON.stringify(usageChunk(endpoint, id, created, model, hit.usage, moe)) })
    await sse.writeSSE({ data: '[DONE]' })
  })
}

const preferAsync = (c: Ctx): boolean =>
  /(^|[\s,;])respond-async($|[\s,;])/i.test(c.req.header('prefer') ?? '')

api.post('/chat/completions', async (c) => handleCompletion(c, 'chat', await jsonBody(c), preferAsync(c)))
api.post('/completions', async (c) => handleCompletion(c, 'completion', await jsonBody(c), preferAsync(c)))

// ---------------------------------------------------------------- async jobs

/** Submit a job: `{ "endpoint": "/v1/chat/completions" | "/v1/completions", "body": {...} }` -> 202. */
api.post('/jobs', async (c) => {
  const env = (await jsonBody(c)) as { endpoint?: unknown; body?: unknown } | null
  const ep = env?.endpoint
  if (ep !== '/v1/chat/completions' && ep !== '/v1/completions') {
    throw new MoeError(
      'invalid_request',
      "endpoint must be '/v1/chat/completions' or '/v1/completions'",
      'endpoint',
    )
  }
  return handleCompletion(c, ep === '/v1/chat/completions' ? 'chat' : 'completion', env?.body, true)
})

function jobObject(jobId: string, s: JobStatus): Record<string, unknown> {
  const out: Record<string, unknown> = {
    id: jobId,
    object: 'job',
    status: s.state,
    created_at: Math.floor(s.meta.createdAt / 1000),
    endpoint: s.meta.endpoint === 'chat' ? '/v1/chat/completions' : '/v1/completions',
    model: s.meta.model,
    moe: { pool: s.meta.pool, queue_state: s.bullState },
  }
  if (s.final?.type === 'done') {
    const done = s.final
    out.result = completionObject(
      s.meta.endpoint,
      completionId(s.meta.endpoint, jobId),
      Math.floor(s.meta.createdAt / 1000),
      s.meta.model,
      done,
      {
        request_id: jobId,
        pool: s.meta.pool,
        task: '',
        modality: '',
        cache: 'BYPASS',
        seed: done.seed,
        expert_load: expertLoadSummary(done.routing),
        allowed_experts: done.routing.allowedExperts,
        timings: done.timings,
      },
    )
  } else if (s.final?.type === 'error') {
    out.error = new MoeError(s.final.code, s.final.message).toBody().error
  } else if (s.failure) {
    out.error = new MoeError(s.failure.code, s.failure.message).toBody().error
  }
  return out
}

const JOB_ID = /^[A-Za-z0-9_-]{1,128}$/

api.get('/jobs/:id', async (c) => {
  const jobId = c.req.param('id')
  const tenant = c.get('principal').tenant
  const s = JOB_ID.test(jobId) ? await admissionOf(c.env, tenant.id).jobStatus(jobId, tenant.id) : null
  if (!s) throw new MoeError('not_found', `No job '${jobId}'`)
  return c.json(jobObject(jobId, s))
})

/** Cancel a job: the worker drops it before it starts or at its next step. */
api.delete('/jobs/:id', async (c) => {
  const jobId = c.req.param('id')
  const tenant = c.get('principal').tenant
  const gw = admissionOf(c.env, tenant.id)
  const s = JOB_ID.test(jobId) ? await gw.jobStatus(jobId, tenant.id) : null
  if (!s) throw new MoeError('not_found', `No job '${jobId}'`)
  if (s.state === 'queued' || s.state === 'running') await gw.cancel(jobId)
  return c.json({
    id: jobId,
    object: 'job',
    status: s.state === 'queued' || s.state === 'running' ? 'cancelling' : s.state,
  })
})
