// Scale check (issue 11): a checkpoint with Mixtral-8x7B's tensor shapes
// (hidden 4096, 8 experts of 14336, 32 heads, 8 KV heads, head_dim 128,
// vocab 32000, top-2) but only 2 layers, in bf16 shards, exported to int4 and
// served for a few tokens. Each phase runs in its own child process, so its
// peak RSS (VmHWM) is its own; the figures are set against the memory plan
// and the file sizes.
//
//   node src/bench/scale-check.ts [--dir /tmp/moe-scale-check] [--layers 2] [--tokens 8] [--keep] [--reuse]
//
// --keep leaves the checkpoint and export in --dir; --reuse takes a checkpoint
// already there instead of writing a new one. Results go to
// bench-results/scale-check.md (and stdout).
import { spawnSync } from 'node:child_process'
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { dirname, join } from 'node:path'
import { parseArgs } from 'node:util'
import { formatBytes, type MemoryPlan, planMemory } from '../engine/memory-plan.ts'
import { parseModelConfig } from '../engine/model-config.ts'
import { readModelConfig } from '../engine/model-dir.ts'
import { expectedTensors } from '../engine/model-layout.ts'
import type { MixtralConfigInput } from '../engine/random-model.ts'
import { byteLevelTokenizerFiles } from '../engine/tiny-tokenizer.ts'

const here = dirname(new URL(import.meta.url).pathname)
const workerRoot = join(here, '..', '..')

const { values: args } = parseArgs({
  options: {
    phase: { type: 'string' },
    dir: { type: 'string', default: '/tmp/moe-scale-check' },
    layers: { type: 'string', default: '2' },
    tokens: { type: 'string', default: '8' },
    threads: { type: 'string', default: String(Math.min(2, cpus().length)) },
    keep: { type: 'boolean', default: false },
    reuse: { type: 'boolean', default: false },
  },
})
const root = args.dir!
const modelDir = join(root, 'model')
const cacheDir = join(root, 'onnx-cache')
const dtype = 'int4' as const
const SERVE_BATCH = 1
const SERVE_CONTEXT = 256

/** Mixtral-8x7B-v0.1's config.json, with fewer layers. */
function mixtralConfig(layers: number): MixtralConfigInput {
  return {
    model_type: 'mixtral',
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: layers,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    head_dim: 128,
    num_local_experts: 8,
    num_experts_per_tok: 2,
    rms_norm_eps: 1e-5,
    rope_theta: 1_000_000,
    vocab_size: 32000,
    max_position_embeddings: 32768,
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
  }
}

/**
 * Peak and current RSS of this process in bytes, from /proc: VmHWM counts
 * file-backed pages too (ORT maps the external weights file), so the current
 * RSS is also split into anonymous and file-backed pages.
 */
function memoryStatus(): { peakRss: number; rss: number; rssAnon: number; rssFile: number } {
  const status = readFileSync('/proc/self/status', 'utf8')
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? 0) * 1024
  return { peakRss: kb('VmHWM'), rss: kb('VmRSS'), rssAnon: kb('RssAnon'), rssFile: kb('RssFile') }
}

function dirBytes(dir: string): number {
  let total = 0
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name)
    total += e.isDirectory() ? dirBytes(p) : statSync(p).size
  }
  return total
}

// ---------------------------------------------------------------- generate

const CHUNK = 1 << 22 // elements written at a time: 8 MB of bf16

/**
 * Approximately N(mean, std) values as bf16 bits (round to nearest), from a
 * 32-bit xorshift: each draw sums the four bytes of one word (Irwin-Hall,
 * n=4), which is close enough to normal for weights and ~10x faster in JS
 * than Box-Muller, so 3 billion values take seconds, not minutes.
 */
