import { MoeError } from '@moe/shared'
import { Hono } from 'hono'
import { z } from 'zod'
import { randomBase62 } from '../auth.ts'
import { type AppEnv, admissionOf } from '../http.ts'
import { tenantAuth } from '../middleware/tenant-auth/index.ts'
import { bad, validateBatchFile } from './input-file.ts'

// OpenAI-compatible Files API. Input files are kept in R2 (validated at upload); output and error
// files are written by the Node batch coordinator into Redis and served from there.

export const files = new Hono<AppEnv>()

files.use('/files', tenantAuth({ keys: (c) => c.env.AUTH }))
files.use('/files/*', tenantAuth({ keys: (c) => c.env.AUTH }))

const r2Key = (tenantId: string, fileId: string) => `files/${tenantId}/${fileId}`
const FILE_ID = /^file-[A-Za-z0-9]{1,64}$/

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

files.post('/files', async (c) => {
  const tenant = c.get('principal').tenant
  const declared = Number(c.req.header('content-length') ?? 0)
  const { filesMaxBytes } = c.get('config')
  if (declared > filesMaxBytes + 64 * 1024)
    throw new MoeError('payload_too_large', `The file is larger than the limit of ${filesMaxBytes} bytes`)
  // Counted as it streams in: a chunked upload (no Content-Length) is cut off at the limit
  // (plus room for the form's other fields), never buffered whole first.
  const cap = filesMaxBytes + 64 * 1024
  let received = 0
  const counted = c.req.raw.body?.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, ctl) {
        received += chunk.byteLength
        if (received > cap) ctl.error(new Error('upload over the limit'))
        else ctl.enqueue(chunk)
      },
    }),
  )
  const tooLarge = () =>
    new MoeError('payload_too_large', `The file is larger than the limit of ${filesMaxBytes} bytes`)
  let form: FormData
  try {
    form = await new Request(c.req.url, {
      method: 'POST',
      headers: { 'content-type': c.req.header('content-type') ?? '' },
      body: counted ?? null,
    }).formData()
  } catch {
    if (received > cap) throw tooLarge()
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

/** GET /v1/files query: OpenAI's pagination (`after`, `limit`, `order`) and `purpose` filter. */
const FileListQuery = z.strictObject({
  after: z.string().regex(FILE_ID, { error: 'after must be a file id (file-...)' }).optional(),
  limit: z.coerce
    .number({ error: 'limit must be an integer from 1 to 10000' })
    .int({ error: 'limit must be an integer from 1 to 10000' })
    .min(1, { error: 'limit must be an integer from 1 to 10000' })
    .max(10_000, { error: 'limit must be an integer from 1 to 10000' })
    .default(10_000),
  order: z.enum(['asc', 'desc'], { error: "order must be 'asc' or 'desc'" }).default('desc'),
  purpose: z.string().min(1).max(64).optional(),
})

/** Most uploaded files one listing reads from R2 (1,000 per page). */
const R2_LIST_PAGES = 20

/** Every file of a tenant: uploads from R2, output and error files of its batches from Redis. */
async function tenantFiles(env: Env, tenantId: string): Promise<FileObject[]> {
  const uploads: FileObject[] = []
  let cursor: string | undefined
  for (let page = 0; page < R2_LIST_PAGES; page++) {
    const listed = await env.FILES.list({
      prefix: r2Key(tenantId, ''),
      include: ['customMetadata'],
      ...(cursor ? { cursor } : {}),
    })
    for (const o of listed.objects) {
      const m = o.customMetadata ?? {}
      const id = o.key.slice(r2Key(tenantId, '').length)
      if (FILE_ID.test(id))
        uploads.push(fileObject(id, o.size, Number(m.created_at), m.filename ?? '', m.purpose ?? 'batch'))
    }
    if (!listed.truncated) break
    cursor = listed.cursor
  }
  const stored = await admissionOf(env, tenantId).listStoredFiles(tenantId)
  return [...uploads, ...stored.map((m) => fileObject(m.id, m.bytes, m.created_at, m.filename, m.purpose))]
}

files.get('/files', async (c) => {
  const tenant = c.get('principal').tenant
  const parsed = FileListQuery.safeParse(c.req.query())
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!
    const param = issue.path.map(String).join('.') || null
    throw new MoeError(
      'invalid_request',
      issue.code === 'unrecognized_keys'
        ? `Unrecognized query parameter: ${(issue as { keys: string[] }).keys.join(', ')}`
        : `Invalid value for '${param}': ${issue.message}`,
      param,
    )
  }
  const { after, limit, order, purpose } = parsed.data
  // Oldest first by creation time, then id: a stable order for cursors.
  const all = (await tenantFiles(c.env, tenant.id))
    .filter((f) => purpose === undefined || f.purpose === purpose)
    .sort((a, b) => a.created_at - b.created_at || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))
  if (order === 'desc') all.reverse()
  let start = 0
  if (after !== undefined) {
    const i = all.findIndex((f) => f.id === after)
    if (i < 0) throw new MoeError('not_found', `No such File object: ${after}`, 'after')
    start = i + 1
  }
  const data = all.slice(start, start + limit)
  return c.json({
    object: 'list',
    data,
    first_id: data[0]?.id ?? null,
    last_id: data.at(-1)?.id ?? null,
    has_more: start + limit < all.length,
  })
})

/** A tenant's file: an uploaded one from R2, else an output or error file from Redis. */
export async function findFile(env: Env, tenantId: string, id: string, withContent: boolean) {
  if (!FILE_ID.test(id)) return null
  const body = withContent ? await env.FILES.get(r2Key(tenantId, id)) : null
  const obj = body ?? (withContent ? null : await env.FILES.head(r2Key(tenantId, id)))
  if (obj) {
    const m = obj.customMetadata ?? {}
    return {
      file: fileObject(id, obj.size, Number(m.created_at), m.filename ?? '', m.purpose ?? 'batch'),
      content: body ? await body.text() : null,
    }
  }
  const stored = await admissionOf(env, tenantId).getStoredFile(id, tenantId, withContent)
  if (!stored) return null
  const m = stored.meta
  return { file: fileObject(id, m.bytes, m.created_at, m.filename, m.purpose), content: stored.content }
}

files.get('/files/:id', async (c) => {
  const tenant = c.get('principal').tenant
  const f = await findFile(c.env, tenant.id, c.req.param('id'), false)
  if (!f) throw new MoeError('not_found', `No such File object: ${c.req.param('id')}`, 'id')
  return c.json(f.file)
})

files.get('/files/:id/content', async (c) => {
  const tenant = c.get('principal').tenant
  const f = await findFile(c.env, tenant.id, c.req.param('id'), true)
  if (!f) throw new MoeError('not_found', `No such File object: ${c.req.param('id')}`, 'id')
  return c.body(f.content ?? '', 200, { 'content-type': 'application/jsonl' })
})

files.delete('/files/:id', async (c) => {
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
