import { MoeError, TenantConfig } from '@moe/shared'
import { z } from 'zod'

// KV layout (binding AUTH):
//   key:<sha256 hex of the API key>  -> ApiKeyRecord   (the plaintext is never stored)
//   tkey:<tenant>:<keyId>            -> sha256 hex      (lists and revokes a tenant's keys)
//   tenant:<id>                      -> TenantConfig

export const ApiKeyRecord = z.object({
  keyId: z.string(),
  tenantId: z.string(),
  name: z.string(),
  /** First characters of the key, for humans ("sk-AbC1..."). */
  hint: z.string(),
  createdAt: z.number().int(),
  expiresAt: z.number().int().nullable(),
  revokedAt: z.number().int().nullable(),
})
export type ApiKeyRecord = z.infer<typeof ApiKeyRecord>

export const kvKeyOfHash = (hash: string): string => `key:${hash}`
export const kvTenantKey = (tenantId: string, keyId: string): string => `tkey:${tenantId}:${keyId}`
export const kvTenant = (tenantId: string): string => `tenant:${tenantId}`

const enc = new TextEncoder()
const hex = (buf: ArrayBuffer): string => {
  const b = new Uint8Array(buf)
  let s = ''
  for (let i = 0; i < b.length; i++) s += b[i]!.toString(16).padStart(2, '0')
  return s
}

export async function sha256Hex(text: string): Promise<string> {
  return hex(await crypto.subtle.digest('SHA-256', enc.encode(text)))
}

const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'

/** Random base62 string (rejection sampling, so every character is uniform). */
export function randomBase62(length: number): string {
  let out = ''
  while (out.length < length) {
    const bytes = crypto.getRandomValues(new Uint8Array(length * 2))
    for (const b of bytes) {
      if (b < 248 && out.length < length) out += ALPHABET[b % 62]
    }
  }
  return out
}

/** A new API key, `sk-` plus 48 base62 characters (285 bits), like OpenAI's. */
export const generateApiKey = (): string => `sk-${randomBase62(48)}`

export const keyIdOf = (hash: string): string => `key_${hash.slice(0, 16)}`

/** Creates a key for a tenant; returns the plaintext (shown once) and the stored record. */
export async function createApiKey(
  kv: KVNamespace,
  tenantId: string,
  name: string,
  expiresAt: number | null,
  plaintext: string = generateApiKey(),
): Promise<{ key: string; record: ApiKeyRecord }> {
  const hash = await sha256Hex(plaintext)
  const record: ApiKeyRecord = {
    keyId: keyIdOf(hash),
    tenantId,
    name,
    hint: `${plaintext.slice(0, 7)}...`,
    createdAt: Date.now(),
    expiresAt,
    revokedAt: null,
  }
  await kv.put(kvKeyOfHash(hash), JSON.stringify(record))
  await kv.put(kvTenantKey(tenantId, record.keyId), hash)
  return { key: plaintext, record }
}

export async function getTenant(kv: KVNamespace, tenantId: string): Promise<TenantConfig | null> {
  const raw = await kv.get(kvTenant(tenantId), 'json')
  if (raw === null) return null
  const parsed = TenantConfig.safeParse(raw)
  return parsed.success ? parsed.data : null
}

/** Extracts the key from `Authorization: Bearer <key>`. */
export function bearerToken(header: string | undefined): string | null {
  if (!header) return null
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header)
  return m ? m[1]! : null
}

export interface Principal {
  tenant: TenantConfig
  key: ApiKeyRecord
}

const invalid = (message: string) => new MoeError('invalid_api_key', message)

// A short in-isolate cache of key lookups keeps KV off the hot path. Revocation made through
// this isolate takes effect at once (forgetKey); elsewhere within AUTH_CACHE_MS, well inside
// KV's own propagation time in production.
const AUTH_CACHE_MS = 5_000
const authCache = new Map<string, { at: number; principal: Principal }>()
export const forgetAuthCache = (): void => authCache.clear()

/** Resolves a bearer key to its tenant, or throws 401 in the OpenAI error shape. */
export async function authenticate(
  kv: KVNamespace,
  header: string | undefined,
  now = Date.now(),
): Promise<Principal> {
  const token = bearerToken(header)
  if (token === null) {
    throw invalid(
      "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    )
  }
  const hash = await sha256Hex(token)
  const cached = authCache.get(hash)
  let principal: Principal
  if (cached && now - cached.at < AUTH_CACHE_MS) principal = cached.principal
  else {
    const raw = await kv.get(kvKeyOfHash(hash), 'json')
    const rec = raw === null ? null : ApiKeyRecord.safeParse(raw)
    if (!rec?.success) throw invalid('Incorrect API key provided.')
    const tenant = await getTenant(kv, rec.data.tenantId)
    if (!tenant) throw invalid('The tenant of this API key does not exist.')
    principal = { tenant, key: rec.data }
    if (authCache.size > 10_000) authCache.clear()
    authCache.set(hash, { at: now, principal })
  }
  if (principal.key.revokedAt !== null) throw invalid('This API key has been revoked.')
  if (principal.key.expiresAt !== null && principal.key.expiresAt <= now)
    throw invalid('This API key has expired.')
  return principal
}
