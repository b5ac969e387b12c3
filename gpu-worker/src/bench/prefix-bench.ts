// Prefix caching and chunked prefill on the bench model (hidden 512, 8 layers, 8 experts of 1408,
// top-2, vocab 32000), through the batch scheduler with the forward passes on a worker thread,
// as the service runs them:
//  1. time to first token of a request sharing a 1,000-token prefix with an earlier one, against
//     the earlier one's (goal <= 25%);
//  2. the gaps between tokens of 8 running streams while a 2,000-token prompt is admitted, with
//     chunked prefill at a few chunk sizes and without it (goal: their p99 <= 3x the median gap
//     before it arrived), each chunk size with the chunk in the decode pass (mixed) and in a pass of
//     its own between two decode steps (separate), run one after the other.
//   npm run bench:prefix -w @moe/gpu-worker
//     (MOE_THREADS, MOE_BENCH_DIR, MOE_BENCH_CHUNKS=16,32,64,128, MOE_BENCH_MODES=separate,mixed)
import { existsSync, mkdirSync, writeFileSync } from 'node:fs'
import { availableParallelism, cpus, loadavg, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { BENCH_CONFIG, writeRandomMixtral } from '../engine/random-model.ts'
import type { GenerationParams } from '../engine/sequence.ts'
import { ThreadedEngine } from '../engine/threaded-engine.ts'
import { BatchScheduler, type SchedulerOptions, type StepStats } from '../scheduler/batch-scheduler.ts'

const threads = Number(process.env.MOE_THREADS ?? availableParallelism())
const modelDir = process.env.MOE_BENCH_DIR ?? join(tmpdir(), 'moe-bench-model')
const resultsDir = join(import.meta.dirname, '..', '..', 'bench-results')
const chunkSizes = (process.env.MOE_BENCH_CHUNKS ?? '16,32,64,128').split(',').map(Number)
if (chunkSizes.some((n) => !Number.isInteger(n) || n < 16))
  throw new Error('MOE_BENCH_CHUNKS must be comma-separated integers of at least 16')
const modes = (process.env.MOE_BENCH_MODES ?? 'separate,mixed').split(',')
if (modes.length === 0 || modes.some((m) => m !== 'separate' && m !== 'mixed'))
  throw new Error('MOE_BENCH_MODES must be a comma-separated list of separate and mixed')

const prompt = (len: number, salt: number) =>
  Array.from({ length: len }, (_, i) => 3 + ((i * 7919 + salt * 104729) % 31_000))

const params = (maxTokens: number, seed = 0): GenerationParams => ({
  maxTokens,
  temperature: 0,
  topP: 1,
  topK: 0,
  seed,
  stop: [],
  allowedExperts: null,
  ignoreEos: true,
})

const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? Number.NaN
}
const median = (xs: number[]) => quantile(xs, 0.5)

/** Submits a request; resolves with the arrival time of each of its tokens. */
function run(scheduler: BatchScheduler, id: string, promptIds: number[], p: GenerationParams) {
  const times: number[] = []
  const submitted = performance.now()
  const done = new Promise<number[]>((resolve, reject) => {
    scheduler.submit({
      id,
      tenantId: id,
      pool: 'bench',
      promptIds,
      params: p,
      onToken: () => times.push(performance.now()),
      onFinish: (o) => (o.kind === 'failed' ? reject(o.error) : resolve(times)),
    })
  })
  return { submitted, times, done }
}

async function ttft(engine: ThreadedEngine) {
  const scheduler = new BatchScheduler(engine, { maxBatch: 16, prefixCacheTokens: 4096 })
  await run(scheduler, 'warm', prompt(64, 99), params(2)).done
  const cold: number[] = []
  const warm: number[] = []
  for (let i = 0; i < 3; i++) {
    const shared = prompt(1000, i)
    const a = run(scheduler, `cold${i}`, [...shared, ...prompt(24, 100 + i)], params(1))
    cold.push((await a.done)[0]! - a.submitted)
    const b = run(scheduler, `warm${i}`, [...shared, ...prompt(24, 200 + i)], params(1))
    warm.push((await b.done)[0]! - b.submitted)
  }
  return { coldMs: median(cold), warmMs: median(warm), ratio: median(warm) / median(cold), cold, warm }
}

