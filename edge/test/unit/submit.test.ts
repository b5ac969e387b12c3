import { describe, expect, it } from 'vitest'
import { promptTokenEstimate } from '../../src/completions/submit.ts'
import { validateBody } from '../../src/validate.ts'

// The tokens-per-minute charge taken before a job runs must not undercharge: a byte-level
// tokenizer can spend a token on every UTF-8 byte of the prompt.

const utf8Bytes = (s: string) => new TextEncoder().encode(s).length

describe('promptTokenEstimate', () => {
  it.each([
    ['ASCII', 'hello world '.repeat(50)],
    ['accented Latin', 'é'.repeat(400)],
    ['CJK', '漢字'.repeat(300)],
    ['emoji', '\u{1f600}'.repeat(300)],
  ])('%s text: at least one token per UTF-8 byte', (_name, text) => {
    const completion = validateBody('completion', { model: 'general', prompt: text })
    expect(promptTokenEstimate(completion)).toBeGreaterThanOrEqual(utf8Bytes(text))
    const chat = validateBody('chat', { model: 'auto', messages: [{ role: 'user', content: text }] })
    expect(promptTokenEstimate(chat)).toBeGreaterThanOrEqual(utf8Bytes(text))
  })

  it('token-id prompts are charged their length', () => {
    const req = validateBody('completion', { model: 'general', prompt: [1, 2, 3, 4, 5] })
    expect(promptTokenEstimate(req)).toBe(5)
  })
})
