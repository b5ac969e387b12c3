import ipaddr from 'ipaddr.js'
import type { WebhookEndpoint } from './config.ts'

// Standard Webhooks signing (https://www.standardwebhooks.com): headers webhook-id,
// webhook-timestamp and webhook-signature = `v1,` + base64(HMAC-SHA256(key, `${id}.${ts}.${body}`)),
// the key being the base64 after `whsec_`. Web Crypto only, so it runs in workerd and in Node.
// Also the SSRF rules for webhook URLs, checked at registration (edge) and at delivery (Node).

const enc = new TextEncoder()

function b64decode(s: string): Uint8Array<ArrayBuffer> {
  const bin = atob(s)
  const out = new Uint8Array(new ArrayBuffer(bin.length))
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i)
  return out
}

function b64encode(bytes: Uint8Array): string {
  let bin = ''
  for (const b of bytes) bin += String.fromCharCode(b)
  return btoa(bin)
}

/** A new `whsec_` secret: 24 random bytes, base64. */
export function generateWebhookSecret(): string {
  return `whsec_${b64encode(crypto.getRandomValues(new Uint8Array(24)))}`
}

/** True when the secret is `whsec_` + valid base64 of at least 16 bytes. */
export function isValidWebhookSecret(secret: string): boolean {
  if (!secret.startsWith('whsec_')) return false
  try {
    return b64decode(secret.slice(6)).length >= 16
  } catch {
    return false
  }
}

/** `v1,<base64 signature>` of one message. */
export async function signWebhook(
  secret: string,
  id: string,
  timestamp: number,
  body: string,
): Promise<string> {
  const key = await crypto.subtle.importKey(
    'raw',
    b64decode(secret.startsWith('whsec_') ? secret.slice(6) : secret),
    { name: 'HMAC', hash: 'SHA-256' },
    false,
    ['sign'],
  )
  const mac = await crypto.subtle.sign('HMAC', key, enc.encode(`${id}.${timestamp}.${body}`))
  return `v1,${b64encode(new Uint8Array(mac))}`
}

/**
 * The three Standard Webhooks headers for one attempt (the timestamp is the attempt's).
 * `secret` may hold several space-separated secrets (during a rotation, the new and the old):
 * the message is signed with each, and the signatures are space-separated, as Standard Webhooks
 * verifiers expect (any one that verifies is enough).
 */
export async function webhookHeaders(
  secret: string,
  id: string,
  body: string,
  timestamp = Math.floor(Date.now() / 1000),
): Promise<Record<string, string>> {
  const secrets = secret.split(' ').filter(Boolean)
  const signatures = await Promise.all(secrets.map((s) => signWebhook(s, id, timestamp, body)))
  return {
    'webhook-id': id,
    'webhook-timestamp': String(timestamp),
    'webhook-signature': signatures.join(' '),
  }
}

/**
 * An endpoint as the delivery worker gets it: `secret` holds every secret to sign with now
 * (the current one, and the previous one while its rotation grace lasts).
 */
export function signingEndpoint(e: WebhookEndpoint, now = Date.now()): WebhookEndpoint {
  const { previousSecret, ...rest } = e
  if (!previousSecret || previousSecret.expiresAt <= now) return rest
  return { ...rest, secret: `${e.secret} ${previousSecret.secret}` }
}

// ---------------------------------------------------------------- SSRF

export type AddressClass = 'public' | 'loopback' | 'private' | 'link-local' | 'metadata' | 'reserved'

const IPV4_CLASS: Partial<Record<string, AddressClass>> = {
  unicast: 'public',
  loopback: 'loopback',
  private: 'private',
  carrierGradeNat: 'private',
  linkLocal: 'link-local',
}
const IPV6_CLASS: Partial<Record<string, AddressClass>> = {
  unicast: 'public',
  loopback: 'loopback',
  uniqueLocal: 'private',
  linkLocal: 'link-local',
}
const METADATA_IPS = new Set(['169.254.169.254', 'fd00:ec2::254'])

function classifyV4(addr: ipaddr.IPv4): AddressClass {
  if (METADATA_IPS.has(addr.toString())) return 'metadata'
  return IPV4_CLASS[addr.range()] ?? 'reserved'
}

