import { describe, expect, it } from 'vitest'
import { StopMatcher } from '../src/engine/detokenizer.ts'
import { SeededRandom, splitmix64 } from '../src/engine/random.ts'
import { argmax, Sampler, type SamplingParams } from '../src/engine/sampling.ts'

const params = (p: Partial<SamplingParams> = {}): SamplingParams => ({
  temperature: 1,
  topP: 1,
  topK: 0,
  seed: 42,
  ...p,
})

function softmax(logits: ArrayLike<number>, temperature = 1): number[] {
  const max = Math.max(...Array.from(logits))
  const w = Array.from(logits, (x) => Math.exp((x - max) / temperature))
  const total = w.reduce((a, b) => a + b, 0)
  return w.map((x) => x / total)
}

function frequencies(sampler: Sampler, logits: Float32Array, draws: number): number[] {
  const counts = new Array<number>(logits.length).fill(0)
  for (let i = 0; i < draws; i++) counts[sampler.sample(logits)]!++
  return counts.map((c) => c / draws)
}

/** Five standard deviations of a frequency estimated from `draws` samples, plus a little slack. */
const within = (p: number, draws: number) => 5 * Math.sqrt((p * (1 - p)) / draws) + 1e-3

/** Logits that differ from run to run of the test only by the seed given. */
function randomLogits(vocab: number, seed: number, scale = 3): Float32Array {
  const random = new SeededRandom(seed)
  return Float32Array.from({ length: vocab }, () => (random.nextDouble() - 0.5) * 2 * scale)
}

describe('SeededRandom', () => {
  it('follows the published splitmix64 and xoshiro128** sequences', () => {
    expect(splitmix64(0n).value).toBe(0xe220a8397b1dcdafn)
    const random = new SeededRandom([1, 2, 3, 4])
    expect([random.nextUint32(), random.nextUint32(), random.nextUint32(), random.nextUint32()]).toEqual([
      11520, 0, 5927040, 70819200,
    ])
  })

  it('draws doubles in [0, 1)', () => {
    const random = new SeededRandom(7)
    for (let i = 0; i < 10_000; i++) {
      const u = random.nextDouble()
      expect(u >= 0 && u < 1).toBe(true)
    }
  })
})

describe('Sampler', () => {
  const logits = Float32Array.from([0.5, 2.0, -1.0, 2.0, 1.5, Number.NaN, -3, 0])

  it('is greedy at temperature 0: argmax, lowest index on ties, NaN ignored', () => {
    const sampler = new Sampler(params({ temperature: 0 }))
    expect(sampler.sample(logits)).toBe(1)
    expect(sampler.sample(Float32Array.from([Number.NaN, -1, 5, 5]))).toBe(2)
    expect(() => argmax(Float32Array.from([Number.NaN, Number.NEGATIVE_INFINITY]))).toThrow(/no usable/)
  })

  it('is greedy at a vanishing temperature instead of returning token 0 from NaN weights', () => {
    const peaked = Float32Array.from([0.1, 0.3, 9, 0.2, Number.NaN])
    for (const temperature of [5e-324, 1e-300, 1e-6]) {
      const sampler = new Sampler(params({ temperature, topP: 0.9, topK: 3, seed: 3 }))
      for (let i = 0; i < 20; i++) expect(sampler.sample(peaked)).toBe(2)
      const plain = new Sampler(params({ temperature, topP: 1, topK: 0, seed: 3 }))
      expect(plain.sample(peaked)).toBe(2)
    }
    // Just above the threshold the filters still run and stay finite.
    expect(new Sampler(params({ temperature: 2e-5, seed: 1 })).sample(peaked)).toBe(2)
  })

  it('repeats itself for a seed over 200 draws, and differs for another seed', () => {
    const big = randomLogits(500, 1)
    const run = (seed: number) => {
      const sampler = new Sampler(params({ seed, temperature: 0.8, topP: 0.95, topK: 100 }))
      return Array.from({ length: 200 }, () => sampler.sample(big))
    }
    expect(run(123)).toEqual(run(123))
    expect(run(124)).not.toEqual(run(123))
    expect(new Set(run(123)).size).toBeGreaterThan(20) // really sampling, not stuck on one token
  })

  it('equals greedy with top-k 1 at any temperature', () => {
    const big = randomLogits(32_000, 2)
    const best = argmax(big)
    for (const temperature of [0.1, 1, 2, 50]) {
      const sampler = new Sampler(params({ temperature, topK: 1, seed: temperature * 10 }))
      for (let i = 0; i < 20; i++) expect(sampler.sample(big)).toBe(best)
    }
  })

  it('keeps only the best token with a tiny top-p, with or without top-k', () => {
    const big = randomLogits(32_000, 3)
    const best = argmax(big)
    for (const topK of [0, 40]) {
      const sampler = new Sampler(params({ temperature: 2, topP: 1e-9, topK }))
      for (let i = 0; i < 50; i++) expect(sampler.sample(big)).toBe(best)
    }
  })

  it('matches softmax over 20,000 draws at temperature 1, and softmax(l/T) at other temperatures', () => {
    for (const temperature of [1, 0.5, 2]) {
      const expected = softmax(
        Array.from(logits, (x) => (Number.isNaN(x) ? Number.NEGATIVE_INFINITY : x)),
        temperature,
      )
      const observed = frequencies(new Sampler(params({ temperature, seed: 9 })), logits, 20_000)
      for (let i = 0; i < logits.length; i++)
        expect(Math.abs(observed[i]! - expected[i]!)).toBeLessThan(0.012)
      expect(observed[5]).toBe(0) // NaN logit is never drawn
    }
  })

  it('keeps the lowest ids among tokens tied at the top-k edge', () => {
    const tied = Float32Array.from([1, 3, 3, 3, 0, 3])
    const observed = frequencies(new Sampler(params({ topK: 2, seed: 8 })), tied, 2_000)
    expect(observed[1]! + observed[2]!).toBe(1)
    expect(Math.abs(observed[1]! - 0.5)).toBeLessThan(within(0.5, 2_000))
  })

  it('renormalises over the top-k tokens', () => {
    const observed = frequencies(new Sampler(params({ topK: 3, seed: 5 })), logits, 20_000)
    const top = [1, 3, 4]
    const expected = softmax(top.map((i) => logits[i]!))
    top.forEach((id, j) => {
      expect(Math.abs(observed[id]! - expected[j]!)).toBeLessThan(within(expected[j]!, 20_000))
    })
    expect(observed.filter((_, i) => !top.includes(i)).every((f) => f === 0)).toBe(true)
  })

  it('draws from exactly the nucleus a full sort finds, in proportion', () => {
    const vocab = 300
    for (const [topP, temperature, ties] of [
      [0.9, 1, false],
      [0.5, 0.7, false],
      [0.99, 3, false],
      // Logits in steps of 0.5: many ties, so the nucleus edge cuts through a run of equal tokens,
      // keeping the lowest ids.
      [0.8, 1, true],
      [0.3, 1, true],
    ] as const) {
      const big = randomLogits(vocab, 11, 4).map((x) => (ties ? Math.round(x * 2) / 2 : x))
      const probs = softmax(big, temperature)
      const order = probs.map((p, i) => [p, i] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1])
      const nucleus: number[] = []
      let mass = 0
      for (const [p, i] of order) {
        nucleus.push(i)
        mass += p
        if (mass >= topP) break
      }
      const draws = 20_000
      const observed = frequencies(new Sampler(params({ topP, temperature, seed: 3 })), big, draws)
      const drawn = observed.flatMap((f, i) => (f > 0 ? [i] : []))
      expect(drawn).toEqual([...nucleus].sort((a, b) => a - b))
      for (const i of nucleus)
        expect(Math.abs(observed[i]! - probs[i]! / mass)).toBeLessThan(within(probs[i]! / mass, draws))
    }
  })

  it('rejects parameters it cannot honour, saying which', () => {
    expect(() => new Sampler(params({ topP: 0 }))).toThrow(/topP/)
    expect(() => new Sampler(params({ topK: 1.5 }))).toThrow(/topK/)
    expect(() => new Sampler(params({ temperature: -1 }))).toThrow(/temperature/)
    expect(() => new Sampler(params({ seed: 2 ** 60 }))).toThrow(/seed/)
  })
})