class Bf16Normal {
  private s: number
  private readonly f = new Float32Array(CHUNK)
  private readonly u = new Uint32Array(this.f.buffer)
  readonly out = new Uint16Array(CHUNK)
  constructor(seed: number) {
    this.s = seed >>> 0 || 0x9e3779b9
  }
  fill(n: number, mean: number, std: number): Uint16Array {
    const { f, u, out } = this
    const k = std / 147.80138 // std of the sum of four uniform bytes: sqrt(4 * (256^2 - 1) / 12)
    let s = this.s
    for (let i = 0; i < n; i++) {
      s ^= s << 13
      s ^= s >>> 17
      s ^= s << 5
      f[i] = mean + ((s & 255) + ((s >>> 8) & 255) + ((s >>> 16) & 255) + (s >>> 24) - 510) * k
    }
    this.s = s
    for (let i = 0; i < n; i++) {
      const b = u[i]!
      out[i] = (b + 0x7fff + ((b >>> 16) & 1)) >>> 16
    }
    return out.subarray(0, n)
  }
}

function nameSeed(name: string, seed: number): number {
  let h = 2166136261 ^ seed
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 16777619)
  return h >>> 0
}

/**
 * Writes the checkpoint tensor by tensor, in chunks, into shards of about
 * `shardBytes` (model-0000N-of-0000M.safetensors + model.safetensors.index.json),
 * so memory stays at one chunk whatever the model's size.
 */
function writeCheckpoint(dir: string, config: MixtralConfigInput, shardBytes: number): void {
  const parsed = parseModelConfig(config)
  if (!parsed.success) throw new Error(parsed.issues.join('; '))
  const specs = expectedTensors(parsed.data)
  const shards: (typeof specs)[] = [[]]
  let inShard = 0
  for (const t of specs) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * 2
    if (inShard > 0 && inShard + bytes > shardBytes) {
      shards.push([])
      inShard = 0
    }
    shards.at(-1)!.push(t)
    inShard += bytes
  }
  mkdirSync(dir, { recursive: true })
  const weightMap: Record<string, string> = {}
  const pad = (n: number) => String(n).padStart(5, '0')
  shards.forEach((part, s) => {
    const file = `model-${pad(s + 1)}-of-${pad(shards.length)}.safetensors`
    const header: Record<string, unknown> = { __metadata__: { format: 'pt' } }
    let offset = 0
    for (const t of part) {
      const bytes = t.shape.reduce((a, b) => a * b, 1) * 2
      header[t.name] = { dtype: 'BF16', shape: t.shape, data_offsets: [offset, offset + bytes] }
      offset += bytes
      weightMap[t.name] = file
    }
    let json = JSON.stringify(header)
    json += ' '.repeat((8 - (json.length % 8)) % 8)
    const len = Buffer.alloc(8)
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)))
    const fd = openSync(join(dir, file), 'w')
    try {
      writeSync(fd, len)
      writeSync(fd, Buffer.from(json))
      for (const t of part) {
        const rng = new Bf16Normal(nameSeed(t.name, 20261129))
        const norm = t.name.endsWith('norm.weight')
        let left = t.shape.reduce((a, b) => a * b, 1)
        while (left > 0) {
          const n = Math.min(CHUNK, left)
          const bits = rng.fill(n, norm ? 1 : 0, 0.02)
          writeSync(fd, new Uint8Array(bits.buffer, bits.byteOffset, bits.byteLength))
          left -= n
        }
      }
    } finally {
      closeSync(fd)
    }
  })
  const total = specs.reduce((a, t) => a + t.shape.reduce((x, y) => x * y, 1) * 2, 0)
  writeFileSync(
    join(dir, 'model.safetensors.index.json'),
    `${JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2)}\n`,
  )
  writeFileSync(
    join(dir, 'config.json'),
    `${JSON.stringify({ architectures: ['MixtralForCausalLM'], torch_dtype: 'bfloat16', ...config }, null, 2)}\n`,
  )
  const { tokenizerJson, tokenizerConfig } = byteLevelTokenizerFiles()
  writeFileSync(join(dir, 'tokenizer.json'), `${JSON.stringify(tokenizerJson)}\n`)
  writeFileSync(join(dir, 'tokenizer_config.json'), `${JSON.stringify(tokenizerConfig, null, 2)}\n`)
}

