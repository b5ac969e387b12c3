import { SeededRandom } from './random.ts'

export interface SamplingParams {
  /** 0 picks the most likely token (greedy); higher flattens the distribution. */
  temperature: number
  /** Nucleus: sample from the smallest set of most likely tokens whose probability reaches topP (1 = off). */
  topP: number
  /** Sample from the topK most likely tokens only (0 = off). */
  topK: number
  /** A non-negative safe integer; the same seed and logits give the same tokens on any machine. */
  seed: number
  /** Drop tokens less likely than minP times the most likely one, after temperature (0 = off). */
  minP?: number
}

// Scratch space shared by every sampler: sampling is synchronous, so one call never overlaps another.
let weights = new Float64Array(0)
let candidates = new Int32Array(0)
let buckets = new Uint16Array(0)
function scratch(vocab: number): void {
  if (weights.length < vocab) {
    weights = new Float64Array(vocab)
    candidates = new Int32Array(vocab)
    buckets = new Uint16Array(vocab)
  }
}

// Top-p without top-k sorts nothing but the tokens at the edge of the nucleus: tokens are bucketed by
// log-probability (1/32 nat wide, 32 nats deep; the last bucket takes everything less likely).
const BUCKETS = 1024
const BUCKETS_PER_NAT = 32
const bucketMass = new Float64Array(BUCKETS)

/** NaN logits count as impossible tokens. */
const nanToNegInf = (x: number) => (Number.isNaN(x) ? Number.NEGATIVE_INFINITY : x)

/** Index of the largest logit; the lowest index wins ties. */
export function argmax(logits: Float32Array): number {
  let best = -1
  let bestValue = Number.NEGATIVE_INFINITY
  for (let i = 0; i < logits.length; i++) {
    const x = logits[i]!
    if (x > bestValue) {
      bestValue = x
      best = i
    }
  }
  if (best < 0) throw new Error('Every logit is -Infinity or NaN: the model produced no usable distribution')
  return best
}

/** Temperatures below this sample greedily (vLLM's sampling epsilon). */
export const GREEDY_BELOW_TEMPERATURE = 1e-5

/** Picks each next token of one sequence: temperature, then top-k, then top-p, then one seeded draw. */
export class Sampler {
  readonly params: Readonly<SamplingParams>
  readonly #random: SeededRandom

  constructor(params: SamplingParams) {
    const { temperature, topP, topK, seed } = params
    const minP = params.minP ?? 0
    if (!(Number.isFinite(temperature) && temperature >= 0))
      throw new Error(`temperature must be a finite number >= 0 (got ${temperature})`)
    if (!(topP > 0 && topP <= 1)) throw new Error(`topP must be in (0, 1] (got ${topP})`)
    if (!(Number.isInteger(topK) && topK >= 0))
      throw new Error(`topK must be an integer >= 0, 0 meaning off (got ${topK})`)
    if (!(Number.isSafeInteger(seed) && seed >= 0))
      throw new Error(`seed must be an integer from 0 to ${Number.MAX_SAFE_INTEGER} (got ${seed})`)
    if (!(minP >= 0 && minP <= 1)) throw new Error(`minP must be in [0, 1] (got ${minP})`)
    this.params = { temperature, topP, topK, seed, minP }
    this.#random = new SeededRandom(seed)
  }