describe('StopMatcher', () => {
  function run(stops: string[], deltas: string[]) {
    const matcher = new StopMatcher(stops)
    const emitted: string[] = []
    let stopped = false
    for (const delta of deltas) {
      const out = matcher.push(delta)
      emitted.push(out.emit)
      stopped = out.stopped
      if (stopped) break
    }
    return { emitted, stopped, rest: stopped ? '' : matcher.flush() }
  }

  it('finds a stop string spanning deltas and emits only the text before it', () => {
    const { emitted, stopped } = run(['o w'], ['Hel', 'lo wor', 'ld'])
    expect(emitted.join('')).toBe('Hell')
    expect(stopped).toBe(true)
  })

  it('withholds a possible stop prefix, then releases it when the text goes elsewhere', () => {
    const matcher = new StopMatcher(['###'])
    expect(matcher.push('a#')).toEqual({ emit: 'a', stopped: false })
    expect(matcher.push('#')).toEqual({ emit: '', stopped: false })
    expect(matcher.push('b')).toEqual({ emit: '##b', stopped: false })
    expect(matcher.push('##')).toEqual({ emit: '', stopped: false })
    expect(matcher.flush()).toBe('##')
  })

  it('stops at whichever of several stop strings comes first', () => {
    expect(run(['END', 'x\n'], ['abc x', '\nEND'])).toEqual({
      emitted: ['abc ', 'abc '.slice(4)],
      stopped: true,
      rest: '',
    })
    expect(run(['\n\n', 'User:'], ['Sure.', '\nUs', 'er: hi'])).toEqual({
      emitted: ['Sure.', '\n', ''], // "\n" is released once "Us" is the longer candidate prefix
      stopped: true,
      rest: '',
    })
    // A stop inside a single delta.
    expect(run(['</answer>', 'STOP'], ['42 STOP now'])).toEqual({ emitted: ['42 '], stopped: true, rest: '' })
  })

  it('holds the longest prefix when stops overlap, and emits nothing after stopping', () => {
    const matcher = new StopMatcher(['abcd', 'bcx'])
    expect(matcher.push('zabc')).toEqual({ emit: 'z', stopped: false })
    expect(matcher.push('x')).toEqual({ emit: 'a', stopped: true })
    expect(matcher.push('more')).toEqual({ emit: '', stopped: true })
  })

  it('passes text straight through without stop strings', () => {
    expect(run([], ['a', 'b'])).toEqual({ emitted: ['a', 'b'], stopped: false, rest: '' })
  })
})
