// Queue and Redis key names: the one place both sides take them from.

/** BullMQ queue that feeds one expert pool. */
export const poolQueueName = (pool: string): string => `pool.${pool}`

/** Redis stream of one job's token events. */
export const jobEventsKey = (jobId: string): string => `moe:job:${jobId}:events`

/** Set by the edge when the client goes away; the scheduler drops the sequence at the next step. */
export const jobCancelKey = (jobId: string): string => `moe:job:${jobId}:cancel`

/**
 * Whoever sets a cancel key also publishes the job id here, so workers react
 * at the next step without polling every key every step (they still poll the
 * keys of running jobs now and then, in case a message was missed).
 */
export const JOB_CANCEL_CHANNEL = 'moe:cancel'

/**
 * How long a job's stream and cancel key live after the job ends: as long as
 * the job's own record (the edge answers GET /v1/jobs/{id} and idempotent
 * retries from the stream), so the two expire together.
 */
export const JOB_STREAM_TTL_SECONDS = 86_400

/** Prefix for every BullMQ key, so the service can share a Redis with others. */
export const QUEUE_PREFIX = 'moe'