  sample(logits: Float32Array): number {
    const { temperature, topP, topK } = this.params
    const vocab = logits.length
    if (vocab === 0) throw new Error('Cannot sample from empty logits')
    // A vanishing temperature (5e-324) would make 1/T infinite and every weight NaN: it is greedy.
    if (temperature < GREEDY_BELOW_TEMPERATURE) return argmax(logits)
    // Exactly one draw per sampled token, whatever the filters keep, so the n-th token always uses the
    // n-th draw of the seed's stream.
    const u = this.#random.nextDouble()
    if (topK === 1) return argmax(logits)

    let max = Number.NEGATIVE_INFINITY
    for (let i = 0; i < vocab; i++) if (logits[i]! > max) max = logits[i]!
    if (max === Number.NEGATIVE_INFINITY) return argmax(logits) // throws with the reason
    if (max === Number.POSITIVE_INFINITY) return argmax(logits) // an infinite logit is a certainty

    scratch(vocab)
    const invT = 1 / temperature
    const minP = this.params.minP ?? 0
    // p_i / p_max = exp((x_i - max) / T) < minP: those tokens are out (in place; the sampled one keeps its logit).
    if (minP > 0) {
      const floor = max + Math.log(minP) * temperature
      for (let i = 0; i < vocab; i++) if (logits[i]! < floor) logits[i] = Number.NEGATIVE_INFINITY
    }
    if (topK > 0 && topK < vocab) return this.#sampleSorted(logits, selectTopK(logits, topK), max, invT, u)
    if (topP < 1) return this.#sampleNucleus(logits, max, invT, u)

    // No filter: draw straight from the softmax, in index order.
    let total = 0
    for (let i = 0; i < vocab; i++) {
      const w = Math.exp((nanToNegInf(logits[i]!) - max) * invT)
      weights[i] = w
      total += w
    }
    const target = u * total
    let cumulative = 0
    for (let i = 0; i < vocab; i++) {
      cumulative += weights[i]!
      if (cumulative > target) return i
    }
    return lastPositive(weights, vocab)
  }

  /** Samples among the first `count` ids of `candidates` (sorted best first), after top-p. */
  #sampleSorted(logits: Float32Array, count: number, max: number, invT: number, u: number): number {
    let total = 0
    for (let j = 0; j < count; j++) {
      const w = Math.exp((nanToNegInf(logits[candidates[j]!]!) - max) * invT)
      weights[j] = w
      total += w
    }
    return drawFromSorted(count, total, this.params.topP, u)
  }

  #sampleNucleus(logits: Float32Array, max: number, invT: number, u: number): number {
    const vocab = logits.length
    bucketMass.fill(0)
    let total = 0
    for (let i = 0; i < vocab; i++) {
      const x = nanToNegInf(logits[i]!)
      const w = Math.exp((x - max) * invT)
      const b = Math.min(BUCKETS - 1, Math.floor((max - x) * invT * BUCKETS_PER_NAT))
      weights[i] = w
      buckets[i] = b
      total += w
      bucketMass[b]! += w
    }
    // Buckets are ordered by probability. Every token above the bucket where the running mass reaches
    // topP is in the nucleus, every token below it is out; only that boundary bucket needs sorting.
    const needed = this.params.topP * total
    let boundary = 0
    let above = 0
    while (boundary < BUCKETS - 1 && above + bucketMass[boundary]! < needed) above += bucketMass[boundary++]!
    let count = 0
    for (let i = 0; i < vocab; i++) if (buckets[i] === boundary && weights[i]! > 0) candidates[count++] = i
    const edge = sortBestFirst(logits, count)
    let keep = count
    let kept = above
    for (let j = 0; j < count; j++) {
      kept += weights[edge[j]!]!
      if (kept >= needed) {
        keep = j + 1
        break
      }
    }
    // The draw walks the tokens above the boundary in index order, then the kept edge tokens.
    const target = u * kept
    let cumulative = 0
    let last = -1
    for (let i = 0; i < vocab; i++) {
      if (buckets[i]! >= boundary || weights[i] === 0) continue
      cumulative += weights[i]!
      last = i
      if (cumulative > target) return i
    }
    for (let j = 0; j < keep; j++) {
      cumulative += weights[edge[j]!]!
      last = edge[j]!
      if (cumulative > target) return last
    }
    return last // rounding put the draw a hair past the end
  }
}

/** A token's log-probability. */
export interface TokenLogprobValue {
  tokenId: number
  logprob: number
}

/**
 * Log-probabilities under the distribution a sampler at `temperature` draws from, before its top-k,
 * top-p and min-p truncation: log-softmax of logits / T (T = 1 when greedy, whose distribution is the
 * model's own). Tokens at -Infinity (masked, banned) have logprob -Infinity and are never listed.
 */
export class StepLogprobs {
  readonly #max: number
  readonly #invT: number
  readonly #logZ: number
  /** The `count` most likely tokens, best first (lowest id first among equals). */
  readonly top: TokenLogprobValue[]

