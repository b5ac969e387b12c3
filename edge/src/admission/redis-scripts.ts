import type { RedisClient } from '@moe/shared'

// The Lua the admission object runs on Redis, each atomic and on Redis's clock.

// Sliding-window limits (two fixed one-minute windows, the previous one weighted by how much of
// it still overlaps the window ending now), checked and charged atomically, on Redis's clock so
// every edge location agrees. Returns {allowed, reason, retryAfterMs, window}. The window keys
// (KEYS[1] .. ':r:' .. minute) can only be named on Redis's clock, inside the script: they carry
// KEYS[1]'s hash tag (the queue prefix's), so on a Redis Cluster they are in the declared key's
// slot, which Redis allows.
const RATE_LIMIT_LUA = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local win = 60000
local cur = math.floor(now / win)
local frac = (now % win) / win
local base = KEYS[1]
local reqLimit = tonumber(ARGV[1])
local tokLimit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local rc = tonumber(redis.call('GET', base .. ':r:' .. cur) or '0')
local rp = tonumber(redis.call('GET', base .. ':r:' .. (cur - 1)) or '0')
local tc = tonumber(redis.call('GET', base .. ':t:' .. cur) or '0')
local tp = tonumber(redis.call('GET', base .. ':t:' .. (cur - 1)) or '0')
local function wait(prev, curv, need, limit)
  if curv + need > limit then return math.ceil((1 - frac) * win) end
  if prev <= 0 then return 1000 end
  local f = 1 - (limit - curv - need) / prev
  return math.max(1000, math.ceil((f - frac) * win))
end
if cost > tokLimit then return {0, 'tokens_over_limit', win, cur} end
if rp * (1 - frac) + rc + 1 > reqLimit then return {0, 'requests', wait(rp, rc, 1, reqLimit), cur} end
if tp * (1 - frac) + tc + cost > tokLimit then return {0, 'tokens', wait(tp, tc, cost, tokLimit), cur} end
redis.call('INCR', base .. ':r:' .. cur)
redis.call('PEXPIRE', base .. ':r:' .. cur, 2 * win)
redis.call('INCRBY', base .. ':t:' .. cur, cost)
redis.call('PEXPIRE', base .. ':t:' .. cur, 2 * win)
return {1, '', 0, cur}
`

export type AdmissionRedis = RedisClient & {
  moeRateLimit(
    base: string,
    reqLimit: number,
    tokLimit: number,
    cost: number,
  ): Promise<[number, string, number, number]>
  moeLease(key: string, cap: number, ttlMs: number, lease: string): Promise<number>
  moeKeepLast(key: string): Promise<number>
}

// A tenant's live-stream slots: a sorted set of lease ids scored by when they lapse (so a lease
// whose release was lost frees itself). Returns 1 and takes a slot, or 0 when all are held.
const LEASE_LUA = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
`

// Replaces a stream by one holding only its newest entry, under the same id and TTL. XTRIM
// would only flag the entries deleted: their listpack node stays allocated until every entry
// in it is gone, the final event's included.
const KEEP_LAST_LUA = `
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('XADD', KEYS[1], last[1][1], unpack(last[1][2]))
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
`

/** Registers the scripts above as commands on a connection. */
export function defineAdmissionCommands(redis: RedisClient): AdmissionRedis {
  redis.defineCommand('moeRateLimit', { numberOfKeys: 1, lua: RATE_LIMIT_LUA })
  redis.defineCommand('moeLease', { numberOfKeys: 1, lua: LEASE_LUA })
  redis.defineCommand('moeKeepLast', { numberOfKeys: 1, lua: KEEP_LAST_LUA })
  return redis as AdmissionRedis
}
