import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as ort from 'onnxruntime-node'
import { OnnxGraphWriter } from '../engine/onnx-graph.ts'

// The machine's ceilings, measured in the same run as the benchmark with the
// same runtime: memory read bandwidth (a GEMV over a 256 MiB weight, which
// streams it once per call) and fp32 matrix-multiply throughput.

export interface Ceilings {
  /** Bytes per second streamed by a weight-bound GEMV. */
  bandwidth: number
  /** fp32 FLOP per second of a large MatMul. */
  matmulFlops: number
}

async function matmulSession(m: number, k: number, n: number, threads: number) {
  const dir = mkdtempSync(join(tmpdir(), 'moe-ceiling-'))
  const g = new OnnxGraphWriter(join(dir, 'model.onnx.data'))
  const a = g.input('a', 'float32', [m, k])
  const w = new Float32Array(k * n)
  for (let i = 0; i < w.length; i += 97) w[i] = 1e-3
  const b = g.initializer('w', 'float32', [k, n], w)
  g.node('MatMul', [a, b], ['y'])
  g.output('y', 'float32', [m, n])
  writeFileSync(join(dir, 'model.onnx'), g.finish('ceiling'))
  const session = await ort.InferenceSession.create(join(dir, 'model.onnx'), { intraOpNumThreads: threads })
  const feed = { a: new ort.Tensor('float32', new Float32Array(m * k).fill(0.5), [m, k]) }
  return async (iters: number) => {
    await session.run(feed)
    const t0 = performance.now()
    for (let i = 0; i < iters; i++) await session.run(feed)
    return (performance.now() - t0) / 1000 / iters
  }
}

export async function measureCeilings(threads: number): Promise<Ceilings> {
  const K = 4096
  const N = 16384 // 256 MiB of fp32 weights: far beyond any cache
  const gemv = await matmulSession(1, K, N, threads)
  const gemvSeconds = await gemv(20)
  const M = 1024
  const gemm = await matmulSession(M, 2048, 2048, threads)
  const gemmSeconds = await gemm(10)
  return { bandwidth: (K * N * 4) / gemvSeconds, matmulFlops: (2 * M * 2048 * 2048) / gemmSeconds }
}