// ---------------------------------------------------------------- child phases

async function runPhase(phase: string): Promise<Record<string, unknown>> {
  const t0 = performance.now()
  if (phase === 'generate') {
    writeCheckpoint(modelDir, mixtralConfig(Number(args.layers)), 2e9)
    return { seconds: (performance.now() - t0) / 1000 }
  }
  if (phase === 'export') {
    const { openModelDir } = await import('../engine/model-dir.ts')
    const { ensureExported } = await import('../engine/onnx-export.ts')
    const out = ensureExported(openModelDir(modelDir), dtype, cacheDir)
    if (out.cached) throw new Error('export phase found a cached export; it should start from none')
    return { seconds: (performance.now() - t0) / 1000, modelPath: out.modelPath }
  }
  if (phase === 'serve') {
    const { MoeEngine } = await import('../engine/engine.ts')
    const engine = await MoeEngine.load({
      modelDir,
      ep: 'cpu',
      dtype,
      exportCacheDir: cacheDir,
      maxBatch: SERVE_BATCH,
      maxContext: SERVE_CONTEXT,
      intraOpThreads: Number(args.threads),
      log: () => {},
    })
    const loaded = performance.now()
    const afterLoad = memoryStatus()
    const inputIds = [1, ...Array.from({ length: 15 }, (_, i) => 3 + ((i * 7919) % 255))]
    const r = await engine.generate({ inputIds, maxTokens: Number(args.tokens), temperature: 0 })
    await engine.close()
    return {
      loadSeconds: (loaded - t0) / 1000,
      generateSeconds: (performance.now() - loaded) / 1000,
      rssAfterLoad: afterLoad.rss,
      anonAfterLoad: afterLoad.rssAnon,
      fileAfterLoad: afterLoad.rssFile,
      promptTokens: r.usage.promptTokens,
      completionTokens: r.usage.completionTokens,
      finishReason: r.finishReason,
      outputIds: r.outputIds,
      ttftMs: r.timings.timeToFirstTokenMs,
      tokensPerSecond: r.timings.tokensPerSecond,
      decodeTokensPerSecond: r.timings.decodeTokensPerSecond,
    }
  }
  throw new Error(`unknown phase ${phase}`)
}

if (args.phase) {
  const result = await runPhase(args.phase)
  const mem = memoryStatus()
  const maxRssKb = process.resourceUsage().maxRSS
  process.stdout.write(`\n@@result ${JSON.stringify({ ...result, ...mem, maxRss: maxRssKb * 1024 })}\n`)
  process.exit(0)
}

// ---------------------------------------------------------------- parent

type PhaseResult = Record<string, unknown> & { peakRss: number; wallSeconds: number }

function child(phase: string): PhaseResult {
  const t0 = performance.now()
  const argv = [
    new URL(import.meta.url).pathname,
    '--phase',
    phase,
    '--dir',
    root,
    '--layers',
    args.layers!,
    '--tokens',
    args.tokens!,
    '--threads',
    args.threads!,
  ]
  const r = spawnSync(process.execPath, argv, {
    cwd: workerRoot,
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 64 << 20,
    encoding: 'utf8',
  })
  const line = r.stdout.split('\n').find((l) => l.startsWith('@@result '))
  if (r.status !== 0 || !line)
    throw new Error(
      `phase ${phase} failed (status ${r.status}, signal ${r.signal}): ${r.stdout.slice(-2000)}`,
    )
  const out = JSON.parse(line.slice('@@result '.length))
  return { ...out, wallSeconds: (performance.now() - t0) / 1000 }
}

