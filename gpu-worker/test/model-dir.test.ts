import { execFile } from 'node:child_process'
import { readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { describe, expect, it } from 'vitest'
import { MoeEngine } from '../src/engine/engine.ts'
import { openModelDir } from '../src/engine/model-dir.ts'
import { ensureExported } from '../src/engine/onnx-export.ts'
import { f32ToF16, readSafetensorsHeader, readTensorF32 } from '../src/engine/safetensors.ts'
import { copyTinyModel, maxAbsDiff, TINY_MODEL_DIR } from './fixtures.ts'

const run = promisify(execFile)
const CLI = fileURLToPath(new URL('../bin/moe.js', import.meta.url))

/** Rewrites a fp32 safetensors file in another dtype (or with edits), as HF tooling would. */
function rewriteSafetensors(
  src: string,
  dst: string,
  opts: {
    dtype?: 'F16' | 'BF16'
    drop?: string
    reshape?: [string, number[]]
    only?: (name: string) => boolean
  } = {},
) {
  const { tensors } = readSafetensorsHeader(src)
  const header: Record<string, unknown> = {}
  const chunks: Buffer[] = []
  let offset = 0
  for (const t of tensors) {
    if (t.name === opts.drop || (opts.only && !opts.only(t.name))) continue
    const f32 = readTensorF32(t)
    let bytes: Buffer
    if (opts.dtype === 'F16') bytes = Buffer.from(Uint16Array.from(f32, (v) => f32ToF16(v)).buffer)
    else if (opts.dtype === 'BF16')
      bytes = Buffer.from(Uint16Array.from(new Uint32Array(f32.buffer), (b) => b >>> 16).buffer)
    else bytes = Buffer.from(f32.buffer)
    const shape = opts.reshape?.[0] === t.name ? opts.reshape[1] : t.shape
    header[t.name] = { dtype: opts.dtype ?? 'F32', shape, data_offsets: [offset, offset + bytes.length] }
    chunks.push(bytes)
    offset += bytes.length
  }
  const json = Buffer.from(JSON.stringify(header))
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(json.length))
  writeFileSync(dst, Buffer.concat([len, json, ...chunks]))
}

describe('model directory', () => {
  it('loads fp16 and bf16 checkpoints to nearly the same logits as fp32', async () => {
    const prompt = [1, 72, 101, 108, 108, 111]
    const base = await MoeEngine.load({
      modelDir: TINY_MODEL_DIR,
      ep: 'cpu',
      maxBatch: 1,
      maxContext: 64,
      log: () => {},
    })
    const want = (
      await base.forward([{ slot: 0, tokens: prompt, pastLength: 0, allowedExperts: null }])
    ).logits.slice()
    for (const dtype of ['F16', 'BF16'] as const) {
      const dir = copyTinyModel()
      rewriteSafetensors(join(TINY_MODEL_DIR, 'model.safetensors'), join(dir, 'model.safetensors'), { dtype })
      const e = await MoeEngine.load({ modelDir: dir, ep: 'cpu', maxBatch: 1, maxContext: 64, log: () => {} })
      const got = (await e.forward([{ slot: 0, tokens: prompt, pastLength: 0, allowedExperts: null }])).logits
      expect(maxAbsDiff(got, want)).toBeLessThan(dtype === 'F16' ? 0.05 : 0.3)
    }
  })

  it('loads a checkpoint sharded with model.safetensors.index.json', async () => {
    const dir = copyTinyModel()
    const src = join(TINY_MODEL_DIR, 'model.safetensors')
    const first = (n: string) => n.startsWith('model.layers.0.') || n.startsWith('model.embed')
    rewriteSafetensors(src, join(dir, 'model-00001-of-00002.safetensors'), { only: first })
    rewriteSafetensors(src, join(dir, 'model-00002-of-00002.safetensors'), { only: (n) => !first(n) })
    rmSync(join(dir, 'model.safetensors'))
    const weightMap: Record<string, string> = {}
    for (const t of readSafetensorsHeader(src).tensors)
      weightMap[t.name] = first(t.name)
        ? 'model-00001-of-00002.safetensors'
        : 'model-00002-of-00002.safetensors'
    writeFileSync(
      join(dir, 'model.safetensors.index.json'),
      JSON.stringify({ metadata: {}, weight_map: weightMap }),
    )
    const m = openModelDir(dir)
    expect(m.tensors.size).toBe(readSafetensorsHeader(src).tensors.length)
  })

  it('names the file and tensor when a tensor is missing or misshapen', () => {
    const dir = copyTinyModel()
    const file = join(dir, 'model.safetensors')
    const src = join(TINY_MODEL_DIR, 'model.safetensors')
    rewriteSafetensors(src, file, { drop: 'model.layers.1.block_sparse_moe.experts.3.w2.weight' })
    expect(() => openModelDir(dir)).toThrow(
      /model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight is missing/,
    )
    rewriteSafetensors(src, file, { reshape: ['model.layers.0.self_attn.q_proj.weight', [32, 128]] })
    expect(() => openModelDir(dir)).toThrow(
      /model\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj\.weight has shape \[32,128\] but config\.json implies \[64,64\]/,
    )
  })

  it('refuses unsupported dtypes and model types with a message naming the file', () => {
    const dir = copyTinyModel()
    const file = join(dir, 'model.safetensors')
    const bytes = readFileSync(file)
    writeFileSync(
      file,
      Buffer.from(bytes.toString('latin1').replace('"F32"', '"I8" ').replace(/"F32"/g, '"F32"'), 'latin1'),
    )
    expect(() => openModelDir(dir)).toThrow(/model\.safetensors: tensor .* has dtype I8/)
    const dir2 = copyTinyModel()
    const cfg = JSON.parse(readFileSync(join(dir2, 'config.json'), 'utf8'))
    writeFileSync(join(dir2, 'config.json'), JSON.stringify({ ...cfg, model_type: 'llama' }))
    expect(() => openModelDir(dir2)).toThrow(
      /config\.json: model_type: "llama" is not supported; supported are mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoe/,
    )
  })

  it('caches the export and rebuilds it when the config changes', () => {
    const dir = copyTinyModel()
    const a = ensureExported(openModelDir(dir))
    expect(a.cached).toBe(false)
    expect(ensureExported(openModelDir(dir))).toMatchObject({ cached: true, modelPath: a.modelPath })
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'))
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, rms_norm_eps: 1e-6 }))
    const b = ensureExported(openModelDir(dir))
    expect(b.cached).toBe(false)
    expect(b.modelPath).not.toBe(a.modelPath)
  })
})

