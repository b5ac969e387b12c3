// Engine benchmark on a random-weight model of the shape llama.cpp was measured on
// (hidden 512, 8 layers, 8 experts of 1408, top-2, 8 heads, 2 KV heads, vocab 32000).
// Every figure is printed beside the machine's ceiling measured in the same run.
//   npm run bench -w @moe/gpu-worker        (MOE_THREADS, MOE_BENCH_DIR to override;
//   MOE_EXPERT_KERNEL=per-expert for the per-expert dispatch of fp32 experts;
//   MOE_BENCH_CASES=quick for prefill, batch 1 at contexts 16 and 1024, and batch 16 only)
import { existsSync, mkdirSync, writeFileSync } from 'node:fs'
import { availableParallelism, cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { MoeEngine as Engine, type MoeEngine } from '../engine/engine.ts'
import { EXPERT_KERNELS, type ExpertKernel } from '../engine/onnx-export.ts'
import { BENCH_CONFIG, writeRandomMixtral } from '../engine/random-model.ts'
import { prefilledBatch, stepRows } from './bench-batch.ts'
import { measureCeilings } from './ceilings.ts'
import {
  attnParams,
  c,
  decodeBytes,
  expertParams,
  lmHeadParams,
  routerParams,
  touchedExperts,
} from './weight-bytes.ts'

const threads = Number(process.env.MOE_THREADS ?? availableParallelism())
const modelDir = process.env.MOE_BENCH_DIR ?? join(tmpdir(), 'moe-bench-model')
const resultsDir = join(import.meta.dirname, '..', '..', 'bench-results')
const expertKernel = (process.env.MOE_EXPERT_KERNEL ?? 'fused') as ExpertKernel
if (!EXPERT_KERNELS.includes(expertKernel))
  throw new Error(`MOE_EXPERT_KERNEL must be one of ${EXPERT_KERNELS.join(', ')}, not ${expertKernel}`)
const quick = process.env.MOE_BENCH_CASES === 'quick'
if (process.env.MOE_BENCH_CASES !== undefined && !quick)
  throw new Error(`MOE_BENCH_CASES must be "quick" or unset, not ${process.env.MOE_BENCH_CASES}`)

function prompt(len: number, salt: number): number[] {
  return Array.from({ length: len }, (_, i) => 3 + ((i * 7919 + salt * 104729) % 255))
}

interface DecodeFigures {
  batch: number
  context: number
  tokensPerSecond: number
  msPerStep: number
  bytesPerStep: number
  bandwidthShare: number
  overheadShare: number
}

/** Prefills `batch` sequences to `context` tokens, then times `steps` decode steps of all of them. */
async function decode(
  engine: MoeEngine,
  batch: number,
  context: number,
  steps: number,
  bandwidth: number,
): Promise<DecodeFigures> {
  const seqs = await prefilledBatch(
    engine,
    Array.from({ length: batch }, (_, b) => prompt(context, b)),
    (b) => ({ seed: b, maxTokens: steps + 4, temperature: 0 }),
  )
  const walls: number[] = []
  let wall = 0
  let run = 0
  let bytes = 0
  // Two untimed steps first: steady state, after any cache re-layout the prefill left due.
  for (let step = -2; step < steps; step++) {
    const t0 = performance.now()
    const rows = stepRows(seqs)
    const out = await engine.forward(rows)
    engine.acceptStep(seqs, rows, out)
    if (step < 0) continue
    walls.push(performance.now() - t0)
    wall += walls[walls.length - 1]!
    run += out.runMs
    bytes += decodeBytes(touchedExperts(out.expertCounts, batch), rows)
  }
  // The median step: on a shared machine a neighbour's burst lands on a few steps, not all.
  const msPerStep = walls.sort((a, b) => a - b)[Math.floor(steps / 2)]!
  return {
    batch,
    context,
    tokensPerSecond: (batch * 1000) / msPerStep,
    msPerStep,
    bytesPerStep: bytes / steps,
    bandwidthShare: bytes / steps / bandwidth / (msPerStep / 1000),
    overheadShare: (wall - run) / wall,
  }
}

async function main() {
  console.log(
    `moe-edge engine benchmark: ${cpus()[0]?.model ?? 'cpu'} x${availableParallelism()}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, ${threads} threads`,
  )
  const ceilings = await measureCeilings(threads)
  console.log(
    `ceilings (ORT MatMul, same run): memory read ${(ceilings.bandwidth / 1e9).toFixed(1)} GB/s, fp32 matmul ${(ceilings.matmulFlops / 1e9).toFixed(0)} GFLOP/s`,
  )

  if (!existsSync(join(modelDir, 'config.json'))) {
    const t0 = performance.now()
    writeRandomMixtral(modelDir, BENCH_CONFIG, 1234)
    console.log(`wrote bench model to ${modelDir} in ${((performance.now() - t0) / 1000).toFixed(1)} s`)
  }
  const t0 = performance.now()
  const engine = await Engine.load({
    modelDir,
    ep: 'cpu',
    intraOpThreads: threads,
    maxBatch: 32,
    maxContext: 2048,
    expertKernel,
    log: () => {},
  })
  console.log(
    `engine ready in ${((performance.now() - t0) / 1000).toFixed(1)} s (export cached after the first run)`,
  )

  // Prefill: one 512-token prompt.
  const P = 512
  const flopsPrefill =
    2 * P * c.num_hidden_layers * (attnParams + routerParams + c.num_experts_per_tok * expertParams) +
    2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * ((P * (P + 1)) / 2) +
    2 * lmHeadParams
  await engine.forward([{ slot: 0, tokens: prompt(P, 0), pastLength: 0, allowedExperts: null }])
  let prefillMs = Number.POSITIVE_INFINITY
  for (let i = 0; i < 3; i++) {
    const out = await engine.forward([
      { slot: 0, tokens: prompt(P, i + 1), pastLength: 0, allowedExperts: null },
    ])
    prefillMs = Math.min(prefillMs, out.stepMs)
  }
  const prefill = {
    tokens: P,
    tokensPerSecond: (P * 1000) / prefillMs,
    ms: prefillMs,
    flops: flopsPrefill,
    matmulShare: flopsPrefill / ceilings.matmulFlops / (prefillMs / 1000),
  }

  const decodes: DecodeFigures[] = []
  const cases: ReadonlyArray<readonly [number, number, number]> = quick
    ? [
        [1, 16, 64],
        [16, 16, 24],
        [1, 1024, 32],
      ]
    : [
        [1, 16, 64],
        [8, 16, 32],
        [16, 16, 24],
        [32, 16, 16],
        [1, 1024, 32],
      ]
  for (const [batch, context, steps] of cases) {
    decodes.push(await decode(engine, batch, context, steps, ceilings.bandwidth))
  }
  const b1 = decodes[0]!
  const long = decodes[decodes.length - 1]!
  const rooflineMs = (b1.bytesPerStep / ceilings.bandwidth) * 1000

  const lines = [
    `| case | tokens/s | ms/step | share of ceiling | time outside session.run |`,
    `|---|---:|---:|---:|---:|`,
    `| prefill ${P} tokens | ${prefill.tokensPerSecond.toFixed(0)} | ${prefill.ms.toFixed(1)} | ${(prefill.matmulShare * 100).toFixed(0)}% of matmul | - |`,
    ...decodes.map(
      (d) =>
        `| decode batch ${d.batch}, context ${d.context} | ${d.tokensPerSecond.toFixed(1)} | ${d.msPerStep.toFixed(2)} | ${(d.bandwidthShare * 100).toFixed(0)}% of bandwidth (${(d.bytesPerStep / 1e6).toFixed(0)} MB/step) | ${(d.overheadShare * 100).toFixed(1)}% |`,
    ),
  ]
  const summary = [
    `decode batch 1: ${b1.msPerStep.toFixed(2)} ms/token against a weight-bytes roofline of ${rooflineMs.toFixed(2)} ms (${(b1.bandwidthShare * 100).toFixed(0)}%; target >= 60%)`,
    `time outside session.run at batch 1: ${(b1.overheadShare * 100).toFixed(1)}% of a step (target < 10%)`,
    `decode latency, context 1024 vs 16: ${(long.msPerStep / b1.msPerStep).toFixed(2)}x (target <= 1.3x)`,
    `peer (llama.cpp via node-llama-cpp, same shape, this machine type, from the project's notes): decode b1 57 tok/s, prefill 512 ~1000 tok/s`,
  ]
  console.log(['', ...lines, '', ...summary].join('\n'))

  mkdirSync(resultsDir, { recursive: true })
  const date = new Date().toISOString().slice(0, 10)
  const machine = `${cpus()[0]?.model ?? 'cpu'}, ${availableParallelism()} cores, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, ORT CPU EP, ${threads} threads, experts: ${expertKernel}`
  writeFileSync(
    join(resultsDir, 'engine-cpu.json'),
    `${JSON.stringify({ date, machine, ceilings, prefill, decodes }, null, 2)}\n`,
  )
  writeFileSync(
    join(resultsDir, 'engine-cpu.md'),
    [
      `# Engine benchmark (${date})`,
      '',
      `Machine: ${machine}.`,
      `Ceilings measured in the same run: memory read ${(ceilings.bandwidth / 1e9).toFixed(1)} GB/s, fp32 matmul ${(ceilings.matmulFlops / 1e9).toFixed(0)} GFLOP/s.`,
      '',
      ...lines,
      '',
      ...summary.map((s) => `- ${s}`),
      '',
    ].join('\n'),
  )
  console.log(`\nwrote ${join(resultsDir, 'engine-cpu.md')}`)
}

await main()
