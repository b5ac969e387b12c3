import { cpSync, mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { MoeEngine } from '../src/engine/engine.ts'
import type { ExpertKernel } from '../src/engine/onnx-export.ts'

/** The committed demo model (trained; what `npm start` serves). */
export const DEMO_MODEL_DIR = fileURLToPath(new URL('../models/demo-moe', import.meta.url))

/** The committed tiny model (random weights; fast, for the tests). */
export const TINY_MODEL_DIR = fileURLToPath(new URL('../models/tiny-mixtral', import.meta.url))

/** A private copy of the tiny model (for tests that change or export it). */
export function copyTinyModel(): string {
  const dir = join(mkdtempSync(join(tmpdir(), 'moe-test-')), 'tiny')
  cpSync(TINY_MODEL_DIR, dir, { recursive: true, filter: (src) => !src.includes('.onnx-cache') })
  return dir
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`)
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!))
  return m
}

export function argmax(a: ArrayLike<number>): number {
  let best = 0
  for (let i = 1; i < a.length; i++) if (a[i]! > a[best]!) best = i
  return best
}

/** The tiny model on the CPU, quiet, with the given batch and context limits. */
export async function loadTinyEngine(
  maxBatch = 1,
  maxContext = 512,
  expertKernel?: ExpertKernel,
): Promise<MoeEngine> {
  return MoeEngine.load({
    modelDir: TINY_MODEL_DIR,
    ep: 'cpu',
    maxBatch,
    maxContext,
    expertKernel,
    log: () => {},
  })
}
