import { spawnSync } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { MoeEngine } from '../src/engine/engine.ts'
import { evaluateText } from '../src/engine/evaluate.ts'
import { openModelDir, tensorEntry } from '../src/engine/model-dir.ts'
import { readTensorF32, writeSafetensors } from '../src/engine/safetensors.ts'
import { copyTinyModel, loadTinyEngine, TINY_MODEL_DIR } from './fixtures.ts'
import { ReferenceModel } from './reference-model.ts'

const MOE_BIN = join(import.meta.dirname, '..', 'bin', 'moe.js')
const TEXT = 'Bits per byte: 3 + 4 = 7. Grüße, naïve café! {"k": [1, 2]}\n'

/** A copy of the tiny model whose lm_head is zero: every next token is equally likely. */
function uniformModel(): string {
  const dir = copyTinyModel()
  const model = openModelDir(dir)
  const tensors = [...model.tensors.keys()].map((name) => {
    const data = readTensorF32(tensorEntry(model, name))
    return {
      name,
      shape: tensorEntry(model, name).shape,
      data: name === 'lm_head.weight' ? data.fill(0) : data,
    }
  })
  writeSafetensors(
    join(dir, 'model.safetensors'),
    tensors,
    (name) => tensors.find((t) => t.name === name)!.data,
  )
  return dir
}

describe('moe eval: bits per byte with the engine forward pass', () => {
  let engine: MoeEngine
  beforeAll(async () => {
    engine = await loadTinyEngine(4, 64)
  })
  afterAll(async () => {
    await engine.close()
  })

  it('gives log2(V) bits per byte for a uniform model over a byte-level vocabulary of V tokens', async () => {
    const uniform = await MoeEngine.load({
      modelDir: uniformModel(),
      ep: 'cpu',
      maxBatch: 4,
      maxContext: 32,
      log: () => {},
    })
    try {
      const r = await evaluateText(uniform, TEXT, { window: 16 })
      const V = uniform.config.vocab_size
      expect(r.tokens).toBe(Buffer.byteLength(TEXT))
      expect(r.bytes).toBe(Buffer.byteLength(TEXT))
      expect(r.windows).toBe(Math.ceil(r.tokens / 16))
      expect(r.bits_per_byte).toBeCloseTo(Math.log2(V), 6)
      expect(r.perplexity).toBeCloseTo(V, 3)
    } finally {
      await uniform.close()
    }
  })

  it('equals the sum of -log2 p over every window, from the reference forward pass', async () => {
    const ref = new ReferenceModel(TINY_MODEL_DIR)
    const ids = engine.tokenizer.encode(TEXT)
    const bos = engine.tokenizer.bosTokenId!
    const window = 20
    let bits = 0
    for (let at = 0; at < ids.length; at += window) {
      const input = [bos, ...ids.slice(at, at + window)]
      for (let t = 1; t < input.length; t++) {
        const logits = ref.forward(input.slice(0, t)).logits
        const max = Math.max(...logits)
        const logSum = Math.log(logits.reduce((a, x) => a + Math.exp(x - max), 0))
        bits -= (logits[input[t]!]! - max - logSum) / Math.LN2
      }
    }
    const r = await evaluateText(engine, TEXT, { window })
    expect(r.windows).toBe(Math.ceil(ids.length / window))
    expect(r.tokens).toBe(ids.length)
    expect(r.bits_per_byte).toBeCloseTo(bits / Buffer.byteLength(TEXT), 4)
  })

  it('scores with a pool expert subset differently from all experts', async () => {
    const all = await evaluateText(engine, TEXT)
    const subset = await evaluateText(engine, TEXT, { allowedExperts: [0, 2, 5, 7] })
    expect(subset.tokens).toBe(all.tokens)
    expect(subset.bits_per_byte).not.toBeCloseTo(all.bits_per_byte, 3)
    await expect(evaluateText(engine, TEXT, { allowedExperts: [1] })).rejects.toThrow(/at least 2/)
    await expect(evaluateText(engine, '')).rejects.toThrow(/empty/)
  })

  it('prints {"bits_per_byte", "tokens", ...} with --json, and exits 2 on bad arguments', () => {
    const file = join(copyTinyModel(), 'text.txt')
    writeFileSync(file, TEXT)
    const ok = spawnSync(
      process.execPath,
      [MOE_BIN, 'eval', '--model', TINY_MODEL_DIR, '--text-file', file, '--json'],
      {
        encoding: 'utf8',
      },
    )
    expect(ok.status).toBe(0)
    const r = JSON.parse(ok.stdout)
    expect(r.bits_per_byte).toBeGreaterThan(0)
    expect(r.tokens).toBe(Buffer.byteLength(TEXT))
    const missing = spawnSync(process.execPath, [MOE_BIN, 'eval', '--model', TINY_MODEL_DIR], {
      encoding: 'utf8',
    })
    expect(missing.status).toBe(2)
    expect(missing.stderr).toContain('--text-file')
  })
})
