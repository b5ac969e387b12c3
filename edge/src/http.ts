import { type ErrorCode, MoeError } from '@moe/shared'
import type { Context, MiddlewareHandler } from 'hono'
import { bodyLimit } from 'hono/body-limit'
import type { Principal } from './auth.ts'
import type { EdgeConfig } from './config.ts'
import { parseJson } from './validate.ts'

export interface Vars {
  requestId: string
  config: EdgeConfig
  principal: Principal
  /** Filled by routed handlers for the access log. */
  logFields: Record<string, unknown>
}

export type AppEnv = { Bindings: Env; Variables: Vars }
export type Ctx = Context<AppEnv>

/** The tenant's Durable Object: admission, jobs, batches, files and webhooks (tenant-admission.ts). */
export const admissionOf = (env: Env, tenantId: string) =>
  env.TENANT_ADMISSION.get(env.TENANT_ADMISSION.idFromName(`tenant:${tenantId}`))

/** A MoeError that also carries response headers (Retry-After). */
export class EdgeError extends MoeError {
  readonly headers: Record<string, string>
  constructor(
    code: ErrorCode,
    message: string,
    param: string | null = null,
    headers: Record<string, string> = {},
  ) {
    super(code, message, param)
    this.headers = headers
  }
}

/**
 * Whether an error means Redis cannot be reached (ioredis gave up on a command, the socket was
 * refused or lost) or cannot take writes (OOM: it is at maxmemory, and BullMQ needs noeviction). Matched on the message: errors from the Durable Object arrive without their
 * class.
 */
export function isRedisUnavailable(error: unknown): boolean {
  const msg = error instanceof Error ? error.message : String(error)
  return /max retries per request|Connection is closed|ECONNREFUSED|ECONNRESET|ETIMEDOUT|connect (failed|refused|timed out)|Network connection lost|Stream isn't writeable|Socket closed|Redis is unavailable|^OOM |OOM command not allowed/i.test(
    msg,
  )
}

/** The answer while Redis is down: 503 with Retry-After, so clients back off and retry. */
export const redisUnavailable = (): EdgeError =>
  new EdgeError('overloaded', 'The job queue is temporarily unavailable; please retry shortly.', null, {
    'retry-after': '2',
  })

export function errorResponse(c: Ctx, err: MoeError): Response {
  if (err instanceof EdgeError) for (const [k, v] of Object.entries(err.headers)) c.header(k, v)
  return c.json(err.toBody(), err.status as 400)
}

/** 415 unless the body is declared JSON. */
export const requireJson: MiddlewareHandler<AppEnv> = async (c, next) => {
  const ct = (c.req.header('content-type') ?? '').split(';')[0]!.trim().toLowerCase()
  if (ct !== 'application/json' && !ct.endsWith('+json')) {
    throw new MoeError(
      'unsupported_media_type',
      `Unsupported Content-Type '${ct || '(none)'}'; send the body as application/json`,
    )
  }
  await next()
}

/** 413 over MAX_BODY_BYTES (hono's body-limit, with the OpenAI error body). */
export const limitBody: MiddlewareHandler<AppEnv> = (c, next) => {
  const maxSize = c.get('config').maxBodyBytes
  return bodyLimit({
    maxSize,
    onError: (c2) => {
      const err = new MoeError('payload_too_large', `Request body too large: the limit is ${maxSize} bytes`)
      return c2.json(err.toBody(), 413)
    },
  })(c, next)
}

export async function jsonBody(c: Ctx): Promise<unknown> {
  return parseJson(await c.req.text())
}

/** One JSON log line; callers never pass headers, keys or bodies. */
export function log(level: 'info' | 'warn' | 'error', msg: string, fields: Record<string, unknown>): void {
  const line = JSON.stringify({ level, msg, ...fields })
  if (level === 'error') console.error(line)
  else if (level === 'warn') console.warn(line)
  else console.log(line)
}
