import { spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { seedDev } from '../../../infra/scripts/seed-dev.ts'
import { type ApiKeyRecord, generateApiKey, kvKeyOfHash, sha256Hex } from '../../src/auth.ts'
import { repoRoot } from '../wrangler-dev.ts'

// `npm start` seeds the dev tenant and key on every run; a key revoked since must stay revoked.

const persistTo = mkdtempSync(join(tmpdir(), 'moe-seed-test-'))
afterAll(() => rmSync(persistTo, { recursive: true, force: true }))

function kv(...args: string[]): string {
  const r = spawnSync(
    'npx',
    ['wrangler', 'kv', ...args, '--binding', 'AUTH', '--local', '--persist-to', persistTo],
    {
      cwd: repoRoot,
      encoding: 'utf8',
      env: { ...process.env, WRANGLER_SEND_METRICS: 'false' },
    },
  )
  if (r.status !== 0) throw new Error(`wrangler kv ${args.join(' ')}: ${r.stderr}`)
  return r.stdout.trim()
}

describe('seed-dev', () => {
  it('keeps a revoked dev key revoked on the next run', async () => {
    const key = generateApiKey()
    process.env.MOE_DEV_API_KEY = key
    try {
      const kvKey = kvKeyOfHash(await sha256Hex(key))
      expect((await seedDev({ persistTo })).revoked).toBe(false)
      const record = JSON.parse(kv('key', 'get', kvKey, '--text')) as ApiKeyRecord
      expect(record.revokedAt).toBeNull()
      kv('key', 'put', kvKey, JSON.stringify({ ...record, revokedAt: Date.now() }))
      expect((await seedDev({ persistTo })).revoked).toBe(true)
      expect((JSON.parse(kv('key', 'get', kvKey, '--text')) as ApiKeyRecord).revokedAt).not.toBeNull()
    } finally {
      delete process.env.MOE_DEV_API_KEY
    }
  }, 120_000)
})
