import { randomUUID } from 'node:crypto'
import { poolQueueName, type StreamEvent } from '@moe/shared'
import { Worker } from 'bullmq'
import { Redis } from 'ioredis'
import pino from 'pino'
import { afterEach, describe, expect, it } from 'vitest'
import { ThreadedEngine } from '../src/engine/threaded-engine.ts'
import { loadWorkerConfig } from '../src/service/config.ts'
import { WorkerService } from '../src/service/worker-service.ts'
import { payload, QueueClient, REDIS_URL, testEnv, uniquePrefix } from './service-harness.ts'

// Faults inside one worker process, against the real Redis and engine.

const cleanup: Array<() => Promise<unknown>> = []
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f().catch(() => {})
})

async function start(prefix: string, extra: Record<string, string> = {}) {
  const fatal: Error[] = []
  const service = new WorkerService(
    loadWorkerConfig(testEnv(prefix, extra)),
    pino({ level: 'silent' }),
    (e) => fatal.push(e),
  )
  await service.start()
  cleanup.push(() => service.close())
  return { service, fatal }
}

describe('worker faults', () => {
  it('a dead engine thread: stops taking jobs, reports unhealthy, and asks to exit', async () => {
    const prefix = uniquePrefix()
    const client = new QueueClient(prefix)
    cleanup.push(() => client.close())
    const { service, fatal } = await start(prefix, { MOE_POOLS: 'general' })
    const engine = service.runtimeFor('general')!.engine
    expect(engine).toBeInstanceOf(ThreadedEngine)
    expect(service.health()).toMatchObject({ ok: true, status: 'ok' })

    await (engine as ThreadedEngine).terminate()
    for (let i = 0; i < 100 && fatal.length === 0; i++) await new Promise((r) => setTimeout(r, 20))
    expect(fatal).toHaveLength(1)
    expect(service.health()).toMatchObject({ ok: false, status: 'engine_failed' })
    const res = await fetch(`http://127.0.0.1:${service.healthPort}/healthz`)
    expect(res.status).toBe(503)

    // A job queued now is left for a healthy worker, not taken and failed.
    const p = payload('general')
    await client.add(p, { attempts: 2 })
    await new Promise((r) => setTimeout(r, 800))
    expect(['waiting', 'prioritized']).toContain(await client.queue('general').getJobState(p.requestId!))
    // The queue-depth gauge (what an autoscaler reads) counts it, and batch lines at any offset.
    const line = payload('general', { priority: 'batch' })
    await client.queue('general').add('generate', line, { jobId: line.requestId, priority: 10 + 37 })
    const metrics = await (await fetch(`http://127.0.0.1:${service.healthPort}/metrics`)).text()
    expect(metrics).toContain('moe_queue_depth{pool="general",priority="live"} 1')
    expect(metrics).toContain('moe_queue_depth{pool="general",priority="async"} 0')
    expect(metrics).toContain('moe_queue_depth{pool="general",priority="batch"} 1')
  })

  it('a job that stalled past the limit gets a final error event, so clients stop waiting', async () => {
    const prefix = uniquePrefix()
    const client = new QueueClient(prefix)
    cleanup.push(() => client.close())
    const p = payload('general')
    await client.add(p)
    // A worker that takes the job and then hangs: it never renews its lock.
    const thiefConn = new Redis(REDIS_URL, { maxRetriesPerRequest: null })
    const thief = new Worker(poolQueueName('general'), null, {
      connection: thiefConn,
      prefix,
      lockDuration: 1000,
      autorun: false,
    })
    cleanup.push(async () => {
      await thief.close(true)
      thiefConn.disconnect()
    })
    const taken = await thief.getNextJob(randomUUID())
    expect(taken?.id).toBe(p.requestId)

    await start(prefix, {
      MOE_POOLS: 'general',
      MOE_LOCK_MS: '1000',
      MOE_STALLED_INTERVAL_MS: '500',
      MOE_MAX_STALLED_COUNT: '0',
    })
    const events: StreamEvent[] = await client.events(p.requestId!, 15_000)
    expect(events.at(-1)).toMatchObject({ type: 'error', code: 'internal_error' })
    expect(events.filter((e) => e.type !== 'token')).toHaveLength(1)
    expect(await client.queue('general').getJobState(p.requestId!)).toBe('failed')
  })
})
