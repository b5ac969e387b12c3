// Seeded random numbers that give the same draws on every machine, for sampling and test models.

const MASK64 = (1n << 64n) - 1n

/** splitmix64: turns one 64-bit seed into well-mixed 64-bit words (used to fill a generator's state). */
export function splitmix64(state: bigint): { value: bigint; next: bigint } {
  const next = (state + 0x9e3779b97f4a7c15n) & MASK64
  let z = next
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64
  return { value: z ^ (z >> 31n), next }
}

const rotl = (x: number, k: number) => (x << k) | (x >>> (32 - k))

/**
 * xoshiro128** (Blackman and Vigna): small, fast in 32-bit integer arithmetic, and specified exactly, so a
 * seed gives the same draws on every machine. The state is filled from the seed by splitmix64, as its
 * authors recommend.
 */
export class SeededRandom {
  #s0: number
  #s1: number
  #s2: number
  #s3: number

  /** From a seed, or (for reference test vectors) from the four state words themselves. */
  constructor(seed: number | bigint | readonly [number, number, number, number]) {
    let words: readonly number[]
    if (typeof seed === 'number' || typeof seed === 'bigint') {
      const first = splitmix64(BigInt.asUintN(64, BigInt(seed)))
      const second = splitmix64(first.next)
      words = [first.value, first.value >> 32n, second.value, second.value >> 32n].map((w) =>
        Number(w & 0xffffffffn),
      )
    } else {
      words = seed
    }
    this.#s0 = words[0]! | 0
    this.#s1 = words[1]! | 0
    this.#s2 = words[2]! | 0
    this.#s3 = words[3]! | 0
    if ((this.#s0 | this.#s1 | this.#s2 | this.#s3) === 0)
      throw new Error('xoshiro128** state must not be all zero')
  }

  nextUint32(): number {
    const s1 = this.#s1
    const result = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0
    const t = s1 << 9
    this.#s2 ^= this.#s0
    this.#s3 ^= this.#s1
    this.#s1 ^= this.#s2
    this.#s0 ^= this.#s3
    this.#s2 ^= t
    this.#s3 = rotl(this.#s3, 11)
    return result
  }

  /** A uniform double in [0, 1) with 53 random bits. */
  nextDouble(): number {
    const high = this.nextUint32() >>> 5 // 27 bits
    const low = this.nextUint32() >>> 6 // 26 bits
    return (high * 67108864 + low) / 9007199254740992
  }
}
