import {
  BATCH_ENDPOINTS,
  type BatchEndpoint,
  type BatchLine,
  type BatchStatic,
  type ChatCompletionRequest,
  type CompletionRequest,
  type ExpertPool,
  type JobPayload,
  MoeError,
  seedFromJobId,
  type TenantConfig,
} from '@moe/shared'
import { Hono } from 'hono'
import { effectiveSampling, inputOf } from './api.ts'
import { randomBase62 } from './auth.ts'
import type { EffectiveSampling } from './cache.ts'
import type { EdgeConfig } from './config.ts'
import { type AppEnv, admissionOf, jsonBody, limitBody, requireJson } from './http.ts'
import { tenantAuth } from './middleware/tenant-auth/index.ts'
import { POOLS } from './pools.ts'
import { choosePool, decideTask, modalitiesOf, routerFor } from './router/index.ts'
import { type Endpoint, validateBody } from './validate.ts'

// OpenAI-compatible Files and Batches API. Input files are validated line by line at upload
// (so a bad file is never stored and nothing is enqueued) and kept in R2; batch creation reads
// the file, routes every line like a live request and fans out one child job per line (the job
// payload holds the request) in a BullMQ flow. Output and error files are written by the Node
// batch coordinator into Redis and served from there (see batch-store.ts).

export const batchApi = new Hono<AppEnv>()

for (const path of ['/files', '/files/*', '/batches', '/batches/*', '/webhooks/*'] as const) {
  batchApi.use(path, tenantAuth({ keys: (c) => c.env.AUTH }))
}
batchApi.post('/batches', requireJson, limitBody)

const r2Key = (tenantId: string, fileId: string) => `files/${tenantId}/${fileId}`
const FILE_ID = /^file-[A-Za-z0-9]{1,64}$/
const BATCH_ID = /^batch_[A-Za-z0-9]{1,64}$/

const bad = (message: string, param: string | null = null) => new MoeError('invalid_request', message, param)

// ---------------------------------------------------------------- validation

export interface RoutedLine {
  line: number
  customId: string
  url: BatchEndpoint
  req: ChatCompletionRequest | CompletionRequest
  pool: ExpertPool
  sampling: EffectiveSampling
}

/** Routes one request body as the live path would (tenant router and pools), without a request context. */
function routeLine(tenant: TenantConfig, endpoint: Endpoint, body: unknown) {
  const req = validateBody(endpoint, body)
  if (req.stream === true) throw bad('stream is not supported in a batch', 'stream')
  const messages = 'messages' in req ? req.messages : undefined
  const prompt = 'prompt' in req ? req.prompt : undefined
  const task = decideTask(routerFor(tenant), { messages, prompt, taskHint: req.metadata?.task })
  const { modality, required } = modalitiesOf({ messages })
  const { pool } = choosePool(tenant, POOLS, req.model, task.task, modality, required)
  return { req, pool, sampling: effectiveSampling({ req, pool }) }
}

/**
 * Validates a whole JSONL batch file: every line JSON, unique custom_id, POST, one supported
 * url, a body valid for the tenant; limits on lines and bytes. The first problem is a 400
 * naming its line.
 */
