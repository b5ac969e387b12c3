// Decode-step A/B between engine variants, interleaved so that every variant
// sees the same neighbours: on a shared machine, back-to-back benchmark runs
// measure the load as much as the engine. Each variant is an engine source
// tree (this one, or another checkout's via MOE_AB_BASE) and an expert kernel.
// Reports the median wall time and the median CPU time of a step (the process's
// user + system time, with ORT's threads sleeping rather than spinning).
//   node src/bench/engine-ab.ts
//   MOE_AB_VARIANTS=this,this:fused,base  MOE_AB_BASE=/path/to/other/gpu-worker/src/engine/engine.ts
//   MOE_AB_CASES=1x16,1x1024,16x16 (batch x context)  MOE_AB_ROUNDS=10  MOE_BENCH_DIR=...
import { existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { MoeEngine } from '../engine/engine.ts'
import { BENCH_CONFIG, writeRandomMixtral } from '../engine/random-model.ts'
import { decodeStep, prefilledBatch } from './bench-batch.ts'

const modelDir = process.env.MOE_BENCH_DIR ?? join(tmpdir(), 'moe-bench-model')
const trees: Record<string, string | undefined> = {
  this: new URL('../engine/engine.ts', import.meta.url).pathname,
  base: process.env.MOE_AB_BASE,
}
const variants = (process.env.MOE_AB_VARIANTS ?? 'this,this:fused').split(',')
const cases = (process.env.MOE_AB_CASES ?? '1x16,1x1024,16x16').split(',').map((c) => {
  const [batch, context] = c.split('x').map(Number)
  if (!Number.isInteger(batch) || !Number.isInteger(context) || batch! < 1 || context! < 1)
    throw new Error(`MOE_AB_CASES entries are BATCHxCONTEXT, e.g. 16x16; got ${c}`)
  return { batch: batch!, context: context! }
})
const rounds = Number(process.env.MOE_AB_ROUNDS ?? 10)

const prompt = (len: number, salt: number) =>
  Array.from({ length: len }, (_, i) => 3 + ((i * 7919 + salt * 104729) % 255))

interface Runner {
  name: string
  step: () => Promise<void>
  wall: number[]
  cpu: number[]
}

if (!existsSync(join(modelDir, 'config.json'))) writeRandomMixtral(modelDir, BENCH_CONFIG, 1234)
const runners: Runner[] = []
for (const variant of variants) {
  const [tree, expertKernel] = variant.split(':')
  const path = trees[tree!]
  if (!path) throw new Error(`variant ${variant}: tree ${tree} is unknown (set MOE_AB_BASE for "base")`)
  const { MoeEngine: Engine } = (await import(path)) as { MoeEngine: typeof MoeEngine }
  for (const { batch, context } of cases) {
    // One engine per case: the cache's capacity follows its longest sequence.
    const engine = await Engine.load({
      modelDir,
      ep: 'cpu',
      intraOpThreads: Number(process.env.MOE_THREADS ?? 2),
      maxBatch: Math.max(batch, 1),
      maxContext: 2048,
      spin: false,
      ...(expertKernel ? { expertKernel: expertKernel as 'fused' | 'per-expert' } : {}),
      log: () => {},
    })
    const seqs = await prefilledBatch(
      engine,
      Array.from({ length: batch }, (_, b) => prompt(context, b)),
      (b) => ({ seed: b, maxTokens: 1 << 20 }),
    )
    const step = async () => {
      await decodeStep(engine, seqs)
    }
    for (let i = 0; i < 3; i++) await step()
    runners.push({ name: `${variant} batch ${batch} context ${context}`, step, wall: [], cpu: [] })
  }
}
for (let r = 0; r < rounds; r++)
  for (const runner of runners)
    for (let i = 0; i < 3; i++) {
      const c0 = process.cpuUsage()
      const t0 = performance.now()
      await runner.step()
      runner.wall.push(performance.now() - t0)
      const c = process.cpuUsage(c0)
      runner.cpu.push((c.user + c.system) / 1000)
    }
const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!
console.log('| variant | wall ms/step (median) | CPU ms/step (median) |\n|---|---:|---:|')
for (const r of runners)
  console.log(`| ${r.name} | ${median(r.wall).toFixed(2)} | ${median(r.cpu).toFixed(2)} |`)
