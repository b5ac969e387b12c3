import { z } from 'zod'
import { answerChoices, chatLogprobs, completionLogprobs } from './choices.ts'
import { publicErrorMessage } from './errors.ts'
import type { ChoiceResult } from './stream.ts'

// Batch contracts shared by the edge (Files/Batches API, fan-out) and the Node-side batch
// coordinator (finalisation, output files, webhook events). Key names live here too.

/** BullMQ queue of batch parents (a flow: the parent runs once every child has finished) and control jobs. */
export const BATCH_QUEUE = 'batches'
/** BullMQ queue of webhook deliveries. */
export const WEBHOOK_QUEUE = 'webhooks'

export const BatchStatus = z.enum([
  'validating',
  'failed',
  'in_progress',
  'finalizing',
  'completed',
  'expired',
  'cancelling',
  'cancelled',
])
export type BatchStatus = z.infer<typeof BatchStatus>

export const BATCH_ENDPOINTS = ['/v1/chat/completions', '/v1/completions'] as const
export type BatchEndpoint = (typeof BATCH_ENDPOINTS)[number]

/** One line of the batch as the coordinator needs it to write the output file. */
export const BatchLine = z.object({
  /** custom_id */
  c: z.string(),
  /** the child job id (also the request id) */
  j: z.string(),
  /** the model the response reports */
  m: z.string(),
})
export type BatchLine = z.infer<typeof BatchLine>

/** The parent job's data. */
export const BatchParentData = z.object({
  batchId: z.string(),
  tenantId: z.string(),
  endpoint: z.enum(BATCH_ENDPOINTS),
  lines: z.array(BatchLine),
})
export type BatchParentData = z.infer<typeof BatchParentData>

/** A control job on BATCH_QUEUE: cancel or expire a batch (remove waiting children, stop running ones). */
export const BatchControlData = z.object({
  batchId: z.string(),
  action: z.enum(['cancel', 'expire']),
})
export type BatchControlData = z.infer<typeof BatchControlData>

/** Redis hash of one batch: `status`, timestamps (epoch s), counts, file ids, and `obj` (the static fields as JSON). */
export const batchKey = (prefix: string, batchId: string): string => `${prefix}:batch:${batchId}`
/** Sorted set (score = created_at ms) of a tenant's batches, newest listed first. */
export const tenantBatchesKey = (prefix: string, tenantId: string): string =>
  `${prefix}:tenant:${tenantId}:batches`
/** Hash of a file the coordinator wrote (output and error files): `meta` (JSON) and `content`. */
export const storedFileKey = (prefix: string, fileId: string): string => `${prefix}:file:${fileId}`
/** Hash endpointId -> WebhookEndpoint JSON: the tenant's webhook endpoints as the delivery side sees them. */
export const tenantWebhooksKey = (prefix: string, tenantId: string): string =>
  `${prefix}:tenant:${tenantId}:webhooks`
/** One delivery (event x endpoint): JSON record; attempts in a list beside it. */
export const webhookDeliveryKey = (prefix: string, deliveryId: string): string =>
  `${prefix}:whd:${deliveryId}`
export const webhookAttemptsKey = (prefix: string, deliveryId: string): string =>
  `${prefix}:whd:${deliveryId}:attempts`
/** Sorted set (score = created ms) of a tenant's deliveries. */
export const tenantDeliveriesKey = (prefix: string, tenantId: string): string =>
  `${prefix}:tenant:${tenantId}:deliveries`

/** How long output/error files and batch records live in Redis (30 days). */
export const BATCH_RECORD_TTL_SECONDS = 30 * 86_400

/** The stored static part of a batch (`obj` field). */
export interface BatchStatic {
  id: string
  tenantId: string
  endpoint: BatchEndpoint
  input_file_id: string
  completion_window: string
  created_at: number
  expires_at: number
  metadata: Record<string, string> | null
  total: number
}

/** The metadata of a file the coordinator wrote. */
export interface StoredFileMeta {
  id: string
  tenantId: string
  filename: string
  purpose: 'batch_output'
  bytes: number
  created_at: number
}

/**
 * Atomic status transition on a batch hash: KEYS[1] the hash; ARGV[1] the allowed current
 * statuses (comma-separated), ARGV[2] the new status, then field/value pairs to set with it.
 * Returns the previous status when it moved, false otherwise.
 */
export const BATCH_TRANSITION_LUA = `
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return false end
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then
    redis.call('HSET', KEYS[1], 'status', ARGV[2])
    for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return cur
  end
end
return false
`