export function validateBatchFile(text: string, tenant: TenantConfig, config: EdgeConfig): RoutedLine[] {
  const limitLines = config.filesMaxLines
  const limitBytes = config.filesMaxBytes
  const enc = new TextEncoder()
  const out: RoutedLine[] = []
  const seen = new Map<string, number>()
  let bytes = 0
  const rows = text.split('\n')
  for (let i = 0; i < rows.length; i++) {
    const n = i + 1
    const raw = rows[i]!.replace(/\r$/, '')
    bytes += enc.encode(raw).length + 1
    if (bytes > limitBytes + 1)
      throw bad(`Line ${n}: the file is larger than the limit of ${limitBytes} bytes`, 'file')
    if (raw.trim() === '') continue
    if (out.length >= limitLines)
      throw bad(
        `Line ${n}: the file has more than ${limitLines} requests, the most one batch may hold`,
        'file',
      )
    let obj: unknown
    try {
      obj = JSON.parse(raw)
    } catch (e) {
      throw bad(`Line ${n}: not valid JSON (${(e as Error).message})`, 'file')
    }
    if (typeof obj !== 'object' || obj === null || Array.isArray(obj))
      throw bad(`Line ${n}: each line must be a JSON object`, 'file')
    const o = obj as Record<string, unknown>
    if (typeof o.custom_id !== 'string' || o.custom_id === '' || o.custom_id.length > 512)
      throw bad(`Line ${n}: custom_id must be a non-empty string (at most 512 characters)`, 'file')
    const first = seen.get(o.custom_id)
    if (first !== undefined)
      throw bad(`Line ${n}: duplicate custom_id '${o.custom_id}' (first used on line ${first})`, 'file')
    seen.set(o.custom_id, n)
    if (o.method !== 'POST') throw bad(`Line ${n}: method must be 'POST'`, 'file')
    if (!BATCH_ENDPOINTS.includes(o.url as BatchEndpoint))
      throw bad(
        `Line ${n}: url must be one of ${BATCH_ENDPOINTS.join(', ')} (got ${JSON.stringify(o.url)})`,
        'file',
      )
    const url = o.url as BatchEndpoint
    if (out.length > 0 && out[0]!.url !== url)
      throw bad(
        `Line ${n}: url '${url}' differs from line ${out[0]!.line}'s '${out[0]!.url}'; a batch file holds one endpoint`,
        'file',
      )
    try {
      const r = routeLine(tenant, url === '/v1/chat/completions' ? 'chat' : 'completion', o.body)
      out.push({ line: n, customId: o.custom_id, url, ...r })
    } catch (e) {
      if (e instanceof MoeError) throw bad(`Line ${n}: ${e.message}`, 'file')
      throw e
    }
  }
  if (out.length === 0) throw bad('The file holds no requests', 'file')
  return out
}

// ---------------------------------------------------------------- files

interface FileObject {
  id: string
  object: 'file'
  bytes: number
  created_at: number
  filename: string
  purpose: string
  status: 'processed'
  status_details: null
  expires_at: null
}

const fileObject = (
  id: string,
  bytes: number,
  createdAt: number,
  filename: string,
  purpose: string,
): FileObject => ({
  id,
  object: 'file',
  bytes,
  created_at: createdAt,
  filename,
  purpose,
  status: 'processed',
  status_details: null,
  expires_at: null,
})

batchApi.post('/files', async (c) => {
  const tenant = c.get('principal').tenant
  const declared = Number(c.req.header('content-length') ?? 0)
  const { filesMaxBytes } = c.get('config')
  if (declared > filesMaxBytes + 64 * 1024)
    throw new MoeError('payload_too_large', `The file is larger than the limit of ${filesMaxBytes} bytes`)
  let form: FormData
  try {
    form = await c.req.raw.formData()
  } catch {
    throw bad('Send the file as multipart/form-data with the fields file and purpose')
  }
  const purpose = form.get('purpose')
  if (purpose !== 'batch') throw bad(`purpose must be 'batch' (got ${JSON.stringify(purpose)})`, 'purpose')
  const file = form.get('file')
  if (file === null || typeof file === 'string')
    throw bad('The form has no file field holding a file', 'file')
  const text = await file.text()
  const lines = validateBatchFile(text, tenant, c.get('config'))
  const id = `file-${randomBase62(24)}`
  const createdAt = Math.floor(Date.now() / 1000)
  const bytes = new TextEncoder().encode(text).length
  await c.env.FILES.put(r2Key(tenant.id, id), text, {
    httpMetadata: { contentType: 'application/jsonl' },
    customMetadata: {
      filename: file.name || 'batch.jsonl',
      purpose: 'batch',
      created_at: String(createdAt),
      lines: String(lines.length),
    },
  })
  c.get('logFields').file = id
  return c.json(fileObject(id, bytes, createdAt, file.name || 'batch.jsonl', 'batch'))
})

async function findFile(env: Env, tenantId: string, id: string, withContent: boolean) {
  if (!FILE_ID.test(id)) return null
  if (withContent) {
    const obj = await env.FILES.get(r2Key(tenantId, id))
    if (obj) {
      const m = obj.customMetadata ?? {}
      return {
        file: fileObject(id, obj.size, Number(m.created_at), m.filename ?? '', m.purpose ?? 'batch'),
        content: await obj.text(),
      }
    }
  } else {
    const obj = await env.FILES.head(r2Key(tenantId, id))
    if (obj) {
      const m = obj.customMetadata ?? {}
      return {
        file: fileObject(id, obj.size, Number(m.created_at), m.filename ?? '', m.purpose ?? 'batch'),
        content: null,
      }
    }
  }
  const stored = await admissionOf(env, tenantId).getStoredFile(id, tenantId, withContent)
  if (!stored) return null
  const m = stored.meta
  return { file: fileObject(id, m.bytes, m.created_at, m.filename, m.purpose), content: stored.content }
}

