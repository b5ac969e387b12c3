import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { cudaAvailable, type GenerateRequest, MoeEngine } from './engine/engine.ts'
import { evaluateText } from './engine/evaluate.ts'
import {
  formatPlan,
  ModelMemoryError,
  PLAN_DTYPES,
  type PlanDtype,
  planMemory,
} from './engine/memory-plan.ts'
import { ModelDirError, openModelDir, readModelConfig } from './engine/model-dir.ts'
import { ensureExported } from './engine/onnx-export.ts'
import { BENCH_CONFIG, TINY_CONFIG, writeRandomMixtral } from './engine/random-model.ts'
import type { ExecutionProviderChoice } from './engine/session.ts'

const USAGE = `usage: moe <command> [options]

commands:
  generate --model DIR (--prompt TEXT | --input-ids 1,2,3) [--max-tokens N] [--temperature T]
           [--top-p P] [--top-k K] [--seed S] [--stop TEXT]... [--experts 0,2,5] [--chat] [--json]
           [--ep cpu|cuda|auto] [--threads N] [--dtype fp32|fp16|int8|int4]
      Generate from a prompt. --chat applies the model's chat template; --json prints one JSON object.
  export --model DIR [--dtype fp32|fp16|int8|int4]
      Export the model to ONNX (cached next to the model) and print where. int8/int4 store the
      attention and expert weights in symmetric blocks of 32 (MatMulNBits).
  plan --model DIR [--dtype fp32|fp16|int8|int4] [--max-batch N] [--max-context T] [--memory-gb G] [--json]
      From config.json alone: weight bytes per component, KV-cache bytes per token and for
      batch x context, the total, and whether it fits in G GB (default: this machine's memory).
      The engine refuses to load a model that does not fit.
  make-model --out DIR [--preset tiny|bench] [--seed N]
      Write a deterministic random-weight Mixtral in the Hugging Face layout.
  eval --model DIR --text-file F [--window N] [--experts 0,2,5] [--json] [--ep cpu|cuda|auto] [--threads N]
      Held-out bits per byte of a text under the model, with the engine's own forward pass.
  pull ORG/NAME [--revision R] [--dir DIR]
      Download the files the engine needs from a Hugging Face hub (HF_ENDPOINT, HF_TOKEN),
      resuming an interrupted pull and verifying every checksum.
  serve [--pools a,b]
      Run the GPU worker service (see README).
`

class UsageError extends Error {}

function num(
  name: string,
  v: string | undefined,
  opts: { int?: boolean; min?: number; max?: number } = {},
): number | undefined {
  if (v === undefined) return undefined
  const n = Number(v)
  if (
    !Number.isFinite(n) ||
    (opts.int && !Number.isInteger(n)) ||
    (opts.min !== undefined && n < opts.min) ||
    (opts.max !== undefined && n > opts.max)
  )
    throw new UsageError(
      `--${name} must be ${opts.int ? 'an integer' : 'a number'}${opts.min !== undefined ? ` >= ${opts.min}` : ''}${opts.max !== undefined ? ` <= ${opts.max}` : ''} (got ${JSON.stringify(v)})`,
    )
  return n
}

function intList(name: string, v: string | undefined): number[] | undefined {
  if (v === undefined) return undefined
  const parts = v.split(',').map((s) => s.trim())
  if (parts.some((p) => !/^\d+$/.test(p)))
    throw new UsageError(`--${name} must be comma-separated non-negative integers (got ${JSON.stringify(v)})`)
  return parts.map(Number)
}

function ep(v: string | undefined): ExecutionProviderChoice {
  const e = v ?? process.env.MOE_EP ?? 'auto'
  if (e !== 'cpu' && e !== 'cuda' && e !== 'auto')
    throw new UsageError(`--ep / MOE_EP must be cpu, cuda or auto (got ${JSON.stringify(e)})`)
  return e
}

function exportDtype(v: string): PlanDtype {
  if (!PLAN_DTYPES.includes(v as PlanDtype))
    throw new UsageError(`--dtype must be one of ${PLAN_DTYPES.join(', ')} (got ${JSON.stringify(v)})`)
  return v as PlanDtype
}

