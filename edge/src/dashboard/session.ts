import type { TenantConfig } from '@moe/shared'
import { timingSafeEqual } from 'hono/utils/buffer'
import {
  ApiKeyRecord,
  authenticate,
  bearerToken,
  getTenant,
  kvKeyOfHash,
  kvTenantKey,
  sha256Hex,
} from '../auth.ts'

// Who is looking at the dashboard: the operator (the admin token) or one tenant (one of its API
// keys), seeing its own traffic only. The login form trades the token for a session cookie that
// holds no secret: `admin.<expiry>.<mac>` or `tenant.<tenant>.<keyId>.<expiry>.<mac>`, signed with
// HMAC-SHA256 keyed by the admin token, or by the API key's hash (kept in KV). So a session ends
// when the admin token is rotated or the key is revoked, and no store of sessions is needed.

export type Viewer = { kind: 'admin' } | { kind: 'tenant'; tenant: TenantConfig; keyId: string }

export const SESSION_COOKIE = 'moe_dashboard'
export const SESSION_SECONDS = 12 * 3600

const enc = new TextEncoder()

const base64url = (bytes: ArrayBuffer): string => {
  let s = ''
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b)
  return btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '')
}

async function mac(secret: string, message: string): Promise<string> {
  const key = await crypto.subtle.importKey(
    'raw',
    enc.encode(secret),
    { name: 'HMAC', hash: 'SHA-256' },
    false,
    ['sign'],
  )
  return base64url(await crypto.subtle.sign('HMAC', key, enc.encode(message)))
}

/**
 * Who a token (typed into the login form, or sent as a bearer header) belongs to, or null.
 * With it, the session cookie's value.
 */
export async function viewerOfToken(
  kv: KVNamespace,
  adminToken: string | null,
  token: string,
  now = Date.now(),
): Promise<{ viewer: Viewer; cookie: string } | null> {
  const expires = Math.floor(now / 1000) + SESSION_SECONDS
  if (adminToken && (await timingSafeEqual(token, adminToken))) {
    const body = `admin.${expires}`
    return { viewer: { kind: 'admin' }, cookie: `${body}.${await mac(adminToken, body)}` }
  }
  if (!token.startsWith('sk-')) return null
  try {
    const { tenant, key } = await authenticate(kv, `Bearer ${token}`, now)
    const body = `tenant.${tenant.id}.${key.keyId}.${expires}`
    return {
      viewer: { kind: 'tenant', tenant, keyId: key.keyId },
      cookie: `${body}.${await mac(await sha256Hex(token), body)}`,
    }
  } catch {
    return null
  }
}

/** The viewer a session cookie names, if its signature holds, it has not expired and its key lives. */
export async function viewerOfSession(
  kv: KVNamespace,
  adminToken: string | null,
  cookie: string | undefined,
  now = Date.now(),
): Promise<Viewer | null> {
  if (!cookie || cookie.length > 512) return null
  const parts = cookie.split('.')
  const signature = parts.pop()
  const expires = Number(parts.at(-1))
  if (!signature || !Number.isSafeInteger(expires) || expires * 1000 <= now) return null
  const body = parts.join('.')
  if (parts[0] === 'admin' && parts.length === 2) {
    if (!adminToken) return null
    return (await timingSafeEqual(signature, await mac(adminToken, body))) ? { kind: 'admin' } : null
  }
  if (parts[0] !== 'tenant' || parts.length !== 4) return null
  const [, tenantId, keyId] = parts as [string, string, string]
  const hash = await kv.get(kvTenantKey(tenantId, keyId))
  if (hash === null || !(await timingSafeEqual(signature, await mac(hash, body)))) return null
  const raw = await kv.get(kvKeyOfHash(hash), 'json')
  const record = raw === null ? null : ApiKeyRecord.safeParse(raw)
  if (!record?.success || record.data.tenantId !== tenantId) return null
  if (record.data.revokedAt !== null) return null
  if (record.data.expiresAt !== null && record.data.expiresAt <= now) return null
  const tenant = await getTenant(kv, tenantId)
  return tenant ? { kind: 'tenant', tenant, keyId } : null
}

/** The viewer of a request: its session cookie, or else an `Authorization: Bearer` token. */
export async function viewerOf(
  kv: KVNamespace,
  adminToken: string | null,
  cookie: string | undefined,
  authorization: string | undefined,
): Promise<Viewer | null> {
  const fromSession = await viewerOfSession(kv, adminToken, cookie)
  if (fromSession) return fromSession
  const token = bearerToken(authorization)
  return token ? ((await viewerOfToken(kv, adminToken, token))?.viewer ?? null) : null
}
