import { closeSync, mkdtempSync, openSync, readSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  GgmlType,
  type GgufTensorInfo,
  getLlama,
  LlamaLogLevel,
  readGgufFileInfo,
  type Token,
} from 'node-llama-cpp'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { interleaveRopeRows, writeMixtralGguf } from '../src/bench/gguf-mixtral.ts'
import { quantizeQ4_0, quantizeQ8_0 } from '../src/bench/gguf-writer.ts'
import { MoeEngine } from '../src/engine/engine.ts'
import { openModelDir, tensorEntry } from '../src/engine/model-dir.ts'
import { f16ToF32, readTensorF32 } from '../src/engine/safetensors.ts'
import { TINY_MODEL_DIR } from './fixtures.ts'

// The GGUF the peers bench hands llama.cpp: ggml's block layouts, the file
// read back by an independent parser (node-llama-cpp's), and llama.cpp
// decoding greedily the very tokens this engine decodes from the same weights.

describe('ggml block quantizers', () => {
  it('Q8_0: an fp16 scale amax/127, then 32 int8 values rounded half away from zero', () => {
    const x = new Float32Array(32)
    x[0] = -127 // amax 127: scale exactly 1
    x[1] = 2.5
    x[2] = -2.5
    x[3] = 0.4
    x[31] = 100.49
    const block = quantizeQ8_0(x)
    expect(block.length).toBe(34)
    const view = new DataView(block.buffer)
    expect(f16ToF32(view.getUint16(0, true))).toBe(1)
    const q = new Int8Array(block.buffer, 2, 32)
    expect([q[0], q[1], q[2], q[3], q[4], q[31]]).toEqual([-127, 3, -3, 0, 0, 100])
  })

  it('Q4_0: scale = the value of largest magnitude / -8; byte j holds element j low, j + 16 high', () => {
    const x = new Float32Array(32)
    for (let j = 0; j < 16; j++) {
      x[j] = j - 8 // x[0] = -8 is the first of largest magnitude: d = 1
      x[16 + j] = 7 - j
    }
    const block = quantizeQ4_0(x)
    expect(block.length).toBe(18)
    expect(f16ToF32(new DataView(block.buffer).getUint16(0, true))).toBe(1)
    for (let j = 0; j < 16; j++) expect(block[2 + j]).toBe(j | ((15 - j) << 4))
  })

  it('Q4_0 dequantizes, as ggml does ((q - 8) * d), to within half a step', () => {
    const x = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i * 1.7) * (1 + (i % 5)))
    const blocks = quantizeQ4_0(x)
    const view = new DataView(blocks.buffer)
    for (let b = 0; b < 2; b++) {
      const d = f16ToF32(view.getUint16(b * 18, true))
      for (let j = 0; j < 32; j++) {
        const byte = blocks[b * 18 + 2 + (j % 16)]!
        const q = j < 16 ? byte & 15 : byte >> 4
        expect(Math.abs((q - 8) * d - x[b * 32 + j]!)).toBeLessThanOrEqual(Math.abs(d) / 2 + 1e-2)
      }
    }
  })
})

describe('interleaveRopeRows', () => {
  it("moves each head's rotate-half pairs (i, i + D/2) to adjacent rows (2i, 2i + 1)", () => {
    // 2 heads of D = 4, one column: rows hold their own HF index.
    const w = Float32Array.from({ length: 8 }, (_, i) => i)
    expect([...interleaveRopeRows(w, 2, 1)]).toEqual([0, 2, 1, 3, 4, 6, 5, 7])
  })
})

