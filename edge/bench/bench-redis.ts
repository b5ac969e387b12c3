// Shared by streams-bench.ts and redis-ops-bench.ts: a private redis-server of this run only (so
// INFO clients / commandstats / stats count this stack's traffic and nothing else), the whole
// stack on it the way tests/src/stack.ts starts it (wrangler dev + `moe serve` on the tiny
// model), and small readers of INFO.
import { spawnSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { Redis } from 'ioredis'
import { startPrivateRedis } from '../../tests/src/stack.ts'

export interface BenchRedis {
  url: string
  port: number
  version: string
  stop(): Promise<void>
}

/** redis-server on a free loopback port, no persistence, data in a temp dir (tests/src/stack.ts). */
export async function startBenchRedis(): Promise<BenchRedis> {
  const redis = await startPrivateRedis({ durable: false })
  const r = new Redis(redis.url, { maxRetriesPerRequest: 1 })
  try {
    const version = /redis_version:(\S+)/.exec(await r.info('server'))?.[1] ?? '?'
    return { url: redis.url, port: redis.port, version, stop: () => redis.stop() }
  } finally {
    r.disconnect()
  }
}

/** INFO <section> as numbers where they are numbers. */
export async function infoOf(redis: Redis, section: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {}
  for (const line of (await redis.info(section)).split('\r\n')) {
    const i = line.indexOf(':')
    if (i > 0 && !line.startsWith('#')) out[line.slice(0, i)] = line.slice(i + 1)
  }
  return out
}

export const num = (info: Record<string, string>, k: string): number => Number(info[k] ?? Number.NaN)

/** INFO commandstats: command -> calls. */
export async function commandCalls(redis: Redis): Promise<Record<string, number>> {
  const out: Record<string, number> = {}
  for (const [k, v] of Object.entries(await infoOf(redis, 'commandstats'))) {
    const m = /calls=(\d+)/.exec(v)
    if (m) out[k.replace(/^cmdstat_/, '')] = Number(m[1])
  }
  return out
}

export function diffCalls(a: Record<string, number>, b: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {}
  for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
    const d = (b[k] ?? 0) - (a[k] ?? 0)
    if (d !== 0) out[k] = d
  }
  return out
}

/** CLIENT LIST grouped by the last command each connection ran (cmd=...), plus its size. */
export async function clientsByCmd(redis: Redis): Promise<{ total: number; byCmd: Record<string, number> }> {
  const list = (await redis.client('LIST')) as string
  const byCmd: Record<string, number> = {}
  let total = 0
  for (const line of list.split('\n')) {
    const cmd = /\bcmd=(\S+)/.exec(line)?.[1]
    if (!cmd) continue
    total++
    byCmd[cmd] = (byCmd[cmd] ?? 0) + 1
  }
  return { total, byCmd }
}

export const percentile = (xs: number[], p: number): number => {
  if (xs.length === 0) return Number.NaN
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!
}

export const r1 = (x: number): number => Math.round(x * 10) / 10
export const r3 = (x: number): number => Math.round(x * 1000) / 1000

/** What a result file records about where it ran. */
export function machine(): Record<string, unknown> {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8')
  const model = /model name\s*:\s*(.+)/.exec(cpuinfo)?.[1]?.trim() ?? cpus()[0]?.model ?? '?'
  const load = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')
  const node = process.version
  const wrangler = spawnSync('npx', ['wrangler', '--version'], { encoding: 'utf8' }).stdout?.trim()
  return {
    date: new Date().toISOString(),
    cpu: model,
    cores: cpus().length,
    memory_gib: Math.round(totalmem() / 2 ** 30),
    loadavg_at_start: load,
    node,
    wrangler,
  }
}

export const loadavg = (): string => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')
