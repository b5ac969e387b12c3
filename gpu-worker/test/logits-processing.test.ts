import { describe, expect, it } from 'vitest'
import { LogitsProcessor } from '../src/engine/logits-processor.ts'
import { Sampler, StepLogprobs } from '../src/engine/sampling.ts'
import { type GenerationParams, Sequence, type TokenConstraint } from '../src/engine/sequence.ts'
import { BYTE_TOKEN_OFFSET, byteLevelTokenizerFiles } from '../src/engine/tiny-tokenizer.ts'
import { ChatTokenizer } from '../src/engine/tokenizer.ts'

// Penalties, logit_bias, min_p and logprobs: each changes (or reports) the distribution the way
// OpenAI's and vLLM's documentation say.

const VOCAB = 6
const EOS = 5

const tokenizer = {
  decode: (ids: readonly number[]) => ids.map((id) => String.fromCharCode(97 + id)).join(''),
  isEos: (id: number) => id === EOS,
}

function sequence(
  params: Partial<GenerationParams>,
  promptIds = [0],
  constraint?: TokenConstraint,
): Sequence {
  return new Sequence({
    id: 's',
    promptIds,
    params: {
      maxTokens: 64,
      temperature: 0,
      topP: 1,
      topK: 0,
      seed: 7,
      stop: [],
      allowedExperts: null,
      ...params,
    },
    tokenizer,
    layers: 1,
    experts: 1,
    maxContext: 1024,
    ...(constraint ? { constraint } : {}),
  })
}

/** Runs a sequence on the same model logits at every step; returns the sampled ids. */
function run(seq: Sequence, logits: number[], steps: number): number[] {
  const ids: number[] = []
  for (let i = 0; i < steps && !seq.finished; i++)
    ids.push(seq.accept(Float32Array.from(logits), i === 0 ? seq.promptIds.length : 1).tokenId)
  return ids
}

function logSoftmax(logits: readonly number[], temperature = 1): number[] {
  const scaled = logits.map((x) => x / temperature)
  const max = Math.max(...scaled)
  const logZ = Math.log(scaled.reduce((a, x) => a + Math.exp(x - max), 0)) + max
  return scaled.map((x) => x - logZ)
}

function frequencies(draw: () => number, draws: number): number[] {
  const counts = new Array<number>(VOCAB).fill(0)
  for (let i = 0; i < draws; i++) counts[draw()]!++
  return counts.map((c) => c / draws)
}

const within = (p: number, draws: number) => 5 * Math.sqrt((p * (1 - p)) / draws) + 1e-3

describe('LogitsProcessor', () => {
  it('asks for nothing at neutral values', () => {
    expect(
      LogitsProcessor.create(
        { presencePenalty: 0, frequencyPenalty: 0, repetitionPenalty: 1, logitBias: {} },
        [1],
      ),
    ).toBeNull()
  })

  it('frequency penalty subtracts once per occurrence, presence penalty once per token', () => {
    const p = new LogitsProcessor({ frequencyPenalty: 0.5, presencePenalty: 0.25 }, [3])
    for (const id of [1, 1, 1, 2]) p.accept(id)
    const logits = Float32Array.from([0, 1, 1, 1, 1, 1])
    p.apply(logits)
    // Prompt tokens (3) are not penalised: OpenAI's penalties count generated tokens only.
    expect(Array.from(logits)).toEqual([0, 1 - 1.5 - 0.25, 1 - 0.5 - 0.25, 1, 1, 1])
  })

  it('repetition penalty divides positive and multiplies negative logits of prompt and output tokens', () => {
    const p = new LogitsProcessor({ repetitionPenalty: 2 }, [0, 1])
    p.accept(2)
    p.accept(2)
    const logits = Float32Array.from([4, -4, 3, 3, -3, 0])
    p.apply(logits)
    expect(Array.from(logits)).toEqual([2, -8, 1.5, 3, -3, 0])
  })

  it('logit_bias adds to the named tokens', () => {
    const p = new LogitsProcessor({ logitBias: { '2': 5, '4': -100 } }, [0])
    const logits = Float32Array.from([1, 1, 1, 1, 1, 1])
    p.apply(logits)
    expect(Array.from(logits)).toEqual([1, 1, 6, 1, -99, 1])
  })

  it('refuses values outside OpenAI and vLLM ranges', () => {
    expect(() => new LogitsProcessor({ frequencyPenalty: 2.5 }, [])).toThrow(/frequencyPenalty/)
    expect(() => new LogitsProcessor({ presencePenalty: -3 }, [])).toThrow(/presencePenalty/)
    expect(() => new LogitsProcessor({ repetitionPenalty: 0 }, [])).toThrow(/repetitionPenalty/)
    expect(() => new LogitsProcessor({ logitBias: { '1': 101 } }, [])).toThrow(/logitBias/)
  })
})

