import { readJobStream, type StreamEvent } from '@moe/shared'
import { Redis } from 'ioredis'

/**
 * A connection of this request's own for reading one job's event stream (blocking reads would
 * stall the shared connection of the Durable Object). Created before the enqueue so the TCP
 * handshake overlaps it.
 */
export function openReader(url: string): Redis {
  const redis = new Redis(url, { maxRetriesPerRequest: 1, connectTimeout: 2000, enableReadyCheck: false })
  redis.on('error', () => {})
  return redis
}

export function closeReader(redis: Redis): void {
  try {
    redis.disconnect()
  } catch {}
}

/** A job's events until `done` or `error`, each token index once; past `deadline` it throws 504. */
export const jobEvents = (redis: Redis, jobId: string, deadline: number): AsyncGenerator<StreamEvent> =>
  readJobStream(redis, jobId, { deadline })
