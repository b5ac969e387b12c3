import { type DoneEvent, structuredPlan, type TenantConfig } from '@moe/shared'
import { Hono } from 'hono'
import { sha256Hex } from '../auth.ts'
import {
  type CachedAnswer,
  cacheGet,
  cacheKey,
  cacheModeOf,
  cachePut,
  canonicalRequest,
  isDeterministic,
  stableStringify,
} from '../cache.ts'
import {
  type AppEnv,
  admissionOf,
  type Ctx,
  EdgeError,
  jsonBody,
  limitBody,
  log,
  requireJson,
} from '../http.ts'
import { openReader } from '../job-events.ts'
import { tenantAuth } from '../middleware/tenant-auth/index.ts'
import { completionId, completionObject, type MoeSummary, moeSummary } from '../openai-format.ts'
import type { AdmitRequest, JobMeta } from '../tenant-admission.ts'
import { readToolCalls, toolReading } from '../tool-calls.ts'
import { type Endpoint, validateBody } from '../validate.ts'
import { awaitAnswer, type LiveJob, relaySse, replaySse, type SseFrame } from './relay.ts'
import {
  classifyRequest,
  effectiveSampling,
  jobPayload,
  type Routed,
  routeRequest,
  tokenCostOf,
} from './submit.ts'

// POST /v1/chat/completions and /v1/completions (live, streamed or not, or asynchronous with
// `Prefer: respond-async`), and POST /v1/route, the router's dry run.

/** A job submitted asynchronously is worth running for this long. */
const ASYNC_DEADLINE_MS = 3_600_000

export const completions = new Hono<AppEnv>()

for (const path of ['/route', '/chat/completions', '/completions'] as const) {
  completions.use(path, tenantAuth({ keys: (c) => c.env.AUTH }))
  completions.on(['POST', 'PUT', 'PATCH'], path, requireJson, limitBody)
}

/** Routes a request body and says how in the x-moe-* headers and the access log. */
function routeLive(c: Ctx, tenant: TenantConfig, endpoint: Endpoint, body: unknown): Routed {
  const req = validateBody(endpoint, body)
  const classified = classifyRequest(tenant, req, c.req.header('x-moe-task'))
  c.header('x-moe-task', classified.task.task)
  c.header('x-moe-modality', classified.modality)
  const r = routeRequest(tenant, endpoint, req, classified)
  c.header('x-moe-pool', r.pool.name)
  Object.assign(c.get('logFields'), {
    pool: r.pool.name,
    task: r.task.task,
    modality: r.modality,
    via: r.via,
  })
  return r
}

