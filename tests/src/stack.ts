// The whole service on free ports with isolated state, started the way `npm start` starts it:
// Redis (the shared one on 127.0.0.1:6379, or a private one), the GPU worker(s) on the tiny model
// (`npx moe serve`) and the edge in workerd (`wrangler dev`) with its own persist dir and queue
// prefix, tenants seeded from infra/config/tenants.dev.json through the admin API. stop() ends
// exactly what it started and removes the queue prefix's keys.
//
// MOE_E2E_URL (+ MOE_E2E_ADMIN_TOKEN, default: ADMIN_TOKEN from .dev.vars) reuses a running stack,
// e.g. `npm start`, for the suites that need no control over its processes.
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  connectRedis,
  isCluster,
  parseClusterNodes,
  QUEUE_PREFIX,
  type RedisClient,
  TenantConfig,
} from '@moe/shared'
import { Redis } from 'ioredis'
import { REDIS_URL, type RunningWorker, startGpuWorker } from '../../edge/test/gpu-worker.ts'
import {
  createTenant,
  freePort,
  type RunningEdge,
  repoRoot,
  startEdge,
  type TestTenant,
} from '../../edge/test/wrangler-dev.ts'

export { adminCall, createTenant, freePort, repoRoot, type TestTenant } from '../../edge/test/wrangler-dev.ts'

/** What a test needs to talk to a stack (serialisable: vitest's globalSetup provides it). */
export interface StackInfo {
  /** Edge base URL, without /v1. */
  url: string
  adminToken: string
  redisUrl: string
  /** REDIS_CLUSTER_NODES when the stack runs on a Redis Cluster. */
  clusterNodes?: string
  /** QUEUE_PREFIX / MOE_QUEUE_PREFIX of this stack. */
  prefix: string
  /** Process ids of the workers this stack started (empty when reusing a running stack). */
  workerPids: number[]
  reused: boolean
}

export interface Stack extends StackInfo {
  edge: RunningEdge | null
  workers: RunningWorker[]
  /** Starts one more worker on this stack's Redis and queues. */
  addWorker(env?: Record<string, string>): Promise<RunningWorker>
  stop(): Promise<void>
}

export interface StackOptions {
  workers?: number
  redisUrl?: string
  /** Run on a Redis Cluster: its REDIS_CLUSTER_NODES (`redisUrl` then names one of its nodes). */
  clusterNodes?: string
  /** Extra worker environment (MOE_LOCK_MS, MOE_STALLED_INTERVAL_MS, ...). */
  workerEnv?: Record<string, string>
  /** Extra edge vars. */
  edgeVars?: Record<string, string>
}

const POOLS = ['general', 'code', 'vision']

/** The dev tenant's config (infra/config/tenants.dev.json), the one `npm start` seeds. */
export function devTenantConfig(): TenantConfig {
  const file = JSON.parse(readFileSync(join(repoRoot, 'infra/config/tenants.dev.json'), 'utf8')) as {
    tenants: unknown[]
  }
  return TenantConfig.parse(file.tenants[0])
}

/** A fresh tenant with the dev tenant's config (unique id) and one key; `overrides` replace fields. */
export function devTenant(stack: StackInfo, overrides: Partial<TenantConfig> = {}): Promise<TestTenant> {
  const id = `e2e_${randomBytes(5).toString('hex')}`
  return createTenant(stack, { ...devTenantConfig(), id, name: `e2e ${id}`, ...overrides })
}

function reusedStack(): Stack | null {
  const url = process.env.MOE_E2E_URL
  if (!url) return null
  let adminToken = process.env.MOE_E2E_ADMIN_TOKEN
  if (!adminToken) {
    const vars = join(repoRoot, '.dev.vars')
    const m = existsSync(vars)
      ? /^ADMIN_TOKEN\s*=\s*"?([^"\n]+)"?\s*$/m.exec(readFileSync(vars, 'utf8'))
      : null
    adminToken = m?.[1]
  }
  if (!adminToken) throw new Error('MOE_E2E_URL is set: set MOE_E2E_ADMIN_TOKEN too (the edge ADMIN_TOKEN)')
  return {
    url: url.replace(/\/+(v1\/?)?$/, ''),
    adminToken,
    redisUrl: process.env.REDIS_URL ?? REDIS_URL,
    prefix: process.env.QUEUE_PREFIX ?? QUEUE_PREFIX,
    workerPids: [],
    reused: true,
    edge: null,
    workers: [],
    addWorker: () => Promise.reject(new Error('a reused stack cannot add workers')),
    stop: async () => {},
  }
}