/** The IPv4 address carried inside bytes [i, i+4) of an IPv6 address. */
const embeddedV4 = (addr: ipaddr.IPv6, i: number): ipaddr.IPv4 =>
  new ipaddr.IPv4(addr.toByteArray().slice(i, i + 4))

/** What kind of address an IP literal is (null when it is not an IP literal). */
export function classifyIp(ip: string): AddressClass | null {
  let bare = ip.startsWith('[') && ip.endsWith(']') ? ip.slice(1, -1) : ip
  if (bare.includes('%')) bare = bare.slice(0, bare.indexOf('%')) // zone id
  if (!ipaddr.isValid(bare)) return bare.includes(':') ? 'reserved' : null
  const addr = ipaddr.parse(bare)
  if (addr.kind() === 'ipv4') return classifyV4(addr as ipaddr.IPv4)
  const v6 = addr as ipaddr.IPv6
  if (METADATA_IPS.has(v6.toString())) return 'metadata'
  const range = v6.range()
  // Forms that carry an IPv4 address the network may reach: judge the address inside.
  if (range === 'ipv4Mapped') return classifyV4(v6.toIPv4Address())
  if (range === 'rfc6052') return classifyV4(embeddedV4(v6, 12)) // NAT64 64:ff9b::/96
  if (range === '6to4') {
    const inner = classifyV4(embeddedV4(v6, 2)) // 2002:AABB:CCDD::/48
    return inner === 'public' ? 'public' : inner
  }
  // Deprecated IPv4-compatible ::a.b.c.d: a URL writes it as [::7f00:1], which ipaddr.js calls
  // unicast, so it is judged by the IPv4 address inside before the range lookup (:: and ::1 aside).
  if (range !== 'loopback' && range !== 'unspecified' && v6.parts.slice(0, 6).every((x) => x === 0))
    return classifyV4(embeddedV4(v6, 12))
  return IPV6_CLASS[range] ?? 'reserved'
}

/** Host names that never point at the public internet. */
const INTERNAL_NAMES = /(^|\.)(localhost|local|internal|localdomain|home\.arpa)$/i
const METADATA_NAMES = new Set(['metadata.google.internal', 'metadata', 'instance-data'])

export interface WebhookUrlPolicy {
  /** Dev/test only: allow http and loopback addresses (127.0.0.0/8, ::1, localhost). */
  allowLoopback: boolean
}

/**
 * Checks a webhook URL without DNS: https (http only to loopback under allowLoopback), no
 * credentials, and no IP literal or well-known name that is private, loopback, link-local or
 * metadata. Returns the reason it is refused, or null. Resolve the host afterwards and check
 * every address with `checkResolvedAddress`.
 */
export function checkWebhookUrl(raw: string, policy: WebhookUrlPolicy): string | null {
  let u: URL
  try {
    u = new URL(raw)
  } catch {
    return 'is not a valid URL'
  }
  if (u.username || u.password) return 'must not contain credentials'
  const host = u.hostname.toLowerCase()
  const kind = classifyIp(host)
  const loopback = kind === 'loopback' || (kind === null && /(^|\.)localhost$/.test(host))
  if (u.protocol !== 'https:' && !(u.protocol === 'http:' && policy.allowLoopback && loopback)) {
    return 'must use https'
  }
  if (kind === null) {
    if (METADATA_NAMES.has(host)) return `points at a metadata service (${host})`
    if (loopback) return policy.allowLoopback ? null : `resolves to a loopback address (${host})`
    if (INTERNAL_NAMES.test(host) || !host.includes('.')) return `is an internal host name (${host})`
    return null
  }
  return checkResolvedAddress(host, policy)
}

/** The reason an address (from DNS or a literal) is refused, or null. */
export function checkResolvedAddress(ip: string, policy: WebhookUrlPolicy): string | null {
  const kind = classifyIp(ip) ?? 'reserved'
  if (kind === 'public') return null
  if (kind === 'loopback' && policy.allowLoopback) return null
  return `resolves to a ${kind} address (${ip})`
}