batchApi.get('/files/:id', async (c) => {
  const tenant = c.get('principal').tenant
  const f = await findFile(c.env, tenant.id, c.req.param('id'), false)
  if (!f) throw new MoeError('not_found', `No such File object: ${c.req.param('id')}`, 'id')
  return c.json(f.file)
})

batchApi.get('/files/:id/content', async (c) => {
  const tenant = c.get('principal').tenant
  const f = await findFile(c.env, tenant.id, c.req.param('id'), true)
  if (!f) throw new MoeError('not_found', `No such File object: ${c.req.param('id')}`, 'id')
  return c.body(f.content ?? '', 200, { 'content-type': 'application/jsonl' })
})

batchApi.delete('/files/:id', async (c) => {
  const tenant = c.get('principal').tenant
  const id = c.req.param('id')
  let deleted = false
  if (FILE_ID.test(id)) {
    if (await c.env.FILES.head(r2Key(tenant.id, id))) {
      await c.env.FILES.delete(r2Key(tenant.id, id))
      deleted = true
    } else deleted = await admissionOf(c.env, tenant.id).deleteStoredFile(id, tenant.id)
  }
  if (!deleted) throw new MoeError('not_found', `No such File object: ${id}`, 'id')
  return c.json({ id, object: 'file', deleted: true })
})

// ---------------------------------------------------------------- batches

const WINDOW_MS: Record<string, number> = { '24h': 86_400_000 }

batchApi.post('/batches', async (c) => {
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
  const children: JobPayload[] = []
  const parentLines: BatchLine[] = []
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i]!
    const jobId = `${batchId}-${i}`
    children.push({
      version: 1,
      requestId: jobId,
      tenantId: tenant.id,
      pool: l.pool.name,
      model: l.pool.modelId,
      input: inputOf(l.req),
      sampling: { ...l.sampling, seed: l.sampling.seed ?? seedFromJobId(jobId) },
      deadline: now + windowMs,
      createdAt: now,
      priority: 'batch',
    })
    parentLines.push({ c: l.customId, j: jobId, m: l.pool.modelId })
  }
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
  })
  c.get('logFields').batch = batchId
  return c.json(batch)
})

batchApi.get('/batches', async (c) => {
  const tenant = c.get('principal').tenant
  const limit = Math.min(100, Math.max(1, Number(c.req.query('limit') ?? 20) || 20))
  const after = c.req.query('after') ?? null
  const page = await admissionOf(c.env, tenant.id).listBatches(tenant.id, after, limit)
  return c.json({
    object: 'list',
    data: page.data,
    first_id: (page.data[0]?.id as string | undefined) ?? null,
    last_id: (page.data.at(-1)?.id as string | undefined) ?? null,
    has_more: page.has_more,
  })
})

batchApi.get('/batches/:id', async (c) => {
  const tenant = c.get('principal').tenant
  const id = c.req.param('id')
  const b = BATCH_ID.test(id) ? await admissionOf(c.env, tenant.id).getBatch(id, tenant.id) : null
  if (!b) throw new MoeError('not_found', `No such Batch object: ${id}`, 'id')
  return c.json(b)
})

batchApi.post('/batches/:id/cancel', async (c) => {
  const tenant = c.get('principal').tenant
  const id = c.req.param('id')
  const b = BATCH_ID.test(id) ? await admissionOf(c.env, tenant.id).cancelBatch(id, tenant.id) : null
  if (!b) throw new MoeError('not_found', `No such Batch object: ${id}`, 'id')
  return c.json(b)
})

// ---------------------------------------------------------------- webhook deliveries

/** Every delivery of the tenant's webhook events with each attempt (status, latency). `?batch_id=` filters. */
batchApi.get('/webhooks/deliveries', async (c) => {
  const tenant = c.get('principal').tenant
  const limit = Math.min(100, Math.max(1, Number(c.req.query('limit') ?? 20) || 20))
  const data = await admissionOf(c.env, tenant.id).listDeliveries(
    tenant.id,
    c.req.query('batch_id') ?? null,
    limit,
  )
  return c.json({ object: 'list', data })
})