function plan(maxBatch: number, maxContext: number): MemoryPlan {
  return planMemory(readModelConfig(modelDir), { dtype, maxBatch, maxContext })
}

const GiB = 1024 ** 3
const fmt = (n: number) => `${formatBytes(n)} (${(n / GiB).toFixed(2)} GiB)`
const started = new Date()
const t0 = performance.now()
const cpuModel = /model name\s*:\s*(.*)/.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? cpus()[0]?.model
const machine = `${cpuModel}, ${cpus().length} cores, ${(totalmem() / GiB).toFixed(0)} GiB`
console.error(`scale check: ${machine}; working in ${root}`)

mkdirSync(root, { recursive: true })
let gen: PhaseResult | null = null
if (!(args.reuse && existsSync(join(modelDir, 'model.safetensors.index.json')))) {
  rmSync(modelDir, { recursive: true, force: true })
  console.error('generating the checkpoint ...')
  gen = child('generate')
}
const checkpointBytes = readdirSync(modelDir)
  .filter((f) => f.endsWith('.safetensors'))
  .reduce((a, f) => a + statSync(join(modelDir, f)).size, 0)
const shardCount = readdirSync(modelDir).filter((f) => f.endsWith('.safetensors')).length

// The planner, as `moe plan --model DIR --dtype int4 --json` prints it (defaults: batch 32, context 2048).
const planStart = performance.now()
const cli = spawnSync(
  process.execPath,
  [join(workerRoot, 'bin', 'moe.js'), 'plan', '--model', modelDir, '--dtype', dtype, '--json'],
  { cwd: workerRoot, encoding: 'utf8' },
)
if (cli.status !== 0) throw new Error(`moe plan failed: ${cli.stderr}`)
const cliPlan = JSON.parse(cli.stdout) as MemoryPlan
const planSeconds = (performance.now() - planStart) / 1000
const servePlan = plan(SERVE_BATCH, SERVE_CONTEXT)

rmSync(cacheDir, { recursive: true, force: true })
console.error('exporting to int4 ...')
const exp = child('export')
const exportDirPath = dirname(String(exp.modelPath))
const exportBytes = dirBytes(exportDirPath)
const exportDataBytes = statSync(join(exportDirPath, 'model.onnx.data')).size
const exportGraphBytes = statSync(join(exportDirPath, 'model.onnx')).size
console.error('serving ...')
const serve = child('serve')
const totalSeconds = (performance.now() - t0) / 1000
// What one decode step of one row must read: every dense weight, k of E experts per layer.
const cfg = readModelConfig(modelDir)
const parts = cliPlan.components
const decodeBytes =
  parts.lm_head +
  parts.attention +
  parts.router +
  (parts.experts * cfg.num_experts_per_tok) / cfg.num_local_experts

