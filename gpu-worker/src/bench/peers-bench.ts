// The engine against llama.cpp in the same run, on the same weights: the bench
// model (hidden 512, 8 layers, 8 experts of 1408, top-2, vocab 32000) written
// to GGUF in F32, Q8_0 and Q4_0 for llama.cpp (node-llama-cpp, CPU), and run
// by this engine at fp32, int8 and int4. Both use the same thread count.
//   npm run bench:peers -w @moe/gpu-worker                 (about 5 minutes)
//   npm run bench:peers -w @moe/gpu-worker -- --quick      (tiny model, fewer tokens; a smoke run)
// Flags: --threads N (default 2), --out FILE (default bench-results/peers-cpu.md; none with --quick).
// The last stdout line is one JSON object of engine / llama.cpp ratios.
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { availableParallelism, cpus, loadavg, tmpdir, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { getLlama, type Llama, type LlamaContextSequence, LlamaLogLevel, type Token } from 'node-llama-cpp'
import { MoeEngine } from '../engine/engine.ts'
import { openModelDir } from '../engine/model-dir.ts'
import type { ExportDtype } from '../engine/onnx-export.ts'
import { BENCH_CONFIG, writeRandomMixtral } from '../engine/random-model.ts'
import { REPO_ROOT } from '../service/config.ts'
import { decodeStep, prefilledBatch } from './bench-batch.ts'
import { writeMixtralGguf } from './gguf-mixtral.ts'
import type { GgmlTensorType } from './gguf-writer.ts'
import { BenchService, benchJob, benchPrompt } from './service-load.ts'

/** Bumped when the GGUF the converter writes changes, so cached files are rewritten. */
const GGUF_FORMAT = 1

interface Plan {
  model: string
  modelDir: string
  /** Decode steps timed at the short and the long context. */
  steps: number
  longSteps: number
  shortContext: number
  longContext: number
  prefillTokens: number
  /** Sequences and tokens each in the concurrent case. */
  concurrency: number
  concurrentTokens: number
  /** Greedy tokens compared between the peers. */
  checkTokens: number
}

const PAIRS: ReadonlyArray<{ engine: ExportDtype; peer: GgmlTensorType }> = [
  { engine: 'fp32', peer: 'F32' },
  { engine: 'int8', peer: 'Q8_0' },
  { engine: 'int4', peer: 'Q4_0' },
]

/** What one engine measured at one dtype; tokens/s throughout. */
interface Figures {
  decodeShort: number
  decodeLong: number
  prefill: number
  /** 16 sequences, prompt to last token: through the service for the engine. */
  concurrent: number
  /** The engine alone in this process at the same concurrency (null for llama.cpp). */
  concurrentAlone: number | null
  greedy: number[]
  /** The engine's logits before each greedy token (empty for llama.cpp). */
  greedyLogits: Float32Array[]
}

/** Logits closer than this are a tie that two correct fp32 implementations may break either way. */
const NEAR_TIE = 0.05

function usage(message: string): never {
  console.error(`bench:peers: ${message}\nusage: bench:peers [--quick] [--threads N] [--out FILE]`)
  process.exit(2)
}

function parseFlags() {
  let values: { quick?: boolean; threads?: string; out?: string }
  try {
    ;({ values } = parseArgs({
      options: { quick: { type: 'boolean' }, threads: { type: 'string' }, out: { type: 'string' } },
      strict: true,
    }))
  } catch (e) {
    usage((e as Error).message)
  }
  const threads = Number(values.threads ?? 2)
  if (!Number.isInteger(threads) || threads < 1 || threads > 256)
    usage(`--threads must be an integer from 1 to 256 (got ${JSON.stringify(values.threads)})`)
  const quick = values.quick ?? false
  const out = values.out ?? (quick ? null : join(REPO_ROOT, 'gpu-worker/bench-results/peers-cpu.md'))
  return { quick, threads, out: out === null ? null : resolve(out) }
}

function plan(quick: boolean): Plan {
  if (quick)
    return {
      model: 'tiny (hidden 64, 2 layers, 8 experts of 128, top-2, vocab 259)',
      modelDir: join(REPO_ROOT, 'gpu-worker/models/tiny-mixtral'),
      steps: 8,
      longSteps: 8,
      shortContext: 16,
      longContext: 256,
      prefillTokens: 128,
      concurrency: 16,
      concurrentTokens: 8,
      checkTokens: 8,
    }
  const modelDir = process.env.MOE_BENCH_DIR ?? join(tmpdir(), 'moe-bench-model')
  if (!existsSync(join(modelDir, 'config.json'))) writeRandomMixtral(modelDir, BENCH_CONFIG, 1234)
  return {
    model: 'bench (hidden 512, 8 layers, 8 experts of 1408, top-2, 8 heads, 2 KV heads, vocab 32000)',
    modelDir,
    steps: 64,
    longSteps: 32,
    shortContext: 16,
    longContext: 1024,
    prefillTokens: 512,
    concurrency: 16,
    concurrentTokens: 32,
    checkTokens: 16,
  }
}

const perSecond = (n: number, ms: number) => (n * 1000) / ms

/** The GGUF of `dir` in `type`, written once per model fingerprint into the temp dir. */
function ggufFile(dir: string, type: GgmlTensorType): string {
  const cache = join(tmpdir(), 'moe-bench-gguf')
  mkdirSync(cache, { recursive: true })
  const file = join(cache, `${openModelDir(dir).fingerprint}-${type}-v${GGUF_FORMAT}.gguf`)
  if (!existsSync(file)) {
    const t0 = performance.now()
    const staging = `${file}.${process.pid}.tmp`
    const bytes = writeMixtralGguf(dir, staging, type)
    renameSync(staging, file)
    console.log(
      `wrote ${type} GGUF (${(bytes / 2 ** 20).toFixed(0)} MiB) in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
    )
  }
  return file
}

// ---- this engine ---------------------------------------------------------------------------------

/**
 * Prefills `batch` sequences of `context` tokens, then decodes them greedily.
 * `timeAll`: tokens/s from the start of the prefill to each sequence's
 * `steps`-th token (the concurrent case); else decode tokens/s over `steps`
 * steps after two untimed ones.
 */
async function engineRun(
  engine: MoeEngine,
  batch: number,
  context: number,
  steps: number,
  timeAll: boolean,
): Promise<number> {
  const t0 = performance.now()
  const seqs = await prefilledBatch(
    engine,
    Array.from({ length: batch }, (_, b) => benchPrompt(context, b)),
    (b) => ({ seed: b, maxTokens: steps + 4, temperature: 0, ignoreEos: true }),
  )
  const warm = timeAll ? 0 : 2
  let start = t0
  for (let step = 0; step < warm + steps - (timeAll ? 1 : 0); step++) {
    if (step === warm && !timeAll) start = performance.now()
    await decodeStep(engine, seqs)
  }
  return perSecond(batch * steps, performance.now() - start)
}

async function engineFigures(p: Plan, dtype: ExportDtype, threads: number) {
  const engine = await MoeEngine.load({
    modelDir: p.modelDir,
    ep: 'cpu',
    dtype,
    intraOpThreads: threads,
    maxBatch: p.concurrency,
    maxContext: Math.max(p.longContext + p.longSteps + 8, p.prefillTokens),
    log: () => {},
  })
  try {
    // Greedy tokens and their logits for the check against llama.cpp; also the warm-up.
    const check = engine.createSequence('check', benchPrompt(p.shortContext, 0), {
      seed: 0,
      maxTokens: p.checkTokens,
      temperature: 0,
      ignoreEos: true,
    })
    check.slot = 0
    const greedyLogits: Float32Array[] = []
    while (check.finishReason === null) {
      const row = { slot: 0, tokens: check.nextInput(), pastLength: check.pastLength, allowedExperts: null }
      const out = await engine.forward([row])
      greedyLogits.push(out.logits.slice())
      engine.acceptStep([check], [row], out)
    }
    const decodeShort = await engineRun(engine, 1, p.shortContext, p.steps, false)
    const decodeLong = await engineRun(engine, 1, p.longContext, p.longSteps, false)
    let prefillMs = Number.POSITIVE_INFINITY
    for (let i = 0; i < 3; i++) {
      const row = { slot: 0, tokens: benchPrompt(p.prefillTokens, i), pastLength: 0, allowedExperts: null }
      prefillMs = Math.min(prefillMs, (await engine.forward([row])).stepMs)
    }
    await engineRun(engine, p.concurrency, p.shortContext, 2, true) // warm the batch shapes
    const concurrentAlone = await engineRun(engine, p.concurrency, p.shortContext, p.concurrentTokens, true)
    return {
      decodeShort,
      decodeLong,
      prefill: perSecond(p.prefillTokens, prefillMs),
      concurrentAlone,
      greedy: check.outputIds,
      greedyLogits,
    }
  } finally {
    await engine.close()
  }
}

/** Aggregate tokens/s of `concurrency` greedy jobs through Redis and a worker process. */
async function serviceConcurrent(p: Plan, dtype: ExportDtype, threads: number): Promise<number> {
  const service = await BenchService.start(p.modelDir, {
    maxBatch: p.concurrency,
    maxContext: p.shortContext + p.concurrentTokens + 8,
    dtype,
    threads,
    readers: p.concurrency,
  })
  try {
    const jobs = (maxTokens: number) =>
      Array.from({ length: p.concurrency }, (_, i) =>
        benchJob({ promptLen: p.shortContext, maxTokens, temperature: 0 }, i),
      )
    await service.concurrent(jobs(2)) // warm-up
    return (await service.concurrent(jobs(p.concurrentTokens))).tokensPerSecond
  } finally {
    await service.close()
  }
}

// ---- llama.cpp -----------------------------------------------------------------------------------

/** Greedy tokens after `prompt`; tokens/s over `steps` decode steps after two untimed ones. */
async function peerDecode(
  seq: LlamaContextSequence,
  prompt: number[],
  steps: number,
): Promise<{ tokensPerSecond: number; tokens: number[] }> {
  await seq.clearHistory()
  const tokens: number[] = []
  let start = 0
  // Token k + 1 comes out after token k was evaluated: yields 3 .. steps + 3 span `steps` decode passes.
  for await (const t of seq.evaluate(prompt as Token[], { temperature: 0, yieldEogToken: true })) {
    tokens.push(t)
    if (tokens.length === 3) start = performance.now()
    if (tokens.length === steps + 3) break
  }
  return { tokensPerSecond: perSecond(steps, performance.now() - start), tokens }
}

async function peerFigures(llama: Llama, file: string, p: Plan, threads: number): Promise<Figures> {
  const model = await llama.loadModel({ modelPath: file, gpuLayers: 0 })
  const contextOptions = {
    threads: { ideal: threads, min: threads },
    batchSize: Math.max(p.prefillTokens, 512),
    // The engine keeps fp32 K/V; llama.cpp's default is f16.
    experimentalKvCacheKeyType: 'F32',
    experimentalKvCacheValueType: 'F32',
  } as const
  try {
    const ctx = await model.createContext({
      ...contextOptions,
      contextSize: Math.max(p.longContext + p.longSteps + 16, p.prefillTokens + 16),
    })
    const seq = ctx.getSequence()
    const check = await peerDecode(seq, benchPrompt(p.shortContext, 0), p.checkTokens) // also the warm-up
    const decodeShort = (await peerDecode(seq, benchPrompt(p.shortContext, 1), p.steps)).tokensPerSecond
    const decodeLong = (await peerDecode(seq, benchPrompt(p.longContext, 2), p.longSteps)).tokensPerSecond
    let prefillMs = Number.POSITIVE_INFINITY
    for (let i = 0; i < 3; i++) {
      await seq.clearHistory()
      const t0 = performance.now()
      await seq.evaluateWithoutGeneratingNewTokens(benchPrompt(p.prefillTokens, i) as Token[])
      prefillMs = Math.min(prefillMs, performance.now() - t0)
    }
    await ctx.dispose()

    // Concurrent sequences in one context: node-llama-cpp batches their steps into one llama_decode.
    const many = await model.createContext({
      ...contextOptions,
      sequences: p.concurrency,
      contextSize: p.shortContext + p.concurrentTokens + 16,
    })
    const seqs = Array.from({ length: p.concurrency }, () => many.getSequence())
    const generate = async (s: LlamaContextSequence, i: number, n: number) => {
      await s.clearHistory()
      let got = 0
      for await (const _ of s.evaluate(benchPrompt(p.shortContext, i) as Token[], {
        temperature: 0,
        yieldEogToken: true,
      }))
        if (++got === n) break
      return got
    }
    await Promise.all(seqs.map((s, i) => generate(s, i, 3))) // warm-up
    const t0 = performance.now()
    const counts = await Promise.all(seqs.map((s, i) => generate(s, i, p.concurrentTokens)))
    const concurrent = perSecond(
      counts.reduce((a, b) => a + b, 0),
      performance.now() - t0,
    )
    await many.dispose()
    return {
      decodeShort,
      decodeLong,
      prefill: perSecond(p.prefillTokens, prefillMs),
      concurrent,
      concurrentAlone: null,
      greedy: check.tokens.slice(0, p.checkTokens),
      greedyLogits: [],
    }
  } finally {
    await model.dispose()
  }
}

// ---- report --------------------------------------------------------------------------------------

/** How many leading tokens two greedy runs share. */
const agreedPrefix = (a: number[], b: number[]) => {
  let n = 0
  while (n < a.length && n < b.length && a[n] === b[n]) n++
  return n
}

/**
 * Whether llama.cpp decodes the engine's greedy tokens: all of them, or all
 * up to a step where the engine itself scores llama.cpp's pick within
 * NEAR_TIE of its own (after which the two continue different texts).
 */
function fp32Agreement(engine: Figures, peer: Figures, tokens: number): { agree: boolean; note: string } {
  const n = agreedPrefix(engine.greedy, peer.greedy)
  if (n >= tokens) return { agree: true, note: `yes, ${tokens} of ${tokens} greedy tokens` }
  const logits = engine.greedyLogits[n]!
  const margin = logits[engine.greedy[n]!]! - logits[peer.greedy[n]!]!
  return margin < NEAR_TIE
    ? {
        agree: true,
        note: `yes, ${n} of ${tokens} greedy tokens, then a near-tie (the engine scores llama.cpp's token ${margin.toFixed(4)} below its own)`,
      }
    : {
        agree: false,
        note: `NO: they part at token ${n}, where the engine scores llama.cpp's token ${margin.toFixed(3)} below its own; the GGUF conversion or one engine is wrong`,
      }
}

function table(p: Plan, rows: Array<{ engine: Figures; peer: Figures }>): string[] {
  const fmt = (v: number) => (v >= 100 ? v.toFixed(0) : v.toFixed(1))
  const cells = (pick: (f: Figures) => number | null) =>
    rows.flatMap(({ engine, peer }) => {
      const e = pick(engine)
      const l = pick(peer)
      return [e === null ? '-' : fmt(e), l === null ? '-' : fmt(l), e && l ? `${(e / l).toFixed(2)}x` : '-']
    })
  const latency = (f: Figures) => f.decodeShort / f.decodeLong
  const line = (label: string, values: string[]) => `| ${label} | ${values.join(' | ')} |`
  return [
    line(
      'case (tokens/s unless noted)',
      PAIRS.flatMap(({ engine, peer }) => [`engine ${engine}`, `llama.cpp ${peer}`, 'ratio']),
    ),
    `|---|${PAIRS.map(() => '---:|---:|---:|').join('')}`,
    line(
      `decode, batch 1, context ${p.shortContext}`,
      cells((f) => f.decodeShort),
    ),
    line(
      `decode, batch 1, context ${p.longContext}`,
      cells((f) => f.decodeLong),
    ),
    line(
      `prefill, ${p.prefillTokens} tokens`,
      cells((f) => f.prefill),
    ),
    line(
      `${p.concurrency} concurrent sequences, ${p.concurrentTokens} tokens each (engine through the service)`,
      cells((f) => f.concurrent),
    ),
    line(
      `${p.concurrency} concurrent sequences, engine alone in-process`,
      rows.flatMap(({ engine, peer }) => [
        fmt(engine.concurrentAlone!),
        fmt(peer.concurrent),
        `${(engine.concurrentAlone! / peer.concurrent).toFixed(2)}x`,
      ]),
    ),
    line(
      `decode latency, context ${p.longContext} / context ${p.shortContext} (lower is better)`,
      rows.flatMap(({ engine, peer }) => [
        `${latency(engine).toFixed(2)}x`,
        `${latency(peer).toFixed(2)}x`,
        '-',
      ]),
    ),
  ]
}

async function main() {
  const flags = parseFlags()
  const p = plan(flags.quick)
  const version = (pkg: string) =>
    (
      JSON.parse(
        readFileSync(
          join(dirname(createRequire(import.meta.url).resolve(pkg)), '..', 'package.json'),
          'utf8',
        ),
      ) as { version: string }
    ).version
  const llama = await getLlama({
    gpu: false,
    build: 'never',
    logLevel: LlamaLogLevel.error,
    maxThreads: flags.threads,
  })
  const machine = `${cpus()[0]?.model ?? 'cpu'}, ${availableParallelism()} cores, ${(totalmem() / 2 ** 30).toFixed(0)} GiB; ${flags.threads} threads for each engine; onnxruntime-node ${version('onnxruntime-node')} CPU EP; node-llama-cpp ${version('node-llama-cpp')} (llama.cpp release ${llama.llamaCppRelease.release}, ${llama.buildType} CPU build), fp32 KV cache in both; load average ${loadavg()[0]!.toFixed(1)} at the start`
  console.log(`moe-edge peers benchmark: ${machine}\nmodel: ${p.model}`)

  const rows: Array<{ engine: Figures; peer: Figures }> = []
  for (const pair of PAIRS) {
    const file = ggufFile(p.modelDir, pair.peer)
    const t0 = performance.now()
    const alone = await engineFigures(p, pair.engine, flags.threads)
    const concurrent = await serviceConcurrent(p, pair.engine, flags.threads)
    const peer = await peerFigures(llama, file, p, flags.threads)
    rows.push({ engine: { ...alone, concurrent }, peer })
    console.log(
      `measured engine ${pair.engine} and llama.cpp ${pair.peer} in ${((performance.now() - t0) / 1000).toFixed(0)} s`,
    )
  }
  await llama.dispose()

  const lines = table(p, rows)
  const agreement = rows.map(({ engine, peer }, i) => {
    const n = agreedPrefix(engine.greedy, peer.greedy)
    return `${PAIRS[i]!.engine} vs ${PAIRS[i]!.peer}: ${n} of ${p.checkTokens}`
  })
  const fp32 = rows[0]!
  const { agree, note } = fp32Agreement(fp32.engine, fp32.peer, p.checkTokens)
  const notes = [
    `greedy tokens from the same prompt, leading tokens the peers agree on: ${agreement.join('; ')} (quantized pairs use different quantizers, so they may part)`,
    `peers agree at fp32: ${note}`,
    'decode: tokens/s over steps after two untimed ones; prefill: best of 3; concurrent: prompt to last token, greedy, every context warmed up first',
  ]
  console.log(['', ...lines, '', ...notes.map((n) => `- ${n}`), ''].join('\n'))

  if (flags.out) {
    mkdirSync(dirname(flags.out), { recursive: true })
    const date = new Date().toISOString().slice(0, 10)
    writeFileSync(
      flags.out,
      [
        `# The engine against llama.cpp (${date})`,
        '',
        `Machine: ${machine}.`,
        `Model: ${p.model}, random weights; the same weights written to GGUF for llama.cpp.`,
        'Command: `npm run bench:peers -w @moe/gpu-worker`. Other work shared the machine: figures are noisy.',
        '',
        ...lines,
        '',
        ...notes.map((n) => `- ${n}`),
        '',
      ].join('\n'),
    )
    console.log(`wrote ${flags.out}`)
  }
  const int4 = rows[2]!
  console.log(
    JSON.stringify({
      decode_b1_ratio: fp32.engine.decodeShort / fp32.peer.decodeShort,
      prefill_ratio: fp32.engine.prefill / fp32.peer.prefill,
      concurrent16_ratio: fp32.engine.concurrent / fp32.peer.concurrent,
      ctx1024_ratio: fp32.engine.decodeLong / fp32.peer.decodeLong,
      int4_decode_b1_ratio: int4.engine.decodeShort / int4.peer.decodeShort,
    }),
  )
  process.exit(agree ? 0 : 1)
}

await main()
