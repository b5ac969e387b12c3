import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { MoeEngine } from '../engine/engine.ts'
import { evaluateText } from '../engine/evaluate.ts'
import { engineEnv, exportDtype, intList, num, UsageError } from './args.ts'

/** `moe eval`: held-out bits per byte of a text file, with the engine's own forward pass. */
export async function evalCommand(argv: string[]): Promise<void> {
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
      dtype: { type: 'string' },
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
    ...engineEnv(values.ep),
    dtype: values.dtype === undefined ? undefined : exportDtype(values.dtype),
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
