import { createHash } from 'node:crypto'
import {
  createReadStream,
  createWriteStream,
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
} from 'node:fs'
import { dirname, join, resolve, sep } from 'node:path'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import type { ReadableStream as WebReadableStream } from 'node:stream/web'
import { downloadFile, type ListFileEntry, listFiles } from '@huggingface/hub'

// `moe pull ORG/NAME`: fetches the files the engine reads from a Hugging Face hub into a local
// model directory. Run before serving, never by it: the worker only reads local directories.

export interface PullOptions {
  repo: string
  /** Branch, tag or commit (default main). */
  revision?: string
  /** Where the model directory goes (default ./models/<name>). */
  dir?: string
  /** Hub base URL (HF_ENDPOINT; default https://huggingface.co). */
  endpoint?: string
  /** HF_TOKEN, for gated and private repositories. */
  token?: string
  log?: (line: string) => void
}

export interface PulledFile {
  path: string
  bytes: number
  /** sha256 for LFS files (the hub's LFS oid), git blob sha1 otherwise. */
  checksum: string
  /** Already present and verified: not downloaded again. */
  reused: boolean
  /** Bytes a previous interrupted pull had left, resumed from. */
  resumedFrom: number
}

export class PullError extends Error {
  override name = 'PullError'
}

const REPO = /^[A-Za-z0-9][\w.-]*\/[A-Za-z0-9][\w.-]*$/
/** What the engine reads from a model directory (see model-dir.ts), and nothing else. */
const WANTED = new Set([
  'config.json',
  'generation_config.json',
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'model.safetensors',
  'model.safetensors.index.json',
])

/** The files to fetch: the fixed set, plus every shard the safetensors index names. */
function selectFiles(entries: ListFileEntry[], index: { weight_map?: Record<string, string> } | null) {
  const byPath = new Map(entries.filter((e) => e.type === 'file').map((e) => [e.path, e]))
  const shards = new Set(Object.values(index?.weight_map ?? {}))
  for (const s of shards)
    if (!byPath.has(s))
      throw new PullError(`model.safetensors.index.json names ${s}, which the repository lacks`)
  const chosen = [...byPath.values()].filter((e) => WANTED.has(e.path) || shards.has(e.path))
  for (const required of ['config.json', 'tokenizer.json'])
    if (!byPath.has(required)) throw new PullError(`the repository has no ${required}; the engine needs it`)
  if (!byPath.has('model.safetensors') && shards.size === 0) {
    const other = [...byPath.keys()].filter((p) => /\.(bin|pt|pth|gguf)$/.test(p))
    throw new PullError(
      `the repository has no safetensors weights${other.length > 0 ? ` (only ${other.slice(0, 3).join(', ')})` : ''}; the engine loads safetensors only`,
    )
  }
  return chosen
}

/** How a hub file's content is checked: LFS files by sha256, the rest by their git blob id. */
function expectedChecksum(e: ListFileEntry): { algo: 'sha256' | 'git-sha1'; hex: string } {
  if (e.lfs) return { algo: 'sha256', hex: e.lfs.oid }
  if (!e.oid) throw new PullError(`the hub gave no checksum for ${e.path}`)
  return { algo: 'git-sha1', hex: e.oid }
}

async function fileChecksum(file: string, algo: 'sha256' | 'git-sha1'): Promise<string> {
  const hash = createHash(algo === 'sha256' ? 'sha256' : 'sha1')
  if (algo === 'git-sha1') hash.update(`blob ${statSync(file).size}\0`)
  await pipeline(createReadStream(file), hash)
  return hash.digest('hex')
}

/** A path inside `root`, refusing hub paths that would escape it. */
function inside(root: string, path: string): string {
  const full = resolve(root, path)
  if (!full.startsWith(root + sep)) throw new PullError(`refusing the hub path ${JSON.stringify(path)}`)
  return full
}

/**
 * Downloads what the engine needs from `repo` at `revision` into `dir`. A file already there
 * with the right checksum is kept; a `.partial` left by an interrupted pull is resumed with a
 * range request; every file is verified before it takes its final name.
 */
