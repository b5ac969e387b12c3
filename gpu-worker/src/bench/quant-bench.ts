// Decode speed of the fp32, int8 and int4 exports of the bench model (hidden
// 512, 8 layers, 8 experts of 1408, top-2, vocab 32000), batch 1 and 16.
//   node src/bench/quant-bench.ts      (MOE_THREADS, MOE_BENCH_DIR, MOE_BENCH_STEPS to override)
import { existsSync } from 'node:fs'
import { availableParallelism, tmpdir } from 'node:os'
import { join } from 'node:path'
import { MoeEngine } from '../engine/engine.ts'
import type { ExportDtype } from '../engine/onnx-export.ts'
import { BENCH_CONFIG, writeRandomModel } from '../engine/random-model.ts'
import type { StepRow } from '../engine/step-engine.ts'

const threads = Number(process.env.MOE_THREADS ?? availableParallelism())
const modelDir = process.env.MOE_BENCH_DIR ?? join(tmpdir(), 'moe-bench-model')
const steps = Number(process.env.MOE_BENCH_STEPS ?? 32)
if (!existsSync(join(modelDir, 'config.json'))) writeRandomModel(modelDir, BENCH_CONFIG, 1234)

const prompt = (len: number, salt: number) =>
  Array.from({ length: len }, (_, i) => 3 + ((i * 7919 + salt * 104729) % 255))

/** Tokens per second decoding `batch` rows for `steps` steps after a 64-token prompt each. */
async function decode(engine: MoeEngine, batch: number): Promise<number> {
  const rows: StepRow[] = Array.from({ length: batch }, (_, b) => ({
    slot: b,
    tokens: prompt(64, b),
    pastLength: 0,
    allowedExperts: null,
  }))
  let out = await engine.forward(rows)
  const V = BENCH_CONFIG.vocab_size
  const next = (i: number) => {
    let best = 0
    for (let v = 1; v < V; v++) if (out.logits[i * V + v]! > out.logits[i * V + best]!) best = v
    return best
  }
  let past = 64
  const step = async () => {
    out = await engine.forward(rows.map((r, i) => ({ ...r, tokens: [next(i)], pastLength: past })))
    past++
  }
  for (let i = 0; i < 3; i++) await step() // warm-up
  const t0 = performance.now()
  for (let i = 0; i < steps; i++) await step()
  return (steps * batch * 1000) / (performance.now() - t0)
}

/** Prompt tokens per second prefilling one 512-token prompt. */
async function prefill(engine: MoeEngine): Promise<number> {
  const rows: StepRow[] = [{ slot: 0, tokens: prompt(512, 9), pastLength: 0, allowedExperts: null }]
  await engine.forward(rows) // warm-up
  const t0 = performance.now()
  await engine.forward(rows)
  return (512 * 1000) / (performance.now() - t0)
}

// The machine is shared: the three engines take turns, and each figure is the best of three rounds.
const engines: Array<[ExportDtype, MoeEngine]> = []
for (const dtype of ['fp32', 'int8', 'int4'] as ExportDtype[]) {
  const opts = { modelDir, ep: 'cpu' as const, dtype, intraOpThreads: threads, maxBatch: 16, maxContext: 640 }
  engines.push([dtype, await MoeEngine.load({ ...opts, log: () => {} })])
}
const best = Object.fromEntries(
  engines.map(([d]) => [d, { decode_b1_tok_s: 0, decode_b16_tok_s: 0, prefill_512_tok_s: 0 }]),
)
for (let round = 0; round < 3; round++)
  for (const [dtype, engine] of engines) {
    const b = best[dtype]!
    b.decode_b1_tok_s = Math.max(b.decode_b1_tok_s, Number((await decode(engine, 1)).toFixed(1)))
    b.decode_b16_tok_s = Math.max(b.decode_b16_tok_s, Number((await decode(engine, 16)).toFixed(1)))
    b.prefill_512_tok_s = Math.max(b.prefill_512_tok_s, Number((await prefill(engine)).toFixed(1)))
  }
const fp32 = best.fp32!
for (const [dtype, engine] of engines) {
  const b = best[dtype]!
  const ratios = {
    decode_b1_vs_fp32: Number((b.decode_b1_tok_s / fp32.decode_b1_tok_s).toFixed(2)),
    decode_b16_vs_fp32: Number((b.decode_b16_tok_s / fp32.decode_b16_tok_s).toFixed(2)),
    prefill_vs_fp32: Number((b.prefill_512_tok_s / fp32.prefill_512_tok_s).toFixed(2)),
  }
  console.log(dtype, JSON.stringify({ ...b, ...ratios }))
  await engine.close()
}
