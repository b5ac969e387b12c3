import { createHash } from 'node:crypto'
import { existsSync, readFileSync, statSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { type ModelConfig, parseModelConfig } from './model-config.ts'
import { expectedTensors } from './model-layout.ts'
import { readSafetensorsHeader, SafetensorsError, type TensorEntry } from './safetensors.ts'

/** A model directory in the Hugging Face layout, validated against its config. */
export interface ModelDir {
  dir: string
  config: ModelConfig
  tensors: Map<string, TensorEntry>
  /** Changes when config.json or any weight file's header or size changes: keys the export cache. */
  fingerprint: string
}

export class ModelDirError extends Error {
  override name = 'ModelDirError'
}

function readJson(file: string): unknown {
  if (!existsSync(file)) throw new ModelDirError(`${file}: not found`)
  try {
    return JSON.parse(readFileSync(file, 'utf8'))
  } catch (e) {
    throw new ModelDirError(`${file}: not valid JSON (${(e as Error).message})`)
  }
}

/** Reads and validates a model directory's config.json alone (enough to plan memory). */
export function readModelConfig(dir: string): ModelConfig {
  const configFile = join(dir, 'config.json')
  const parsed = parseModelConfig(readJson(configFile))
  if (!parsed.success) throw new ModelDirError(`${configFile}: ${parsed.issues.join('; ')}`)
  return parsed.data
}

/** Opens and validates a model directory: config, weight files, every tensor's presence and shape. */
export function openModelDir(dirIn: string): ModelDir {
  const dir = resolve(dirIn)
  if (!existsSync(dir) || !statSync(dir).isDirectory())
    throw new ModelDirError(`${dir}: model directory not found`)

  const configFile = join(dir, 'config.json')
  const config = readModelConfig(dir)

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
