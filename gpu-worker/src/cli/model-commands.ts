import { parseArgs } from 'node:util'
import { cudaAvailable, type GenerateRequest, MoeEngine } from '../engine/engine.ts'
import { formatPlan, type PlanDtype, planMemory } from '../engine/memory-plan.ts'
import { openModelDir, readModelConfig } from '../engine/model-dir.ts'
import { ensureExported } from '../engine/onnx-export.ts'
import { BENCH_CONFIG, TINY_CONFIG, writeRandomMixtral } from '../engine/random-model.ts'
import { engineEnv, exportDtype, intList, num, UsageError } from './args.ts'

// `moe generate`, `export`, `plan` and `make-model`: one model directory, no service.

export async function generate(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      model: { type: 'string' },
      prompt: { type: 'string' },
      'input-ids': { type: 'string' },
      'max-tokens': { type: 'string' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      'top-k': { type: 'string' },
      seed: { type: 'string' },
      stop: { type: 'string', multiple: true },
      experts: { type: 'string' },
      chat: { type: 'boolean' },
      json: { type: 'boolean' },
      ep: { type: 'string' },
      threads: { type: 'string' },
      dtype: { type: 'string' },
    },
  })
  if (!values.model) throw new UsageError('generate needs --model DIR')
  if ((values.prompt === undefined) === (values['input-ids'] === undefined))
    throw new UsageError('generate needs exactly one of --prompt TEXT or --input-ids 1,2,3')
  const req: Omit<GenerateRequest, 'inputIds'> = {
    maxTokens: num('max-tokens', values['max-tokens'], { int: true, min: 1 }) ?? 32,
    temperature: num('temperature', values.temperature, { min: 0, max: 2 }) ?? 0,
    topP: num('top-p', values['top-p'], { min: Number.MIN_VALUE, max: 1 }) ?? 1,
    topK: num('top-k', values['top-k'], { int: true, min: 0 }) ?? 0,
    seed: num('seed', values.seed, { int: true, min: 0, max: Number.MAX_SAFE_INTEGER }) ?? 0,
    stop: values.stop ?? [],
    allowedExperts: intList('experts', values.experts) ?? null,
  }
  const threads = num('threads', values.threads, { int: true, min: 1 })
  const engine = await MoeEngine.load({
    modelDir: values.model,
    ...engineEnv(values.ep),
    dtype: values.dtype === undefined ? undefined : exportDtype(values.dtype),
    intraOpThreads: threads,
    log: () => {},
  })
  let inputIds = intList('input-ids', values['input-ids'])
  if (inputIds) {
    const bad = inputIds.find((id) => id >= engine.config.vocab_size)
    if (bad !== undefined)
      throw new UsageError(`--input-ids: ${bad} is outside the vocabulary (size ${engine.config.vocab_size})`)
  } else {
    const prompt = values.prompt!
    inputIds = values.chat
      ? engine.tokenizer.encodeChat([{ role: 'user', content: prompt }])
      : engine.tokenizer.encodePrompt(prompt)
  }
  const result = await engine.generate({
    ...req,
    inputIds,
    onToken: values.json ? undefined : (t) => process.stdout.write(t.text),
  })
  if (values.json) {
    process.stdout.write(
      `${JSON.stringify({ output_ids: result.outputIds, text: result.text, finish_reason: result.finishReason, usage: { prompt_tokens: result.usage.promptTokens, completion_tokens: result.usage.completionTokens }, timings: result.timings, expert_load: result.expertLoad, ep: engine.ep })}\n`,
    )
  } else {
    process.stdout.write(
      `\n[${result.finishReason}; ${result.usage.completionTokens} tokens; ${result.timings.tokensPerSecond.toFixed(1)} tok/s; ${engine.ep}]\n`,
    )
  }
}

export function exportCommand(argv: string[]): void {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: { model: { type: 'string' }, dtype: { type: 'string' } },
  })
  if (!values.model) throw new UsageError('export needs --model DIR')
  const t0 = performance.now()
  const out = ensureExported(
    openModelDir(values.model),
    exportDtype(values.dtype ?? 'fp32'),
    engineEnv(undefined).exportCacheDir,
  )
  console.log(
    `${out.cached ? 'cached' : 'exported'} ${out.modelPath} (${Math.round(performance.now() - t0)} ms)`,
  )
}

export function planCommand(argv: string[]): void {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      model: { type: 'string' },
      dtype: { type: 'string' },
      'max-batch': { type: 'string' },
      'max-context': { type: 'string' },
      'memory-gb': { type: 'string' },
      'prefix-cache-tokens': { type: 'string' },
      json: { type: 'boolean' },
    },
  })
  if (!values.model) throw new UsageError('plan needs --model DIR')
  // Default: the dtype the engine would load at here (fp16 on CUDA, else fp32).
  const dtype = values.dtype ?? (cudaAvailable() ? 'fp16' : 'fp32')
  exportDtype(dtype)
  const memoryGb = num('memory-gb', values['memory-gb'], { min: Number.MIN_VALUE })
  const plan = planMemory(readModelConfig(values.model), {
    dtype: dtype as PlanDtype,
    maxBatch: num('max-batch', values['max-batch'], { int: true, min: 1 }) ?? 32,
    maxContext: num('max-context', values['max-context'], { int: true, min: 2 }) ?? 2048,
    memoryBytes: memoryGb === undefined ? undefined : memoryGb * 1e9,
    prefixCacheTokens: num('prefix-cache-tokens', values['prefix-cache-tokens'], { int: true, min: 0 }) ?? 0,
  })
  console.log(values.json ? JSON.stringify(plan) : formatPlan(plan))
}

export function makeModel(argv: string[]): void {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: { out: { type: 'string' }, preset: { type: 'string' }, seed: { type: 'string' } },
  })
  if (!values.out) throw new UsageError('make-model needs --out DIR')
  const preset = values.preset ?? 'tiny'
  if (preset !== 'tiny' && preset !== 'bench')
    throw new UsageError(`--preset must be tiny or bench (got ${JSON.stringify(preset)})`)
  writeRandomMixtral(
    values.out,
    preset === 'tiny' ? TINY_CONFIG : BENCH_CONFIG,
    num('seed', values.seed, { int: true, min: 0 }) ?? 20261129,
  )
  console.log(`wrote a ${preset} random-weight Mixtral to ${values.out}`)
}
