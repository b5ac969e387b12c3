// A Redis Cluster of this test run only: three masters (no replicas) on free loopback ports, each
// in a temp dir without persistence, joined by `redis-cli --cluster create`. The shared 6379 is
// never touched.
import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { Redis } from 'ioredis'
import { freePort } from './stack.ts'

const run = promisify(execFile)

export interface RedisCluster {
  /** REDIS_CLUSTER_NODES for the edge and the workers. */
  nodes: string
  /** redis:// URL of the first master (the cluster's credentials: none here). */
  url: string
  ports: number[]
  stop(): Promise<void>
}

async function answers(port: number): Promise<boolean> {
  const r = new Redis(port, '127.0.0.1', {
    lazyConnect: true,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
  })
  r.on('error', () => {})
  try {
    await r.connect()
    return (await r.ping()) === 'PONG'
  } catch {
    return false
  } finally {
    r.disconnect()
  }
}

/** Starts the masters, creates the cluster and waits until every slot is served (cluster_state ok). */
export async function startRedisCluster(masters = 3): Promise<RedisCluster> {
  const dir = mkdtempSync(join(tmpdir(), 'moe-e2e-cluster-'))
  const children: ChildProcess[] = []
  const ports: number[] = []
  const stop = async () => {
    await Promise.all(
      children.map(async (c) => {
        if (c.exitCode !== null || c.signalCode !== null) return
        const exited = once(c, 'exit')
        c.kill('SIGKILL')
        await exited
      }),
    )
    rmSync(dir, { recursive: true, force: true })
  }
  try {
    for (let i = 0; i < masters; i++) {
      // Cluster bus port = port + 10000: keep both below 65536 and free.
      let port = await freePort()
      while (port > 55_000) port = await freePort()
      ports.push(port)
      children.push(
        spawn(
          'redis-server',
          [
            '--bind',
            '127.0.0.1',
            '--port',
            String(port),
            '--cluster-enabled',
            'yes',
            '--cluster-config-file',
            join(dir, `nodes-${port}.conf`),
            '--cluster-node-timeout',
            '5000',
            '--dir',
            dir,
            '--dbfilename',
            `dump-${port}.rdb`,
            '--save',
            '',
            '--appendonly',
            'no',
            '--maxmemory-policy',
            'noeviction',
            '--logfile',
            join(dir, `redis-${port}.log`),
          ],
          { stdio: 'ignore' },
        ),
      )
    }
    const deadline = Date.now() + 15_000
    for (const [i, port] of ports.entries()) {
      while (!(await answers(port))) {
        if (children[i]!.exitCode !== null)
          throw new Error(`redis-server exited: see ${dir}/redis-${port}.log`)
        if (Date.now() > deadline) throw new Error(`redis-server did not answer on ${port}`)
        await new Promise((r) => setTimeout(r, 100))
      }
    }
    await run('redis-cli', [
      '--cluster',
      'create',
      ...ports.map((p) => `127.0.0.1:${p}`),
      '--cluster-replicas',
      '0',
      '--cluster-yes',
    ])
    // Every node must see the whole cluster before clients read its slot map.
    for (const port of ports) {
      for (;;) {
        const { stdout } = await run('redis-cli', ['-p', String(port), 'cluster', 'info'])
        if (/cluster_state:ok/.test(stdout) && new RegExp(`cluster_known_nodes:${masters}\\b`).test(stdout))
          break
        if (Date.now() > deadline + 30_000) throw new Error(`cluster not ok on ${port}:\n${stdout}`)
        await new Promise((r) => setTimeout(r, 200))
      }
    }
  } catch (e) {
    await stop()
    throw e
  }
  return {
    nodes: ports.map((p) => `127.0.0.1:${p}`).join(','),
    url: `redis://127.0.0.1:${ports[0]}`,
    ports,
    stop,
  }
}
