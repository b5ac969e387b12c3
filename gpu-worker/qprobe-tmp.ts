import { writeFileSync } from 'node:fs'
import * as ort from 'onnxruntime-node'
import { OnnxGraphWriter } from './src/engine/onnx-graph.ts'
import { dequantizeMatrix, quantizeMatrix, routedExpertsNBits, type QuantBits } from './src/engine/quantize.ts'
const H = 512, I = 1408, E = 8, K = 2
let seed = 1
const rnd = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648 - 0.5 }
const mat = (n: number, s: number) => Float32Array.from({ length: n }, () => rnd() * s)
const gateUp = Array.from({ length: E }, () => mat(2 * I * H, 0.1)), down = Array.from({ length: E }, () => mat(H * I, 0.05))
async function session(build: (g: OnnxGraphWriter, x: string, l: string) => string, name: string) {
  const g = new OnnxGraphWriter(`/tmp/qprobe/${name}.bin`)
  const x = g.input('x', 'float32', ['n', H]); const l = g.input('l', 'float32', ['n', E])
  g.node('Identity', [build(g, x, l)], ['y']); g.output('y', 'float32', ['n', H])
  writeFileSync(`/tmp/qprobe/${name}.onnx`, g.finish(name))
  return ort.InferenceSession.create(`/tmp/qprobe/${name}.onnx`, { intraOpNumThreads: 2, graphOptimizationLevel: 'all' })
}
function interleaved(src: Float32Array[]) { const fc1 = new Float32Array(E * 2 * I * H); src.forEach((gu, e) => { for (let i = 0; i < I; i++) { fc1.set(gu.subarray(i * H, (i + 1) * H), e * 2 * I * H + 2 * i * H); fc1.set(gu.subarray((I + i) * H, (I + i + 1) * H), e * 2 * I * H + (2 * i + 1) * H) } }); return fc1 }
const moeAttrs = { k: K, activation_type: 'swiglu', swiglu_fusion: 1, normalize_routing_weights: 1, activation_alpha: { float: 1 }, activation_beta: { float: 0 }, swiglu_limit: { float: 1e30 } }
const variants: Record<string, (bits: QuantBits | 0) => (g: OnnxGraphWriter, x: string, l: string) => string> = {}
const q = { 8: [] as ReturnType<typeof quantizeMatrix>[][], 4: [] as ReturnType<typeof quantizeMatrix>[][] }
for (const bits of [8, 4] as const) for (let e = 0; e < E; e++) q[bits].push([quantizeMatrix(gateUp[e]!, 2 * I, H, bits), quantizeMatrix(down[e]!, H, I, bits)])
const sessions: Record<string, ort.InferenceSession> = {}
for (const bits of [8, 4] as const) {
  // fp32 MoE on the dequantized weights, the yardstick for the NBits dispatch's numbers
  const dq = q[bits].map(([a, b]) => [dequantizeMatrix(a!), dequantizeMatrix(b!)])
  sessions[`MoE fp32 (deq${bits})`] = await session((g, x, l) => { const f1 = new Float32Array(E * H * I); dq.forEach(([, d], e) => f1.set(d!, e * H * I)); return g.op('MoE', [x, l, g.initializer('fc1', 'float32', [E, 2 * I, H], interleaved(dq.map(([a]) => a!))), '', g.initializer('fc2', 'float32', [E, H, I], f1)], moeAttrs, 'com.microsoft') }, `moe${bits}`)
  sessions[`NBits int${bits}`] = await session((g, x, l) => routedExpertsNBits(g, x, l, q[bits].map(([a, b]) => ({ gateUp: a!, down: b! })), { k: K, normTopK: true, I, prefix: 'e' }), `nbits${bits}`)
  sessions[`QMoE int${bits}`] = await session((g, x, l) => {
    const per = 8 / bits
    const w1 = new Uint8Array(E * 2 * I * H / per).map(() => (rnd() * 256) & 255), w2 = new Uint8Array(E * H * I / per).map(() => (rnd() * 256) & 255)
    const s1 = new Float32Array(E * 2 * I * H / 32).fill(0.001), s2 = new Float32Array(E * H * I / 32).fill(0.001)
    return g.op('QMoE', [x, l, g.initializer('w1', 'uint8', [E, 2 * I, H / per], w1), g.initializer('s1', 'float32', [E, 2 * I, H / 32], s1), '', g.initializer('w2', 'uint8', [E, H, I / per], w2), g.initializer('s2', 'float32', [E, H, I / 32], s2)], { ...moeAttrs, expert_weight_bits: bits, block_size: 32 }, 'com.microsoft')
  }, `qmoe${bits}`)
}
for (const n of [16]) {
  const feeds = { x: new ort.Tensor('float32', mat(n * H, 2), [n, H]), l: new ort.Tensor('float32', mat(n * E, 4), [n, E]) }
  const outs: Record<string, Float32Array> = {}
  const line: string[] = []
  for (const [name, s] of Object.entries(sessions)) {
    for (let i = 0; i < 3; i++) outs[name] = (await s.run(feeds)).y!.data as Float32Array
    const reps = n === 1 ? 200 : 40
    const t0 = performance.now(); for (let i = 0; i < reps; i++) await s.run(feeds)
    line.push(`${name} ${((performance.now() - t0) / reps).toFixed(2)}ms`)
  }
  const rel = (a: Float32Array, b: Float32Array) => { let num = 0, den = 0; for (let i = 0; i < a.length; i++) { num += (a[i]! - b[i]!) ** 2; den += b[i]! ** 2 } return Math.sqrt(num / den) }
  console.log(`rows ${n}: ${line.join(' | ')}\n  rel err NBits vs fp32 MoE on the same dequantized weights: int8 ${rel(outs['NBits int8']!, outs['MoE fp32 (deq8)']!).toExponential(2)} int4 ${rel(outs['NBits int4']!, outs['MoE fp32 (deq4)']!).toExponential(2)}`)
}