async function generate(argv: string[]): Promise<void> {
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
    ep: ep(values.ep),
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

function exportCommand(argv: string[]): void {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: { model: { type: 'string' }, dtype: { type: 'string' } },
  })
  if (!values.model) throw new UsageError('export needs --model DIR')
  const t0 = performance.now()
  const out = ensureExported(openModelDir(values.model), exportDtype(values.dtype ?? 'fp32'))
  console.log(
    `${out.cached ? 'cached' : 'exported'} ${out.modelPath} (${Math.round(performance.now() - t0)} ms)`,
  )
}

function planCommand(argv: string[]): void {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      model: { type: 'string' },
      dtype: { type: 'string' },
      'max-batch': { type: 'string' },
      'max-context': { type: 'string' },
      'memory-gb': { type: 'string' },
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
  })
  console.log(values.json ? JSON.stringify(plan) : formatPlan(plan))
}

function makeModel(argv: string[]): void {
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

async function evalCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      model: { type: 'string' },
      'text-file': { type: 'string' },
      window: { type: 'string' },
      experts: { type: 'string' },
      json: { type: 'boolean' },
      ep: { type: 'string' },
      threads: { type: 'string' },
    },
  })
  if (!values.model) throw new UsageError('eval needs --model DIR')
  if (!values['text-file']) throw new UsageError('eval needs --text-file F')
  let text: string
  try {
    text = readFileSync(values['text-file'], 'utf8')
  } catch (e) {
    throw new UsageError(`--text-file: cannot read ${values['text-file']}: ${(e as Error).message}`)
  }
  if (text.length === 0) throw new UsageError(`--text-file: ${values['text-file']} is empty`)
  const window = num('window', values.window, { int: true, min: 2 })
  const engine = await MoeEngine.load({
    modelDir: values.model,
    ep: ep(values.ep),
    intraOpThreads: num('threads', values.threads, { int: true, min: 1 }),
    maxBatch: 16,
    maxContext: window === undefined ? 1024 : window + 1,
    log: () => {},
  })
  try {
    const r = await evaluateText(engine, text, { window, allowedExperts: intList('experts', values.experts) })
    if (values.json) process.stdout.write(`${JSON.stringify(r)}\n`)
    else
      process.stdout.write(
        `${r.bits_per_byte.toFixed(4)} bits per byte over ${r.bytes} bytes (${r.tokens} tokens in ${r.windows} windows; perplexity ${r.perplexity.toFixed(3)})\n`,
      )
  } finally {
    await engine.close()
  }
}

async function pullCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: true,
    options: { revision: { type: 'string' }, dir: { type: 'string' } },
  })
  if (positionals.length !== 1) throw new UsageError('pull needs exactly one repository, ORG/NAME')
  const { pullModel, PullError } = await import('./hub/pull.ts')
  try {
    const r = await pullModel({
      repo: positionals[0]!,
      revision: values.revision,
      dir: values.dir,
      endpoint: process.env.HF_ENDPOINT,
      token: process.env.HF_TOKEN,
      log: (line) => console.error(line),
    })
    const bytes = r.files.reduce((a, f) => a + f.bytes, 0)
    console.log(`${r.dir}: ${r.files.length} files, ${bytes} bytes, every checksum verified`)
  } catch (e) {
    if (e instanceof PullError) {
      console.error(`moe pull: ${e.message}`)
      process.exit(1)
    }
    throw e
  }
}

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv
  switch (command) {
    case 'generate':
      return generate(rest)
    case 'export':
      return exportCommand(rest)
    case 'plan':
      return planCommand(rest)
    case 'make-model':
      return makeModel(rest)
    case 'eval':
      return evalCommand(rest)
    case 'pull':
      return pullCommand(rest)
    case 'serve': {
      const { serve } = await import('./service/serve.ts')
      return serve(rest)
    }
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE)
      return
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)}`)
  }
}

try {
  await main(process.argv.slice(2))
} catch (e) {
  if (e instanceof UsageError || (e as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
    console.error(`moe: ${(e as Error).message}\n\n${USAGE}`)
    process.exit(2)
  }
  if (e instanceof ModelDirError) {
    console.error(`moe: bad model directory: ${e.message}`)
    process.exit(1)
  }
  if (e instanceof ModelMemoryError) {
    console.error(`moe: ${e.message}`)
    process.exit(1)
  }
  console.error(`moe: ${(e as Error).stack ?? e}`)
  process.exit(1)
}