describe('the tiny model as GGUF', () => {
  const dir = mkdtempSync(join(tmpdir(), 'moe-gguf-test-'))
  const model = openModelDir(TINY_MODEL_DIR)
  const c = model.config
  const files: Record<'F32' | 'Q4_0', string> = {
    F32: join(dir, 'tiny-f32.gguf'),
    Q4_0: join(dir, 'tiny-q4_0.gguf'),
  }
  const sizes: Record<string, number> = {}

  beforeAll(() => {
    sizes.F32 = writeMixtralGguf(TINY_MODEL_DIR, files.F32, 'F32')
    sizes.Q4_0 = writeMixtralGguf(TINY_MODEL_DIR, files.Q4_0, 'Q4_0')
  })

  const tensorValues = (file: string, t: GgufTensorInfo, count: number) => {
    const fd = openSync(file, 'r')
    try {
      const out = new Float32Array(count)
      readSync(fd, new Uint8Array(out.buffer), 0, count * 4, Number(t.fileOffset))
      return out
    } finally {
      closeSync(fd)
    }
  }

  it('reads back through node-llama-cpp: llama architecture with experts, tokenizer, 32-byte aligned tensors', async () => {
    const info = await readGgufFileInfo(files.F32, { logWarnings: false })
    expect(statSync(files.F32).size).toBe(sizes.F32)
    expect(info.version).toBe(3)
    const m = info.metadata as unknown as Record<string, Record<string, unknown>>
    expect(m.general!.architecture).toBe('llama')
    expect(m.llama).toMatchObject({
      block_count: c.num_hidden_layers,
      embedding_length: c.hidden_size,
      feed_forward_length: c.moe_intermediate_size,
      expert_count: c.num_local_experts,
      expert_used_count: c.num_experts_per_tok,
      attention: { head_count: c.num_attention_heads, head_count_kv: c.num_key_value_heads },
    })
    const tok = (m.tokenizer as { ggml: Record<string, unknown> }).ggml
    expect(tok.model).toBe('gpt2')
    expect((tok.tokens as string[]).length).toBe(c.vocab_size)
    expect((tok.tokens as string[]).slice(0, 4)).toEqual(['<unk>', '<s>', '</s>', 'Ā'])
    expect(tok.bos_token_id).toBe(1)
    expect(tok.eos_token_id).toBe(2)

    const tensors = new Map(info.tensorInfo!.map((t) => [t.name, t]))
    expect(tensors.size).toBe(3 + 10 * c.num_hidden_layers)
    const H = c.hidden_size
    const I = c.moe_intermediate_size
    const E = c.num_local_experts
    expect(tensors.get('blk.1.ffn_gate_exps.weight')!.dimensions.map(Number)).toEqual([H, I, E])
    expect(tensors.get('blk.1.ffn_down_exps.weight')!.dimensions.map(Number)).toEqual([I, H, E])
    expect(tensors.get('output.weight')!.dimensions.map(Number)).toEqual([H, c.vocab_size])
    for (const t of info.tensorInfo!) {
      expect(t.ggmlType).toBe(GgmlType.F32)
      expect(Number(t.offset) % 32).toBe(0)
    }

    // Data where the tensor infos say: expert 3's down projection, and q's rows in llama.cpp's rotary order.
    const down = tensorValues(files.F32, tensors.get('blk.1.ffn_down_exps.weight')!, H * I * E)
    const w2 = readTensorF32(tensorEntry(model, 'model.layers.1.block_sparse_moe.experts.3.w2.weight'))
    expect(down.subarray(3 * H * I, 4 * H * I)).toEqual(w2)
    const D = c.head_dim
    const q = tensorValues(files.F32, tensors.get('blk.0.attn_q.weight')!, H * c.num_attention_heads * D)
    const hfQ = readTensorF32(tensorEntry(model, 'model.layers.0.self_attn.q_proj.weight'))
    const row = (w: Float32Array, r: number) => w.subarray(r * H, (r + 1) * H)
    // Head 1, pair i = 2: HF rows D + 2 and D + 2 + D/2 become rows D + 4 and D + 5.
    expect(row(q, D + 4)).toEqual(row(hfQ, D + 2))
    expect(row(q, D + 5)).toEqual(row(hfQ, D + 2 + D / 2))
  })

  it('Q4_0: the matrices quantized in 18-byte blocks; norms, router and embedding kept F32', async () => {
    const info = await readGgufFileInfo(files.Q4_0, { logWarnings: false })
    const type = new Map(info.tensorInfo!.map((t) => [t.name, t.ggmlType]))
    expect(type.get('blk.0.attn_k.weight')).toBe(GgmlType.Q4_0)
    expect(type.get('blk.0.ffn_up_exps.weight')).toBe(GgmlType.Q4_0)
    expect(type.get('output.weight')).toBe(GgmlType.Q4_0)
    expect(type.get('token_embd.weight')).toBe(GgmlType.F32)
    expect(type.get('blk.0.ffn_gate_inp.weight')).toBe(GgmlType.F32)
    expect(type.get('blk.0.attn_norm.weight')).toBe(GgmlType.F32)
    const last = info.tensorInfo!.at(-1)!
    expect(last.name).toBe('output.weight')
    const bytes = ((c.hidden_size * c.vocab_size) / 32) * 18
    expect(sizes.Q4_0).toBe(Number(last.fileOffset) + Math.ceil(bytes / 32) * 32)
  })

  describe('llama.cpp on the F32 file', () => {
    let engine: MoeEngine
    beforeAll(async () => {
      engine = await MoeEngine.load({
        modelDir: TINY_MODEL_DIR,
        ep: 'cpu',
        maxBatch: 1,
        maxContext: 128,
        log: () => {},
      })
    })
    afterAll(async () => {
      await engine.close()
    })

    it('decodes greedily the tokens this engine decodes from the same prompt', async () => {
      const prompt = [1, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110]
      const steps = 16
      const ours = await engine.generate({
        inputIds: prompt,
        maxTokens: steps,
        temperature: 0,
        ignoreEos: true,
      })
      const llama = await getLlama({
        gpu: false,
        build: 'never',
        logLevel: LlamaLogLevel.error,
        maxThreads: 1,
      })
      const model = await llama.loadModel({ modelPath: files.F32, gpuLayers: 0 })
      const ctx = await model.createContext({
        contextSize: 128,
        threads: 1,
        experimentalKvCacheKeyType: 'F32',
        experimentalKvCacheValueType: 'F32',
      })
      const theirs: number[] = []
      for await (const t of ctx
        .getSequence()
        .evaluate(prompt as Token[], { temperature: 0, yieldEogToken: true })) {
        theirs.push(t)
        if (theirs.length === steps) break
      }
      await model.dispose()
      await llama.dispose()
      expect(theirs).toEqual(ours.outputIds)
    })
  })
})
