import { BATCH_ENDPOINTS, type BatchEndpoint, type BatchLine, type BatchStatic, MoeError } from '@moe/shared'
import { Hono } from 'hono'
import { randomBase62 } from '../auth.ts'
import { jobPayload, tokenCostOf } from '../completions/submit.ts'
import { type AppEnv, admissionOf, type Ctx, jsonBody, limitBody, requireJson } from '../http.ts'
import { tenantAuth } from '../middleware/tenant-auth/index.ts'
import { findFile } from './files.ts'
import { bad, validateBatchFile } from './input-file.ts'

// OpenAI-compatible Batches API. Creating a batch reads its input file, routes every line like a
// live request and fans out one child job per line (the job payload holds the request) in a
// BullMQ flow, through the tenant's Durable Object (see batch-store.ts).

export const batches = new Hono<AppEnv>()

for (const path of ['/batches', '/batches/*', '/webhooks/*'] as const) {
  batches.use(path, tenantAuth({ keys: (c) => c.env.AUTH }))
}
batches.post('/batches', requireJson, limitBody)

const BATCH_ID = /^batch_[A-Za-z0-9]{1,64}$/
const WINDOW_MS: Record<string, number> = { '24h': 86_400_000 }

const pageLimit = (limit: string | undefined): number => Math.min(100, Math.max(1, Number(limit ?? 20) || 20))

batches.post('/batches', async (c) => {
  const tenant = c.get('principal').tenant
  const body = (await jsonBody(c)) as Record<string, unknown> | null
  if (typeof body !== 'object' || body === null || Array.isArray(body))
    throw bad('The body must be a JSON object')
  const { input_file_id: fileId, endpoint, completion_window: window, metadata } = body
  if (typeof fileId !== 'string') throw bad('input_file_id is required', 'input_file_id')
  if (!BATCH_ENDPOINTS.includes(endpoint as BatchEndpoint))
    throw bad(`endpoint must be one of ${BATCH_ENDPOINTS.join(', ')}`, 'endpoint')
  if (typeof window !== 'string' || WINDOW_MS[window] === undefined)
    throw bad(`completion_window must be one of ${Object.keys(WINDOW_MS).join(', ')}`, 'completion_window')
  let meta: Record<string, string> | null = null
  if (metadata !== undefined && metadata !== null) {
    const entries = typeof metadata === 'object' && !Array.isArray(metadata) ? Object.entries(metadata) : null
    if (
      !entries ||
      entries.length > 16 ||
      entries.some(([k, v]) => k.length > 64 || typeof v !== 'string' || v.length > 512)
    )
      throw bad(
        'metadata must be at most 16 string pairs (keys up to 64, values up to 512 characters)',
        'metadata',
      )
    meta = Object.fromEntries(entries as [string, string][])
  }
  const f = await findFile(c.env, tenant.id, fileId, true)
  if (f?.file.purpose !== 'batch')
    throw new MoeError('not_found', `No such File object: ${fileId}`, 'input_file_id')
  // The tenant's config may have changed since the upload: validate and route again.
  const lines = validateBatchFile(f.content ?? '', tenant, c.get('config'))
  for (const l of lines) {
    if (l.url !== endpoint)
      throw bad(
        `Line ${l.line}: url '${l.url}' does not match the batch endpoint '${endpoint}'`,
        'input_file_id',
      )
  }
  const batchId = `batch_${randomBase62(24)}`
  const now = Date.now()
  const windowMs = WINDOW_MS[window]!
  const children = lines.map((l, i) =>
    jobPayload(`${batchId}-${i}`, tenant.id, l, now, now + windowMs, 'batch', false),
  )
  const parentLines: BatchLine[] = lines.map((l, i) => ({
    c: l.customId,
    j: `${batchId}-${i}`,
    m: l.pool.modelId,
  }))
  const created = Math.floor(now / 1000)
  const stat: BatchStatic = {
    id: batchId,
    tenantId: tenant.id,
    endpoint: endpoint as BatchEndpoint,
    input_file_id: fileId,
    completion_window: window,
    created_at: created,
    expires_at: created + windowMs / 1000,
    metadata: meta,
    total: lines.length,
  }
  const batch = await admissionOf(c.env, tenant.id).createBatch({
    static: stat,
    parent: { batchId, tenantId: tenant.id, endpoint: endpoint as BatchEndpoint, lines: parentLines },
    children,
    windowMs,
    tokens: lines.reduce((sum, l) => sum + tokenCostOf(l.req, l.sampling), 0),
    queueTokenLimit: tenant.batchQueueTokens,
  })
  c.get('logFields').batch = batchId
  return c.json(batch)
})

batches.get('/batches', async (c) => {
  const tenant = c.get('principal').tenant
  const after = c.req.query('after') ?? null
  const page = await admissionOf(c.env, tenant.id).listBatches(
    tenant.id,
    after,
    pageLimit(c.req.query('limit')),
  )
  return c.json({
    object: 'list',
    data: page.data,
    first_id: page.data[0]?.id ?? null,
    last_id: page.data.at(-1)?.id ?? null,
    has_more: page.has_more,
  })
})

/** One of the tenant's batches by id, read or cancelled; 404 for a malformed or unknown id. */
async function oneBatch(c: Ctx, op: 'getBatch' | 'cancelBatch') {
  const tenant = c.get('principal').tenant
  const id = c.req.param('id') ?? ''
  const b = BATCH_ID.test(id) ? await admissionOf(c.env, tenant.id)[op](id, tenant.id) : null
  if (!b) throw new MoeError('not_found', `No such Batch object: ${id}`, 'id')
  return c.json(b)
}

batches.get('/batches/:id', (c) => oneBatch(c, 'getBatch'))
/** in_progress -> cancelling; the coordinator removes waiting children and stops running ones. */
batches.post('/batches/:id/cancel', (c) => oneBatch(c, 'cancelBatch'))

/** Every delivery of the tenant's webhook events with each attempt (status, latency). `?batch_id=` filters. */
batches.get('/webhooks/deliveries', async (c) => {
  const tenant = c.get('principal').tenant
  const limit = pageLimit(c.req.query('limit'))
  const data = await admissionOf(c.env, tenant.id).listDeliveries(
    tenant.id,
    c.req.query('batch_id') ?? null,
    limit,
  )
  return c.json({ object: 'list', data })
})
