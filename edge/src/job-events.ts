import { decodeStreamEvent, jobEventsKey, MoeError, STREAM_FIELD, type StreamEvent } from '@moe/shared'
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

/**
 * Yields a job's events from the start of its stream (XREAD from id 0, so nothing is missed),
 * each token index once even if the job was retried, until `done` or `error`.
 */
export async function* jobEvents(redis: Redis, jobId: string, deadline: number): AsyncGenerator<StreamEvent> {
  const key = jobEventsKey(jobId)
  let lastId = '0'
  let nextIndex = 0
  for (;;) {
    const left = deadline - Date.now()
    if (left <= 0) throw new MoeError('deadline_exceeded', 'The model did not finish in time')
    const res = await redis.xread(
      'COUNT',
      512,
      'BLOCK',
      Math.min(5000, Math.max(1, left)),
      'STREAMS',
      key,
      lastId,
    )
    const entries = res?.[0]?.[1] ?? []
    for (const [id, fields] of entries) {
      lastId = id
      const i = fields.indexOf(STREAM_FIELD)
      if (i < 0) continue
      const ev = decodeStreamEvent(fields[i + 1]!)
      if (ev.type === 'token') {
        if (ev.index < nextIndex) continue
        nextIndex = ev.index + 1
      }
      yield ev
      if (ev.type !== 'token') return
    }
  }
}
