import {
  type DoneEvent,
  type ErrorEvent,
  execPerSlot,
  JOB_STREAM_TTL_SECONDS,
  jobCancelKey,
  jobEventsKey,
  type RedisClient,
  type StreamEvent,
  streamEntryEvent,
  streamEntryFields,
  type TokenEvent,
} from '@moe/shared'

/** Streams of unfinished jobs live this long, in case their worker dies for good. */
const RUNNING_TTL_SECONDS = 24 * 3600

/**
 * Writes token events to each job's Redis stream. Events are buffered and sent
 * in one pipeline per scheduler step, so a batch of 32 sequences costs one
 * round trip per step, not 32. This is the one module that talks to Redis
 * about streams and cancel keys.
 */
export class TokenStreamWriter {
  private readonly redis: RedisClient
  private buffered: Array<[string, StreamEvent]> = []
  private readonly ending = new Set<string>()
  private readonly withTtl = new Set<string>()
  private acked: Promise<void> = Promise.resolve()

  constructor(redis: RedisClient) {
    this.redis = redis
  }

  /**
   * Where a job's stream stands, in one round trip: the last token index
   * already written (-1 if none), the end event if the stream already ended
   * (a worker died after writing it), and whether the job was cancelled before
   * it started. A retried job skips what is there, so readers see each index once.
   */
  async resumePoint(
    jobId: string,
  ): Promise<{ lastIndex: number; end: DoneEvent | ErrorEvent | null; cancelled: boolean }> {
    const [[, entries], [, cancelled]] = (await this.redis
      .pipeline()
      .xrevrange(jobEventsKey(jobId), '+', '-', 'COUNT', 2)
      .exists(jobCancelKey(jobId))
      .exec()) as [[null, Array<[string, string[]]>], [null, number]]
    const events = entries.flatMap(([, fields]) => streamEntryEvent(fields) ?? [])
    const newest = events[0]
    const end = newest && newest.type !== 'token' ? newest : null
    const lastToken = events.find((e) => e.type === 'token')
    return { lastIndex: lastToken?.type === 'token' ? lastToken.index : -1, end, cancelled: cancelled === 1 }
  }

  /**
   * The token ids already written for each choice of a retried job, in index order: the retry takes
   * them instead of sampling (see GenerationParams.resumeIds), so the text its client already has
   * continues. One pass over the stream, read only when a job is retried mid-stream.
   */
  async streamedTokens(jobId: string): Promise<Map<number, number[]>> {
    const entries = await this.redis.xrange(jobEventsKey(jobId), '-', '+')
    const ids = new Map<number, number[]>()
    for (const [, fields] of entries) {
      const e = streamEntryEvent(fields)
      if (e?.type !== 'token') continue
      const choice = ids.get(e.choice ?? 0) ?? []
      choice[e.index] = e.tokenId
      ids.set(e.choice ?? 0, choice)
    }
    return ids
  }

  /** Drops what this writer remembers about a job that left this worker (retry, hand-back, end). */
  forget(jobId: string): void {
    this.withTtl.delete(jobId)
  }

  token(jobId: string, event: TokenEvent): void {
    this.buffered.push([jobId, event])
  }

  /** Ends a job's stream with `done` or `error` (buffered; the caller flushes). */
  end(jobId: string, event: DoneEvent | ErrorEvent): void {
    this.buffered.push([jobId, event])
    this.ending.add(jobId)
  }

  /**
   * Sends everything buffered in one pipeline, at once: commands on one
   * connection reach Redis in the order they were written, so events keep
   * their order without waiting for the previous reply. The returned promise
   * settles when this and every earlier flush has been acknowledged; await it
   * before completing a job, or let it run behind the next step.
   */
  flush(): Promise<void> {
    if (this.buffered.length > 0) {
      const sent = this.send(this.buffered, new Set(this.ending))
      this.buffered = []
      this.ending.clear()
      // A failed send is reported to its own awaiters; later flushes still go out.
      this.acked = Promise.all([this.acked.catch(() => {}), sent]).then(() => {})
    }
    return this.acked
  }

  private async send(batch: Array<[string, StreamEvent]>, ending: Set<string>): Promise<void> {
    // Each job's commands in order; on a cluster, each job's go in their own pipeline (its slot).
    const byJob = new Map<string, StreamEvent[]>()
    for (const [jobId, event] of batch) byJob.get(jobId)?.push(event) ?? byJob.set(jobId, [event])
    for (const jobId of ending) if (!byJob.has(jobId)) byJob.set(jobId, [])
    const results = await execPerSlot(this.redis, [...byJob.keys()], jobEventsKey, (pipe, jobId) => {
      const key = jobEventsKey(jobId)
      for (const event of byJob.get(jobId)!) pipe.xadd(key, '*', ...streamEntryFields(event))
      if (ending.has(jobId)) {
        pipe.expire(key, JOB_STREAM_TTL_SECONDS)
        pipe.expire(jobCancelKey(jobId), JOB_STREAM_TTL_SECONDS)
        this.withTtl.delete(jobId)
      } else if (!this.withTtl.has(jobId)) {
        // A TTL from the first event on, so a stream whose worker died for good still expires.
        pipe.expire(key, RUNNING_TTL_SECONDS)
        this.withTtl.add(jobId)
      }
    })
    const failed = results.flat().find(([err]) => err)
    if (failed) throw failed[0]
  }

  /** The ids among `jobIds` whose cancel key is set (one round trip; on a cluster, one per job, at once). */
  async cancelled(jobIds: readonly string[]): Promise<string[]> {
    if (jobIds.length === 0) return []
    const results = await execPerSlot(this.redis, jobIds, jobCancelKey, (pipe, id) =>
      pipe.exists(jobCancelKey(id)),
    )
    return jobIds.filter((_, i) => results[i]?.[0]?.[1] === 1)
  }
}
