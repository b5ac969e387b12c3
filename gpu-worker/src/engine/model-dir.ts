import { createHash } from 'node:crypto'
import { existsSync, readFileSync, statSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { MixtralConfig } from './model-config.ts'
import { readSafetensorsHeader, SafetensorsError, type TensorEntry } from './safetensors.ts'

/** A model directory in the Hugging Face layout, validated against its config. */
export interface ModelDir {
  dir: string
  config: MixtralConfig
  tensors: Map<string, TensorEntry>
  /** Changes when config.json or any weight file's header or size changes: keys the export cache. */
  fingerprint: string
}

export class ModelDirError extends Error {
  override name = 'ModelDirError'
}

/** Every tensor the engine reads, with the shape config.json implies. */
export function expectedTensors(c: MixtralConfig): Array<{ name: string; shape: number[] }> {
  const H = c.hidden_size
  const I = c.intermediate_size
  const D = c.head_dim
  const out = [
    { name: 'model.embed_tokens.weight', shape: [c.vocab_size, H] },
    { name: 'model.norm.weight', shape: [H] },
  ]
  if (!c.tie_word_embeddings) out.push({ name: 'lm_head.weight', shape: [c.vocab_size, H] })
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const p = `model.layers.${l}`
    out.push(
      { name: `${p}.input_layernorm.weight`, shape: [H] },
      { name: `${p}.post_attention_layernorm.weight`, shape: [H] },
      { name: `${p}.self_attn.q_proj.weight`, shape: [c.num_attention_heads * D, H] },
      { name: `${p}.self_attn.k_proj.weight`, shape: [c.num_key_value_heads * D, H] },
      { name: `${p}.self_attn.v_proj.weight`, shape: [c.num_key_value_heads * D, H] },
      { name: `${p}.self_attn.o_proj.weight`, shape: [H, c.num_attention_heads * D] },
      { name: `${p}.block_sparse_moe.gate.weight`, shape: [c.num_local_experts, H] },
    )
    for (let e = 0; e < c.num_local_experts; e++) {
      const q = `${p}.block_sparse_moe.experts.${e}`
      out.push(
        { name: `${q}.w1.weight`, shape: [I, H] },
        { name: `${q}.w3.weight`, shape: [I, H] },
        { name: `${q}.w2.weight`, shape: [H, I] },
      )
    }
  }
  return out
}

function readJson(file: string): unknown {
  if (!existsSync(file)) throw new ModelDirError(`${file}: not found`)
  try {
    return JSON.parse(readFileSync(file, 'utf8'))
  } catch (e) {
    throw new ModelDirError(`${file}: not valid JSON (${(e as Error).message})`)
  }
}

/** Opens and validates a model directory: config, weight files, every tensor's presence and shape. */
export function openModelDir(dirIn: string): ModelDir {
  const dir = resolve(dirIn)
  if (!existsSync(dir) || !statSync(dir).isDirectory())
    throw new ModelDirError(`${dir}: model directory not found`)

  const configFile = join(dir, 'config.json')
  const parsed = MixtralConfig.safeParse(readJson(configFile))
  if (!parsed.success) {
    const issues = parsed.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')
    throw new ModelDirError(`${configFile}: ${issues}`)
  }
  const config = parsed.data

  const indexFile = join(dir, 'model.safetensors.index.json')
  let files: string[]
  if (existsSync(indexFile)) {
    const index = readJson(indexFile) as { weight_map?: Record<string, string> }
    if (!index.weight_map || typeof index.weight_map !== 'object')
      throw new ModelDirError(`${indexFile}: has no weight_map`)
    files = [...new Set(Object.values(index.weight_map))].map((f) => join(dir, f))
  } else if (existsSync(join(dir, 'model.safetensors'))) {
    files = [join(dir, 'model.safetensors')]
  } else {
    throw new ModelDirError(`${dir}: no model.safetensors or model.safetensors.index.json`)
  }

  const tensors = new Map<string, TensorEntry>()
  const hash = createHash('sha256').update(readFileSync(configFile))
  for (const file of files) {
    if (!existsSync(file)) throw new ModelDirError(`${file}: weight file named by the index is missing`)
    try {
      const { tensors: entries, headerBytes } = readSafetensorsHeader(file)
      hash.update(headerBytes).update(String(statSync(file).size))
      for (const t of entries) tensors.set(t.name, t)
    } catch (e) {
      if (e instanceof SafetensorsError) throw new ModelDirError(e.message)
      throw e
    }
  }

  for (const want of expectedTensors(config)) {
    const got = tensors.get(want.name)
    if (!got) throw new ModelDirError(`${dir}: tensor ${want.name} is missing from the weight files`)
    if (got.shape.join(',') !== want.shape.join(','))
      throw new ModelDirError(
        `${got.file}: tensor ${want.name} has shape [${got.shape}] but config.json implies [${want.shape}]`,
      )
  }
  return { dir, config, tensors, fingerprint: hash.digest('hex').slice(0, 16) }
}

/** The tensor entry for a name that validation guaranteed exists. */
export function tensorEntry(model: ModelDir, name: string): TensorEntry {
  const t = model.tensors.get(name)
  if (!t) throw new ModelDirError(`${model.dir}: tensor ${name} is missing`)
  return t
}