/** The batch object of the API (OpenAI's fields), from the stored hash. */
export function batchObject(
  h: Record<string, string>,
  live?: { completed: number; failed: number },
): Record<string, unknown> | null {
  if (!h.obj || !h.status) return null
  const s = JSON.parse(h.obj) as BatchStatic
  const ts = (k: string): number | null => (h[k] ? Number(h[k]) : null)
  const counts =
    h.completed !== undefined
      ? { total: s.total, completed: Number(h.completed), failed: Number(h.failed ?? 0) }
      : { total: s.total, completed: live?.completed ?? 0, failed: live?.failed ?? 0 }
  return {
    id: s.id,
    object: 'batch',
    endpoint: s.endpoint,
    errors: h.errors ? JSON.parse(h.errors) : null,
    input_file_id: s.input_file_id,
    completion_window: s.completion_window,
    status: h.status,
    output_file_id: h.output_file_id || null,
    error_file_id: h.error_file_id || null,
    created_at: s.created_at,
    in_progress_at: ts('in_progress_at'),
    expires_at: s.expires_at,
    finalizing_at: ts('finalizing_at'),
    completed_at: ts('completed_at'),
    failed_at: ts('failed_at'),
    expired_at: ts('expired_at'),
    cancelling_at: ts('cancelling_at'),
    cancelled_at: ts('cancelled_at'),
    request_counts: counts,
    metadata: s.metadata,
  }
}

/** Batch event types a webhook endpoint may subscribe to. */
export const BATCH_EVENT_TYPES = [
  'batch.completed',
  'batch.failed',
  'batch.cancelled',
  'batch.expired',
] as const
export type BatchEventType = (typeof BATCH_EVENT_TYPES)[number]

/** The webhook event body (OpenAI's shape): small; the receiver fetches the batch and its output. */
export interface WebhookEvent {
  id: string
  object: 'event'
  type: string
  created_at: number
  data: { id: string }
}

/** A delivery job on WEBHOOK_QUEUE. The body is serialised once so every retry sends the same bytes and id. */
export const WebhookDeliveryData = z.object({
  deliveryId: z.string(),
  tenantId: z.string(),
  endpointId: z.string(),
  eventId: z.string(),
  eventType: z.string(),
  batchId: z.string().nullable(),
  body: z.string(),
})
export type WebhookDeliveryData = z.infer<typeof WebhookDeliveryData>

export interface WebhookAttempt {
  attempt: number
  at: number
  status_code: number | null
  latency_ms: number
  error: string | null
}

export interface WebhookDeliveryRecord {
  id: string
  object: 'webhook.delivery'
  event_id: string
  event_type: string
  endpoint_id: string
  url: string
  batch_id: string | null
  created_at: number
  /** pending (retrying), succeeded, failed (gave up or not retryable), disabled (410 or endpoint disabled) */
  status: 'pending' | 'succeeded' | 'failed' | 'disabled'
}

/** The child job's return value (gpu-worker's JobResult). */
export interface ChildResult {
  finishReason: 'stop' | 'length' | 'cancelled'
  text: string
  usage: { promptTokens: number; completionTokens: number }
  /** Every choice, when the line asked for n > 1, several prompts or logprobs. */
  choices?: ChoiceResult[]
}

/** One line of the output file: `{id, custom_id, response: {status_code, request_id, body}, error: null}`. */
export function batchOutputLine(
  endpoint: BatchEndpoint,
  line: BatchLine,
  r: ChildResult,
  created: number,
): string {
  const usage = {
    prompt_tokens: r.usage.promptTokens,
    completion_tokens: r.usage.completionTokens,
    total_tokens: r.usage.promptTokens + r.usage.completionTokens,
  }
  const base = { created, model: line.m, system_fingerprint: null }
  const body =
    endpoint === '/v1/chat/completions'
      ? {
          id: `chatcmpl-${line.j}`,
          object: 'chat.completion',
          ...base,
          choices: answerChoices(r).map((ch) => ({
            index: ch.index,
            message: { role: 'assistant', content: ch.text, refusal: null },
            finish_reason: ch.finishReason,
            logprobs: chatLogprobs(ch.logprobs),
          })),
          usage,
        }
      : {
          id: `cmpl-${line.j}`,
          object: 'text_completion',
          ...base,
          choices: answerChoices(r).map((ch) => ({
            index: ch.index,
            text: ch.text,
            finish_reason: ch.finishReason,
            logprobs: completionLogprobs(ch.logprobs),
          })),
          usage,
        }
  return JSON.stringify({
    id: `batch_req_${line.j}`,
    custom_id: line.c,
    response: { status_code: 200, request_id: line.j, body },
    error: null,
  })
}

/** One line of the error file. A request that ran and failed has a response; one never run has none. */
export function batchErrorLine(
  line: BatchLine,
  error: { code: string; message: string },
  statusCode: number | null,
): string {
  return JSON.stringify({
    id: `batch_req_${line.j}`,
    custom_id: line.c,
    response:
      statusCode === null
        ? null
        : {
            status_code: statusCode,
            request_id: line.j,
            body: {
              error: {
                message: publicErrorMessage(error.code, error.message, line.j),
                type: 'server_error',
                param: null,
                code: error.code,
              },
            },
          },
    error: statusCode === null ? error : null,
  })
}