  constructor(logits: Float32Array, temperature: number, count: number) {
    const invT = temperature < GREEDY_BELOW_TEMPERATURE ? 1 : 1 / temperature
    let max = Number.NEGATIVE_INFINITY
    for (let i = 0; i < logits.length; i++) if (logits[i]! > max) max = logits[i]!
    let total = 0
    for (let i = 0; i < logits.length; i++) total += Math.exp((nanToNegInf(logits[i]!) - max) * invT)
    this.#max = max
    this.#invT = invT
    this.#logZ = Math.log(total)
    // Insertion into a short sorted list: most tokens cost one comparison with its worst entry.
    const ids: number[] = []
    for (let i = 0; i < logits.length && count > 0; i++) {
      const x = nanToNegInf(logits[i]!)
      if (x === Number.NEGATIVE_INFINITY) continue
      if (ids.length === count && x <= logits[ids[count - 1]!]!) continue
      let j = Math.min(ids.length, count - 1)
      ids[j] = i
      while (j > 0 && logits[ids[j - 1]!]! < x) {
        ids[j] = ids[j - 1]!
        ids[j - 1] = i
        j--
      }
    }
    this.top = ids.map((tokenId) => ({ tokenId, logprob: this.of(logits[tokenId]!) }))
  }

  /** The log-probability of a token whose (processed) logit is `logit`. */
  of(logit: number): number {
    const x = nanToNegInf(logit)
    if (x === Number.NEGATIVE_INFINITY) return Number.NEGATIVE_INFINITY
    return (x - this.#max) * this.#invT - this.#logZ
  }
}

/** Sorts candidates[0, count) by logit, best first, lowest index first among equals. */
function sortBestFirst(logits: Float32Array, count: number): Int32Array {
  const view = candidates.subarray(0, count)
  view.sort((a, b) => nanToNegInf(logits[b]!) - nanToNegInf(logits[a]!) || a - b)
  return view
}

/**
 * Draws from candidates[0, count) whose weights (by rank) are weights[0, count); top-p keeps the
 * smallest prefix whose share of `total` reaches topP, and at least one token.
 */
function drawFromSorted(count: number, total: number, topP: number, u: number): number {
  let keep = count
  let kept = total
  if (topP < 1) {
    const needed = topP * total
    let cumulative = 0
    for (let j = 0; j < count; j++) {
      cumulative += weights[j]!
      if (cumulative >= needed) {
        keep = j + 1
        kept = cumulative
        break
      }
    }
    // Rounding can leave the sum a hair short of `needed`: then keep every candidate.
    if (keep === count) kept = cumulative
  }
  const target = u * kept
  let cumulative = 0
  for (let j = 0; j < keep; j++) {
    cumulative += weights[j]!
    if (cumulative > target) return candidates[j]!
  }
  return candidates[lastPositive(weights, keep)]!
}

/** The last index with positive weight: the answer when rounding puts the draw past the cumulative sum. */
function lastPositive(w: Float64Array, count: number): number {
  for (let j = count - 1; j > 0; j--) if (w[j]! > 0) return j
  return 0
}

/**
 * Fills candidates[0, k) with the k largest logits, sorted best first, in O(V log k) with a min-heap
 * whose root is the worst kept token, so most of the vocabulary costs one comparison.
 */
function selectTopK(logits: Float32Array, k: number): number {
  const heap = candidates
  // a is worse than b: smaller logit, or equal logit and larger index.
  const worse = (a: number, b: number) => {
    const x = nanToNegInf(logits[a]!)
    const y = nanToNegInf(logits[b]!)
    return x < y || (x === y && a > b)
  }
  const siftDown = (start: number, size: number) => {
    let i = start
    for (;;) {
      const left = 2 * i + 1
      if (left >= size) return
      const right = left + 1
      const child = right < size && worse(heap[right]!, heap[left]!) ? right : left
      if (!worse(heap[child]!, heap[i]!)) return
      const tmp = heap[i]!
      heap[i] = heap[child]!
      heap[child] = tmp
      i = child
    }
  }
  for (let i = 0; i < k; i++) heap[i] = i
  for (let i = (k >> 1) - 1; i >= 0; i--) siftDown(i, k)
  // A later token with a logit equal to the root's is worse (larger index), so strictly greater is the test.
  let rootValue = nanToNegInf(logits[heap[0]!]!)
  for (let i = k; i < logits.length; i++) {
    const x = logits[i]!
    if (x > rootValue) {
      heap[0] = i
      siftDown(0, k)
      rootValue = nanToNegInf(logits[heap[0]!]!)
    }
  }
  sortBestFirst(logits, k)
  return k
}
