import { describe, expect, it } from 'vitest'
import {
  authenticate,
  bearerToken,
  createApiKey,
  forgetAuthCache,
  generateApiKey,
  kvKeyOfHash,
  kvTenant,
  sha256Hex,
} from '../../src/auth.ts'
import { MemoryKV } from './memory-kv.ts'

const tenant = { id: 'acme', name: 'Acme', allowedPools: ['general'], defaultPool: 'general' }

async function setup() {
  forgetAuthCache()
  const kv = new MemoryKV()
  await kv.put(kvTenant('acme'), JSON.stringify(tenant))
  return kv
}

async function status(p: Promise<unknown>): Promise<number | string> {
  try {
    await p
    return 'ok'
  } catch (e) {
    return (e as { status: number }).status
  }
}

describe('API keys', () => {
  it('hashes with SHA-256 (hex)', async () => {
    expect(await sha256Hex('abc')).toBe('ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad')
  })

  it('makes sk- prefixed random keys', () => {
    const keys = new Set(Array.from({ length: 200 }, generateApiKey))
    expect(keys.size).toBe(200)
    for (const k of keys) expect(k).toMatch(/^sk-[A-Za-z0-9]{48}$/)
  })

  it('stores only the hash of a key, never the plaintext', async () => {
    const kv = await setup()
    const { key, record } = await createApiKey(kv as unknown as KVNamespace, 'acme', 'ci', null)
    const dump = JSON.stringify([...kv.data])
    expect(dump).not.toContain(key)
    expect(kv.data.has(kvKeyOfHash(await sha256Hex(key)))).toBe(true)
    expect(record.hint).toBe(`${key.slice(0, 7)}...`)
  })

  it('parses bearer tokens', () => {
    expect(bearerToken('Bearer sk-abc')).toBe('sk-abc')
    expect(bearerToken('bearer   sk-abc ')).toBe('sk-abc')
    expect(bearerToken('Basic Zm9v')).toBeNull()
    expect(bearerToken(undefined)).toBeNull()
  })

  it('accepts a valid key and rejects missing, unknown, revoked and expired ones with 401', async () => {
    const kv = (await setup()) as unknown as KVNamespace
    const ok = await createApiKey(kv, 'acme', 'ok', null)
    const p = await authenticate(kv, `Bearer ${ok.key}`)
    expect(p.tenant.id).toBe('acme')
    expect(p.tenant.rateLimits.requestsPerMinute).toBeGreaterThan(0) // defaults applied
    expect(await status(authenticate(kv, undefined))).toBe(401)
    expect(await status(authenticate(kv, 'Bearer sk-nope'))).toBe(401)
    const expired = await createApiKey(kv, 'acme', 'old', Date.now() - 1)
    expect(await status(authenticate(kv, `Bearer ${expired.key}`))).toBe(401)
    const revoked = await createApiKey(kv, 'acme', 'gone', null)
    await kv.put(
      kvKeyOfHash(await sha256Hex(revoked.key)),
      JSON.stringify({ ...revoked.record, revokedAt: Date.now() }),
    )
    forgetAuthCache()
    expect(await status(authenticate(kv, `Bearer ${revoked.key}`))).toBe(401)
  })
})
