import { readFileSync } from 'node:fs'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { MoeEngine, StepRow } from '../src/engine/engine.ts'
import { ensureExported } from '../src/engine/onnx-export.ts'
import { argmax, loadTinyEngine, maxAbsDiff, TINY_MODEL_DIR } from './fixtures.ts'
import { ReferenceModel, referenceGreedy } from './reference-model.ts'

// Correctness of the exported graph on ONNX Runtime, held to a plain
// TypeScript forward pass (test/reference-model.ts).

const PROMPT = [1, 77, 104, 111, 32, 105, 115, 32, 116, 104, 101, 114, 101, 63]

let engine: MoeEngine
let ref: ReferenceModel

beforeAll(async () => {
  engine = await loadTinyEngine(8, 256)
  ref = new ReferenceModel(TINY_MODEL_DIR)
})
afterAll(() => {})

const row = (
  slot: number,
  tokens: number[],
  pastLength = 0,
  allowedExperts: readonly number[] | null = null,
): StepRow => ({
  slot,
  tokens,
  pastLength,
  allowedExperts,
})

describe('MoE engine on ONNX Runtime', () => {
  it('matches the reference forward pass to 1e-4 on a prompt, experts included', async () => {
    const out = await engine.forward([row(0, PROMPT)])
    const want = ref.forward(PROMPT)
    expect(maxAbsDiff(out.logits, want.logits)).toBeLessThan(1e-4)
    const k = engine.config.num_experts_per_tok
    for (let l = 0; l < engine.config.num_hidden_layers; l++)
      for (let pos = 0; pos < PROMPT.length; pos++) {
        const base = (l * PROMPT.length + pos) * k
        const got = Array.from(out.chosenExperts.subarray(base, base + k), Number)
        expect(new Set(got)).toEqual(new Set(want.experts[l]![pos]))
      }
  })

  it('greedy-generates the same whole sequence as the reference', async () => {
    const result = await engine.generate({ inputIds: PROMPT, maxTokens: 32, temperature: 0, seed: 1 })
    const want = referenceGreedy(ref, PROMPT, 32, (id) => engine.tokenizer.isEos(id))
    expect(want.length).toBeGreaterThan(0)
    expect(result.outputIds).toEqual(want)
    expect(result.usage).toEqual({ promptTokens: PROMPT.length, completionTokens: result.outputIds.length })
  })

  it('decoding with the KV cache equals recomputing the whole sequence at every step', async () => {
    const ids = [...PROMPT]
    let out = await engine.forward([row(0, ids)])
    for (let step = 0; step < 12; step++) {
      const next = argmax(out.logits)
      const past = ids.length
      ids.push(next)
      out = await engine.forward([row(0, [next], past)])
      const full = await engine.forward([row(1, ids)]) // fresh slot, no cache
      expect(maxAbsDiff(out.logits, full.logits)).toBeLessThan(1e-4)
    }
  })

  it('gives each row of a mixed-length batch the logits it gets alone', async () => {
    const prompts = [
      PROMPT,
      PROMPT.slice(0, 3),
      [1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214],
    ]
    const alone: Float32Array[] = []
    for (const p of prompts) alone.push((await engine.forward([row(0, p)])).logits.slice())
    // Batched prefill, right-padded rows.
    const batch = await engine.forward(prompts.map((p, i) => row(i, p)))
    const V = engine.config.vocab_size
    prompts.forEach((_, i) => {
      expect(maxAbsDiff(batch.logits.subarray(i * V, (i + 1) * V), alone[i]!)).toBeLessThan(1e-4)
    })
    // Batched decode with different past lengths, against each row decoded alone.
    const next = prompts.map((_, i) => argmax(batch.logits.subarray(i * V, (i + 1) * V)))
    const decoded = await engine.forward(prompts.map((p, i) => row(i, [next[i]!], p.length)))
    for (let i = 0; i < prompts.length; i++) {
      const solo = await engine.forward([row(5, [...prompts[i]!, next[i]!])])
      expect(maxAbsDiff(decoded.logits.subarray(i * V, (i + 1) * V), solo.logits)).toBeLessThan(1e-4)
    }
  })

  it("a short prefill joining the batch leaves a long running sequence's cache intact", async () => {
    const long = Array.from({ length: 100 }, (_, i) => 3 + ((i * 13) % 250))
    const first = await engine.forward([row(0, long)])
    const next = argmax(first.logits)
    // A newcomer with a short prompt: the cache must not shrink to its length.
    await engine.forward([row(1, [1, 5, 6])])
    const decoded = await engine.forward([row(0, [next], long.length), row(1, [7], 3)])
    const fresh = await engine.forward([row(2, [...long, next])])
    const V = engine.config.vocab_size
    expect(maxAbsDiff(decoded.logits.subarray(0, V), fresh.logits)).toBeLessThan(1e-4)
  })

  it('prefills a prompt in chunks on top of its cached start, beside decode rows, as one prefill would', async () => {
    const long = Array.from({ length: 40 }, (_, i) => 3 + ((i * 29) % 250))
    const V = engine.config.vocab_size
    const whole = (await engine.forward([row(3, long)])).logits.slice()
    // Slot 0 decodes while slot 1 takes its prompt in chunks of 16, 16 and 8 (rows of different lengths).
    const first = await engine.forward([row(0, PROMPT), row(1, long.slice(0, 16))])
    let next = argmax(first.logits.subarray(0, V))
    const ids = [...PROMPT, next]
    let out = await engine.forward([row(0, [next], PROMPT.length), row(1, long.slice(16, 32), 16)])
    next = argmax(out.logits.subarray(0, V))
    ids.push(next)
    out = await engine.forward([row(0, [next], PROMPT.length + 1), row(1, long.slice(32), 32)])
    expect(maxAbsDiff(out.logits.subarray(V, 2 * V), whole)).toBeLessThan(1e-4)
    expect(maxAbsDiff(out.logits.subarray(0, V), (await engine.forward([row(4, ids)])).logits)).toBeLessThan(
      1e-4,
    )
    // And the chunked slot's cache holds what a whole prefill would: its next decode agrees.
    const after = await engine.forward([row(1, [7], long.length)])
    expect(maxAbsDiff(after.logits, (await engine.forward([row(5, [...long, 7])])).logits)).toBeLessThan(1e-4)
  })

  it('routes only to the allowed experts and matches the reference with the others removed', async () => {
    const allowed = [2, 5]
    const out = await engine.forward([row(0, PROMPT, 0, allowed)])
    for (const e of out.chosenExperts) expect(allowed).toContain(Number(e))
    expect(maxAbsDiff(out.logits, ref.forward(PROMPT, allowed).logits)).toBeLessThan(1e-4)
    // A batch where only one row is restricted leaves the other row's routing alone.
    const mixed = await engine.forward([row(0, PROMPT, 0, allowed), row(1, PROMPT, 0, null)])
    const V = engine.config.vocab_size
    expect(maxAbsDiff(mixed.logits.subarray(V, 2 * V), ref.forward(PROMPT).logits)).toBeLessThan(1e-4)
  })

  it('is really top-2: exactly k distinct experts per token per layer', async () => {
    const out = await engine.forward([row(0, PROMPT)])
    const k = engine.config.num_experts_per_tok
    expect(k).toBe(2)
    expect(out.chosenExperts.length).toBe(engine.config.num_hidden_layers * PROMPT.length * k)
    for (let i = 0; i < out.chosenExperts.length; i += k) {
      const picks = new Set(Array.from(out.chosenExperts.subarray(i, i + k), Number))
      expect(picks.size).toBe(k)
    }
    // Expert counts per layer add up to k per token.
    const L = engine.config.num_hidden_layers
    const E = engine.config.num_local_experts
    for (let l = 0; l < L; l++) {
      const sum = out.expertCounts.subarray(l * E, (l + 1) * E).reduce((a, b) => a + b, 0)
      expect(sum).toBe(PROMPT.length * k)
    }
  })

  it('samples reproducibly: same seed same output, another seed another output', async () => {
    const params = { inputIds: PROMPT, maxTokens: 24, temperature: 1.2, topP: 0.95, topK: 50 }
    const a = await engine.generate({ ...params, seed: 7 })
    const b = await engine.generate({ ...params, seed: 7 })
    const c = await engine.generate({ ...params, seed: 8 })
    expect(a.outputIds).toEqual(b.outputIds)
    expect(c.outputIds).not.toEqual(a.outputIds)
  })

  it('stops on max tokens with finish_reason length, and reports usage, timings and expert load', async () => {
    const r = await engine.generate({ inputIds: PROMPT, maxTokens: 5, seed: 3 })
    expect(r.finishReason).toBe('length')
    expect(r.outputIds).toHaveLength(5)
    expect(r.timings.timeToFirstTokenMs).toBeGreaterThan(0)
    const routed = r.expertLoad.map((layer) => layer.reduce((a, b) => a + b, 0))
    // Every prompt token and every fed generated token was routed to 2 experts in each layer.
    for (const n of routed) expect(n).toBe((PROMPT.length + 4) * 2)
  })

  it('stops at a stop sequence that spans tokens and leaves it out of the text', async () => {
    const free = await engine.generate({ inputIds: PROMPT, maxTokens: 20, seed: 1 })
    const text = free.text
    // Pick a stop string from the middle of what greedy decoding produces, crossing a token boundary.
    const stop = [...text].slice(4, 6).join('')
    const r = await engine.generate({ inputIds: PROMPT, maxTokens: 20, seed: 1, stop: [stop] })
    expect(r.finishReason).toBe('stop')
    expect(r.text).toBe(text.slice(0, text.indexOf(stop)))
  })

  it('refuses expert subsets that cannot serve top-2 routing', () => {
    expect(() => engine.validateExperts([3])).toThrow(/at least 2/)
    expect(() => engine.validateExperts([1, 9])).toThrow(/does not exist/)
  })
})