const rows: Array<[string, string]> = [
  ['checkpoint (bf16, safetensors)', `${fmt(checkpointBytes)}, ${shardCount} shards`],
  ['planned weights at int4 (`weights_bytes`)', fmt(cliPlan.weights_bytes)],
  ['exported (model.onnx + model.onnx.data)', fmt(exportBytes)],
  [
    'exported weights file (model.onnx.data) - planned weights',
    `${(exportDataBytes - cliPlan.weights_bytes).toLocaleString('en-US')} bytes (${((exportDataBytes / cliPlan.weights_bytes - 1) * 100).toFixed(3)}%); graph file ${exportGraphBytes.toLocaleString('en-US')} bytes`,
  ],
  ['export peak RSS', fmt(exp.peakRss)],
  ['serve peak RSS', fmt(serve.peakRss)],
  [
    'serve RSS after load (anonymous + file-backed)',
    `${fmt(Number(serve.rssAfterLoad))} = ${formatBytes(Number(serve.anonAfterLoad))} + ${formatBytes(Number(serve.fileAfterLoad))}`,
  ],
  [
    `planned total, CLI defaults (batch ${cliPlan.max_batch} x ${cliPlan.max_context}; KV ${formatBytes(cliPlan.kv_bytes)})`,
    fmt(cliPlan.total_bytes),
  ],
  [
    `planned total, as served (batch ${SERVE_BATCH} x ${SERVE_CONTEXT}; KV ${formatBytes(servePlan.kv_bytes)})`,
    fmt(servePlan.total_bytes),
  ],
  ['serve peak RSS / planned total as served', `${(serve.peakRss / servePlan.total_bytes).toFixed(2)}x`],
  [
    `generation: ${serve.promptTokens}-token prompt, ${serve.completionTokens} new tokens`,
    `${Number(serve.tokensPerSecond).toFixed(2)} tok/s overall, ${Number(serve.decodeTokensPerSecond).toFixed(2)} tok/s decode, first token ${Number(serve.ttftMs).toFixed(0)} ms`,
  ],
  [
    'weight bytes read per decode token (head, attention, router, top-2 of 8 experts)',
    `${formatBytes(decodeBytes)}; at the decode rate ${((decodeBytes * Number(serve.decodeTokensPerSecond)) / 1e9).toFixed(1)} GB/s`,
  ],
]
const phases: Array<[string, string]> = [
  [
    'write checkpoint',
    gen ? `${gen.wallSeconds.toFixed(1)} s (peak RSS ${formatBytes(gen.peakRss)})` : 'reused',
  ],
  ['moe plan (CLI)', `${planSeconds.toFixed(1)} s`],
  ['export to int4', `${exp.wallSeconds.toFixed(1)} s (export itself ${Number(exp.seconds).toFixed(1)} s)`],
  ['serve: load (session create)', `${Number(serve.loadSeconds).toFixed(1)} s`],
  ['serve: generate', `${Number(serve.generateSeconds).toFixed(1)} s`],
  ['serve child, wall', `${serve.wallSeconds.toFixed(1)} s`],
  ['whole run', `${totalSeconds.toFixed(1)} s`],
]
const table = (head: [string, string], body: Array<[string, string]>) =>
  [`| ${head[0]} | ${head[1]} |`, '|---|---:|', ...body.map(([a, b]) => `| ${a} | ${b} |`)].join('\n')

const c = mixtralConfig(Number(args.layers))
const md = [
  `# Scale check: Mixtral-8x7B shapes, ${c.num_hidden_layers} layers, int4 (${started.toISOString().slice(0, 10)})`,
  '',
  `Machine: ${machine}, ORT CPU EP, ${args.threads} threads. Run at ${started.toISOString()}.`,
  '',
  `Checkpoint: random bf16 weights (about N(0, 0.02); norms about 1), hidden ${c.hidden_size}, ${c.num_local_experts} experts of ${c.intermediate_size}, ${c.num_attention_heads} heads, ${c.num_key_value_heads} KV heads, head_dim ${c.head_dim}, vocab ${c.vocab_size}, top-${c.num_experts_per_tok}, ${c.num_hidden_layers} layers (${(cliPlan.parameters / 1e9).toFixed(2)}B parameters), written by the benchmark in ${shardCount} shards. Export and serving each ran in a child process; peak RSS is the child's VmHWM.`,
  '',
  table(['figure', 'value'], rows),
  '',
  table(['phase', 'time'], phases),
  '',
  'Command: `cd gpu-worker && npx node src/bench/scale-check.ts`',
  '',
].join('\n')
console.log(md)
const resultsFile = join(workerRoot, 'bench-results', 'scale-check.md')
writeFileSync(resultsFile, md)
console.error(`wrote ${resultsFile}`)
console.error(
  JSON.stringify({
    gen,
    exp,
    serve,
    cliPlan: { weights: cliPlan.weights_bytes, kv: cliPlan.kv_bytes, total: cliPlan.total_bytes },
    servePlan: servePlan.total_bytes,
  }),
)
if (!args.keep) rmSync(root, { recursive: true, force: true })
