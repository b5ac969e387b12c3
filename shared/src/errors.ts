import { z } from 'zod'

/** Stable error codes, shared by the HTTP API and the job stream's `error` event. */
export const ErrorCode = z.enum([
  'invalid_request',
  'invalid_json',
  'unsupported_parameter',
  'unsupported_media_type',
  'payload_too_large',
  'context_length_exceeded',
  'max_tokens_exceeded',
  'invalid_api_key',
  'pool_not_allowed',
  'unknown_pool',
  'not_found',
  'method_not_allowed',
  'idempotency_conflict',
  'rate_limited',
  'overloaded',
  'deadline_exceeded',
  'cancelled',
  'internal_error',
])
export type ErrorCode = z.infer<typeof ErrorCode>

/** The OpenAI error body: `{ "error": { message, type, param, code } }`. */
export const ApiErrorBody = z.object({
  error: z.object({
    message: z.string(),
    type: z.string(),
    param: z.string().nullable(),
    code: z.string().nullable(),
  }),
})
export type ApiErrorBody = z.infer<typeof ApiErrorBody>

const HTTP_STATUS: Record<ErrorCode, number> = {
  invalid_request: 400,
  invalid_json: 400,
  unsupported_parameter: 400,
  unsupported_media_type: 415,
  payload_too_large: 413,
  context_length_exceeded: 400,
  max_tokens_exceeded: 400,
  invalid_api_key: 401,
  pool_not_allowed: 403,
  unknown_pool: 404,
  not_found: 404,
  method_not_allowed: 405,
  idempotency_conflict: 409,
  rate_limited: 429,
  overloaded: 503,
  deadline_exceeded: 504,
  cancelled: 499,
  internal_error: 500,
}

const ERROR_TYPE: Partial<Record<ErrorCode, string>> = {
  invalid_api_key: 'authentication_error',
  pool_not_allowed: 'permission_error',
  rate_limited: 'rate_limit_error',
  overloaded: 'server_error',
  internal_error: 'server_error',
  deadline_exceeded: 'server_error',
}

/** An error with a stable code and a message the caller can act on. */
export class MoeError extends Error {
  readonly code: ErrorCode
  readonly param: string | null
  constructor(code: ErrorCode, message: string, param: string | null = null) {
    super(message)
    this.name = 'MoeError'
    this.code = code
    this.param = param
  }

  get status(): number {
    return HTTP_STATUS[this.code]
  }

  toBody(): ApiErrorBody {
    return {
      error: {
        message: this.message,
        type: ERROR_TYPE[this.code] ?? 'invalid_request_error',
        param: this.param,
        code: this.code,
      },
    }
  }
}

export const httpStatusOf = (code: ErrorCode): number => HTTP_STATUS[code]

/**
 * What a client is told of a job's error. An internal error's own text (a stack overflow, a
 * Redis reply, a file path) stays in the logs; the client gets a generic message and the
 * request id to quote. Every other code's message is written for the client.
 */
export function publicErrorMessage(code: string, message: string, requestId: string): string {
  if (code !== 'internal_error') return message
  return `The server had an error while processing this request (request id ${requestId}); please retry it, and quote the request id if the error persists.`
}
