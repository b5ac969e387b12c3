import { PLAN_DTYPES, type PlanDtype } from '../engine/memory-plan.ts'
import type { ExecutionProviderChoice } from '../engine/session.ts'
import { WorkerVariables } from '../service/config.ts'

// Flag parsing shared by the commands: each bad value is a UsageError (exit 2) naming the flag.

export class UsageError extends Error {}

export function num(
  name: string,
  v: string | undefined,
  opts: { int?: boolean; min?: number; max?: number } = {},
): number | undefined {
  if (v === undefined) return undefined
  const n = Number(v)
  if (
    !Number.isFinite(n) ||
    (opts.int && !Number.isInteger(n)) ||
    (opts.min !== undefined && n < opts.min) ||
    (opts.max !== undefined && n > opts.max)
  )
    throw new UsageError(
      `--${name} must be ${opts.int ? 'an integer' : 'a number'}${opts.min !== undefined ? ` >= ${opts.min}` : ''}${opts.max !== undefined ? ` <= ${opts.max}` : ''} (got ${JSON.stringify(v)})`,
    )
  return n
}

export function intList(name: string, v: string | undefined): number[] | undefined {
  if (v === undefined) return undefined
  const parts = v.split(',').map((s) => s.trim())
  if (parts.some((p) => !/^\d+$/.test(p)))
    throw new UsageError(`--${name} must be comma-separated non-negative integers (got ${JSON.stringify(v)})`)
  return parts.map(Number)
}

/** The engine settings a command takes from the environment (MOE_EP, MOE_EXPORT_CACHE), validated. */
export function engineEnv(epFlag: string | undefined): {
  ep: ExecutionProviderChoice
  exportCacheDir?: string
} {
  const parsed = WorkerVariables.pick({ MOE_EP: true, MOE_EXPORT_CACHE: true }).safeParse({
    ...process.env,
    ...(epFlag !== undefined && { MOE_EP: epFlag }),
  })
  if (!parsed.success)
    throw new UsageError(
      parsed.error.issues
        .map((i) => `${i.path[0] === 'MOE_EP' ? '--ep / MOE_EP' : String(i.path[0])}: ${i.message}`)
        .join('; '),
    )
  return { ep: parsed.data.MOE_EP, exportCacheDir: parsed.data.MOE_EXPORT_CACHE }
}

export function exportDtype(v: string): PlanDtype {
  if (!PLAN_DTYPES.includes(v as PlanDtype))
    throw new UsageError(`--dtype must be one of ${PLAN_DTYPES.join(', ')} (got ${JSON.stringify(v)})`)
  return v as PlanDtype
}
