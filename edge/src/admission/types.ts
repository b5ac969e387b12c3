import type { JobFailure, JobPayload, StreamEvent } from '@moe/shared'

// The typed data between the completion routes and the TenantAdmission object.

/** How long the edge remembers who owns a job (for GET /v1/jobs/{id}). */
export const JOB_META_TTL_SECONDS = 86_400

/** How long a delivered live answer that no Idempotency-Key can replay stays in Redis. */
export const DELIVERED_GRACE_SECONDS = 300

export interface JobMeta {
  tenantId: string
  pool: string
  model: string
  endpoint: 'chat' | 'completion'
  createdAt: number
  async: boolean
  /** SHA-256 of the canonical request: an Idempotency-Key is bound to the body it first came with. */
  bodyHash?: string
  /** A chat with tools: how its answer is read as tool calls (function names only). */
  tools?: { mode: 'forced' | 'auto'; names: string[]; idBase: string }
}

export interface AdmitRequest {
  payload: JobPayload
  meta: JobMeta
  limits: { requestsPerMinute: number; tokensPerMinute: number }
  /** Tokens charged against tokens-per-minute now: prompt estimate plus max_tokens. */
  tokenCost: number
  maxQueueDepth: number
  /** The most jobs this tenant may have queued on the pool (its share of maxQueueDepth). */
  tenantQueueDepth: number
  /** Set when the job id came from an Idempotency-Key: an existing job is returned, not re-run. */
  idempotent: boolean
  /**
   * A live request holds a stream (and a Redis connection) until its job ends: at most this many
   * at once per tenant. Null for asynchronous jobs, which hold none.
   */
  maxLiveStreams: number | null
}

export type AdmitResult =
  | {
      ok: true
      jobId: string
      existing: boolean
      meta: JobMeta
      /** The rate-limit window the tokens were charged to (absent when nothing was charged). */
      window?: number
      /** The live-stream slot this request holds; give it back with releaseStream. */
      lease?: string
    }
  | {
      ok: false
      code: 'rate_limited' | 'overloaded' | 'idempotency_conflict'
      message: string
      retryAfterSeconds: number
    }

export type JobState = 'queued' | 'running' | 'completed' | 'failed' | 'cancelled'

export interface JobStatus {
  meta: JobMeta
  state: JobState
  bullState: string
  /** The last event of the job's stream when it is `done` or `error`. */
  final: StreamEvent | null
  /** Why BullMQ gave up on the job, when its stream has no final event. */
  failure: JobFailure | null
}

export const jobMetaKey = (prefix: string, jobId: string): string => `${prefix}:jobmeta:${jobId}`