export async function pullModel(opts: PullOptions): Promise<{ dir: string; files: PulledFile[] }> {
  if (!REPO.test(opts.repo))
    throw new PullError(`repository must be ORG/NAME (got ${JSON.stringify(opts.repo)})`)
  const log = opts.log ?? (() => {})
  const dir = resolve(opts.dir ?? join('models', opts.repo.split('/')[1]!))
  const hub = {
    repo: opts.repo,
    revision: opts.revision ?? 'main',
    hubUrl: (opts.endpoint ?? 'https://huggingface.co').replace(/\/+$/, ''),
    accessToken: opts.token || undefined,
  }
  let entries: ListFileEntry[]
  try {
    entries = []
    for await (const e of listFiles({ ...hub, recursive: true })) entries.push(e)
  } catch (e) {
    throw new PullError(`cannot list ${opts.repo}@${hub.revision} on ${hub.hubUrl}: ${(e as Error).message}`)
  }
  mkdirSync(dir, { recursive: true })
  const files: PulledFile[] = []
  // The index decides which shards to fetch, so it comes first.
  const indexEntry = entries.find((e) => e.path === 'model.safetensors.index.json')
  if (indexEntry) files.push(await pullFile(hub, dir, indexEntry, log))
  const index = indexEntry ? JSON.parse(readFileSync(join(dir, indexEntry.path), 'utf8')) : null
  for (const e of selectFiles(entries, index))
    if (e !== indexEntry) files.push(await pullFile(hub, dir, e, log))
  return { dir, files }
}

async function pullFile(
  hub: { repo: string; revision: string; hubUrl: string; accessToken?: string },
  dir: string,
  e: ListFileEntry,
  log: (line: string) => void,
): Promise<PulledFile> {
  const want = expectedChecksum(e)
  const dest = inside(dir, e.path)
  const bytes = e.lfs?.size ?? e.size
  if (
    existsSync(dest) &&
    statSync(dest).size === bytes &&
    (await fileChecksum(dest, want.algo)) === want.hex
  ) {
    log(`${e.path}: present and verified`)
    return { path: e.path, bytes, checksum: want.hex, reused: true, resumedFrom: 0 }
  }
  mkdirSync(dirname(dest), { recursive: true })
  const partial = `${dest}.partial`
  let resumedFrom = existsSync(partial) ? statSync(partial).size : 0
  if (resumedFrom > bytes) {
    rmSync(partial)
    resumedFrom = 0
  }
  if (resumedFrom < bytes) {
    log(`${e.path}: ${resumedFrom > 0 ? `resuming at ${resumedFrom} of` : 'downloading'} ${bytes} bytes`)
    const blob = await downloadFile({ ...hub, path: e.path, xet: false })
    if (!blob) throw new PullError(`${e.path}: listed by the hub but not found for download`)
    try {
      const body = Readable.fromWeb(blob.slice(resumedFrom).stream() as WebReadableStream<Uint8Array>)
      await pipeline(body, createWriteStream(partial, { flags: resumedFrom > 0 ? 'a' : 'w' }))
    } catch (err) {
      const got = existsSync(partial) ? statSync(partial).size : 0
      throw new PullError(
        `${e.path}: download interrupted at ${got} of ${bytes} bytes (${(err as Error).message}); run the same command again to resume`,
      )
    }
  }
  const got = statSync(partial).size
  const sum = await fileChecksum(partial, want.algo)
  if (got !== bytes || sum !== want.hex) {
    // A corrupt file is never resumed from or left where the engine would read it.
    rmSync(partial)
    throw new PullError(
      `${e.path}: checksum mismatch (${want.algo} ${sum} over ${got} bytes, the hub says ${want.hex} over ${bytes}); the partial file was removed, run the command again`,
    )
  }
  renameSync(partial, dest)
  log(`${e.path}: verified (${want.algo} ${want.hex.slice(0, 12)})`)
  return { path: e.path, bytes, checksum: want.hex, reused: false, resumedFrom }
}
