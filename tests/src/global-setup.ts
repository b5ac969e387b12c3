// One stack for the suites that share it (happy paths, routing, cache, hostile input, load): the
// edge, one worker and the shared Redis, or the running stack named by MOE_E2E_URL. The fault
// suite starts its own, on a private Redis.
import type {} from 'vitest'
import type { TestProject } from 'vitest/node'
import { type StackInfo, startStack } from './stack.ts'

declare module 'vitest' {
  export interface ProvidedContext {
    stack: StackInfo
  }
}

export default async function setup(project: TestProject) {
  const stack = await startStack({ workers: Number(process.env.MOE_E2E_WORKERS ?? 1) }, true)
  const { edge: _e, workers: _w, addWorker: _a, stop, ...info } = stack
  project.provide('stack', info)
  return stop
}