describe('moe CLI', () => {
  it('generate --json prints the same ids as the engine', async () => {
    const { stdout } = await run('node', [
      CLI,
      'generate',
      '--model',
      TINY_MODEL_DIR,
      '--input-ids',
      '1,72,105',
      '--max-tokens',
      '8',
      '--json',
    ])
    const out = JSON.parse(stdout)
    const engine = await MoeEngine.load({
      modelDir: TINY_MODEL_DIR,
      ep: 'cpu',
      maxBatch: 1,
      maxContext: 64,
      log: () => {},
    })
    const want = await engine.generate({ inputIds: [1, 72, 105], maxTokens: 8, seed: 0 })
    expect(out.output_ids).toEqual(want.outputIds)
    expect(out).toMatchObject({ finish_reason: 'length', usage: { prompt_tokens: 3, completion_tokens: 8 } })
    expect(out.timings.timeToFirstTokenMs).toBeGreaterThan(0)
  })

  it('answers bad arguments with usage and exit code 2, a bad model directory with exit code 1', async () => {
    const fail = async (args: string[]) => {
      try {
        await run('node', [CLI, ...args])
        return { code: 0, stderr: '' }
      } catch (e) {
        return e as { code: number; stderr: string }
      }
    }
    const noPrompt = await fail(['generate', '--model', TINY_MODEL_DIR])
    expect(noPrompt.code).toBe(2)
    expect(noPrompt.stderr).toMatch(/exactly one of --prompt/)
    expect(
      (await fail(['generate', '--model', TINY_MODEL_DIR, '--prompt', 'x', '--temperature', 'hot'])).code,
    ).toBe(2)
    expect((await fail(['generate', '--model', TINY_MODEL_DIR, '--prompt', 'x', '--bogus'])).code).toBe(2)
    expect((await fail(['frobnicate'])).code).toBe(2)
    const badDir = await fail(['generate', '--model', '/nonexistent/model', '--prompt', 'x'])
    expect(badDir.code).toBe(1)
    expect(badDir.stderr).toMatch(/model directory not found/)
  })
})

describe('tiny model generator', () => {
  it('regenerates the committed tiny model byte for byte', async () => {
    const dir = join(copyTinyModel(), '..', 'regenerated')
    await run('node', [CLI, 'make-model', '--out', dir, '--preset', 'tiny'])
    for (const f of ['model.safetensors', 'config.json', 'tokenizer.json', 'tokenizer_config.json'])
      expect(readFileSync(join(dir, f)).equals(readFileSync(join(TINY_MODEL_DIR, f)))).toBe(true)
  })
})
