import { z } from 'zod'

export const Modality = z.enum(['text', 'image', 'audio'])
export type Modality = z.infer<typeof Modality>

export const Task = z.string().regex(/^[a-z][a-z0-9_-]{0,31}$/, 'task names are lower-case words')

/** An expert pool: one queue, one model, optionally a subset of the model's experts. */
export const ExpertPool = z.object({
  name: z.string().regex(/^[a-z][a-z0-9-]{0,62}$/, 'pool names are lower-case, digits and dashes'),
  description: z.string().default(''),
  /** Model directory (HF layout), relative to the repo root unless absolute. */
  modelDir: z.string().min(1),
  /** The model id clients see (`model` in the API). */
  modelId: z.string().min(1),
  /** Experts this pool may route tokens to; null means all. */
  experts: z.array(z.number().int().min(0)).min(1).nullable().default(null),
  /**
   * Weight dtype the worker loads the model at: int8/int4 are weight-only quantized at export;
   * absent, the engine's default (fp16 on CUDA, fp32 on the CPU).
   */
  dtype: z.enum(['fp32', 'fp16', 'int8', 'int4']).optional(),
  /**
   * What the pool's model can read. List 'image' only for a model that reads images: a request
   * with images is refused (400) unless a pool says so, never run with its images dropped.
   */
  modalities: z.array(Modality).min(1).default(['text']),
  /** Deeper than this, the edge answers 503 with Retry-After instead of queueing. */
  maxQueueDepth: z.number().int().positive().default(1000),
  maxTokensLimit: z.number().int().positive().default(4096),
})
export type ExpertPool = z.infer<typeof ExpertPool>

export const PoolsFile = z
  .object({ pools: z.array(ExpertPool).min(1) })
  .refine((f) => new Set(f.pools.map((p) => p.name)).size === f.pools.length, 'pool names must be unique')
export type PoolsFile = z.infer<typeof PoolsFile>

export const Route = z.object({
  task: Task,
  utterances: z.array(z.string().min(1)).min(1),
})
export type Route = z.infer<typeof Route>

export const WebhookEndpoint = z.object({
  id: z.string().min(1),
  url: z.string().url(),
  secret: z.string().startsWith('whsec_'),
  events: z.array(z.string()).min(1),
  disabled: z.boolean().default(false),
  /** The secret before the last rotation: events are signed with it too until expiresAt (epoch ms). */
  previousSecret: z
    .object({ secret: z.string().startsWith('whsec_'), expiresAt: z.number().int() })
    .optional(),
})
export type WebhookEndpoint = z.infer<typeof WebhookEndpoint>

/** Per-tenant config: which pools, how requests map to them, limits. */
export const TenantConfig = z.object({
  id: z.string().regex(/^[a-zA-Z0-9_-]{1,64}$/),
  name: z.string().min(1),
  allowedPools: z.array(z.string()).min(1),
  defaultPool: z.string(),
  /** `task` or `task:modality` -> pool name. */
  poolMap: z.record(z.string(), z.string()).default({}),
  /** Extra routes (or extra utterances for built-in ones). */
  routes: z.array(Route).default([]),
  rateLimits: z
    .object({
      requestsPerMinute: z.number().int().positive(),
      tokensPerMinute: z.number().int().positive(),
    })
    .default({ requestsPerMinute: 600, tokensPerMinute: 200_000 }),
  cacheTtlSeconds: z.number().int().min(0).default(300),
  /**
   * Live responses (streamed or not) this tenant may wait on at once: each holds a Redis
   * connection until its job ends. Beyond it, 429; asynchronous jobs hold none.
   */
  maxLiveStreams: z.number().int().positive().default(128),
  /**
   * Tokens (prompt estimate + max_tokens) this tenant may have in batches not yet finished, as
   * OpenAI's enqueued-token limit: a batch that would go over it fails at once.
   */
  batchQueueTokens: z.number().int().positive().default(2_000_000),
  /**
   * The share of each pool's queue depth (maxQueueDepth) this tenant may fill with its own queued
   * requests: one tenant cannot fill a pool and have everyone else answered 503.
   */
  queueShare: z.number().gt(0).max(1).default(0.5),
  webhooks: z.array(WebhookEndpoint).default([]),
})
export type TenantConfig = z.infer<typeof TenantConfig>
