// `npm start`: the whole service on one machine. Makes sure Redis is up, seeds
// the dev tenant and key into the edge's local KV, starts the GPU worker(s) on
// the configured pools and the edge under `wrangler dev`, waits until each is
// healthy, then prints the URL, the dev key and a curl to try. Ctrl-C stops
// what it started, and only that.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { clusterPrefixProblem, connectRedis, parseClusterNodes, QUEUE_PREFIX } from '@moe/shared'
import { seedDev } from './seed-dev.ts'

const root = join(import.meta.dirname, '..', '..')
const env = process.env
const edgePort = Number(env.EDGE_PORT ?? 8787)
const workers = Number(env.MOE_WORKERS ?? 1)
const metricsBase = Number(env.MOE_METRICS_PORT ?? 9464)
if (!Number.isInteger(edgePort) || edgePort < 1 || edgePort > 65535)
  fail(`EDGE_PORT must be a port number (got ${env.EDGE_PORT})`)
if (!Number.isInteger(workers) || workers < 1 || workers > 16)
  fail(`MOE_WORKERS must be 1..16 (got ${env.MOE_WORKERS})`)

function fail(msg: string): never {
  console.error(`moe-edge: ${msg}`)
  process.exit(1)
}

const children: Array<{ name: string; child: ChildProcess }> = []
let redisPidFile: string | null = null

/** Prefixes each line of a child's output; pino's JSON lines become `level msg {fields}`. */
function pipeLogs(name: string, child: ChildProcess) {
  for (const stream of [child.stdout!, child.stderr!]) {
    createInterface({ input: stream }).on('line', (line) => {
      let text = line
      if (line.startsWith('{')) {
        try {
          const { level, msg, time: _t, pid: _p, hostname: _h, service: _s, ...rest } = JSON.parse(line)
          const lv =
            (
              { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' } as Record<
                number,
                string
              >
            )[level] ?? level
          text = `${lv} ${msg}${Object.keys(rest).length ? ` ${JSON.stringify(rest)}` : ''}`
        } catch {}
      }
      console.log(`[${name}] ${text}`)
    })
  }
}

function start(name: string, cmd: string, args: string[], extraEnv: Record<string, string> = {}) {
  // Own process group, so Ctrl-C reaches us first and we stop children in order.
  const child = spawn(cmd, args, {
    cwd: root,
    env: { ...env, ...extraEnv },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  })
  pipeLogs(name, child)
  child.on('exit', (code, signal) => {
    if (!stopping) {
      console.error(`moe-edge: ${name} exited (${signal ?? code}); stopping everything`)
      void stop(1)
    }
  })
  children.push({ name, child })
  return child
}

async function waitHealthy(name: string, url: string, timeoutMs = 120_000) {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    if (stopping) return
    try {
      if ((await fetch(url)).ok) return
    } catch {}
    await new Promise((r) => setTimeout(r, 250))
  }
  console.error(`moe-edge: ${name} did not become healthy at ${url} within ${timeoutMs / 1000} s`)
  await stop(1)
}

let stopping = false
async function stop(code: number) {
  if (stopping) return
  stopping = true
  console.log('moe-edge: stopping')
  // Edge first (no new work), then workers (they drain), then a Redis we started.
  for (const group of [
    children.filter((c) => c.name === 'edge'),
    children.filter((c) => c.name !== 'edge'),
  ]) {
    await Promise.all(
      group.map(async ({ child }) => {
        if (child.exitCode !== null || child.signalCode !== null) return
        process.kill(-child.pid!, 'SIGTERM')
        const exited = new Promise((r) => child.once('exit', r))
        const timer = setTimeout(
          () => child.exitCode === null && process.kill(-child.pid!, 'SIGKILL'),
          35_000,
        )
        await exited
        clearTimeout(timer)
      }),
    )
  }
  if (redisPidFile && existsSync(redisPidFile)) {
    process.kill(Number(readFileSync(redisPidFile, 'utf8')), 'SIGTERM')
    console.log('moe-edge: stopped the Redis it started')
  }
  process.exit(code)
}
process.on('SIGINT', () => void stop(0))
process.on('SIGTERM', () => void stop(0))