describe('penalties in a sequence', () => {
  const logits = [3, 2.9, 2.8, 0, 0, -10]

  it('greedy decoding repeats the best token without penalties', () => {
    expect(run(sequence({}), logits, 6)).toEqual([0, 0, 0, 0, 0, 0])
  })

  it('frequency penalty moves greedy decoding off a token as it repeats', () => {
    // After k uses a token's logit drops by 0.15 k: 0; then 2.85 < 2.9, so 1; then 2.85 > 2.75, so 0;
    // then 2.7 < 2.75 < 2.8, so 2; then 1 (2.75), then 0 (2.7 against 2.6 and 2.65).
    expect(run(sequence({ frequencyPenalty: 0.15 }), logits, 6)).toEqual([0, 1, 0, 2, 1, 0])
  })

  it('presence penalty applies once: after every candidate was used, the order is the model’s again', () => {
    expect(run(sequence({ presencePenalty: 1 }), logits, 6)).toEqual([0, 1, 2, 0, 0, 0])
  })

  it('repetition penalty covers the prompt too', () => {
    // Token 0 is in the prompt: 3 / 1.2 = 2.5 < 2.9.
    expect(run(sequence({ repetitionPenalty: 1.2 }, [0]), logits, 1)).toEqual([1])
    expect(run(sequence({ repetitionPenalty: 1.2 }, [4]), logits, 1)).toEqual([0])
  })

  it('logit_bias -100 bans a token; a bias shifts a sampled distribution by exp(bias)', () => {
    expect(run(sequence({ logitBias: { '0': -100 } }), logits, 3)).toEqual([1, 1, 1])
    const base = [1, 1, 1, 1, 1, -100]
    const draws = 20_000
    const freq = frequencies(() => {
      const seq = sequence({
        temperature: 1,
        seed: Math.floor(Math.random() * 1e9),
        logitBias: { '3': Math.log(4) },
      })
      return seq.accept(Float32Array.from(base), 1).tokenId
    }, draws)
    // Token 3 weighs 4, the other four 1 each: 4/8 and 1/8.
    expect(Math.abs(freq[3]! - 0.5)).toBeLessThan(within(0.5, draws))
    for (const id of [0, 1, 2, 4]) expect(Math.abs(freq[id]! - 0.125)).toBeLessThan(within(0.125, draws))
  })

  it('a constraint has the last word: a biased token it masks is never sampled', () => {
    const constraint: TokenConstraint = {
      mask: (l) => {
        l[0] = Number.NEGATIVE_INFINITY
      },
      advance: () => {},
    }
    const seq = sequence({ logitBias: { '0': 100 } }, [1], constraint)
    expect(run(seq, logits, 3)).toEqual([1, 1, 1])
  })
})

describe('min_p', () => {
  // Probabilities 8:4:2:1:1 (token 5 at -inf): with min_p 0.2 at temperature 1, tokens below 8 * 0.2 =
  // 1.6 drop out, the rest renormalise to 8/14, 4/14, 2/14.
  const logits = Float32Array.from([Math.log(8), Math.log(4), Math.log(2), 0, 0, Number.NEGATIVE_INFINITY])

  it('drops the tokens below min_p times the best and renormalises the rest', () => {
    const sampler = new Sampler({ temperature: 1, topP: 1, topK: 0, seed: 3, minP: 0.2 })
    const draws = 20_000
    const freq = frequencies(() => sampler.sample(logits.slice()), draws)
    expect(freq[3]).toBe(0)
    expect(freq[4]).toBe(0)
    for (const [id, p] of [
      [0, 8 / 14],
      [1, 4 / 14],
      [2, 2 / 14],
    ] as const)
      expect(Math.abs(freq[id]! - p)).toBeLessThan(within(p, draws))
  })

  it('scales with temperature: at T = 2 the same min_p keeps more tokens', () => {
    // At T = 2 probabilities go as sqrt: 2.83 : 2 : 1.41 : 1 : 1; 0.2 * 2.83 = 0.57 keeps all five.
    const sampler = new Sampler({ temperature: 2, topP: 1, topK: 0, seed: 3, minP: 0.2 })
    const freq = frequencies(() => sampler.sample(logits.slice()), 5000)
    expect(freq[3]).toBeGreaterThan(0)
    expect(() => new Sampler({ temperature: 1, topP: 1, topK: 0, seed: 3, minP: 1.5 })).toThrow(/minP/)
  })
})

