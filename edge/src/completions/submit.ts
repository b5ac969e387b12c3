import {
  type ChatCompletionRequest,
  type CompletionRequest,
  type ExpertPool,
  type JobInput,
  type JobPayload,
  type Modality,
  MoeError,
  promptList,
  seedFromJobId,
  structuredPlan,
  type TenantConfig,
} from '@moe/shared'
import type { EffectiveSampling } from '../cache.ts'
import { POOLS } from '../pools.ts'
import { choosePool, decideTask, modalitiesOf, routerFor, type TaskDecision } from '../router/index.ts'
import { type Endpoint, requestedMaxTokens } from '../validate.ts'

// What a completion request becomes before it is enqueued, the same for a live request and for a
// line of a batch file: its task and modality, the tenant's pool for them, the sampling with
// defaults applied, and the job payload.

/** max_tokens when the request sets none (capped by the pool's limit). */
export const DEFAULT_MAX_TOKENS = 256

export type CompletionBody = ChatCompletionRequest | CompletionRequest

export interface Classified {
  task: TaskDecision
  modality: Modality
  required: Modality[]
}

export interface Routed {
  endpoint: Endpoint
  req: CompletionBody
  task: TaskDecision
  modality: Modality
  pool: ExpertPool
  via: string
}

/** The request's task (hint, or the tenant's router) and modality. */
export function classifyRequest(tenant: TenantConfig, req: CompletionBody, taskHint?: string): Classified {
  const messages = 'messages' in req ? req.messages : undefined
  const prompt = 'prompt' in req ? routingPrompt(req.prompt) : undefined
  const task = decideTask(routerFor(tenant), {
    messages,
    prompt,
    taskHint: taskHint ?? req.metadata?.task,
  })
  const { modality, required } = modalitiesOf({ messages })
  return { task, modality, required }
}

/** What the task router reads of a text completion: its prompt, or its text prompts together. */
function routingPrompt(prompt: CompletionRequest['prompt']): string | number[] {
  const prompts = promptList(prompt)
  if (prompts.length === 1) return prompts[0]!
  return prompts.filter((p) => typeof p === 'string').join('\n')
}

/** The tenant's pool for a classified request. */
export function routeRequest(
  tenant: TenantConfig,
  endpoint: Endpoint,
  req: CompletionBody,
  { task, modality, required }: Classified,
): Routed {
  const { pool, via } = choosePool(tenant, POOLS, req.model, task.task, modality, required)
  return { endpoint, req, task, modality, pool, via }
}

export function effectiveSampling(r: Pick<Routed, 'req' | 'pool'>): EffectiveSampling {
  const requested = requestedMaxTokens(r.req)
  if (requested !== null && requested > r.pool.maxTokensLimit) {
    throw new MoeError(
      'max_tokens_exceeded',
      `max_tokens is too large: ${requested}. The model '${r.pool.modelId}' supports at most ${r.pool.maxTokensLimit} completion tokens.`,
      'max_tokens',
    )
  }
  const stop = r.req.stop == null ? [] : typeof r.req.stop === 'string' ? [r.req.stop] : r.req.stop
  return {
    maxTokens: requested ?? Math.min(DEFAULT_MAX_TOKENS, r.pool.maxTokensLimit),
    temperature: r.req.temperature ?? 1,
    topP: r.req.top_p ?? 1,
    topK: r.req.top_k ?? 0,
    seed: r.req.seed ?? null,
    stop,
    ...processingOf(r.req),
  }
}

/** Choices, penalties, bias and logprobs of a request, each left out at its neutral value. */
function processingOf(req: CompletionBody): Partial<EffectiveSampling> {
  const out: Partial<EffectiveSampling> = {}
  if (req.n != null && req.n > 1) out.n = req.n
  if (req.presence_penalty) out.presencePenalty = req.presence_penalty
  if (req.frequency_penalty) out.frequencyPenalty = req.frequency_penalty
  if (req.repetition_penalty != null && req.repetition_penalty !== 1)
    out.repetitionPenalty = req.repetition_penalty
  if (req.min_p) out.minP = req.min_p
  if (req.logit_bias && Object.keys(req.logit_bias).length > 0) out.logitBias = req.logit_bias
  if ('messages' in req) {
    if (req.logprobs === true) out.logprobs = req.top_logprobs ?? 0
  } else if (req.logprobs != null) out.logprobs = req.logprobs
  return out
}

/** How many choices a request generates: prompts times n. */
export function choicesOf(req: CompletionBody): number {
  return ('prompt' in req ? promptList(req.prompt).length : 1) * (req.n ?? 1)
}

const utf8 = new TextEncoder()

/**
 * Prompt size charged against tokens-per-minute before the job runs: a byte-level tokenizer can
 * spend one token per UTF-8 byte, so the estimate is the byte count (never less than the real
 * count), plus a few tokens per chat message for the template. The charge is settled to the real
 * usage when the job ends.
 */
export function promptTokenEstimate(req: CompletionBody): number {
  if ('prompt' in req)
    return promptList(req.prompt).reduce(
      (sum, p) => sum + (typeof p === 'string' ? utf8.encode(p).length : p.length),
      0,
    )
  let tokens = 0
  for (const m of req.messages) {
    tokens += 8
    if (typeof m.content === 'string') tokens += utf8.encode(m.content).length
    else for (const p of m.content) tokens += p.type === 'text' ? utf8.encode(p.text).length : 256
  }
  return tokens
}

export function inputOf(req: CompletionBody): JobInput {
  if ('messages' in req) return { kind: 'chat', messages: req.messages }
  const prompts = promptList(req.prompt)
  if (prompts.length > 1) return { kind: 'prompts', prompts }
  const only = prompts[0]!
  return typeof only === 'string' ? { kind: 'text', prompt: only } : { kind: 'tokens', inputIds: only }
}

/** What admission charges before the job runs: the prompts, and max_tokens for every choice. */
export const tokenCostOf = (req: CompletionBody, sampling: EffectiveSampling): number =>
  promptTokenEstimate(req) + sampling.maxTokens * choicesOf(req)

/**
 * The job for a routed request; a request without a seed gets one derived from the job id.
 * Batch lines stream no tokens: their result is read from the finished job, never token by token.
 */
export function jobPayload(
  jobId: string,
  tenantId: string,
  r: Pick<Routed, 'req' | 'pool'> & { sampling: EffectiveSampling },
  createdAt: number,
  deadline: number,
  priority: JobPayload['priority'],
  streamTokens = true,
): JobPayload {
  const plan = 'messages' in r.req ? structuredPlan(r.req) : {}
  return {
    version: 1,
    requestId: jobId,
    tenantId,
    pool: r.pool.name,
    model: r.pool.modelId,
    input: inputOf(r.req),
    sampling: { ...r.sampling, seed: r.sampling.seed ?? seedFromJobId(jobId) },
    deadline,
    createdAt,
    priority,
    streamTokens,
    ...(plan.json ? { jsonOutput: plan.json } : {}),
    ...(plan.tools ? { tools: plan.tools } : {}),
  }
}
