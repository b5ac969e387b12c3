// Queue and Redis key names: the one place both sides take them from.
//
// Redis Cluster hashes a key by its first {tag}. Two groups of keys, so multi-key commands and
// scripts stay in one slot:
//   {moe}...           everything under the queue prefix (BullMQ's queues, which a batch flow
//                      spans, admission counters, batch and webhook records): one slot;
//   moe:job:{<id>}:... a job's token stream and cancel key: a slot per job, so the per-token
//                      traffic spreads over every shard.

/** BullMQ queue that feeds one expert pool. */
export const poolQueueName = (pool: string): string => `pool.${pool}`

/** Redis stream of one job's token events (tagged by the job id: one slot with its cancel key). */
export const jobEventsKey = (jobId: string): string => `moe:job:{${jobId}}:events`

/** Set by the edge when the client goes away; the scheduler drops the sequence at the next step. */
export const jobCancelKey = (jobId: string): string => `moe:job:{${jobId}}:cancel`

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

/**
 * Prefix for every BullMQ key, so the service can share a Redis with others. Its hash tag keeps
 * all queues in one cluster slot: a batch is one BullMQ flow whose parent (on the batch queue)
 * and children (on the pool queues) BullMQ's scripts update together.
 */
export const QUEUE_PREFIX = '{moe}'

/** What a queue prefix may look like: a name, optionally with (or as) one {hash tag}. */
export const QUEUE_PREFIX_PATTERN = /^[\w.-]*(\{[\w.-]+\})?[\w.-]*$/

/**
 * A tenant's jobs queued on one pool and not yet taken by a worker (job ids scored by their
 * deadline): the edge adds at enqueue, the worker removes when it takes one, and a job whose
 * deadline passed drops out. It gives each tenant a share of a pool's queue depth.
 */
export const tenantQueuedKey = (prefix: string, pool: string, tenantId: string): string =>
  `${prefix}:queued:${pool}:${tenantId}`

/** Tokens charged to a tenant in one minute window (the edge's tokens-per-minute limit). */
export const tenantTokensKey = (prefix: string, tenantId: string, window: number): string =>
  `${prefix}:rl:${tenantId}:t:${window}`

/**
 * Settles a charge once real usage is known: adds the difference to the minute it was charged
 * to, while that window's counter still exists (KEYS[1] = tenantTokensKey, ARGV[1] = delta).
 */
export const SETTLE_TOKENS_LUA =
  "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end return 0"
