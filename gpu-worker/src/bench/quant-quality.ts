// What int8 and int4 weights cost the trained demo model, against its fp32 graph:
//   npx node src/bench/quant-quality.ts [MODEL_DIR]
// - greedy agreement: 8 chat prompts, 32 generated tokens each (256 in all), fp32's token at
//   each step compared with the quantized graph's, teacher-forced along fp32's sequence;
// - mean KL(fp32 || quantized) of the next-token distributions over those steps;
// - held-out bits per byte of each domain of tools/train-demo-model/heldout, per dtype.
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { MoeEngine } from '../engine/engine.ts'
import { evaluateText } from '../engine/evaluate.ts'
import type { ExportDtype } from '../engine/onnx-export.ts'

const repo = join(import.meta.dirname, '..', '..', '..')
const modelDir = process.argv[2] ?? join(repo, 'gpu-worker/models/demo-moe')
const heldout = join(repo, 'tools/train-demo-model/heldout')
const PROMPTS = [
  'Who are you?',
  'What is 23 + 58?',
  'Translate to German: Open the file',
  'Translate to French: Save changes',
  'Extract name and age as JSON: Anna Berg is 34 years old.',
  'What does the ls command do?',
  'Write a Python function that adds two numbers.',
  'Hello!',
]
const STEPS = 32

const load = (dtype: ExportDtype) =>
  MoeEngine.load({ modelDir, ep: 'cpu', dtype, maxBatch: 16, maxContext: 512, log: () => {} })

function logSoftmax(l: Float32Array): Float64Array {
  let max = Number.NEGATIVE_INFINITY
  for (const x of l) max = Math.max(max, x)
  let sum = 0
  for (const x of l) sum += Math.exp(x - max)
  const out = new Float64Array(l.length)
  for (let i = 0; i < l.length; i++) out[i] = l[i]! - max - Math.log(sum)
  return out
}

/** Next-token log-probabilities after each prefix of `ids` longer than `from` (one row, KV cache). */
async function forced(engine: MoeEngine, ids: number[], from: number): Promise<Float64Array[]> {
  const out: Float64Array[] = []
  let step = await engine.forward([
    { slot: 0, tokens: ids.slice(0, from), pastLength: 0, allowedExperts: null },
  ])
  out.push(logSoftmax(step.logits))
  for (let t = from; t < ids.length; t++) {
    step = await engine.forward([{ slot: 0, tokens: [ids[t]!], pastLength: t, allowedExperts: null }])
    out.push(logSoftmax(step.logits))
  }
  return out
}

const argmax = (a: Float64Array) => a.reduce((b, x, i) => (x > a[b]! ? i : b), 0)

const fp32 = await load('fp32')
const refs: Array<{ ids: number[]; from: number; logp: Float64Array[] }> = []
for (const prompt of PROMPTS) {
  const promptIds = fp32.tokenizer.encodeChat([{ role: 'user', content: prompt }])
  const r = await fp32.generate({ inputIds: promptIds, maxTokens: STEPS, ignoreEos: true })
  const ids = [...promptIds, ...r.outputIds.slice(0, STEPS - 1)]
  refs.push({ ids, from: promptIds.length, logp: await forced(fp32, ids, promptIds.length) })
}
const domains = readdirSync(heldout)
  .filter((f) => f.endsWith('.txt'))
  .map((f) => f.replace(/\.txt$/, ''))
const bpb = async (engine: MoeEngine) => {
  const out: Record<string, number> = {}
  for (const d of domains)
    out[d] = (
      await evaluateText(engine, readFileSync(join(heldout, `${d}.txt`), 'utf8'), { window: 255 })
    ).bits_per_byte
  return out
}
const rows: Array<{ dtype: string; agree: number; kl: number; bpb: Record<string, number> }> = [
  { dtype: 'fp32', agree: 1, kl: 0, bpb: await bpb(fp32) },
]
await fp32.close()
for (const dtype of ['int8', 'int4'] as const) {
  const q = await load(dtype)
  let same = 0
  let kl = 0
  let n = 0
  for (const ref of refs) {
    const logq = await forced(q, ref.ids, ref.from)
    ref.logp.forEach((p, i) => {
      const qq = logq[i]!
      if (argmax(p) === argmax(qq)) same++
      for (let v = 0; v < p.length; v++) kl += Math.exp(p[v]!) * (p[v]! - qq[v]!)
      n++
    })
  }
  rows.push({ dtype, agree: same / n, kl: kl / n, bpb: await bpb(q) })
  await q.close()
}
const mean = (r: Record<string, number>) => Object.values(r).reduce((a, b) => a + b, 0) / domains.length
console.log(
  `model ${modelDir}; ${PROMPTS.length} prompts x ${STEPS} steps; held-out: ${domains.join(', ')}\n`,
)
console.log(
  '| dtype | greedy agreement with fp32 | mean KL(fp32 ‖ q) | mean bits/byte | vs fp32 | per domain |',
)
console.log('| --- | --- | --- | --- | --- | --- |')
const base = mean(rows[0]!.bpb)
for (const r of rows)
  console.log(
    `| ${r.dtype} | ${(r.agree * 100).toFixed(1)}% | ${r.kl.toExponential(2)} | ${mean(r.bpb).toFixed(4)} | ${((mean(r.bpb) / base - 1) * 100).toFixed(2)}% | ${domains.map((d) => `${d} ${r.bpb[d]!.toFixed(3)}`).join(', ')} |`,
  )
console.log(JSON.stringify(rows.map((r) => ({ ...r, mean_bpb: mean(r.bpb) }))))
