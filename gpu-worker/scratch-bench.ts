import { Sampler, SeededRandom } from './src/engine/sampling.ts'

function randomLogits(vocab: number, seed: number, scale = 3): Float32Array {
  const random = new SeededRandom(seed)
  return Float32Array.from({ length: vocab }, () => (random.nextDouble() - 0.5) * 2 * scale)
}
for (const [vocab, scale] of [
  [32000, 8],
  [2000, 4],
] as const) {
  const big = randomLogits(vocab, 4, scale)
  for (const p of [
    { topK: 50, topP: 1, temperature: 1 },
    { topK: 0, topP: 0.9, temperature: 1 },
    { topK: 0, topP: 1, temperature: 1 },
    { topK: 0, topP: 0.95, temperature: 2 },
  ]) {
    const s = new Sampler({ ...p, seed: 1 })
    for (let i = 0; i < 50; i++) s.sample(big)
    const t = performance.now()
    for (let i = 0; i < 500; i++) s.sample(big)
    console.log(vocab, JSON.stringify(p), ((performance.now() - t) / 500).toFixed(3), 'ms')
  }
}
