import {
  connectRedis,
  type RedisClient,
  type RedisEndpoint,
  readJobStream,
  type StreamEvent,
} from '@moe/shared'

/**
 * A connection of this request's own for reading one job's event stream (blocking reads would
 * stall the shared connection of the Durable Object). Created before the enqueue so the TCP
 * handshake overlaps it.
 */
export function openReader(endpoint: RedisEndpoint): RedisClient {
  const redis = connectRedis(endpoint, {
    maxRetriesPerRequest: 1,
    connectTimeout: 2000,
    enableReadyCheck: false,
  })
  redis.on('error', () => {})
  return redis
}

export function closeReader(redis: RedisClient): void {
  try {
    redis.disconnect()
  } catch {}
}

/** A job's events until `done` or `error`, each token index once; past `deadline` it throws 504. */
export const jobEvents = (redis: RedisClient, jobId: string, deadline: number): AsyncGenerator<StreamEvent> =>
  readJobStream(redis, jobId, { deadline })
