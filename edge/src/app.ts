import { MoeError } from '@moe/shared'
import { Hono } from 'hono'
import { cors } from 'hono/cors'
import { requestId } from 'hono/request-id'
import { admin } from './admin.ts'
import { randomBase62 } from './auth.ts'
import { files } from './batches/files.ts'
import { batches } from './batches/index.ts'
import { completions } from './completions/index.ts'
import { withConfig } from './config.ts'
import { dashboard } from './dashboard/index.ts'
import {
  type AppEnv,
  errorResponse,
  isRedisUnavailable,
  limitBody,
  log,
  redisUnavailable,
  requireJson,
} from './http.ts'
import { jobs } from './jobs.ts'
import { requestTelemetry } from './middleware/request-telemetry/index.ts'
import { models } from './models.ts'
import { responses } from './responses/index.ts'
import { tokenizer } from './tokenize.ts'

export const app = new Hono<AppEnv>()

// Request ids are ours, never the client's: the id is also the job id, so a client-chosen one
// could name another tenant's job. A client's own id (X-Client-Request-Id) is logged beside it.
app.use(requestId({ headerName: '', generator: () => `req_${randomBase62(24)}` }))
app.use(async (c, next) => {
  const start = Date.now()
  c.set('logFields', {})
  c.header('x-request-id', c.get('requestId'))
  await next()
  c.res.headers.set('x-request-id', c.get('requestId'))
  const client = c.req.header('x-client-request-id')
  log(c.res.status >= 500 ? 'error' : 'info', 'request', {
    request_id: c.get('requestId'),
    ...(client ? { client_request_id: client.slice(0, 128) } : {}),
    method: c.req.method,
    path: c.req.path,
    status: c.res.status,
    ms: Date.now() - start,
    ...c.get('logFields'),
  })
})
// The dashboard's own polling and health checks would drown the traffic they are there to show.
app.use(requestTelemetry({ skip: (path) => path === '/healthz' || path.startsWith('/dashboard') }))
app.use(withConfig)
app.use(
  cors({
    origin: '*',
    allowMethods: ['GET', 'POST', 'PUT', 'DELETE', 'OPTIONS'],
    // No fixed list: the preflight's Access-Control-Request-Headers are allowed as asked (SDKs
    // add headers of their own, e.g. X-Stainless-Helper-Method); every API route needs a key anyway.
    exposeHeaders: [
      'x-request-id',
      'x-moe-pool',
      'x-moe-task',
      'x-moe-modality',
      'x-moe-cache',
      'retry-after',
      'location',
    ],
    maxAge: 86400,
  }),
)

app.get('/healthz', (c) =>
  c.json({ status: 'ok', service: 'moe-edge', environment: c.get('config').environment }),
)
app.route('/v1', models)
app.route('/v1', completions)
app.route('/v1', responses)
app.route('/', tokenizer)
app.route('/v1', jobs)
app.route('/v1', files)
app.route('/v1', batches)
app.route('/admin', admin)
app.route('/dashboard', dashboard)

const BODY_MIDDLEWARE: ReadonlySet<unknown> = new Set([requireJson, limitBody])

/** The methods some route answers at `path` (a known path asked with another method gets 405). */
function allowedMethods(path: string): string[] {
  const methods = new Set<string>()
  for (const r of app.routes) {
    // Middleware registered per method (body checks) answers nothing by itself.
    if (r.method === 'ALL' || BODY_MIDDLEWARE.has(r.handler)) continue
    const pattern = r.path
      .replace(/[.+?^${}()|[\]\\]/g, '\\$&')
      .replace(/:[^/]+/g, '[^/]+')
      .replace(/\*/g, '.*')
    if (new RegExp(`^${pattern}$`).test(path)) methods.add(r.method)
  }
  return [...methods].sort()
}

app.notFound((c) => {
  const path = new URL(c.req.url).pathname
  const allow = allowedMethods(path)
  if (allow.length > 0) {
    const err = new MoeError(
      'method_not_allowed',
      `${c.req.method} is not allowed on ${path}; use ${allow.join(' or ')}`,
    )
    return c.json(err.toBody(), 405, { allow: allow.join(', ') })
  }
  const err = new MoeError('not_found', `No route for ${c.req.method} ${path}`)
  return c.json(err.toBody(), 404)
})

app.onError((error, c) => {
  if (error instanceof MoeError) return errorResponse(c, error)
  if (isRedisUnavailable(error)) {
    log('warn', 'redis unavailable', { request_id: c.get('requestId'), error: String(error) })
    return errorResponse(c, redisUnavailable())
  }
  log('error', 'unhandled', { request_id: c.get('requestId'), error: String(error) })
  return c.json(new MoeError('internal_error', 'Internal error').toBody(), 500)
})