interface GapFigures {
  chunkTokens: number | null
  /** The chunk in the decode rows' pass, or in a pass of its own. */
  mode: 'one pass' | 'separate' | 'mixed'
  /** Median gap between consecutive tokens of the 8 streams before the long prompt arrived. */
  steadyMedianMs: number
  /** Gaps that overlap the long prompt's admission (from its arrival to its first token). */
  admissionGaps: number
  admissionP99Ms: number
  admissionMaxMs: number
  /** The goal's ratio: p99 gap while admitting over the steady median. */
  ratio: number
  longPromptTtftMs: number
  /** Median step times (stepMs): decode before the arrival, decode passes and passes with a chunk while admitting. */
  steadyDecodeMs: number
  admissionDecodeMs: number
  admissionChunkMs: number
  steps: string
}

/** 8 streams decode; after 24 of their tokens a 2,000-token prompt arrives; they stop once it has its first token. */
async function gaps(
  engine: ThreadedEngine,
  chunkTokens: number | null,
  mode: GapFigures['mode'],
): Promise<GapFigures> {
  const steps: StepStats[] = []
  const opts: SchedulerOptions = {
    maxBatch: 16,
    maxPrefillTokens: 2048,
    prefillChunkTokens: chunkTokens ?? 2048,
    mixedPrefill: mode === 'mixed',
    hooks: { afterStep: (s) => steps.push(s) },
  }
  const scheduler = new BatchScheduler(engine, opts)
  const streams = Array.from({ length: 8 }, (_, i) =>
    run(scheduler, `s${i}`, prompt(16, 300 + i), params(1000)),
  )
  while (streams.some((s) => s.times.length < 24)) await new Promise((r) => setTimeout(r, 2))
  const stepsBefore = steps.length
  const steadyDecode = steps.filter((x, i) => i >= 4 && x.kind === 'decode').map((x) => x.stepMs)
  const long = run(scheduler, 'long', prompt(2000, 7), params(1))
  const arrival = long.submitted
  const firstLong = (await long.done)[0]!
  const admission = steps.slice(stepsBefore)
  const stepMs = (kind: StepStats['kind']) =>
    median(admission.filter((x) => x.kind === kind).map((x) => x.stepMs))
  const admissionDecodeMs = stepMs('decode')
  const admissionChunkMs = stepMs(mode === 'mixed' ? 'mixed' : 'prefill')
  for (let i = 0; i < 8; i++) scheduler.cancel(`s${i}`)
  const streamTimes = await Promise.all(streams.map((s) => s.done))
  const steady: number[] = []
  const during: number[] = []
  for (const times of streamTimes) {
    for (let i = 4; i < times.length; i++) {
      const gap = times[i]! - times[i - 1]!
      if (times[i]! <= arrival) steady.push(gap)
      else if (times[i - 1]! < firstLong) during.push(gap) // overlaps the admission
    }
  }
  const kinds = steps
    .slice(stepsBefore, stepsBefore + 12)
    .map((s) => (s.kind === 'decode' ? 'D' : s.kind === 'mixed' ? `M${s.tokens}` : `P${s.tokens}`))
  const steadyMedian = median(steady)
  const p99 = quantile(during, 0.99)
  return {
    chunkTokens,
    mode,
    steadyMedianMs: steadyMedian,
    admissionGaps: during.length,
    admissionP99Ms: p99,
    admissionMaxMs: Math.max(...during),
    ratio: p99 / steadyMedian,
    longPromptTtftMs: firstLong - arrival,
    steadyDecodeMs: median(steadyDecode),
    admissionDecodeMs,
    admissionChunkMs,
    steps: kinds.join(' '),
  }
}

