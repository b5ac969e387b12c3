// Queue and Redis key names: the one place both sides take them from.

/** BullMQ queue that feeds one expert pool. */
export const poolQueueName = (pool: string): string => `pool.${pool}`

/** Redis stream of one job's token events. */
export const jobEventsKey = (jobId: string): string => `moe:job:${jobId}:events`

/** Set by the edge when the client goes away; the scheduler drops the sequence at the next step. */
export const jobCancelKey = (jobId: string): string => `moe:job:${jobId}:cancel`

/** How long a job's stream and cancel key live after the job ends. */
export const JOB_STREAM_TTL_SECONDS = 3600

/** Prefix for every BullMQ key, so the service can share a Redis with others. */
export const QUEUE_PREFIX = 'moe'