/** Starts edge and workers (or reuses MOE_E2E_URL when `allowReuse`). */
export async function startStack(opts: StackOptions = {}, allowReuse = false): Promise<Stack> {
  if (allowReuse) {
    const reused = reusedStack()
    if (reused) return reused
  }
  const redisUrl = opts.redisUrl ?? REDIS_URL
  const clusterNodes = opts.clusterNodes
  // On a cluster every queue key of the stack shares one slot (its hash tag).
  const prefix = clusterNodes
    ? `{e2e-${randomBytes(4).toString('hex')}}`
    : `e2e-${randomBytes(4).toString('hex')}`
  const workers: RunningWorker[] = []
  const workerEnv = { MOE_LOG_LEVEL: 'info', ...opts.workerEnv }
  const addWorker = async (env: Record<string, string> = {}) => {
    const w = await startGpuWorker(prefix, POOLS, {
      redisUrl,
      ...(clusterNodes ? { clusterNodes } : {}),
      env: { ...workerEnv, ...env },
    })
    workers.push(w)
    stack.workerPids.push(w.pid)
    return w
  }
  let edge: RunningEdge | null = null
  const stack: Stack = {
    url: '',
    adminToken: '',
    redisUrl,
    ...(clusterNodes ? { clusterNodes } : {}),
    prefix,
    workerPids: [],
    reused: false,
    edge: null,
    workers,
    addWorker,
    async stop() {
      await edge?.stop()
      await Promise.all(workers.map((w) => w.stop()))
      await deleteKeys({ redisUrl, redisClusterNodes: parseClusterNodes(clusterNodes) }, `${prefix}:*`).catch(
        () => {},
      )
    },
  }
  try {
    // The edge comes up beside the first worker; further workers one at a time (each waits for
    // one more consumer on every pool queue).
    const [e, w] = await Promise.allSettled([
      startEdge({
        QUEUE_PREFIX: prefix,
        REDIS_URL: redisUrl,
        ...(clusterNodes ? { REDIS_CLUSTER_NODES: clusterNodes } : {}),
        ...opts.edgeVars,
      }),
      addWorker(),
    ])
    if (e.status === 'fulfilled') edge = e.value
    if (e.status === 'rejected') throw e.reason
    if (w.status === 'rejected') throw w.reason
    for (let i = 1; i < (opts.workers ?? 1); i++) await addWorker()
  } catch (err) {
    await stack.stop()
    throw err
  }
  stack.edge = edge
  stack.url = edge!.url
  stack.adminToken = edge!.adminToken
  return stack
}

async function deleteKeys(endpoint: Parameters<typeof connectRedis>[0], pattern: string): Promise<void> {
  const redis = connectRedis(endpoint, {
    maxRetriesPerRequest: 1,
    lazyConnect: true,
    retryStrategy: () => null,
  })
  redis.on('error', () => {})
  // SCAN walks one node: on a cluster, every master in turn (the pattern's keys share a slot).
  const scanAll = async (node: RedisClient) => {
    let cursor = '0'
    do {
      const [next, keys] = await node.scan(cursor, 'MATCH', pattern, 'COUNT', 1000)
      cursor = next
      if (keys.length > 0) await node.del(...keys)
    } while (cursor !== '0')
  }
  try {
    await redis.connect()
    await Promise.all(isCluster(redis) ? redis.nodes('master').map(scanAll) : [scanAll(redis)])
  } finally {
    redis.disconnect()
  }
}

// ---------------------------------------------------------------- a private Redis

export interface PrivateRedis {
  url: string
  port: number
  dir: string
  /** SIGKILL (no shutdown save: only the AOF survives). */
  kill(): Promise<void>
  /** Starts it again on the same port and data dir (replays the AOF). */
  start(): Promise<void>
  /** Stops it for good and removes its data. */
  stop(): Promise<void>
}

/**
 * A redis-server of this test run only, on a free loopback port, with AOF (fsync on every write)
 * in a temp dir: the one a fault test may kill and restart. The shared 6379 is never touched.
 * `durable: false` turns persistence off (benchmarks that count Redis work want no AOF writes).
 */
export async function startPrivateRedis({ durable = true } = {}): Promise<PrivateRedis> {
  const port = await freePort()
  const dir = mkdtempSync(join(tmpdir(), 'moe-e2e-redis-'))
  let child: ReturnType<typeof spawn> | null = null
  const url = `redis://127.0.0.1:${port}`
  const up = async () => {
    child = spawn(
      'redis-server',
      [
        '--bind',
        '127.0.0.1',
        '--port',
        String(port),
        '--dir',
        dir,
        ...(durable ? ['--appendonly', 'yes', '--appendfsync', 'always'] : ['--appendonly', 'no']),
        '--maxmemory-policy',
        'noeviction',
        '--save',
        '',
        '--logfile',
        join(dir, 'redis.log'),
      ],
      { stdio: 'ignore' },
    )
    const deadline = Date.now() + 15_000
    for (;;) {
      const r = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null })
      r.on('error', () => {})
      try {
        await r.connect()
        if ((await r.ping()) === 'PONG') return
      } catch {
        // not yet (or still loading the AOF)
      } finally {
        r.disconnect()
      }
      if (child.exitCode !== null) throw new Error(`redis-server exited: see ${dir}/redis.log`)
      if (Date.now() > deadline) throw new Error(`redis-server did not answer on ${port}`)
      await new Promise((r) => setTimeout(r, 100))
    }
  }
  const down = async () => {
    const c = child
    if (!c || c.exitCode !== null || c.signalCode !== null) return
    const exited = once(c, 'exit')
    c.kill('SIGKILL')
    await exited
  }
  await up()
  return {
    url,
    port,
    dir,
    kill: down,
    start: up,
    async stop() {
      await down()
      rmSync(dir, { recursive: true, force: true })
    },
  }
}