/** Dry run of the router: what would happen, without enqueuing. */
completions.post('/route', async (c) => {
  const body = (await jsonBody(c)) as Record<string, unknown>
  const withModel =
    typeof body === 'object' && body !== null && !Array.isArray(body) ? { model: 'auto', ...body } : body
  const endpoint: Endpoint =
    typeof withModel === 'object' && withModel && 'prompt' in withModel ? 'completion' : 'chat'
  const r = routeLive(c, c.get('principal').tenant, endpoint, withModel)
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

export async function handleCompletion(
  c: Ctx,
  endpoint: Endpoint,
  body: unknown,
  asyncMode: boolean,
): Promise<Response> {
  const tenant = c.get('principal').tenant
  const r = routeLive(c, tenant, endpoint, body)
  const sampling = effectiveSampling(r)
  const stream = !asyncMode && r.req.stream === true
  const requestId = c.get('requestId')
  const frame: SseFrame = {
    endpoint,
    id: completionId(endpoint, requestId),
    created: Math.floor(Date.now() / 1000),
    model: r.pool.modelId,
    includeUsage: stream && r.req.stream_options?.include_usage === true,
    tools: 'messages' in r.req ? toolReading(structuredPlan(r.req), requestId) : undefined,
  }
  const withCalls = <T extends { text: string }>(answer: T): T => {
    const toolCalls = frame.tools ? readToolCalls(answer.text, frame.tools) : null
    return toolCalls ? { ...answer, toolCalls } : answer
  }

  // Cache: deterministic requests only, keyed per tenant.
  const mode = cacheModeOf(c.req.header('cache-control'))
  const cacheable = !asyncMode && isDeterministic(sampling) && tenant.cacheTtlSeconds > 0
  const key = cacheable
    ? await cacheKey(tenant.id, r.pool.name, r.pool.modelId, canonicalRequest(endpoint, r.req, sampling))
    : null
  const cacheState: MoeSummary['cache'] = key && mode === 'use' ? 'MISS' : 'BYPASS'
  c.header('x-moe-cache', cacheState)
  c.get('logFields').cache = cacheState
  const admission = admissionOf(c.env, tenant.id)
  if (key && mode === 'use') {
    const hit = await cacheGet(c.env.RESPONSE_CACHE, key)
    if (hit) {
      // An answer from the cache is still a request: it counts against the request rate.
      const charged = await admission.chargeRequest(tenant.id, tenant.rateLimits)
      if (!charged.ok)
        throw new EdgeError('rate_limited', charged.message, null, {
          'retry-after': String(charged.retryAfterSeconds),
        })
      c.header('x-moe-cache', 'HIT')
      c.get('logFields').cache = 'HIT'
      const moe = { ...(hit.moe as unknown as MoeSummary), request_id: requestId, cache: 'HIT' as const }
      if (stream) return replaySse(c, frame, hit, moe)
      return c.json(completionObject(endpoint, frame.id, frame.created, frame.model, withCalls(hit), moe))
    }
  }

  // Admission: rate limits, backpressure, enqueue - one RPC to the tenant's Durable Object.
  const idem = c.req.header('idempotency-key')
  const jobId = idem ? `idem_${(await sha256Hex(`${tenant.id}\u0000${idem}`)).slice(0, 40)}` : requestId
  const now = Date.now()
  const deadline = now + (asyncMode ? ASYNC_DEADLINE_MS : c.get('config').liveTimeoutMs)
  const payload = jobPayload(
    jobId,
    tenant.id,
    { ...r, sampling },
    now,
    deadline,
    asyncMode ? 'async' : 'live',
    // An async job's result is read from its final event: nobody reads its tokens.
    !asyncMode,
  )
  const meta: JobMeta = {
    tenantId: tenant.id,
    pool: r.pool.name,
    model: r.pool.modelId,
    endpoint,
    createdAt: now,
    async: asyncMode,
    // What an Idempotency-Key is bound to: the request as validated, and how it was asked for.
    bodyHash: idem ? await sha256Hex(stableStringify({ endpoint, asyncMode, req: r.req })) : undefined,
    // An async job's result is read later from this record: what reading it as tool calls needs.
    ...(asyncMode && frame.tools
      ? {
          tools: {
            mode: frame.tools.mode,
            idBase: frame.tools.idBase,
            names: frame.tools.tools.map((t) => t.name),
          },
        }
      : {}),
  }
  const admit: AdmitRequest = {
    payload,
    meta,
    limits: tenant.rateLimits,
    tokenCost: tokenCostOf(r.req, sampling),
    maxQueueDepth: r.pool.maxQueueDepth,
    tenantQueueDepth: Math.max(1, Math.floor(r.pool.maxQueueDepth * tenant.queueShare)),
    idempotent: idem !== undefined,
    maxLiveStreams: asyncMode ? null : tenant.maxLiveStreams,
  }
  const admitStart = Date.now()
  const admitted = await admission.admit(admit)
  c.get('logFields').admission_ms = Date.now() - admitStart
  if (!admitted.ok) {
    throw new EdgeError(
      admitted.code,
      admitted.message,
      null,
      admitted.retryAfterSeconds > 0 ? { 'retry-after': String(admitted.retryAfterSeconds) } : {},
    )
  }
  c.get('logFields').job = jobId

  if (asyncMode) {
    c.header('location', `/v1/jobs/${jobId}`)
    return c.json(
      {
        id: jobId,
        object: 'job',
        status: 'queued',
        created_at: Math.floor(meta.createdAt / 1000),
        endpoint: endpoint === 'chat' ? '/v1/chat/completions' : '/v1/completions',
        model: r.pool.modelId,
        moe: moeSummary(requestId, r, 'BYPASS'),
      },
      202,
    )
  }

  // The reader's connection is opened only once admitted: the live-stream cap bounds them.
  const reader = openReader(c.get('config'))
  const { lease, existing } = admitted
  const charged = admitted.window
  const job: LiveJob = {
    jobId,
    deadline,
    reader,
    released: () => {
      if (lease) c.executionCtx.waitUntil(admission.releaseStream(tenant.id, lease).catch(() => {}))
    },
    summary: (done) => moeSummary(requestId, r, cacheState, done),
    finished: (done: DoneEvent) => {
      // The answer is delivered: what Redis keeps of the job shrinks (tenant-admission.ts).
      c.executionCtx.waitUntil(admission.retainDelivered(jobId, idem !== undefined).catch(() => {}))
      if (charged !== undefined) {
        const used = done.usage.promptTokens + done.usage.completionTokens
        c.executionCtx.waitUntil(
          admission.settleTokens(tenant.id, charged, used - admit.tokenCost).catch(() => {}),
        )
      }
      // A replay's answer was cached (or not) by the request that ran the job.
      if (!key || mode === 'off' || existing || done.finishReason === 'cancelled') return
      const answer: CachedAnswer = {
        v: 1,
        text: done.text,
        finishReason: done.finishReason,
        usage: done.usage,
        ...(done.choices ? { choices: done.choices } : {}),
        requestId,
        createdAt: Date.now(),
        expiresAt: Date.now() + tenant.cacheTtlSeconds * 1000,
        moe: moeSummary(requestId, r, 'MISS', done) as unknown as Record<string, unknown>,
      }
      c.executionCtx.waitUntil(
        cachePut(c.env.RESPONSE_CACHE, key, answer, tenant.cacheTtlSeconds).catch(() => {}),
      )
    },
    cancel: (why) => {
      // A request with an Idempotency-Key will be retried under the same job: a disconnect must
      // not cancel the work the retry is coming back for. Deadlines still cancel.
      if (idem && why === 'client disconnected') return
      log('info', 'cancel', { request_id: requestId, job: jobId, why })
      c.executionCtx.waitUntil(admission.cancel(jobId).catch(() => {}))
    },
  }
  if (stream) return relaySse(c, frame, job)
  const done = await awaitAnswer(c, job)
  return c.json(
    completionObject(endpoint, frame.id, frame.created, frame.model, withCalls(done), job.summary(done)),
  )
}

const preferAsync = (c: Ctx): boolean =>
  /(^|[\s,;])respond-async($|[\s,;])/i.test(c.req.header('prefer') ?? '')

completions.post('/chat/completions', async (c) =>
  handleCompletion(c, 'chat', await jsonBody(c), preferAsync(c)),
)
completions.post('/completions', async (c) =>
  handleCompletion(c, 'completion', await jsonBody(c), preferAsync(c)),
)
