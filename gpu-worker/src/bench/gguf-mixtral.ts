import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { openModelDir, tensorEntry } from '../engine/model-dir.ts'
import { readTensorF32 } from '../engine/safetensors.ts'
import { type GgmlTensorType, type GgufTensor, type GgufValue, gguf, writeGguf } from './gguf-writer.ts'

// A Mixtral model directory (Hugging Face layout) as the GGUF llama.cpp loads
// for Mixtral: the `llama` architecture with experts, tensor names and
// metadata as llama.cpp's convert_hf_to_gguf.py writes them, so llama.cpp
// runs the very weights the engine runs.

/** general.file_type (llama_ftype) per weight type. */
const FILE_TYPE: Record<GgmlTensorType, number> = { F32: 0, Q8_0: 7, Q4_0: 2 }

/** llama_token_type. */
const TOKEN_TYPE = { normal: 1, control: 3, unused: 5 } as const

/**
 * HF stores q_proj/k_proj rows for rotate-half RoPE (pairs i and i + D/2);
 * llama.cpp's llama architecture rotates adjacent pairs (2i, 2i + 1). This is
 * convert_hf_to_gguf.py's permute: per head, row t*D/2 + i moves to 2i + t.
 */
export function interleaveRopeRows(w: Float32Array, heads: number, cols: number): Float32Array {
  const rows = w.length / cols
  const D = rows / heads
  const half = D / 2
  const out = new Float32Array(w.length)
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < half; i++)
      for (let t = 0; t < 2; t++) {
        const from = (h * D + t * half + i) * cols
        out.set(w.subarray(from, from + cols), (h * D + 2 * i + t) * cols)
      }
  return out
}

interface TokenizerJson {
  added_tokens?: Array<{ id: number; content: string; special?: boolean }>
  model?: { type?: string; vocab?: Record<string, number>; merges?: Array<string | [string, string]> }
  pre_tokenizer?: { type?: string } | null
}

/**
 * The tokenizer as GGUF metadata: byte-level BPE ("gpt2"), ids as in
 * tokenizer.json, and ids the tokenizer leaves unnamed up to the model's
 * vocabulary size padded as `[PAD<id>]`, as convert_hf_to_gguf.py does.
 */
function tokenizerMetadata(dir: string, vocabSize: number, bos?: number, eos?: number) {
  const file = join(dir, 'tokenizer.json')
  const tok = JSON.parse(readFileSync(file, 'utf8')) as TokenizerJson
  if (tok.model?.type !== 'BPE' || tok.pre_tokenizer?.type !== 'ByteLevel')
    throw new Error(`${file}: only byte-level BPE tokenizers can be written to GGUF here`)
  const tokens: string[] = Array.from({ length: vocabSize }, (_, i) => `[PAD${i}]`)
  const types: number[] = Array.from({ length: vocabSize }, () => TOKEN_TYPE.unused)
  for (const [text, id] of Object.entries(tok.model.vocab ?? {})) {
    if (id >= vocabSize) throw new Error(`${file}: token id ${id} is beyond vocab_size ${vocabSize}`)
    tokens[id] = text
    types[id] = TOKEN_TYPE.normal
  }
  for (const t of tok.added_tokens ?? []) {
    tokens[t.id] = t.content
    types[t.id] = t.special ? TOKEN_TYPE.control : TOKEN_TYPE.normal
  }
  const merges = (tok.model.merges ?? []).map((m) => (typeof m === 'string' ? m : m.join(' ')))
  const ids: Record<string, GgufValue> = {}
  if (bos !== undefined) ids['tokenizer.ggml.bos_token_id'] = gguf.u32(bos)
  if (eos !== undefined) ids['tokenizer.ggml.eos_token_id'] = gguf.u32(eos)
  return {
    'tokenizer.ggml.model': gguf.str('gpt2'),
    'tokenizer.ggml.pre': gguf.str('default'),
    'tokenizer.ggml.tokens': gguf.strings(tokens),
    'tokenizer.ggml.token_type': gguf.i32s(types),
    'tokenizer.ggml.merges': gguf.strings(merges),
    ...ids,
    // The engine's callers add bos themselves; the bench feeds token ids.
    'tokenizer.ggml.add_bos_token': gguf.bool(false),
  }
}

/**
 * Writes the Mixtral checkpoint in `modelDir` to `file` with its matrices in
 * `type` (norms, the router and the token embedding stay F32, as the engine's
 * quantized exports keep them). Returns the file's size in bytes.
 */
