import type { ChatMessage, ExpertPool, Modality, TenantConfig } from '@moe/shared'
import { MoeError } from '@moe/shared'
import { type Classification, type CompiledRouter, classify, compileRoutes, type TaskScore } from './ngram.ts'
import { BUILTIN_ROUTES, DEFAULT_TASK } from './routes.ts'

export { BUILTIN_ROUTES, DEFAULT_TASK } from './routes.ts'

/** Under this best-route score the prompt is "none of the above" and gets the default. */
export const ROUTER_THRESHOLD = 0.09

const builtinRouter = compileRoutes(BUILTIN_ROUTES)
const tenantRouters = new Map<string, { routesJson: string; router: CompiledRouter }>()

/** The tenant's router: built-in routes plus its own; compiled once per isolate and config version. */
export function routerFor(tenant: Pick<TenantConfig, 'id' | 'routes'>): CompiledRouter {
  if (tenant.routes.length === 0) return builtinRouter
  const routesJson = JSON.stringify(tenant.routes)
  const hit = tenantRouters.get(tenant.id)
  if (hit && hit.routesJson === routesJson) return hit.router
  const router = compileRoutes([...BUILTIN_ROUTES, ...tenant.routes])
  if (tenantRouters.size >= 256) tenantRouters.delete(tenantRouters.keys().next().value!)
  tenantRouters.set(tenant.id, { routesJson, router })
  return router
}

export const knownTasks = (router: CompiledRouter): string[] => router.routes.map((r) => r.task)

/** What the router looks at in a request. */
export interface RoutingInput {
  messages?: readonly ChatMessage[]
  prompt?: string | readonly number[]
  /** `x-moe-task` header or `metadata.task`. */
  taskHint?: string | undefined
}

/** The modalities a request carries (text is implied), and the one that names it. */
export function modalitiesOf(input: RoutingInput): { modality: Modality; required: Modality[] } {
  let image = false
  let audio = false
  for (const m of input.messages ?? []) {
    if (typeof m.content === 'string') continue
    for (const part of m.content) {
      if (part.type === 'image_url') image = true
      else if (part.type === 'input_audio') audio = true
    }
  }
  const required: Modality[] = ['text']
  if (image) required.push('image')
  if (audio) required.push('audio')
  return { modality: audio ? 'audio' : image ? 'image' : 'text', required }
}

/** The text the task router reads: the last user message (or the prompt). */
export function routingText(input: RoutingInput): string {
  if (typeof input.prompt === 'string') return input.prompt
  const messages = input.messages ?? []
  for (let i = messages.length - 1; i >= 0; i--) {
    const m = messages[i]!
    if (m.role !== 'user') continue
    if (typeof m.content === 'string') return m.content
    return m.content.map((p) => (p.type === 'text' ? p.text : '')).join('\n')
  }
  return ''
}

export interface TaskDecision {
  task: string
  source: 'hint' | 'router' | 'fallback'
  confidence: number
  scores: TaskScore[]
}

export function decideTask(router: CompiledRouter, input: RoutingInput): TaskDecision {
  if (input.taskHint !== undefined) {
    const hint = input.taskHint.trim().toLowerCase()
    if (!knownTasks(router).includes(hint)) {
      throw new MoeError(
        'invalid_request',
        `Unknown task hint '${input.taskHint}'; known tasks: ${knownTasks(router).join(', ')}`,
        'metadata.task',
      )
    }
    return { task: hint, source: 'hint', confidence: 1, scores: [] }
  }
  const text = routingText(input)
  if (text.trim() === '') return { task: DEFAULT_TASK, source: 'fallback', confidence: 0, scores: [] }
  const c: Classification = classify(router, text, ROUTER_THRESHOLD)
  if (c.task === null)
    return { task: DEFAULT_TASK, source: 'fallback', confidence: c.best.score, scores: c.scores }
  return { task: c.task, source: 'router', confidence: c.best.score, scores: c.scores }
}

export interface PoolDecision {
  pool: ExpertPool
  /** How the pool was chosen. */
  via: 'model' | 'poolMap' | 'default' | 'modality'
}

const accepts = (pool: ExpertPool, required: readonly Modality[]): boolean =>
  required.every((m) => pool.modalities.includes(m))

/**
 * Maps (model, task, modality) to one of the tenant's pools. `model` is `auto` (the router
 * chooses), a pool name, or a pool's model id.
 */
export function choosePool(
  tenant: TenantConfig,
  pools: ReadonlyMap<string, ExpertPool>,
  model: string,
  task: string,
  modality: Modality,
  required: readonly Modality[],
): PoolDecision {
  const allowed = tenant.allowedPools.map((n) => pools.get(n)).filter((p): p is ExpertPool => p !== undefined)
  const needs = required.filter((m) => m !== 'text').join(' and ')
  if (model !== 'auto') {
    const named = pools.get(model) ?? [...pools.values()].find((p) => p.modelId === model)
    if (!named) throw new MoeError('unknown_pool', `The model '${model}' does not exist`, 'model')
    if (!tenant.allowedPools.includes(named.name)) {
      throw new MoeError('pool_not_allowed', `This API key may not use the model '${model}'`, 'model')
    }
    if (!accepts(named, required)) {
      throw new MoeError(
        'invalid_request',
        `The model '${model}' does not accept ${needs} input (it accepts ${named.modalities.join(', ')})`,
        'messages',
      )
    }
    return { pool: named, via: 'model' }
  }
  for (const key of [`${task}:${modality}`, task]) {
    const name = tenant.poolMap[key]
    const pool = name !== undefined && tenant.allowedPools.includes(name) ? pools.get(name) : undefined
    if (pool && accepts(pool, required)) return { pool, via: 'poolMap' }
  }
  const dflt = pools.get(tenant.defaultPool)
  if (dflt && tenant.allowedPools.includes(dflt.name) && accepts(dflt, required))
    return { pool: dflt, via: 'default' }
  const any = allowed.find((p) => accepts(p, required))
  if (any) return { pool: any, via: 'modality' }
  throw new MoeError(
    'invalid_request',
    required.includes('image')
      ? `No model available to this API key accepts image input: this request has images, and no model here can read them. Send text only.`
      : `No model available to this API key accepts ${needs || 'text'} input`,
    'messages',
  )
}
