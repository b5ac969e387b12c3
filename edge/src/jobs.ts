import { MoeError } from '@moe/shared'
import { Hono } from 'hono'
import { handleCompletion } from './completions/index.ts'
import { jobError } from './completions/relay.ts'
import { type AppEnv, admissionOf, jsonBody, limitBody, requireJson } from './http.ts'
import { tenantAuth } from './middleware/tenant-auth/index.ts'
import { completionId, completionObject, doneSummary } from './openai-format.ts'
import type { JobStatus } from './tenant-admission.ts'
import { readToolCalls } from './tool-calls.ts'

// Asynchronous jobs: submit one, read its status and result, cancel it.

export const jobs = new Hono<AppEnv>()

for (const path of ['/jobs', '/jobs/*'] as const) {
  jobs.use(path, tenantAuth({ keys: (c) => c.env.AUTH }))
  jobs.on(['POST', 'PUT', 'PATCH'], path, requireJson, limitBody)
}

/** Submit a job: `{ "endpoint": "/v1/chat/completions" | "/v1/completions", "body": {...} }` -> 202. */
jobs.post('/jobs', async (c) => {
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
    const t = s.meta.tools
    const toolCalls = t ? readToolCalls(done.text, { ...t, tools: t.names.map((name) => ({ name })) }) : null
    out.result = completionObject(
      s.meta.endpoint,
      completionId(s.meta.endpoint, jobId),
      Math.floor(s.meta.createdAt / 1000),
      s.meta.model,
      toolCalls ? { ...done, toolCalls } : done,
      { request_id: jobId, pool: s.meta.pool, task: '', modality: '', cache: 'BYPASS', ...doneSummary(done) },
    )
  } else if (s.final?.type === 'error') {
    out.error = jobError(jobId, s.final).toBody().error
  } else if (s.failure) {
    out.error = jobError(jobId, s.failure).toBody().error
  }
  return out
}

const JOB_ID = /^[A-Za-z0-9_-]{1,128}$/

jobs.get('/jobs/:id', async (c) => {
  const jobId = c.req.param('id')
  const tenant = c.get('principal').tenant
  const s = JOB_ID.test(jobId) ? await admissionOf(c.env, tenant.id).jobStatus(jobId, tenant.id) : null
  if (!s) throw new MoeError('not_found', `No job '${jobId}'`)
  return c.json(jobObject(jobId, s))
})

/** Cancel a job: the worker drops it before it starts or at its next step. */
jobs.delete('/jobs/:id', async (c) => {
  const jobId = c.req.param('id')
  const tenant = c.get('principal').tenant
  const admission = admissionOf(c.env, tenant.id)
  const s = JOB_ID.test(jobId) ? await admission.jobStatus(jobId, tenant.id) : null
  if (!s) throw new MoeError('not_found', `No job '${jobId}'`)
  if (s.state === 'queued' || s.state === 'running') await admission.cancel(jobId)
  return c.json({
    id: jobId,
    object: 'job',
    status: s.state === 'queued' || s.state === 'running' ? 'cancelling' : s.state,
  })
})
