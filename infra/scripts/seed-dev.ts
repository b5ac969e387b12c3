// Seeds the dev tenant (infra/config/tenants.dev.json) and one API key into the edge's local KV
// (`wrangler dev` state), and makes sure a local ADMIN_TOKEN exists in .dev.vars. Prints both.
//
//   node infra/scripts/seed-dev.ts [--persist-to DIR]
//
// The key is kept in .wrangler/moe-dev-key so every run prints the same one (MOE_DEV_API_KEY
// overrides it). Only the key's SHA-256 goes into KV, as for any key.
import { spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { TenantConfig } from '@moe/shared'
import {
  type ApiKeyRecord,
  generateApiKey,
  keyIdOf,
  kvKeyOfHash,
  kvTenant,
  kvTenantKey,
  sha256Hex,
} from '../../edge/src/auth.ts'

const root = join(import.meta.dirname, '..', '..')

export interface SeedResult {
  tenantIds: string[]
  apiKey: string
  adminToken: string
  /** The dev key was revoked: it was left revoked, not seeded again. */
  revoked: boolean
}

function devKey(): string {
  if (process.env.MOE_DEV_API_KEY) return process.env.MOE_DEV_API_KEY
  const file = join(root, '.wrangler', 'moe-dev-key')
  if (existsSync(file)) return readFileSync(file, 'utf8').trim()
  const key = generateApiKey()
  mkdirSync(join(root, '.wrangler'), { recursive: true })
  writeFileSync(file, `${key}\n`, { mode: 0o600 })
  return key
}

function adminToken(): string {
  const file = join(root, '.dev.vars')
  const text = existsSync(file) ? readFileSync(file, 'utf8') : ''
  const m = /^ADMIN_TOKEN\s*=\s*"?([^"\n]+)"?\s*$/m.exec(text)
  if (m) return m[1]!
  const token = `adm_${randomBytes(24).toString('hex')}`
  writeFileSync(file, `${text}${text && !text.endsWith('\n') ? '\n' : ''}ADMIN_TOKEN=${token}\n`, {
    mode: 0o600,
  })
  return token
}

export async function seedDev(opts: { persistTo?: string } = {}): Promise<SeedResult> {
  const file = JSON.parse(readFileSync(join(root, 'infra/config/tenants.dev.json'), 'utf8')) as {
    tenants: unknown[]
  }
  const tenants = file.tenants.map((t) => TenantConfig.parse(t))
  const first = tenants[0]
  if (!first) throw new Error('infra/config/tenants.dev.json has no tenant')
  const apiKey = devKey()
  const hash = await sha256Hex(apiKey)
  // A revocation stands: a revoked dev key is not seeded again (delete .wrangler/moe-dev-key
  // for a new one).
  const existing = kvGet(kvKeyOfHash(hash), opts.persistTo)
  const revoked = existing !== null && (JSON.parse(existing) as ApiKeyRecord).revokedAt !== null
  const record: ApiKeyRecord = {
    keyId: keyIdOf(hash),
    tenantId: first.id,
    name: 'dev (seeded)',
    hint: `${apiKey.slice(0, 7)}...`,
    createdAt: Date.now(),
    expiresAt: null,
    revokedAt: null,
  }
  const entries = [
    ...tenants.map((t) => ({ key: kvTenant(t.id), value: JSON.stringify(t) })),
    ...(revoked
      ? []
      : [
          { key: kvKeyOfHash(hash), value: JSON.stringify(record) },
          { key: kvTenantKey(first.id, record.keyId), value: hash },
        ]),
  ]
  const tmp = join(tmpdir(), `moe-seed-${process.pid}.json`)
  writeFileSync(tmp, JSON.stringify(entries))
  try {
    const args = ['wrangler', 'kv', 'bulk', 'put', tmp, '--binding', 'AUTH', '--local']
    if (opts.persistTo) args.push('--persist-to', opts.persistTo)
    const r = spawnSync('npx', args, {
      cwd: root,
      encoding: 'utf8',
      env: { ...process.env, WRANGLER_SEND_METRICS: 'false' },
    })
    if (r.status !== 0) throw new Error(`wrangler kv bulk put failed:\n${r.stdout}\n${r.stderr}`)
  } finally {
    rmSync(tmp, { force: true })
  }
  return { tenantIds: tenants.map((t) => t.id), apiKey, adminToken: adminToken(), revoked }
}

/** A value of the local AUTH KV, or null. */
function kvGet(key: string, persistTo: string | undefined): string | null {
  const args = ['wrangler', 'kv', 'key', 'get', key, '--binding', 'AUTH', '--local', '--text']
  if (persistTo) args.push('--persist-to', persistTo)
  const r = spawnSync('npx', args, {
    cwd: root,
    encoding: 'utf8',
    env: { ...process.env, WRANGLER_SEND_METRICS: 'false' },
  })
  const out = r.stdout.trim()
  return r.status === 0 && out.startsWith('{') ? out : null
}

if (import.meta.main) {
  const i = process.argv.indexOf('--persist-to')
  const persistTo = i > 0 ? process.argv[i + 1] : undefined
  const r = await seedDev(persistTo ? { persistTo } : {})
  console.log(
    `moe-edge: seeded tenant${r.tenantIds.length > 1 ? 's' : ''} ${r.tenantIds.join(', ')} into local KV`,
  )
  console.log(
    r.revoked
      ? 'moe-edge: the dev API key was revoked and stays revoked (delete .wrangler/moe-dev-key for a new one)'
      : `moe-edge: dev API key (tenant ${r.tenantIds[0]}): ${r.apiKey}`,
  )
  console.log('moe-edge: admin token (ADMIN_TOKEN in .dev.vars): see .dev.vars')
}