describe('logprobs', () => {
  it('are the log-softmax at the sampling temperature, top alternatives best first', () => {
    const logits = [2, 1, 3, 0.5, -1, Number.NEGATIVE_INFINITY]
    const step = new StepLogprobs(Float32Array.from(logits), 0.5, 3)
    const expected = logSoftmax(logits.slice(0, 5), 0.5)
    expect(step.top.map((t) => t.tokenId)).toEqual([2, 0, 1])
    for (const t of step.top) expect(t.logprob).toBeCloseTo(expected[t.tokenId]!, 5)
    expect(step.of(-1)).toBeCloseTo(expected[4]!, 5)
    expect(step.of(Number.NEGATIVE_INFINITY)).toBe(Number.NEGATIVE_INFINITY)
    // Greedy decoding reports the model's own distribution (T = 1).
    const greedy = new StepLogprobs(Float32Array.from(logits), 0, 1)
    expect(greedy.top[0]!.logprob).toBeCloseTo(logSoftmax(logits.slice(0, 5))[2]!, 5)
  })

  it('describe the processed distribution a sequence samples from, EOS excluded', () => {
    const constraint: TokenConstraint = {
      mask: (l) => {
        l[1] = Number.NEGATIVE_INFINITY
      },
      advance: () => {},
    }
    const seq = sequence({ temperature: 1, logprobs: 2, logitBias: { '2': 1 } }, [0], constraint)
    const logits = [2, 5, 1, 0, 0, -50]
    const out = seq.accept(Float32Array.from(logits), 1)
    // Token 1 is masked, token 2 gets +1: the distribution is over [2, -inf, 2, 0, 0, -50].
    const expected = logSoftmax([2, 2, 0, 0, -50])
    const expectedOf = (id: number) => expected[id === 0 ? 0 : id - 1]!
    expect(out.logprobs?.top.map((t) => t.tokenId)).toEqual([0, 2])
    expect(out.logprobs?.top[0]?.logprob).toBeCloseTo(expectedOf(0), 5)
    expect(out.logprobs?.top[1]?.logprob).toBeCloseTo(expectedOf(2), 5)
    expect(out.logprobs?.logprob).toBeCloseTo(expectedOf(out.tokenId), 5)
    expect(out.tokenId).not.toBe(1)
    // An EOS that ends the sequence carries no logprobs entry.
    const eos = sequence({ temperature: 0, logprobs: 1 }).accept(Float32Array.from([0, 0, 0, 0, 0, 9]), 1)
    expect(eos.tokenId).toBe(EOS)
    expect(eos.logprobs).toBeUndefined()
  })

  it('are absent unless asked for', () => {
    expect(sequence({}).accept(Float32Array.from([1, 0, 0, 0, 0, 0]), 1).logprobs).toBeUndefined()
  })
})

describe('token pieces for logprobs', () => {
  it("a byte-level token reports its own bytes, even part of a character's", () => {
    const { tokenizerJson, tokenizerConfig } = byteLevelTokenizerFiles()
    const tok = new ChatTokenizer(tokenizerJson, tokenizerConfig)
    // Byte b is token b + 3: 'A', a space, and the first byte of '€' (e2 82 ac).
    expect(tok.tokenPiece(BYTE_TOKEN_OFFSET + 0x41)).toEqual({ token: 'A', bytes: [0x41] })
    expect(tok.tokenPiece(BYTE_TOKEN_OFFSET + 0x20)).toEqual({ token: ' ', bytes: [0x20] })
    expect(tok.tokenPiece(BYTE_TOKEN_OFFSET + 0xe2)).toEqual({ token: '\uFFFD', bytes: [0xe2] })
    // <s>: decoding skips special tokens, so its piece is empty and a choice's pieces spell its text.
    expect(tok.tokenPiece(1)).toEqual({ token: '', bytes: [] })
  })
})
