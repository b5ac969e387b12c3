import { type ChildProcess, spawn } from 'node:child_process'
import { once } from 'node:events'
import { createServer } from 'node:net'
import { fileURLToPath } from 'node:url'

const repoRoot = fileURLToPath(new URL('../..', import.meta.url))

/** A free loopback port, picked by the OS. */
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
  stop(): Promise<void>
}

/** Starts the edge Worker in the real workerd runtime (`wrangler dev`) and waits for /healthz. */
export async function startEdge(vars: Record<string, string> = {}): Promise<RunningEdge> {
  const port = await freePort()
  const args = ['wrangler', 'dev', '--ip', '127.0.0.1', '--port', String(port), '--inspector-port', '0']
  for (const [k, v] of Object.entries(vars)) args.push('--var', `${k}:${v}`)
  const child: ChildProcess = spawn('npx', args, {
    cwd: repoRoot,
    env: { ...process.env, WRANGLER_SEND_METRICS: 'false', CI: 'true' },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  })
  let log = ''
  child.stdout?.on('data', (d) => {
    log += d
  })
  child.stderr?.on('data', (d) => {
    log += d
  })
  const url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + 60_000
  for (;;) {
    if (child.exitCode !== null) throw new Error(`wrangler dev exited early:\n${log}`)
    try {
      const res = await fetch(`${url}/healthz`)
      if (res.ok) break
    } catch {}
    if (Date.now() > deadline) throw new Error(`wrangler dev did not come up in 60 s:\n${log}`)
    await new Promise((r) => setTimeout(r, 200))
  }
  return {
    url,
    async stop() {
      if (child.exitCode !== null) return
      process.kill(-child.pid!, 'SIGTERM')
      await Promise.race([once(child, 'exit'), new Promise((r) => setTimeout(r, 5000))])
      if (child.exitCode === null) process.kill(-child.pid!, 'SIGKILL')
    },
  }
}