async function main() {
  const machine = `${cpus()[0]?.model ?? 'cpu'}, ${availableParallelism()} cores, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, ORT CPU EP, ${threads} threads`
  console.log(`moe-edge prefix cache and chunked prefill benchmark: ${machine}`)
  if (!existsSync(join(modelDir, 'config.json'))) {
    writeRandomMixtral(modelDir, BENCH_CONFIG, 1234)
    console.log(`wrote bench model to ${modelDir}`)
  }
  const engine = await ThreadedEngine.load({
    modelDir,
    ep: 'cpu',
    intraOpThreads: threads,
    maxBatch: 16,
    maxContext: 2048,
    prefixCacheTokens: 4096,
    log: () => {},
  })
  try {
    const t = await ttft(engine)
    console.log(
      `TTFT, 1,024-token prompt: cold ${t.coldMs.toFixed(0)} ms; sharing a 1,000-token prefix ${t.warmMs.toFixed(0)} ms = ${(t.ratio * 100).toFixed(1)}% (goal <= 25%)`,
    )
    const cases: GapFigures[] = []
    const runs: Array<[number | null, GapFigures['mode']]> = [
      [null, 'one pass'],
      ...chunkSizes.flatMap((c) => modes.map((m) => [c, m] as [number, GapFigures['mode']])),
    ]
    for (const [chunk, mode] of runs) {
      const g = await gaps(engine, chunk, mode)
      cases.push(g)
      console.log(
        `chunk ${chunk ?? 'off'} (${mode}): steady median gap ${g.steadyMedianMs.toFixed(0)} ms; while admitting (${g.admissionGaps} gaps) p99 ${g.admissionP99Ms.toFixed(0)} ms = ${g.ratio.toFixed(2)}x (goal <= 3x), max ${g.admissionMaxMs.toFixed(0)} ms; 2,000-token prompt TTFT ${g.longPromptTtftMs.toFixed(0)} ms; median steps: decode ${g.steadyDecodeMs.toFixed(0)} ms before, ${g.admissionDecodeMs.toFixed(0)} ms while admitting, passes with a chunk ${g.admissionChunkMs.toFixed(0)} ms; steps ${g.steps}`,
      )
    }
    const lines = [
      '| chunk (tokens) | chunk pass | steady median gap (ms) | gaps while admitting | their p99 (ms) | p99 / steady median | their max (ms) | 2,000-token prompt TTFT (ms) | decode step before / while admitting (ms) | pass with the chunk (ms) |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
      ...cases.map(
        (g) =>
          `| ${g.chunkTokens ?? 'off'} | ${g.mode} | ${g.steadyMedianMs.toFixed(0)} | ${g.admissionGaps} | ${g.admissionP99Ms.toFixed(0)} | ${g.ratio.toFixed(2)}x | ${g.admissionMaxMs.toFixed(0)} | ${g.longPromptTtftMs.toFixed(0)} | ${g.steadyDecodeMs.toFixed(0)} / ${Number.isNaN(g.admissionDecodeMs) ? '-' : g.admissionDecodeMs.toFixed(0)} | ${g.admissionChunkMs.toFixed(0)} |`,
      ),
    ]
    // Other work on the host skews every figure: say how busy it was.
    const load = `load average over the last 15 minutes at the end: ${loadavg()[2]!.toFixed(1)} on ${availableParallelism()} cores`
    console.log(load)
    const date = new Date().toISOString().slice(0, 10)
    mkdirSync(resultsDir, { recursive: true })
    writeFileSync(
      join(resultsDir, 'prefix-cpu.json'),
      `${JSON.stringify({ date, machine, load, ttft: t, gaps: cases }, null, 2)}\n`,
    )
    writeFileSync(
      join(resultsDir, 'prefix-cpu.md'),
      [
        `# Prefix cache and chunked prefill (${date})`,
        '',
        `Machine: ${machine}; ${load}. Bench model shape, fp32, the scheduler over the engine on a worker thread. Command: \`npm run bench:prefix -w @moe/gpu-worker\`.`,
        '',
        `- Time to first token of a 1,024-token prompt: ${t.coldMs.toFixed(0)} ms cold; ${t.warmMs.toFixed(0)} ms when its first 1,000 tokens are cached from an earlier request: ${(t.ratio * 100).toFixed(1)}% (goal <= 25%). Medians of 3.`,
        '- 8 streams (16-token prompts, greedy) decode; after 24 of their tokens a 2,000-token prompt arrives. Gaps between consecutive tokens of the streams: the median before it arrived, and those overlapping the time from its arrival to its first token (goal: their p99 <= 3x the median):',
        '',
        ...lines,
        '',
      ].join('\n'),
    )
    console.log(['', ...lines].join('\n'))
  } finally {
    await engine.close()
  }
}

await main()