export function writeMixtralGguf(modelDir: string, file: string, type: GgmlTensorType): number {
  const model = openModelDir(modelDir)
  const c = model.config
  if (c.model_type !== 'mixtral')
    throw new Error(`${modelDir}: model_type ${c.model_type}; only mixtral converts to GGUF here`)
  const H = c.hidden_size
  const I = c.moe_intermediate_size
  const E = c.num_local_experts
  const D = c.head_dim
  const f32 = (name: string) => () => readTensorF32(tensorEntry(model, name))
  const stack = (names: string[]) => () => {
    const parts = names.map((n) => readTensorF32(tensorEntry(model, n)))
    const out = new Float32Array(parts.reduce((a, p) => a + p.length, 0))
    let at = 0
    for (const p of parts) {
      out.set(p, at)
      at += p.length
    }
    return out
  }
  const tensors: GgufTensor[] = [
    {
      name: 'token_embd.weight',
      dims: [H, c.vocab_size],
      type: 'F32',
      data: f32('model.embed_tokens.weight'),
    },
  ]
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const p = `model.layers.${l}`
    const experts = (w: string) =>
      Array.from({ length: E }, (_, e) => `${p}.block_sparse_moe.experts.${e}.${w}.weight`)
    tensors.push(
      { name: `blk.${l}.attn_norm.weight`, dims: [H], type: 'F32', data: f32(`${p}.input_layernorm.weight`) },
      {
        name: `blk.${l}.attn_q.weight`,
        dims: [H, c.num_attention_heads * D],
        type,
        data: () => interleaveRopeRows(f32(`${p}.self_attn.q_proj.weight`)(), c.num_attention_heads, H),
      },
      {
        name: `blk.${l}.attn_k.weight`,
        dims: [H, c.num_key_value_heads * D],
        type,
        data: () => interleaveRopeRows(f32(`${p}.self_attn.k_proj.weight`)(), c.num_key_value_heads, H),
      },
      {
        name: `blk.${l}.attn_v.weight`,
        dims: [H, c.num_key_value_heads * D],
        type,
        data: f32(`${p}.self_attn.v_proj.weight`),
      },
      {
        name: `blk.${l}.attn_output.weight`,
        dims: [c.num_attention_heads * D, H],
        type,
        data: f32(`${p}.self_attn.o_proj.weight`),
      },
      {
        name: `blk.${l}.ffn_norm.weight`,
        dims: [H],
        type: 'F32',
        data: f32(`${p}.post_attention_layernorm.weight`),
      },
      {
        name: `blk.${l}.ffn_gate_inp.weight`,
        dims: [H, E],
        type: 'F32',
        data: f32(`${p}.block_sparse_moe.gate.weight`),
      },
      { name: `blk.${l}.ffn_gate_exps.weight`, dims: [H, I, E], type, data: stack(experts('w1')) },
      { name: `blk.${l}.ffn_down_exps.weight`, dims: [I, H, E], type, data: stack(experts('w2')) },
      { name: `blk.${l}.ffn_up_exps.weight`, dims: [H, I, E], type, data: stack(experts('w3')) },
    )
  }
  tensors.push(
    { name: 'output_norm.weight', dims: [H], type: 'F32', data: f32('model.norm.weight') },
    {
      name: 'output.weight',
      dims: [H, c.vocab_size],
      type,
      data: f32(c.tie_word_embeddings ? 'model.embed_tokens.weight' : 'lm_head.weight'),
    },
  )
  const eos = Array.isArray(c.eos_token_id) ? c.eos_token_id[0] : c.eos_token_id
  const metadata: Record<string, GgufValue> = {
    'general.architecture': gguf.str('llama'),
    'general.name': gguf.str('moe-edge bench model'),
    'general.file_type': gguf.u32(FILE_TYPE[type]),
    'llama.vocab_size': gguf.u32(c.vocab_size),
    'llama.context_length': gguf.u32(c.max_position_embeddings),
    'llama.embedding_length': gguf.u32(H),
    'llama.block_count': gguf.u32(c.num_hidden_layers),
    'llama.feed_forward_length': gguf.u32(I),
    'llama.rope.dimension_count': gguf.u32(D),
    'llama.rope.freq_base': gguf.f32(c.rope_theta),
    'llama.attention.head_count': gguf.u32(c.num_attention_heads),
    'llama.attention.head_count_kv': gguf.u32(c.num_key_value_heads),
    'llama.attention.key_length': gguf.u32(D),
    'llama.attention.value_length': gguf.u32(D),
    'llama.attention.layer_norm_rms_epsilon': gguf.f32(c.rms_norm_eps),
    'llama.expert_count': gguf.u32(E),
    'llama.expert_used_count': gguf.u32(c.num_experts_per_tok),
    ...tokenizerMetadata(modelDir, c.vocab_size, c.bos_token_id ?? undefined, eos ?? undefined),
  }
  return writeGguf(file, metadata, tensors)
}
