// Task routing by similarity over hashed character n-grams: the semantic-router idea
// (routes described by example utterances, nearest route wins, a threshold falls back)
// with a feature-hashing "embedding" instead of a neural one, so it runs in microseconds.

/** Feature-hash buckets (a power of two). */
export const DIM = 1 << 14
const MASK = DIM - 1
const NGRAM_SIZES = [3, 4] as const
/** Long prompts: the instruction is almost always at the start or the end, so look there. */
export const HEAD_CHARS = 768
export const TAIL_CHARS = 512

export interface RouteDef {
  task: string
  utterances: readonly string[]
}

interface SparseVec {
  idx: Uint32Array
  val: Float32Array
}

export interface CompiledRoute {
  task: string
  utterances: SparseVec[]
}

export interface CompiledRouter {
  routes: CompiledRoute[]
  /** Inverse document frequency per bucket, over routes; unseen buckets keep a neutral weight. */
  idf: Float32Array
}

export interface TaskScore {
  task: string
  score: number
}

export interface Classification {
  /** Best route, or null when the best score is under the threshold. */
  task: string | null
  best: TaskScore
  scores: TaskScore[]
}

/** Lower-case, collapse whitespace, and keep the instruction-bearing head and tail of long text. */
export function normalise(text: string): string {
  let t = text
  if (t.length > HEAD_CHARS + TAIL_CHARS) t = `${t.slice(0, HEAD_CHARS)} ${t.slice(-TAIL_CHARS)}`
  return ` ${t.toLowerCase().replace(/\s+/g, ' ').trim()} `
}

// N-grams are taken over the UTF-8 bytes (TextEncoder.encodeInto, then typed-array reads), not
// charCodeAt: once any code in the isolate subclasses String (ioredis does: VerbatimString),
// V8 drops a fast path and charCodeAt loops run about 5x slower.
const encoder = new TextEncoder()
let bytes = new Uint8Array(4 * (HEAD_CHARS + TAIL_CHARS) + 16)

/** Counts hashed n-grams of `text` into `counts`, recording touched buckets; returns how many were new. */
function countGrams(text: string, counts: Float32Array, touched: Uint32Array): number {
  if (bytes.length < text.length * 3) bytes = new Uint8Array(text.length * 3)
  const len = encoder.encodeInto(text, bytes).written
  let nTouched = 0
  for (const n of NGRAM_SIZES) {
    // FNV-1a over the n bytes; seeded by n so 3- and 4-grams do not collide systematically.
    for (let i = 0; i + n <= len; i++) {
      let h = (2166136261 ^ n) >>> 0
      for (let j = 0; j < n; j++) {
        h ^= bytes[i + j]!
        h = Math.imul(h, 16777619)
      }
      const b = (h >>> 0) & MASK
      if (counts[b] === 0) touched[nTouched++] = b
      counts[b]! += 1
    }
  }
  return nTouched
}

const scratchCounts = new Float32Array(DIM)
const scratchTouched = new Uint32Array(DIM)

function sparseOf(text: string, idf: Float32Array | null): SparseVec {
  const n = countGrams(normalise(text), scratchCounts, scratchTouched)
  const idx = new Uint32Array(n)
  const val = new Float32Array(n)
  let norm = 0
  for (let k = 0; k < n; k++) {
    const b = scratchTouched[k]!
    const w = (1 + Math.log(scratchCounts[b]!)) * (idf ? idf[b]! : 1)
    idx[k] = b
    val[k] = w
    norm += w * w
    scratchCounts[b] = 0
  }
  const inv = norm > 0 ? 1 / Math.sqrt(norm) : 0
  for (let k = 0; k < n; k++) val[k]! *= inv
  return { idx, val }
}

/** Builds the router: IDF over routes (a bucket found in every route says little), then unit vectors. */
export function compileRoutes(defs: readonly RouteDef[]): CompiledRouter {
  const byTask = new Map<string, string[]>()
  for (const d of defs) {
    const list = byTask.get(d.task) ?? []
    list.push(...d.utterances)
    byTask.set(d.task, list)
  }
  const df = new Float32Array(DIM)
  for (const utterances of byTask.values()) {
    const seen = new Set<number>()
    for (const u of utterances) for (const b of sparseOf(u, null).idx) seen.add(b)
    for (const b of seen) df[b]! += 1
  }
  const r = byTask.size
  const idf = new Float32Array(DIM)
  // Buckets no route uses get the weight of a bucket in half the routes: they dilute, not dominate.
  const unseen = Math.log((r + 1) / (r / 2 + 0.5))
  for (let b = 0; b < DIM; b++) idf[b] = df[b]! > 0 ? Math.log((r + 1) / (df[b]! + 0.5)) : unseen
  const routes: CompiledRoute[] = []
  for (const [task, utterances] of byTask)
    routes.push({ task, utterances: utterances.map((u) => sparseOf(u, idf)) })
  return { routes, idf }
}

const query = new Float32Array(DIM)
const queryTouched = new Uint32Array(DIM)

/**
 * Scores `text` against every route: a route's score is the mean of its two nearest utterances'
 * cosine similarities (one lucky utterance is not enough). The best route wins if it clears
 * `threshold`.
 */
export function classify(router: CompiledRouter, text: string, threshold: number): Classification {
  const n = countGrams(normalise(text), query, queryTouched)
  let norm = 0
  for (let k = 0; k < n; k++) {
    const b = queryTouched[k]!
    const w = (1 + Math.log(query[b]!)) * router.idf[b]!
    query[b] = w
    norm += w * w
  }
  const inv = norm > 0 ? 1 / Math.sqrt(norm) : 0
  const scores: TaskScore[] = []
  for (const route of router.routes) {
    let top1 = 0
    let top2 = 0
    for (const u of route.utterances) {
      let dot = 0
      const { idx, val } = u
      for (let k = 0; k < idx.length; k++) dot += val[k]! * query[idx[k]!]!
      if (dot > top1) {
        top2 = top1
        top1 = dot
      } else if (dot > top2) top2 = dot
    }
    const score = route.utterances.length > 1 ? (top1 + top2) / 2 : top1
    scores.push({ task: route.task, score: Math.round(score * inv * 1e4) / 1e4 })
  }
  for (let k = 0; k < n; k++) query[queryTouched[k]!] = 0
  scores.sort((a, b) => b.score - a.score)
  const best = scores[0] ?? { task: 'chat', score: 0 }
  return { task: best.score >= threshold ? best.task : null, best, scores }
}
