import { UsageError } from './cli/args.ts'
import { evalCommand } from './cli/eval-command.ts'
import { exportCommand, generate, makeModel, planCommand } from './cli/model-commands.ts'
import { pullCommand } from './cli/pull-command.ts'
import { ModelMemoryError } from './engine/memory-plan.ts'
import { ModelDirError } from './engine/model-dir.ts'

// The `moe` command: usage, dispatch, and exit codes (2: bad arguments; 1: a bad model, a failure).

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
  eval --model DIR --text-file F [--window N] [--experts 0,2,5] [--dtype D] [--json] [--ep cpu|cuda|auto]
       [--threads N]
      Held-out bits per byte of a text under the model, with the engine's own forward pass.
  pull ORG/NAME [--revision R] [--dir DIR]
      Download the files the engine needs from a Hugging Face hub (HF_ENDPOINT, HF_TOKEN),
      resuming an interrupted pull and verifying every checksum.
  serve [--pools a,b]
      Run the GPU worker service (see README).
`

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
