// One MoE layer of the bench shape (H512, I1408, E8, top-2) on three kernels:
// the fp32 com.microsoft.MoE op, com.microsoft.QMoE at int8/int4 (blocks of
// 32; random bytes, for timing only) and the per-expert MatMulNBits dispatch
// the int8/int4 exports use, with the dispatch's error against fp32 MoE on
// the same dequantized weights.
//   node src/bench/moe-op-bench.ts      (MOE_THREADS to override)
import { mkdtempSync, writeFileSync } from 'node:fs'
import { availableParallelism, tmpdir } from 'node:os'
import { join } from 'node:path'
import * as ort from 'onnxruntime-node'
import { transpose } from '../engine/decoder-graph.ts'
import { routedExpertsDispatch } from '../engine/expert-dispatch.ts'
import { OnnxGraphWriter } from '../engine/onnx-graph.ts'
import {
  dequantizeMatrix,
  type QuantBits,
  type QuantizedExpert,
  quantizeMatrix,
  routedExpertsNBits,
} from '../engine/quantize.ts'
import { SeededRandom } from '../engine/random.ts'

const H = 512
const I = 1408
const E = 8
const K = 2
const threads = Number(process.env.MOE_THREADS ?? availableParallelism())
const dir = mkdtempSync(join(tmpdir(), 'moe-op-bench-'))
const rng = new SeededRandom(1)
const uniform = (n: number, scale: number) =>
  Float32Array.from({ length: n }, () => (rng.nextDouble() - 0.5) * scale)

type Build = (g: OnnxGraphWriter, x: string, logits: string) => string

async function session(name: string, build: Build): Promise<ort.InferenceSession> {
  const g = new OnnxGraphWriter(join(dir, `${name}.bin`))
  const x = g.input('x', 'float32', ['n', H])
  const logits = g.input('logits', 'float32', ['n', E])
  g.node('Identity', [build(g, x, logits)], ['y'])
  g.output('y', 'float32', ['n', H])
  writeFileSync(join(dir, `${name}.onnx`), g.finish(name))
  return ort.InferenceSession.create(join(dir, `${name}.onnx`), { intraOpNumThreads: threads })
}

const moeAttrs = {
  k: K,
  activation_type: 'swiglu',
  swiglu_fusion: 1,
  normalize_routing_weights: 1,
  activation_alpha: { float: 1 },
  activation_beta: { float: 0 },
  swiglu_limit: { float: 1e30 },
}

/** fp32 MoE on experts given as gate rows then up rows [2I,H] and down [H,I]. */
function fp32Moe(experts: Array<{ gateUp: Float32Array; down: Float32Array }>): Build {
  const fc1 = new Float32Array(E * 2 * I * H)
  const fc2 = new Float32Array(E * H * I)
  experts.forEach(({ gateUp, down }, e) => {
    for (let i = 0; i < I; i++) {
      fc1.set(gateUp.subarray(i * H, (i + 1) * H), (e * 2 * I + 2 * i) * H)
      fc1.set(gateUp.subarray((I + i) * H, (I + i + 1) * H), (e * 2 * I + 2 * i + 1) * H)
    }
    fc2.set(down, e * H * I)
  })
  return (g, x, logits) =>
    g.op(
      'MoE',
      [
        x,
        logits,
        g.initializer('fc1', 'float32', [E, 2 * I, H], fc1),
        '',
        g.initializer('fc2', 'float32', [E, H, I], fc2),
      ],
      moeAttrs,
      'com.microsoft',
    )
}

/** The per-expert dispatch on fp32 MatMul (pre-transposed weights), as the fp32 exports can use. */
function fp32Dispatch(experts: Array<{ gateUp: Float32Array; down: Float32Array }>): Build {
  return (g, x, logits) =>
    routedExpertsDispatch(
      g,
      x,
      logits,
      experts.map(({ gateUp, down }, j) => () => ({
        gateUp: (h: string) =>
          g.op('MatMul', [
            h,
            g.initializer(`e${j}.gate_up`, 'float32', [H, 2 * I], transpose(gateUp, 2 * I, H)),
          ]),
        down: (h: string) =>
          g.op('MatMul', [h, g.initializer(`e${j}.down`, 'float32', [I, H], transpose(down, H, I))]),
      })),
      { k: K, normTopK: true, I },
    )
}

