import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, mkdtempSync, readdirSync, readFileSync, statSync } from 'node:fs'
import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { pullModel } from '../src/hub/pull.ts'
import { TINY_MODEL_DIR } from './fixtures.ts'

// A loopback stand-in for the Hugging Face hub's download API (tree listing, resolve with
// Range), serving the tiny model as an LFS-style repository, with faults switched on per test.

const MOE_BIN = join(import.meta.dirname, '..', 'bin', 'moe.js')
const REPO = 'test-org/tiny-mixtral'
const LFS = new Set(['model.safetensors'])
const files = new Map<string, Buffer>()
for (const name of readdirSync(TINY_MODEL_DIR)) {
  if (statSync(join(TINY_MODEL_DIR, name)).isFile()) files.set(name, readFileSync(join(TINY_MODEL_DIR, name)))
}
files.set('README.md', Buffer.from('# tiny\n'))
files.set('pytorch_model.bin', Buffer.from('not wanted'))

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex')
const gitSha1 = (b: Buffer) => createHash('sha1').update(`blob ${b.length}\0`).update(b).digest('hex')

const faults = { cutAfter: 0, corrupt: '', requireToken: '' }
const ranges: string[] = []
let server: Server
let endpoint = ''

beforeAll(async () => {
  server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x')
    if (faults.requireToken && req.headers.authorization !== `Bearer ${faults.requireToken}`) {
      res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":"Invalid credentials"}')
      return
    }
    if (url.pathname === `/api/models/${REPO}/tree/main`) {
      const tree = [...files].map(([path, b]) => ({
        type: 'file',
        path,
        size: b.length,
        oid: gitSha1(b),
        ...(LFS.has(path) && { lfs: { oid: sha256(b), size: b.length, pointerSize: 130 } }),
      }))
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(tree))
      return
    }
    const m = new RegExp(`^/${REPO}/resolve/main/(.+)$`).exec(url.pathname)
    const body = m ? files.get(decodeURIComponent(m[1]!)) : undefined
    if (!m || !body) {
      res.writeHead(404, { 'X-Error-Code': 'EntryNotFound' }).end()
      return
    }
    const name = decodeURIComponent(m[1]!)
    let data = body
    if (faults.corrupt === name) data = Buffer.from(body).fill(7, 100, 200)
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '')
    const start = range ? Number(range[1]) : 0
    const end = range?.[2] ? Number(range[2]) : data.length - 1
    if (range && end > 0) ranges.push(`${name}:${start}`)
    const part = data.subarray(start, end + 1)
    res.writeHead(range ? 206 : 200, {
      ETag: `"${gitSha1(body)}"`,
      'content-type': 'application/octet-stream',
      'content-length': part.length,
      ...(range && { 'content-range': `bytes ${start}-${end}/${data.length}` }),
    })
    if (faults.cutAfter > 0 && name === 'model.safetensors' && part.length > faults.cutAfter) {
      // Send part of the body, then drop the connection: an interrupted download.
      res.write(part.subarray(0, faults.cutAfter), () => res.destroy())
      return
    }
    res.end(part)
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
})
afterAll(() => new Promise<void>((r) => server.close(() => r())))
beforeEach(() => {
  Object.assign(faults, { cutAfter: 0, corrupt: '', requireToken: '' })
  ranges.length = 0
})

const freshDir = () => join(mkdtempSync(join(tmpdir(), 'moe-pull-')), 'model')

describe('moe pull from a hub', () => {
  it('downloads only the files the engine reads, verified byte for byte', async () => {
    const dir = freshDir()
    const r = await pullModel({ repo: REPO, dir, endpoint })
    expect(r.files.map((f) => f.path).sort()).toEqual(
      [
        'config.json',
        'generation_config.json',
        'model.safetensors',
        'tokenizer.json',
        'tokenizer_config.json',
      ].sort(),
    )
    expect(readdirSync(dir).sort()).toEqual(r.files.map((f) => f.path).sort())
    for (const f of r.files) expect(readFileSync(join(dir, f.path)).equals(files.get(f.path)!)).toBe(true)
    // A second pull verifies what is there and downloads nothing.
    const again = await pullModel({ repo: REPO, dir, endpoint })
    expect(again.files.every((f) => f.reused)).toBe(true)
  })

  it('resumes an interrupted download with a range request', async () => {
    const dir = freshDir()
    faults.cutAfter = 20_000
    await expect(pullModel({ repo: REPO, dir, endpoint })).rejects.toThrow(/interrupted at \d+ of \d+ bytes/)
    const partial = statSync(join(dir, 'model.safetensors.partial')).size
    expect(partial).toBeGreaterThan(0)
    expect(existsSync(join(dir, 'model.safetensors'))).toBe(false)
    faults.cutAfter = 0
    ranges.length = 0
    const r = await pullModel({ repo: REPO, dir, endpoint })
    const weights = r.files.find((f) => f.path === 'model.safetensors')!
    expect(weights.resumedFrom).toBe(partial)
    expect(ranges).toContain(`model.safetensors:${partial}`)
    expect(readFileSync(join(dir, 'model.safetensors')).equals(files.get('model.safetensors')!)).toBe(true)
  })

  it('refuses a corrupted file, leaves nothing under its name, and recovers on the next pull', async () => {
    const dir = freshDir()
    faults.corrupt = 'model.safetensors'
    await expect(pullModel({ repo: REPO, dir, endpoint })).rejects.toThrow(
      /model.safetensors: checksum mismatch/,
    )
    expect(existsSync(join(dir, 'model.safetensors'))).toBe(false)
    expect(existsSync(join(dir, 'model.safetensors.partial'))).toBe(false)
    faults.corrupt = ''
    await pullModel({ repo: REPO, dir, endpoint })
    expect(readFileSync(join(dir, 'model.safetensors')).equals(files.get('model.safetensors')!)).toBe(true)
  })

  it('runs as `moe pull` with HF_ENDPOINT and HF_TOKEN, and exits 1 with a message on a refusal', async () => {
    faults.requireToken = 'hf_testtoken123'
    const run = (env: Record<string, string>, dir: string) =>
      new Promise<{ code: number | null; out: string; err: string }>((done) => {
        const child = spawn(process.execPath, [MOE_BIN, 'pull', REPO, '--dir', dir], {
          env: { ...process.env, HF_ENDPOINT: endpoint, ...env },
        })
        let out = ''
        let err = ''
        child.stdout.on('data', (d) => (out += d))
        child.stderr.on('data', (d) => (err += d))
        child.on('close', (code) => done({ code, out, err }))
      })
    const dir = freshDir()
    const denied = await run({ HF_TOKEN: '' }, dir)
    expect(denied.code).toBe(1)
    expect(denied.err).toMatch(/moe pull: cannot list test-org\/tiny-mixtral@main/)
    const ok = await run({ HF_TOKEN: 'hf_testtoken123' }, dir)
    expect(ok.code).toBe(0)
    expect(ok.out).toContain('every checksum verified')
    expect(existsSync(join(dir, 'config.json'))).toBe(true)
  })

  it('rejects a malformed repository name before any request', async () => {
    await expect(pullModel({ repo: '../etc', endpoint })).rejects.toThrow(/ORG\/NAME/)
  })
})
