import {
  type ChainableCommander,
  Cluster,
  type ClusterNode,
  type ClusterOptions,
  Redis,
  type RedisOptions,
} from 'ioredis'

// The one place either side opens a Redis connection: a single Redis from REDIS_URL, or a
// Redis Cluster from REDIS_CLUSTER_NODES, with REDIS_URL's credentials and TLS.

/** A connection to a single Redis or to a Redis Cluster; both speak the commands used here. */
export type RedisClient = Redis | Cluster

/** Where Redis is: REDIS_URL alone, or with cluster seed nodes (then the URL gives auth and TLS). */
export interface RedisEndpoint {
  redisUrl: string
  /** Seed nodes of a Redis Cluster; null or empty for a single Redis. */
  redisClusterNodes?: readonly ClusterNode[] | null
}

export class RedisConfigError extends Error {
  override name = 'RedisConfigError'
}

const HOST_PORT = /^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/

/**
 * Parses REDIS_CLUSTER_NODES (`host:port,host:port,...`, IPv6 in brackets). Unset or blank
 * means no cluster (null); anything else must name at least one valid node (throws what is wrong,
 * for the caller to prefix with the variable's name).
 */
export function parseClusterNodes(
  value: string | undefined | null,
): Array<{ host: string; port: number }> | null {
  if (value === undefined || value === null || value.trim() === '') return null
  return value.split(',').map((raw) => {
    const entry = raw.trim()
    const m = HOST_PORT.exec(entry)
    const port = Number(m?.[3])
    if (!m || port < 1 || port > 65535)
      throw new RedisConfigError(`'${entry}' is not host:port (expected e.g. 10.0.0.5:6379,10.0.0.6:6379)`)
    return { host: (m[1] ?? m[2])!, port }
  })
}

/** The first {hash tag} of a key, as Redis Cluster reads it; null when the whole key is hashed. */
export function hashTagOf(key: string): string | null {
  const open = key.indexOf('{')
  if (open < 0) return null
  const close = key.indexOf('}', open + 1)
  return close > open + 1 ? key.slice(open + 1, close) : null
}

/**
 * BullMQ keeps a queue's keys (and a flow's parent and children, here across the pool queues and
 * the batch queue) in scripts that only work when all of them hash to one slot: on a cluster the
 * prefix must carry a hash tag. Returns the problem, or null.
 */
export function clusterPrefixProblem(prefix: string): string | null {
  return hashTagOf(prefix) === null
    ? `'${prefix}' has no hash tag; on a Redis Cluster every queue key must share one slot: use e.g. '{${prefix.replace(/[{}]/g, '') || 'moe'}}'`
    : null
}

/** Credentials and TLS of a redis:// or rediss:// URL, as ioredis options. */
function urlOptions(url: string): RedisOptions {
  let u: URL
  try {
    u = new URL(url)
  } catch {
    throw new RedisConfigError(`REDIS_URL: '${url}' is not a URL`)
  }
  const opts: RedisOptions = {}
  if (u.username) opts.username = decodeURIComponent(u.username)
  if (u.password) opts.password = decodeURIComponent(u.password)
  if (u.protocol === 'rediss:') opts.tls = { servername: u.hostname }
  return opts
}

/**
 * Opens a connection: `new Redis(url, options)`, or, given cluster nodes, an ioredis Cluster
 * whose node connections take `options` plus the URL's username, password and TLS. Options a
 * Cluster sets on itself (retryStrategy, enableOfflineQueue, lazyConnect...) are moved there.
 */
export function connectRedis(endpoint: string | RedisEndpoint, options: RedisOptions = {}): RedisClient {
  const { redisUrl, redisClusterNodes } = typeof endpoint === 'string' ? { redisUrl: endpoint } : endpoint
  if (!redisClusterNodes || redisClusterNodes.length === 0) return new Redis(redisUrl, options)
  const { retryStrategy, enableOfflineQueue, lazyConnect, enableReadyCheck, ...nodeOptions } = options
  const fromUrl = urlOptions(redisUrl)
  const clusterOptions: ClusterOptions = {
    redisOptions: { ...nodeOptions, ...fromUrl },
    // Connect to the addresses as given: TLS certificates name the hosts, and workerd has no
    // dns.lookup (managed clusters announce their nodes by name or by IP; both work unresolved).
    dnsLookup: (address, callback) => callback(null, address),
    ...(retryStrategy ? { clusterRetryStrategy: retryStrategy } : {}),
    ...(enableOfflineQueue !== undefined ? { enableOfflineQueue } : {}),
    ...(lazyConnect !== undefined ? { lazyConnect } : {}),
    ...(enableReadyCheck !== undefined ? { enableReadyCheck } : {}),
  }
  return new Cluster([...redisClusterNodes], clusterOptions)
}

/** True for a Redis Cluster connection. */
export const isCluster = (redis: RedisClient): redis is Cluster => redis.isCluster

type Reply = [Error | null, unknown]

/**
 * Queues `add(pipe, item)` for every item and sends them: on a single Redis in one pipeline (or
 * MULTI), on a cluster in one per hash slot group of `keyOf(item)` (a cluster pipeline must stay
 * on one node and a MULTI in one slot), concurrently. Returns each item's replies, in order.
 */
export async function execPerSlot<T>(
  redis: RedisClient,
  items: readonly T[],
  keyOf: (item: T) => string,
  add: (pipe: ChainableCommander, item: T) => void,
  { multi = false }: { multi?: boolean } = {},
): Promise<Reply[][]> {
  const groups = new Map<string, number[]>()
  items.forEach((item, i) => {
    const key = keyOf(item)
    const group = isCluster(redis) ? (hashTagOf(key) ?? key) : ''
    const list = groups.get(group)
    if (list) list.push(i)
    else groups.set(group, [i])
  })
  const out: Reply[][] = new Array(items.length)
  await Promise.all(
    [...groups.values()].map(async (indices) => {
      const pipe = multi ? redis.multi() : redis.pipeline()
      const counts = indices.map((i) => {
        const before = pipe.length
        add(pipe, items[i]!)
        return pipe.length - before
      })
      const replies = ((await pipe.exec()) ?? []) as Reply[]
      let at = 0
      indices.forEach((i, n) => {
        out[i] = replies.slice(at, at + counts[n]!)
        at += counts[n]!
      })
    }),
  )
  return out
}

/** A second connection to the same Redis or cluster, with the same options (e.g. a subscriber). */
export const duplicateRedis = (redis: RedisClient): RedisClient =>
  isCluster(redis) ? redis.duplicate() : redis.duplicate()