function qmoe(bits: QuantBits): Build {
  const per = 8 / bits
  const bytes = (n: number) => Uint8Array.from({ length: n }, () => Math.floor(rng.nextDouble() * 256))
  return (g, x, logits) =>
    g.op(
      'QMoE',
      [
        x,
        logits,
        g.initializer('w1', 'uint8', [E, 2 * I, H / per], bytes((E * 2 * I * H) / per)),
        g.initializer('s1', 'float32', [E, 2 * I, H / 32], new Float32Array((E * 2 * I * H) / 32).fill(1e-3)),
        '',
        g.initializer('w2', 'uint8', [E, H, I / per], bytes((E * H * I) / per)),
        g.initializer('s2', 'float32', [E, H, I / 32], new Float32Array((E * H * I) / 32).fill(1e-3)),
      ],
      { ...moeAttrs, expert_weight_bits: bits, block_size: 32 },
      'com.microsoft',
    )
}

const weights = Array.from({ length: E }, () => ({
  gateUp: uniform(2 * I * H, 0.1),
  down: uniform(H * I, 0.05),
}))
const sessions: Record<string, ort.InferenceSession> = {}
for (const bits of [8, 4] as const) {
  const q: QuantizedExpert[] = weights.map((w) => ({
    gateUp: quantizeMatrix(w.gateUp, 2 * I, H, bits),
    down: quantizeMatrix(w.down, H, I, bits),
  }))
  const dequantized = q.map((e) => ({ gateUp: dequantizeMatrix(e.gateUp), down: dequantizeMatrix(e.down) }))
  sessions[`MoE fp32 (int${bits} values)`] = await session(`moe${bits}`, fp32Moe(dequantized))
  if (bits === 8) sessions['MatMul fp32 per expert'] = await session('dispatch32', fp32Dispatch(dequantized))
  sessions[`MatMulNBits int${bits}`] = await session(`nbits${bits}`, (g, x, logits) =>
    routedExpertsNBits(g, x, logits, q, { k: K, normTopK: true, I, prefix: 'experts' }),
  )
  sessions[`QMoE int${bits}`] = await session(`qmoe${bits}`, qmoe(bits))
}

function relativeError(a: Float32Array, b: Float32Array): number {
  let num = 0
  let den = 0
  for (let i = 0; i < a.length; i++) {
    num += (a[i]! - b[i]!) ** 2
    den += b[i]! ** 2
  }
  return Math.sqrt(num / den)
}

// MOE_KERNELS: a regular expression of the kernels to time (default: all).
const only = process.env.MOE_KERNELS ? new RegExp(process.env.MOE_KERNELS) : null
for (const rows of (process.env.MOE_ROWS ?? '1,4,16,64').split(',').map(Number)) {
  const feeds = {
    x: new ort.Tensor('float32', uniform(rows * H, 2), [rows, H]),
    logits: new ort.Tensor('float32', uniform(rows * E, 4), [rows, E]),
  }
  const outs: Record<string, Float32Array> = {}
  const times: string[] = []
  for (const [name, s] of Object.entries(sessions)) {
    if (only && !only.test(name)) continue
    for (let i = 0; i < 3; i++) outs[name] = (await s.run(feeds)).y!.data as Float32Array
    // The best of five rounds: on a shared machine the mean mostly measures the neighbours.
    const reps = rows === 1 ? 40 : 8
    let best = Number.POSITIVE_INFINITY
    for (let round = 0; round < 5; round++) {
      const t0 = performance.now()
      for (let i = 0; i < reps; i++) await s.run(feeds)
      best = Math.min(best, (performance.now() - t0) / reps)
    }
    times.push(`${name} ${best.toFixed(2)} ms`)
  }
  const err = (bits: number) =>
    !outs[`MatMulNBits int${bits}`] || !outs[`MoE fp32 (int${bits} values)`]
      ? '-'
      : relativeError(outs[`MatMulNBits int${bits}`]!, outs[`MoE fp32 (int${bits} values)`]!).toExponential(2)
  console.log(`${rows} rows: ${times.join(' | ')}`)
  console.log(`  MatMulNBits vs fp32 MoE on the same values, relative error: int8 ${err(8)}, int4 ${err(4)}`)
  if (outs['MatMul fp32 per expert'] && outs['MoE fp32 (int8 values)']) {
    const fp32Err = relativeError(outs['MatMul fp32 per expert'], outs['MoE fp32 (int8 values)'])
    console.log(`  fp32 per-expert MatMul vs fp32 MoE, relative error: ${fp32Err.toExponential(2)}`)
  }
}