describe('the per-expert dispatch of fp32 experts (the default) against the fused MoE op', () => {
  const perExpert = () => engine
  let fused: MoeEngine
  beforeAll(async () => {
    fused = await loadTinyEngine(8, 256, 'fused')
  })
  afterAll(async () => {
    await fused.close()
  })

  it('gives a batch of rows the logits, routing and expert counts of the fused MoE op', async () => {
    const graph = readFileSync(ensureExported(engine.model, 'fp32').modelPath, 'latin1')
    expect(graph).not.toMatch(/\bMoE\b/)
    expect(graph).toContain('NonZero')
    expect(readFileSync(ensureExported(fused.model, 'fp32', undefined, 'fused').modelPath, 'latin1')).toMatch(
      /\bMoE\b/,
    )
    const prompts = [PROMPT, PROMPT.slice(0, 5), [1, 200, 201, 202, 203, 204, 205, 206, 207, 208], [1, 9, 8]]
    const allowed = [null, [2, 5], null, [0, 3, 7]]
    const V = engine.config.vocab_size
    let rows = prompts.map((p, i) => row(i, p, 0, allowed[i]))
    for (let step = 0; step < 4; step++) {
      const want = await fused.forward(rows)
      const got = await perExpert().forward(rows)
      expect(maxAbsDiff(got.logits, want.logits)).toBeLessThan(1e-4)
      expect(got.chosenExperts).toEqual(want.chosenExperts)
      expect(got.expertCounts).toEqual(want.expertCounts)
      // Decode rows next (a batch of 4: the size the dispatch is for).
      rows = rows.map((r, i) =>
        row(
          i,
          [argmax(want.logits.subarray(i * V, (i + 1) * V))],
          r.pastLength + r.tokens.length,
          r.allowedExperts,
        ),
      )
    }
  })

  it('the fused op also routes a restricted row only to its allowed experts, as the reference does', async () => {
    const allowed = [2, 5]
    const out = await fused.forward([row(0, PROMPT, 0, allowed)])
    for (const e of out.chosenExperts) expect(allowed).toContain(Number(e))
    expect(maxAbsDiff(out.logits, ref.forward(PROMPT, allowed).logits)).toBeLessThan(1e-4)
  })
})
