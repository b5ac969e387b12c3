import { execFile } from 'node:child_process'
import { mkdtempSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { describe, expect, it } from 'vitest'
import { MoeEngine } from '../src/engine/engine.ts'
import { type MemoryPlan, parameterCounts, planMemory } from '../src/engine/memory-plan.ts'
import { parseModelConfig } from '../src/engine/model-config.ts'
import { openModelDir } from '../src/engine/model-dir.ts'
import { expectedTensors } from '../src/engine/model-layout.ts'
import { ensureExported } from '../src/engine/onnx-export.ts'
import { ThreadedEngine } from '../src/engine/threaded-engine.ts'
import { FAMILIES } from './family-configs.ts'
import { copyTinyModel, TINY_MODEL_DIR } from './fixtures.ts'

const run = promisify(execFile)
const CLI = fileURLToPath(new URL('../bin/moe.js', import.meta.url))

// Mixtral-8x7B's published config.json (the fields the planner reads).
const MIXTRAL_8X7B = {
  model_type: 'mixtral',
  hidden_size: 4096,
  intermediate_size: 14336,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  num_local_experts: 8,
  num_experts_per_tok: 2,
  vocab_size: 32000,
  max_position_embeddings: 32768,
  rms_norm_eps: 1e-5,
  rope_theta: 1e6,
  tie_word_embeddings: false,
}

function configDir(config: object): string {
  const dir = mkdtempSync(join(tmpdir(), 'moe-plan-'))
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config))
  return dir
}

const parse = (raw: unknown) => {
  const r = parseModelConfig(raw)
  if (!r.success) throw new Error(r.issues.join('; '))
  return r.data
}

describe('memory plan', () => {
  it('puts Mixtral-8x7B at about 93 GB of weights in fp16, with its KV cache per token', () => {
    const plan = planMemory(parse(MIXTRAL_8X7B), {
      dtype: 'fp16',
      maxBatch: 4,
      maxContext: 4096,
      memoryBytes: 1e12,
    })
    expect(plan.weights_bytes / 1e9).toBeGreaterThan(93)
    expect(plan.weights_bytes / 1e9).toBeLessThan(94)
    // 2 (K and V) x 32 layers x 8 KV heads x 128 dims x 2 bytes.
    expect(plan.kv_bytes_per_token).toBe(131072)
    expect(plan.kv_bytes).toBe(131072 * 4 * 4096)
    expect(plan.total_bytes).toBe(plan.weights_bytes + plan.kv_bytes)
    expect(plan.fits).toBe(true)
    const fp32 = planMemory(parse(MIXTRAL_8X7B), {
      dtype: 'fp32',
      maxBatch: 4,
      maxContext: 4096,
      memoryBytes: 1e12,
    })
    expect(fp32.kv_bytes_per_token).toBe(2 * 131072)
    expect(fp32.weights_bytes).toBeCloseTo(2 * plan.weights_bytes, -3)
  })

  it('counts exactly the tensors each family loads (plus the untied head copy and rope tables)', () => {
    for (const [family, spec] of Object.entries(FAMILIES)) {
      const c = parse(spec.config)
      const loaded = expectedTensors(c).reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1), 0)
      const extra =
        (c.tie_word_embeddings ? c.vocab_size * c.hidden_size : 0) + c.max_position_embeddings * c.head_dim
      const counted = Object.values(parameterCounts(c)).reduce((a, b) => a + b, 0)
      expect(counted, family).toBe(loaded + extra)
    }
  })

  it('predicts the size of the exported weights at fp32, int8 and int4', () => {
    const model = openModelDir(copyTinyModel())
    for (const dtype of ['fp32', 'int8', 'int4'] as const) {
      const { modelPath } = ensureExported(model, dtype)
      const bytes = statSync(modelPath).size + statSync(join(dirname(modelPath), 'model.onnx.data')).size
      const plan = planMemory(model.config, { dtype, maxBatch: 1, maxContext: 2, memoryBytes: 1e12 })
      // Within the external-data file's alignment padding (64 B per tensor on a model this small).
      expect(bytes / plan.weights_bytes, dtype).toBeGreaterThan(0.999)
      expect(bytes / plan.weights_bytes, dtype).toBeLessThan(1.1)
    }
  })

  it('says it does not fit, and names the most precise dtype that would', () => {
    const c = parse(MIXTRAL_8X7B)
    const plan = planMemory(c, { dtype: 'fp16', maxBatch: 1, maxContext: 2048, memoryBytes: 40e9 })
    expect(plan.fits).toBe(false)
    expect(plan.suggested_dtype).toBe('int4')
    expect(plan.message).toMatch(
      /mixtral at fp16 needs 93\.\d GB .* more than the 40\.0 GB available; int4 would fit/,
    )
    expect(
      planMemory(c, { dtype: 'fp16', maxBatch: 1, maxContext: 2048, memoryBytes: 1e9 }).suggested_dtype,
    ).toBe(null)
  })

  it('makes the engine refuse a model that does not fit, with the plan in the error', async () => {
    const load = MoeEngine.load({ modelDir: TINY_MODEL_DIR, ep: 'cpu', memoryBytes: 100_000, log: () => {} })
    await expect(load).rejects.toThrow(
      /does not fit in memory: mixtral at fp32 needs .* more than the 100\.0 KB/,
    )
    await expect(load).rejects.toMatchObject({ code: 'model_too_large' })
    // The threaded engine checks before it starts its thread.
    const threaded = ThreadedEngine.load({
      modelDir: TINY_MODEL_DIR,
      ep: 'cpu',
      memoryBytes: 100_000,
      log: () => {},
    })
    await expect(threaded).rejects.toMatchObject({ code: 'model_too_large' })
  })
})

describe('moe plan', () => {
  it('prints the plan from config.json alone, as JSON with the four named fields top-level', async () => {
    const dir = configDir(MIXTRAL_8X7B)
    const args = [CLI, 'plan', '--model', dir, '--dtype', 'fp16', '--max-batch', '2', '--max-context', '1024']
    const { stdout } = await run(process.execPath, [...args, '--memory-gb', '80', '--json'])
    const plan = JSON.parse(stdout) as MemoryPlan
    expect(Math.round(plan.weights_bytes / 1e9)).toBe(93)
    expect(plan.kv_bytes).toBe(131072 * 2 * 1024)
    expect(plan.total_bytes).toBe(plan.weights_bytes + plan.kv_bytes)
    expect(plan.fits).toBe(false)
    expect(plan.suggested_dtype).toBe('int8')
    expect(plan.components.experts).toBeGreaterThan(90e9)
    const text = (await run(process.execPath, args)).stdout
    expect(text).toMatch(/experts\s+90\.2 GB/)
    expect(text).toMatch(/total\s+93\.4 GB/)
  })

  it('exits 2 on bad arguments and 1 on a bad config', async () => {
    const dir = configDir(MIXTRAL_8X7B)
    for (const bad of [
      ['plan'],
      ['plan', '--model', dir, '--dtype', 'fp8'],
      ['plan', '--model', dir, '--max-batch', '0'],
      ['plan', '--model', dir, '--memory-gb', '-1'],
      ['plan', '--model', dir, '--bogus'],
    ])
      await expect(run(process.execPath, [CLI, ...bad]), bad.join(' ')).rejects.toMatchObject({ code: 2 })
    const other = configDir({ ...MIXTRAL_8X7B, model_type: 'llama' })
    await expect(run(process.execPath, [CLI, 'plan', '--model', other])).rejects.toMatchObject({
      code: 1,
      stderr: expect.stringMatching(/"llama" is not supported/),
    })
  }, 60_000)
})