// REDIS_CLUSTER_NODES runs everything on a Redis Cluster (started elsewhere); else a single
// Redis at REDIS_URL, started here when it is local and not running.
let clusterNodes: ReturnType<typeof parseClusterNodes> = null
try {
  clusterNodes = parseClusterNodes(env.REDIS_CLUSTER_NODES)
} catch (e) {
  fail(`REDIS_CLUSTER_NODES: ${(e as Error).message}`)
}
const queuePrefix = env.MOE_QUEUE_PREFIX ?? QUEUE_PREFIX
if (clusterNodes) {
  const problem = clusterPrefixProblem(queuePrefix)
  if (problem) fail(`MOE_QUEUE_PREFIX: ${problem}`)
  const cluster = connectRedis(
    { redisUrl: env.REDIS_URL ?? 'redis://127.0.0.1:6379', redisClusterNodes: clusterNodes },
    { maxRetriesPerRequest: 1, connectTimeout: 3000, retryStrategy: () => null },
  )
  cluster.on('error', () => {})
  try {
    await cluster.ping()
    console.log(`redis: cluster at ${env.REDIS_CLUSTER_NODES}`)
  } catch (e) {
    fail(`the Redis Cluster at ${env.REDIS_CLUSTER_NODES} does not answer (${(e as Error).message})`)
  } finally {
    cluster.disconnect()
  }
} else {
  const redis = spawnSync('bash', [join(root, 'infra/scripts/ensure-redis.sh')], { encoding: 'utf8' })
  process.stdout.write(redis.stdout.replace(/^pidfile=.*\n?/m, ''))
  process.stderr.write(redis.stderr)
  if (redis.status !== 0) process.exit(1)
  redisPidFile = /^pidfile=(.*)$/m.exec(redis.stdout)?.[1] ?? null
}

const seeded = await seedDev()

for (let i = 0; i < workers; i++) {
  start(
    workers > 1 ? `worker-${i}` : 'worker',
    process.execPath,
    [join(root, 'gpu-worker/bin/moe.js'), 'serve'],
    {
      MOE_METRICS_PORT: String(metricsBase + i),
    },
  )
}
// The edge reads Redis from its wrangler vars: hand it the same Redis and prefix the workers use.
const edgeVars = [
  ...(env.REDIS_URL ? ['--var', `REDIS_URL:${env.REDIS_URL}`] : []),
  ...(clusterNodes ? ['--var', `REDIS_CLUSTER_NODES:${env.REDIS_CLUSTER_NODES}`] : []),
  ...(env.MOE_QUEUE_PREFIX ? ['--var', `QUEUE_PREFIX:${queuePrefix}`] : []),
]
start('edge', 'npx', ['wrangler', 'dev', '--ip', '127.0.0.1', '--port', String(edgePort), ...edgeVars], {
  WRANGLER_SEND_METRICS: 'false',
})

await Promise.all([
  ...Array.from({ length: workers }, (_, i) =>
    waitHealthy('worker', `http://127.0.0.1:${metricsBase + i}/healthz`),
  ),
  waitHealthy('edge', `http://127.0.0.1:${edgePort}/healthz`),
])
if (!stopping) {
  const url = `http://127.0.0.1:${edgePort}`
  console.log(`
moe-edge is up
  API:      ${url}/v1   (OpenAI-compatible)
  API key:  ${seeded.apiKey}   (tenant ${seeded.tenantIds[0]})
  metrics:  http://127.0.0.1:${metricsBase}/metrics
  dashboard: ${url}/dashboard   (sign in with the API key, or the admin token in .dev.vars)
  try:
    curl -N ${url}/v1/chat/completions \\
      -H "Authorization: Bearer ${seeded.apiKey}" -H "Content-Type: application/json" \\
      -d '{"model":"auto","stream":true,"max_tokens":96,"messages":[{"role":"user","content":"Who are you?"}]}'
  Ctrl-C stops everything started here.
`)
}
