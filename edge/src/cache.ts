import {
  type ChatCompletionRequest,
  type ChatMessage,
  type ChoiceResult,
  type CompletionRequest,
  type FinishReason,
  structuredPlan,
} from '@moe/shared'
import { sha256Hex } from './auth.ts'

/** Sampling after defaults: what the key and the job both use. */
export interface EffectiveSampling {
  maxTokens: number
  temperature: number
  topP: number
  topK: number
  /** The request's seed, or null (the edge then derives one per request). */
  seed: number | null
  stop: string[]
  /** Choices per prompt (absent: 1). */
  n?: number
  presencePenalty?: number
  frequencyPenalty?: number
  repetitionPenalty?: number
  minP?: number
  logitBias?: Record<string, number>
  /** Alternatives per token reported with logprobs (absent: no logprobs). */
  logprobs?: number
}

/** Only deterministic requests are cached: greedy decoding, or a fixed seed. */
export const isDeterministic = (s: EffectiveSampling): boolean => s.temperature === 0 || s.seed !== null

export type CacheMode = 'use' | 'refresh' | 'off'

/** `Cache-Control: no-store` skips the cache both ways; `no-cache` skips reading but stores the fresh answer. */
export function cacheModeOf(cacheControl: string | undefined): CacheMode {
  const cc = (cacheControl ?? '').toLowerCase()
  if (/(^|[\s,])no-store($|[\s,])/.test(cc)) return 'off'
  if (/(^|[\s,])no-cache($|[\s,])/.test(cc)) return 'refresh'
  return 'use'
}

function canonicalMessage(m: ChatMessage): unknown {
  let content: unknown = m.content
  if (Array.isArray(m.content)) {
    const parts = m.content.map((p) => {
      if (p.type === 'text') return { type: 'text', text: p.text }
      if (p.type === 'image_url')
        return { type: 'image_url', url: p.image_url.url, detail: p.image_url.detail ?? 'auto' }
      return { type: 'input_audio', data: p.input_audio.data, format: p.input_audio.format }
    })
    // A single text part means the same as a plain string.
    const only = parts.length === 1 ? (parts[0] as { type: string; text?: string }) : undefined
    content = only?.type === 'text' ? only.text : parts
  }
  // Tool-call history decides the answer too: the calls made and which one a tool message answers.
  return {
    role: m.role,
    content,
    ...(m.name === undefined ? {} : { name: m.name }),
    ...(m.tool_calls === undefined ? {} : { tool_calls: m.tool_calls }),
    ...(m.tool_call_id === undefined ? {} : { tool_call_id: m.tool_call_id }),
  }
}

/**
 * What decides the answer, and nothing else: defaults applied, stop sequences as a sorted set,
 * sampling knobs that greedy decoding ignores dropped; stream, user and metadata left out.
 */
export function canonicalRequest(
  kind: 'chat' | 'completion',
  req: ChatCompletionRequest | CompletionRequest,
  s: EffectiveSampling,
): unknown {
  const input = 'messages' in req ? { messages: req.messages.map(canonicalMessage) } : { prompt: req.prompt }
  const greedy = s.temperature === 0
  const sampling = {
    maxTokens: s.maxTokens,
    temperature: s.temperature,
    stop: [...new Set(s.stop)].sort(),
    ...(greedy ? {} : { topP: s.topP, topK: s.topK, seed: s.seed, minP: s.minP }),
    // Processors change greedy answers too; n and logprobs change the response's shape.
    n: s.n,
    presencePenalty: s.presencePenalty,
    frequencyPenalty: s.frequencyPenalty,
    repetitionPenalty: s.repetitionPenalty,
    logitBias: s.logitBias,
    logprobs: s.logprobs,
  }
  // Structured output and tools change what is generated: the schema and functions are in the key.
  const structured = 'messages' in req ? structuredPlan(req) : {}
  return { kind, ...input, sampling, ...(Object.keys(structured).length > 0 ? { structured } : {}) }
}

/** JSON with object keys sorted at every level, so key order never changes the cache key. */
export function stableStringify(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null'
  if (Array.isArray(value)) return `[${value.map(stableStringify).join(',')}]`
  const obj = value as Record<string, unknown>
  const keys = Object.keys(obj)
    .filter((k) => obj[k] !== undefined)
    .sort()
  return `{${keys.map((k) => `${JSON.stringify(k)}:${stableStringify(obj[k])}`).join(',')}}`
}

/** SHA-256 over tenant, pool, model and the canonical body; the KV key is also scoped by tenant. */
export async function cacheKey(
  tenantId: string,
  pool: string,
  model: string,
  canonical: unknown,
): Promise<string> {
  const digest = await sha256Hex(stableStringify({ tenant: tenantId, pool, model, request: canonical }))
  return `c:${tenantId}:${digest}`
}

/** A finished answer, enough to rebuild the JSON response or replay it as SSE. */
export interface CachedAnswer {
  v: 1
  text: string
  finishReason: FinishReason
  usage: { promptTokens: number; completionTokens: number }
  /** Every choice, when there were several or logprobs were asked for. */
  choices?: ChoiceResult[]
  requestId: string
  createdAt: number
  expiresAt: number
  moe: Record<string, unknown>
}

/** KV refuses TTLs under 60 s, so shorter tenant TTLs are enforced by `expiresAt` on read. */
const KV_MIN_TTL = 60

export async function cacheGet(kv: KVNamespace, key: string, now = Date.now()): Promise<CachedAnswer | null> {
  const hit = await kv.get<CachedAnswer>(key, 'json')
  if (hit?.v !== 1 || hit.expiresAt <= now) return null
  return hit
}

export async function cachePut(
  kv: KVNamespace,
  key: string,
  answer: CachedAnswer,
  ttlSeconds: number,
): Promise<void> {
  if (ttlSeconds <= 0) return
  await kv.put(key, JSON.stringify(answer), { expirationTtl: Math.max(KV_MIN_TTL, ttlSeconds) })
}
