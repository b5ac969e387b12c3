import { parseArgs } from 'node:util'
import { UsageError } from './args.ts'

/** `moe pull ORG/NAME`: a checkpoint from a Hugging Face hub into a local model directory. */
export async function pullCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: true,
    options: { revision: { type: 'string' }, dir: { type: 'string' } },
  })
  if (positionals.length !== 1) throw new UsageError('pull needs exactly one repository, ORG/NAME')
  const { pullModel, PullError } = await import('../hub/pull.ts')
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
