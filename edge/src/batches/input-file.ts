import {
  BATCH_ENDPOINTS,
  type BatchEndpoint,
  type ExpertPool,
  MoeError,
  type TenantConfig,
} from '@moe/shared'
import { z } from 'zod'
import type { EffectiveSampling } from '../cache.ts'
import {
  type CompletionBody,
  classifyRequest,
  effectiveSampling,
  routeRequest,
} from '../completions/submit.ts'
import type { EdgeConfig } from '../config.ts'
import { type Endpoint, validateBody } from '../validate.ts'

// A batch input file is JSONL, one request per line. Files are validated whole at upload (so a bad
// file is never stored and nothing is enqueued) and again at batch creation (the tenant's config
// may have changed since).

export const bad = (message: string, param: string | null = null) =>
  new MoeError('invalid_request', message, param)

/** One line of a batch input file, as OpenAI's Batch API defines it. */
export const BatchInputLine = z.object(
  {
    custom_id: z
      .string({ error: 'custom_id must be a non-empty string (at most 512 characters)' })
      .min(1, { error: 'custom_id must be a non-empty string (at most 512 characters)' })
      .max(512, { error: 'custom_id must be a non-empty string (at most 512 characters)' }),
    method: z.literal('POST', { error: "method must be 'POST'" }),
    url: z.enum(BATCH_ENDPOINTS, {
      error: (i) => `url must be one of ${BATCH_ENDPOINTS.join(', ')} (got ${JSON.stringify(i.input)})`,
    }),
    /** The request body; validated and routed as the live endpoint would. */
    body: z.unknown(),
  },
  { error: 'each line must be a JSON object' },
)
export type BatchInputLine = z.infer<typeof BatchInputLine>

export interface RoutedLine {
  line: number
  customId: string
  url: BatchEndpoint
  req: CompletionBody
  pool: ExpertPool
  sampling: EffectiveSampling
}

/** Routes one request body as the live path would (tenant router and pools). */
function routeLine(tenant: TenantConfig, endpoint: Endpoint, body: unknown) {
  const req = validateBody(endpoint, body)
  if (req.stream === true) throw bad('stream is not supported in a batch', 'stream')
  const { pool } = routeRequest(tenant, endpoint, req, classifyRequest(tenant, req))
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
    const parsed = BatchInputLine.safeParse(obj)
    // Problems in the order a reader checks a line: shape and custom_id, its uniqueness, the rest.
    const issue = parsed.success ? null : parsed.error.issues[0]!
    if (issue && (issue.path.length === 0 || issue.path[0] === 'custom_id'))
      throw bad(`Line ${n}: ${issue.message}`, 'file')
    const customId = (obj as { custom_id: string }).custom_id
    const first = seen.get(customId)
    if (first !== undefined)
      throw bad(`Line ${n}: duplicate custom_id '${customId}' (first used on line ${first})`, 'file')
    seen.set(customId, n)
    if (!parsed.success) throw bad(`Line ${n}: ${issue!.message}`, 'file')
    const { url, body } = parsed.data
    if (out.length > 0 && out[0]!.url !== url)
      throw bad(
        `Line ${n}: url '${url}' differs from line ${out[0]!.line}'s '${out[0]!.url}'; a batch file holds one endpoint`,
        'file',
      )
    try {
      const r = routeLine(tenant, url === '/v1/chat/completions' ? 'chat' : 'completion', body)
      out.push({ line: n, customId, url, ...r })
    } catch (e) {
      if (e instanceof MoeError) throw bad(`Line ${n}: ${e.message}`, 'file')
      throw e
    }
  }
  if (out.length === 0) throw bad('The file holds no requests', 'file')
  return out
}
