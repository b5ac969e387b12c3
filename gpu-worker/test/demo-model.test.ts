import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { MoeEngine } from '../src/engine/engine.ts'
import { evaluateText } from '../src/engine/evaluate.ts'
import { DEMO_MODEL_DIR } from './fixtures.ts'

// The committed demo model (trained by tools/train-demo-model): it loads, the engine's forward
// pass gives the held-out bits per byte the training run recorded, and it answers in text.

const TOOL_DIR = join(import.meta.dirname, '..', '..', 'tools', 'train-demo-model')
const results = JSON.parse(readFileSync(join(TOOL_DIR, 'results.json'), 'utf8')) as {
  bits_per_byte: Record<string, number>
  expert_subsets: { code: number[]; bits_per_byte_restricted: { code: Record<string, number> } }
}

let engine: MoeEngine
beforeAll(async () => {
  engine = await MoeEngine.load({
    modelDir: DEMO_MODEL_DIR,
    ep: 'cpu',
    maxBatch: 16,
    maxContext: 256,
    log: () => {},
  })
})
afterAll(async () => {
  await engine?.close()
})

describe('the demo model', () => {
  it('loads as a top-2 Mixtral of 8 experts with a chat template', () => {
    expect(engine.config).toMatchObject({
      model_type: 'mixtral',
      num_local_experts: 8,
      num_experts_per_tok: 2,
    })
    expect(engine.tokenizer.hasChatTemplate).toBe(true)
  })

  // A fixed slice of each of two held-out domains, scored as the training run scored them
  // (windows of 255 tokens after <s>): the engine must agree with the recorded figure to 2%. Each
// scores a few thousand tokens, which takes seconds on a busy 2-core machine.
  for (const domain of ['code', 'extraction']) {
    it(`gives the recorded held-out bits per byte on ${domain} (within 2%)`, async () => {
      const text = readFileSync(join(TOOL_DIR, 'heldout', `${domain}.txt`), 'utf8')
      const r = await evaluateText(engine, text, { window: 255 })
      expect(r.bits_per_byte).toBeGreaterThan(0)
      expect(Math.abs(r.bits_per_byte / results.bits_per_byte[domain]! - 1)).toBeLessThan(0.02)
    }, 60_000)
  }

  it('costs what was recorded when a pool restricts it to the code experts', async () => {
    const text = readFileSync(join(TOOL_DIR, 'heldout', 'arithmetic.txt'), 'utf8')
    const r = await evaluateText(engine, text, { window: 255, allowedExperts: results.expert_subsets.code })
    const recorded = results.expert_subsets.bits_per_byte_restricted.code.arithmetic!
    expect(Math.abs(r.bits_per_byte / recorded - 1)).toBeLessThan(0.02)
  }, 60_000)

  it('answers a fixed seeded chat prompt with a fixed completion, in text', async () => {
    const inputIds = engine.tokenizer.encodeChat([{ role: 'user', content: 'Who are you?' }])
    const r = await engine.generate({ inputIds, maxTokens: 96, temperature: 0.7, topP: 0.95, seed: 7 })
    expect(r.text).toMatch(/^[\x20-\x7e\n]+$/)
    const again = await engine.generate({ inputIds, maxTokens: 96, temperature: 0.7, topP: 0.95, seed: 7 })
    expect(again.text).toBe(r.text)
    const greedy = await engine.generate({ inputIds, maxTokens: 96 })
    expect(greedy.text).toBe('I am a small mixture-of-experts demo model trained for moe-edge.')
    expect(greedy.finishReason).toBe('stop')
  })
})
