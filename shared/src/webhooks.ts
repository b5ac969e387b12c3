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

/** The three Standard Webhooks headers for one attempt (the timestamp is the attempt's). */
export async function webhookHeaders(
  secret: string,
  id: string,
  body: string,
  timestamp = Math.floor(Date.now() / 1000),
): Promise<Record<string, string>> {
  return {
    'webhook-id': id,
    'webhook-timestamp': String(timestamp),
    'webhook-signature': await signWebhook(secret, id, timestamp, body),
  }
}

// ---------------------------------------------------------------- SSRF

export type AddressClass = 'public' | 'loopback' | 'private' | 'link-local' | 'metadata' | 'reserved'

function ipv4Parts(ip: string): number[] | null {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(ip)
  if (!m) return null
  const parts = m.slice(1).map(Number)
  return parts.every((p) => p <= 255) ? parts : null
}

function classifyV4(p: number[]): AddressClass {
  const [a, b] = p as [number, number, number, number]
  if (p.join('.') === '169.254.169.254') return 'metadata'
  if (a === 127) return 'loopback'
  if (a === 10 || (a === 172 && b >= 16 && b <= 31) || (a === 192 && b === 168)) return 'private'
  if (a === 100 && b >= 64 && b <= 127) return 'private' // carrier-grade NAT
  if (a === 169 && b === 254) return 'link-local'
  if (a === 0 || a >= 224 || (a === 192 && b === 0) || (a === 198 && (b === 18 || b === 19)))
    return 'reserved'
  return 'public'
}

/** Expands an IPv6 literal into 8 groups, or null. */
function ipv6Groups(ip: string): number[] | null {
  let s = ip.toLowerCase()
  if (s.includes('%')) s = s.slice(0, s.indexOf('%'))
  let tail: number[] = []
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(s)
  if (v4) {
    const p = ipv4Parts(v4[1]!)
    if (!p) return null
    tail = [(p[0]! << 8) | p[1]!, (p[2]! << 8) | p[3]!]
    s = s.slice(0, -v4[1]!.length) + (s.endsWith(`:${v4[1]}`) ? '0' : '')
    if (s.endsWith(':0') && tail.length) s = s.slice(0, -2) || ':'
  }
  const halves = s.split('::')
  if (halves.length > 2) return null
  const parse = (h: string) =>
    h === '' ? [] : h.split(':').map((g) => (/^[0-9a-f]{1,4}$/.test(g) ? Number.parseInt(g, 16) : Number.NaN))
  const head = parse(halves[0]!)
  const rest = halves.length === 2 ? parse(halves[1]!) : []
  const known = head.length + rest.length + tail.length
  if (head.some(Number.isNaN) || rest.some(Number.isNaN)) return null
  if (halves.length === 1 && known !== 8) return null
  if (known > 8) return null
  return [...head, ...new Array(8 - known).fill(0), ...rest, ...tail]
}

/** What kind of address an IP literal is (null when it is not an IP literal). */
export function classifyIp(ip: string): AddressClass | null {
  const bare = ip.startsWith('[') && ip.endsWith(']') ? ip.slice(1, -1) : ip
  const v4 = ipv4Parts(bare)
  if (v4) return classifyV4(v4)
  if (!bare.includes(':')) return null
  const g = ipv6Groups(bare)
  if (!g) return 'reserved'
  if (g.every((x) => x === 0)) return 'reserved'
  if (g.slice(0, 7).every((x) => x === 0) && g[7] === 1) return 'loopback'
  // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible addresses: judge the IPv4 inside.
  if (g.slice(0, 5).every((x) => x === 0) && (g[5] === 0xffff || g[5] === 0)) {
    return classifyV4([g[6]! >> 8, g[6]! & 255, g[7]! >> 8, g[7]! & 255])
  }
  // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address that the network may reach.
  if (g[0] === 0x64 && g[1] === 0xff9b && g.slice(2, 6).every((x) => x === 0)) {
    return classifyV4([g[6]! >> 8, g[6]! & 255, g[7]! >> 8, g[7]! & 255])
  }
  if (g[0] === 0x2002) {
    const inner = classifyV4([g[1]! >> 8, g[1]! & 255, g[2]! >> 8, g[2]! & 255])
    if (inner !== 'public') return inner
  }
  if (g[0] === 0xfd00 && g.slice(1, 7).every((x) => x === 0) && g[7] === 0xec2) return 'metadata' // AWS IMDS v6
  if ((g[0]! & 0xfe00) === 0xfc00) return 'private'
  if ((g[0]! & 0xffc0) === 0xfe80) return 'link-local'
  if ((g[0]! & 0xff00) === 0xff00) return 'reserved'
  return 'public'
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
