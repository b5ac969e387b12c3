// Service benchmark: aggregate tokens/s through Redis and a worker process at
// 1, 4, 16 and 64 concurrent requests, against the engine alone at batch 1 in
// the same run, plus the enqueue-to-first-token overhead the service adds.
//   npm run bench:service -w @moe/gpu-worker     (MOE_BENCH_MODELS=tiny,bench)
import { existsSync, mkdirSync, writeFileSync } from 'node:fs'
import { availableParallelism, cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { MoeEngine, type StepRow } from '../engine/engine.ts'
import { BENCH_CONFIG, writeRandomMixtral } from '../engine/random-model.ts'
import { REPO_ROOT } from '../service/config.ts'
import { BenchService, benchJob, benchPrompt } from './service-load.ts'
import { decodeBytes, touchedExperts } from './weight-bytes.ts'

const resultsDir = join(REPO_ROOT, 'gpu-worker/bench-results')
const models = (process.env.MOE_BENCH_MODELS ?? 'tiny,bench').split(',')

interface ModelCase {
  name: string
  dir: string
  maxTokens: number
  promptLen: number
}

const prompt = benchPrompt
const job = (m: ModelCase, salt: number) => benchJob({ ...m, temperature: 0.8 }, salt)

async function runModel(m: ModelCase) {
  // Engine alone, batch 1, in this process: the baseline, and the bytes per step at batch 1 and 16.
  const engine = await MoeEngine.load({
    modelDir: m.dir,
    ep: 'cpu',
    maxBatch: 16,
    maxContext: 512,
    log: () => {},
  })
  await engine.generate({ inputIds: prompt(m.promptLen, 2), maxTokens: 8, seed: 2 }) // warm-up: first runs allocate and prepack
  const t0 = performance.now()
  const solo = await engine.generate({
    inputIds: prompt(m.promptLen, 1),
    maxTokens: m.maxTokens,
    temperature: 0.8,
    seed: 1,
    ignoreEos: true,
  })
  const soloTps = (solo.outputIds.length * 1000) / (performance.now() - t0)
  const prefillMs: number[] = []
  for (let i = 0; i < 5; i++)
    prefillMs.push(
      (
        await engine.forward([
          { slot: 0, tokens: prompt(m.promptLen, i), pastLength: 0, allowedExperts: null },
        ])
      ).stepMs,
    )
  const prefill = prefillMs.sort((a, b) => a - b)[2]!
  let ideal16: number | null = null
  if (m.name === 'bench') {
    const bytesAt = async (b: number) => {
      const rows: StepRow[] = Array.from({ length: b }, (_, i) => ({
        slot: i,
        tokens: prompt(m.promptLen, i),
        pastLength: 0,
        allowedExperts: null,
      }))
      for (let i = 0; i < b; i += 8) await engine.forward(rows.slice(i, i + 8))
      const step = rows.map((r, i) => ({ ...r, tokens: [3 + ((i * 37) % 250)], pastLength: m.promptLen }))
      const out = await engine.forward(step)
      return decodeBytes(touchedExperts(out.expertCounts, b), step)
    }
    ideal16 = (16 * (await bytesAt(1))) / (await bytesAt(16))
  }

  const service = await BenchService.start(m.dir, { maxBatch: 64, maxContext: 512, readers: 64 })
  try {
    // Enqueue-to-first-token at concurrency 1, minus the prefill itself.
    const overhead: number[] = []
    for (let i = 0; i < 30; i++) {
      const p = { ...job(m, 100 + i), sampling: { ...job(m, 100 + i).sampling, maxTokens: 1 } }
      const r = await service.one(p)
      overhead.push(r.firstAt - r.start - prefill)
    }
    overhead.sort((a, b) => a - b)

    const rows: Array<{ concurrency: number; tokensPerSecond: number; speedup: number; ttftP50: number }> = []
    for (const concurrency of [1, 4, 16, 64]) {
      const r = await service.concurrent(Array.from({ length: concurrency }, (_, i) => job(m, i)))
      rows.push({
        concurrency,
        tokensPerSecond: r.tokensPerSecond,
        speedup: r.tokensPerSecond / soloTps,
        ttftP50: r.ttftP50,
      })
    }
    return {
      model: m.name,
      soloTps,
      prefillMs: prefill,
      overheadP50: overhead[15]!,
      overheadP90: overhead[27]!,
      ideal16,
      rows,
    }
  } finally {
    await service.close()
  }
}

async function main() {
  const machine = `${cpus()[0]?.model ?? 'cpu'}, ${availableParallelism()} cores, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, ORT CPU EP`
  console.log(`moe-edge service benchmark: ${machine}`)
  const cases: ModelCase[] = []
  if (models.includes('tiny'))
    cases.push({
      name: 'tiny',
      dir: join(REPO_ROOT, 'gpu-worker/models/tiny-mixtral'),
      maxTokens: 64,
      promptLen: 16,
    })
  if (models.includes('bench')) {
    const dir = process.env.MOE_BENCH_DIR ?? join(tmpdir(), 'moe-bench-model')
    if (!existsSync(join(dir, 'config.json'))) writeRandomMixtral(dir, BENCH_CONFIG, 1234)
    cases.push({ name: 'bench', dir, maxTokens: 32, promptLen: 16 })
  }
  const lines: string[] = []
  const results = []
  for (const m of cases) {
    const r = await runModel(m)
    results.push(r)
    lines.push(
      `### ${m.name} model (${m.maxTokens} tokens per request, ignore_eos; engine alone at batch 1: ${r.soloTps.toFixed(1)} tok/s)`,
      '',
      '| concurrent requests | aggregate tokens/s | vs engine alone, batch 1 | vs 1 request through the service | TTFT p50 |',
      '|---:|---:|---:|---:|---:|',
      ...r.rows.map(
        (x) =>
          `| ${x.concurrency} | ${x.tokensPerSecond.toFixed(1)} | ${x.speedup.toFixed(2)}x | ${(x.tokensPerSecond / r.rows[0]!.tokensPerSecond).toFixed(2)}x | ${x.ttftP50.toFixed(1)} ms |`,
      ),
      '',
      `- enqueue-to-first-token overhead beyond the prefill (${r.prefillMs.toFixed(2)} ms): p50 ${r.overheadP50.toFixed(2)} ms, p90 ${r.overheadP90.toFixed(2)} ms (target p50 < 5 ms)`,
      ...(r.ideal16 === null
        ? [
            `- 16 concurrent: ${r.rows[2]!.speedup.toFixed(2)}x the engine alone at batch 1, ${(r.rows[2]!.tokensPerSecond / r.rows[0]!.tokensPerSecond).toFixed(2)}x one request through the service (target >= 6x)`,
          ]
        : [
            `- 16 concurrent vs one at a time: ${r.rows[2]!.speedup.toFixed(2)}x; ideal from weight bytes per step ${r.ideal16.toFixed(2)}x; reached ${(((r.rows[2]!.speedup - 1) / (r.ideal16 - 1)) * 100).toFixed(0)}% of the possible gain (target >= 80%)`,
          ]),
      '',
    )
  }
  console.log(`\n${lines.join('\n')}`)
  mkdirSync(resultsDir, { recursive: true })
  const date = new Date().toISOString().slice(0, 10)
  writeFileSync(
    join(resultsDir, 'service-cpu.json'),
    `${JSON.stringify({ date, machine, results }, null, 2)}\n`,
  )
  writeFileSync(
    join(resultsDir, 'service-cpu.md'),
    [
      `# Service benchmark (${date})`,
      '',
      `Machine: ${machine}; Redis 7 on loopback; worker in its own process.`,
      '',
      ...lines,
    ].join('\n'),
  )
  console.log(`wrote ${join(resultsDir, 'service-cpu.md')}`)
  process.exit(0)
}

await main()
