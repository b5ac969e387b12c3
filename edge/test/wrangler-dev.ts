import { type ChildProcess, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export const repoRoot = join(import.meta.dirname, '..', '..')

/** A free loopback port, picked by the OS. */
/** Process groups this test process started; killed if it exits without stopping them. */
const started = new Set<number>()
process.on('exit', () => {
  for (const pid of started) {
    try {
      process.kill(-pid, 'SIGKILL')
    } catch {}
  }
})

/**
 * Spawns a detached child in its own process group (so it can be stopped with
 * everything it starts), owned by this test process, collecting its output.
 */
export function spawnOwned(
  cmd: string,
  args: string[],
  env: NodeJS.ProcessEnv,
): { child: ChildProcess; log: () => string } {
  const child = spawn(cmd, args, { cwd: repoRoot, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true })
  ownProcessGroup(child)
  let log = ''
  child.stdout?.on('data', (d) => {
    log += d
  })
  child.stderr?.on('data', (d) => {
    log += d
  })
  return { child, log: () => log }
}

/** Remembers a detached child's process group so it cannot outlive the test run. */
export function ownProcessGroup(child: ChildProcess): void {
  if (child.pid === undefined) return
  started.add(child.pid)
  child.once('exit', () => started.delete(child.pid!))
}

export async function freePort(): Promise<number> {
  const srv = createServer()
  srv.listen(0, '127.0.0.1')
  await once(srv, 'listening')
  const port = (srv.address() as { port: number }).port
  srv.close()
  return port
}

export interface RunningEdge {
  url: string
  /** The ADMIN_TOKEN this edge was started with. */
  adminToken: string
  /** Local KV/DO state of this run only (removed by stop). */
  persistDir: string
  /** Everything wrangler printed so far (for assertions on log lines). */
  log(): string
  stop(): Promise<void>
}

export interface StartOptions {
  /** Keep the state directory (default: a fresh temp dir per run, removed on stop). */
  persistDir?: string
}

/**
 * Starts the edge Worker in the real workerd runtime (`wrangler dev`) and waits for /healthz.
 * Each run gets its own local KV/Durable Object state and a random ADMIN_TOKEN unless `vars`
 * set one.
 */
export async function startEdge(
  vars: Record<string, string> = {},
  opts: StartOptions = {},
): Promise<RunningEdge> {
  const port = await freePort()
  const adminToken = vars.ADMIN_TOKEN ?? `adm_${randomBytes(18).toString('hex')}`
  const persistDir = opts.persistDir ?? mkdtempSync(join(tmpdir(), 'moe-edge-test-'))
  const args = ['wrangler', 'dev', '--ip', '127.0.0.1', '--port', String(port), '--inspector-port', '0']
  args.push('--persist-to', persistDir)
  for (const [k, v] of Object.entries({ ...vars, ADMIN_TOKEN: adminToken })) args.push('--var', `${k}:${v}`)
  const { child, log: output } = spawnOwned('npx', args, {
    ...process.env,
    WRANGLER_SEND_METRICS: 'false',
    CI: 'true',
  })
  const url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + 60_000
  for (;;) {
    if (child.exitCode !== null) throw new Error(`wrangler dev exited early:\n${output()}`)
    try {
      const res = await fetch(`${url}/healthz`)
      if (res.ok) break
    } catch {}
    if (Date.now() > deadline) throw new Error(`wrangler dev did not come up in 60 s:\n${output()}`)
    await new Promise((r) => setTimeout(r, 200))
  }
  return {
    url,
    adminToken,
    persistDir,
    log: output,
    async stop() {
      if (child.exitCode === null) {
        process.kill(-child.pid!, 'SIGTERM')
        await Promise.race([once(child, 'exit'), new Promise((r) => setTimeout(r, 5000))])
        if (child.exitCode === null) process.kill(-child.pid!, 'SIGKILL')
      }
      if (!opts.persistDir) rmSync(persistDir, { recursive: true, force: true })
    },
  }
}

/** Admin API helpers for tests: create a tenant and a key. */
export async function adminCall(
  edge: Pick<RunningEdge, 'url' | 'adminToken'>,
  method: string,
  path: string,
  body?: unknown,
): Promise<Response> {
  return fetch(`${edge.url}/admin${path}`, {
    method,
    headers: { authorization: `Bearer ${edge.adminToken}`, 'content-type': 'application/json' },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  })
}

export interface TestTenant {
  id: string
  key: string
  keyId: string
}

/** A fresh tenant (unique id per call) with one API key. */
export async function createTenant(
  edge: Pick<RunningEdge, 'url' | 'adminToken'>,
  overrides: Record<string, unknown> = {},
): Promise<TestTenant> {
  const id = (overrides.id as string | undefined) ?? `t_${randomBytes(6).toString('hex')}`
  const res = await adminCall(edge, 'POST', '/tenants', {
    id,
    name: `test tenant ${id}`,
    allowedPools: ['general', 'code', 'vision'],
    defaultPool: 'general',
    poolMap: { code: 'code', math: 'code', 'chat:image': 'vision' },
    ...overrides,
  })
  if (res.status !== 201) throw new Error(`create tenant: ${res.status} ${await res.text()}`)
  const k = await adminCall(edge, 'POST', `/tenants/${id}/keys`, { name: 'test' })
  if (k.status !== 201) throw new Error(`create key: ${k.status} ${await k.text()}`)
  const kb = (await k.json()) as { key: string; keyId: string }
  return { id, key: kb.key, keyId: kb.keyId }
}
