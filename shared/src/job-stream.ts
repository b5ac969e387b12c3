import type { ChainableCommander } from 'ioredis'
import { MoeError } from './errors.ts'
import { JOB_CANCEL_CHANNEL, JOB_STREAM_TTL_SECONDS, jobCancelKey, jobEventsKey } from './keys.ts'
import { execPerSlot, isCluster, type RedisClient } from './redis-connection.ts'
import { type StreamEvent, streamEntryEvent } from './stream.ts'

// The Redis side of the job contract, written once for the edge and the workers: reading a
// job's event stream and asking workers to stop a job.

export interface ReadJobStreamOptions {
  /** Epoch ms; past it the reader throws `deadline_exceeded`. */
  deadline?: number
  /** Longest single XREAD block, in ms. */
  blockMs?: number
}

/**
 * Yields a job's events from the start of its stream (XREAD from id 0, so a reader that
 * arrives late misses nothing) until `done` or `error`. Each token index is yielded once, even
 * when a retried job's stream holds some twice.
 */
export async function* readJobStream(
  redis: RedisClient,
  jobId: string,
  { deadline = Number.POSITIVE_INFINITY, blockMs = 5000 }: ReadJobStreamOptions = {},
): AsyncGenerator<StreamEvent> {
  const key = jobEventsKey(jobId)
  let cursor = '0'
  // Per choice: a job with n > 1 interleaves the tokens of its choices.
  const nextIndex = new Map<number, number>()
  for (;;) {
    const left = deadline - Date.now()
    if (left <= 0) throw new MoeError('deadline_exceeded', 'The model did not finish in time')
    const block = Math.max(1, Math.min(blockMs, left))
    const res = await redis.xread('COUNT', 512, 'BLOCK', block, 'STREAMS', key, cursor)
    for (const [id, fields] of res?.[0]?.[1] ?? []) {
      cursor = id
      const event = streamEntryEvent(fields)
      if (!event) continue
      if (event.type === 'token') {
        const choice = event.choice ?? 0
        if (event.index < (nextIndex.get(choice) ?? 0)) continue
        nextIndex.set(choice, event.index + 1)
      }
      yield event
      if (event.type !== 'token') return
    }
  }
}

/** The newest event of a job's stream, or null when the stream is empty or gone. */
export async function lastJobEvent(redis: RedisClient, jobId: string): Promise<StreamEvent | null> {
  const [entry] = await redis.xrevrange(jobEventsKey(jobId), '+', '-', 'COUNT', 1)
  return entry ? streamEntryEvent(entry[1]) : null
}

/**
 * Queues the commands that ask workers to drop jobs: the cancel key (read by a worker before a
 * job starts, and by its fallback poll) and a PUBLISH (seen at the next step boundary).
 */
export function queueCancel(m: ChainableCommander, jobIds: readonly string[]): ChainableCommander {
  for (const id of jobIds)
    m.set(jobCancelKey(id), '1', 'EX', JOB_STREAM_TTL_SECONDS).publish(JOB_CANCEL_CHANNEL, id)
  return m
}

/**
 * Asks workers to drop these jobs, in one MULTI. On a cluster each cancel key has its job's slot
 * (and ioredis routes PUBLISH by its channel), so the keys are set first, then the ids published.
 */
export async function cancelJobs(redis: RedisClient, jobIds: readonly string[]): Promise<void> {
  if (jobIds.length === 0) return
  if (!isCluster(redis)) {
    await queueCancel(redis.multi(), jobIds).exec()
    return
  }
  const set = await execPerSlot(redis, jobIds, jobCancelKey, (p, id) =>
    p.set(jobCancelKey(id), '1', 'EX', JOB_STREAM_TTL_SECONDS),
  )
  const failed = set.flat().find(([err]) => err)
  if (failed) throw failed[0]
  const pub = redis.pipeline()
  for (const id of jobIds) pub.publish(JOB_CANCEL_CHANNEL, id)
  await pub.exec()
}
