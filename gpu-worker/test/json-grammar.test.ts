import { Ajv } from 'ajv'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { encodedVocabulary, JsonGrammar } from '../src/engine/constrained/json-grammar.ts'
import type { MoeEngine } from '../src/engine/engine.ts'
import { byteLevelTokenizerFiles } from '../src/engine/tiny-tokenizer.ts'
import { ChatTokenizer } from '../src/engine/tokenizer.ts'
import { DEMO_MODEL_DIR, loadTinyEngine, TINY_MODEL_DIR } from './fixtures.ts'

// Constrained decoding over the models' real vocabularies: the mask lets through only tokens that
// continue a valid document, EOS only once it is complete, and sampled output always validates.

const PERSON = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 6 },
    age: { type: 'integer', minimum: 0, maximum: 120 },
    role: { enum: ['admin', 'user', null] },
    active: { type: 'boolean' },
    tags: { type: 'array', items: { type: 'string', maxLength: 3 }, maxItems: 2 },
    address: {
      type: 'object',
      properties: { zip: { type: 'string', maxLength: 5 }, kind: { const: 'home' } },
      required: ['zip', 'kind'],
      additionalProperties: false,
    },
    score: { anyOf: [{ type: 'integer', minimum: -5, maximum: 5 }, { type: 'null' }] },
  },
  required: ['name', 'age', 'role', 'active', 'tags', 'address', 'score'],
  additionalProperties: false,
}

const bytesOf = (tokenizer: ChatTokenizer, ids: number[]) => tokenizer.decode(ids)

describe('JSON grammar masks over a byte-level vocabulary', () => {
  let tokenizer: ChatTokenizer
  let grammar: JsonGrammar
  beforeAll(async () => {
    tokenizer = await ChatTokenizer.fromFiles(TINY_MODEL_DIR)
    grammar = new JsonGrammar(tokenizer, 259)
  })

  it('reads the vocabulary as byte-level with special tokens other than EOS blanked', () => {
    const { vocab, type } = encodedVocabulary(tokenizer, 259)
    expect(type).toBe('BYTE_LEVEL')
    expect(vocab[0]).toBe('')
    expect(vocab[1]).toBe('')
    expect(vocab[2]).toBe('</s>')
  })

  it('allows only `{` first for an object, and EOS only once the document is complete', async () => {
    const c = await grammar.constraint({
      schema: {
        type: 'object',
        properties: { ok: { type: 'boolean' } },
        required: ['ok'],
        additionalProperties: false,
      },
    })
    try {
      expect(c.allowed().map((id) => bytesOf(tokenizer, [id]))).toEqual(['{'])
      const text = '{"ok": true}'
      for (const id of tokenizer.encode(text)) {
        expect(c.allowed()).not.toContain(2)
        expect(c.allowed()).toContain(id)
        c.advance(id)
      }
      expect(c.allowed()).toEqual([2])
      const logits = new Float32Array(259).fill(1)
      c.mask(logits)
      expect([...logits].filter((x) => x > Number.NEGATIVE_INFINITY)).toHaveLength(1)
      expect(logits[2]).toBe(1)
      c.advance(2)
      expect(c.terminated).toBe(true)
    } finally {
      c.dispose()
    }
  })

  it('refuses a token that breaks the document', async () => {
    const c = await grammar.constraint({ schema: { enum: ['yes', 'no'] } })
    try {
      for (const id of tokenizer.encode('"y')) c.advance(id)
      expect(() => c.advance(tokenizer.encode('n')[0]!)).toThrow(/does not continue/)
    } finally {
      c.dispose()
    }
  })

  it('json_object mode (no schema) asks for an object', async () => {
    const c = await grammar.constraint({ schema: null })
    try {
      expect(c.allowed().map((id) => bytesOf(tokenizer, [id]))).toEqual(['{'])
    } finally {
      c.dispose()
    }
  })

  it('answers a clear error for a schema xgrammar cannot compile, and keeps working', async () => {
    await expect(grammar.constraint({ schema: { $ref: '#/$defs/missing' } })).rejects.toThrow(
      /could not be compiled into a grammar: .*Cannot find field \$defs/,
    )
    await expect(grammar.constraint({ schema: { type: 'string', pattern: '(?=a)a' } })).rejects.toThrow(
      /Lookahead is not supported/,
    )
    const c = await grammar.constraint({ schema: { type: 'boolean' } })
    expect(
      c
        .allowed()
        .map((id) => bytesOf(tokenizer, [id]))
        .sort(),
    ).toEqual(['f', 't'])
    c.dispose()
  })
})

describe('a BPE vocabulary with multi-byte tokens', () => {
  // The byte-level vocabulary plus merged tokens, as real BPE vocabularies have: a token may span
  // several JSON tokens, or end in the middle of a UTF-8 character.
  const files = byteLevelTokenizerFiles() as { tokenizerJson: { model: { vocab: Record<string, number> } } }
  const merged = ['{"', '{"x', 'ok', '":', 'Ġtrue', 'true}', 'Ã©', 'aÃ', '"}']
  const vocab = { ...files.tokenizerJson.model.vocab }
  merged.forEach((t, i) => {
    vocab[t] = 259 + i
  })
  const tokenizer = new ChatTokenizer(
    { ...files.tokenizerJson, model: { ...files.tokenizerJson.model, vocab } },
    byteLevelTokenizerFiles().tokenizerConfig,
  )
  const id = (t: string) => tokenizer.tokenToId(t)!
  const byte = (s: string) => tokenizer.encode(s)[0]!
  const grammar = new JsonGrammar(tokenizer, 259 + merged.length)

  it('allows a merged token only where all of its bytes fit', async () => {
    const c = await grammar.constraint({
      schema: {
        type: 'object',
        properties: { ok: { type: 'boolean' } },
        required: ['ok'],
        additionalProperties: false,
      },
    })
    try {
      expect(c.allowed().sort((a, b) => a - b)).toEqual([byte('{'), id('{"')])
      c.advance(id('{"'))
      expect(c.allowed()).toContain(id('ok'))
      expect(c.allowed()).not.toContain(id('Ġtrue'))
      for (const t of ['ok', '":']) c.advance(id(t))
      // `"ok":` is followed by one space, then the value: " true" is a single token here.
      expect(c.allowed()).toContain(id('Ġtrue'))
      expect(c.allowed()).not.toContain(id('true}'))
      c.advance(id('Ġtrue'))
      expect(c.allowed()).toEqual([byte('}')])
    } finally {
      c.dispose()
    }
  })

  it('inside a string, a token that ends mid-character must be followed by its continuation', async () => {
    const c = await grammar.constraint({ schema: { type: 'string' } })
    try {
      c.advance(byte('"'))
      expect(c.allowed()).toContain(id('Ã©'))
      expect(c.allowed()).toContain(id('aÃ'))
      c.advance(id('aÃ'))
      const next = c.allowed()
      expect(next).not.toContain(byte('"'))
      expect(next).not.toContain(id('Ã©'))
      // Only continuation bytes 0x80..0xBF.
      expect(next.every((t) => t >= 0x80 + 3 && t <= 0xbf + 3)).toBe(true)
    } finally {
      c.dispose()
    }
  })
})

describe('sampled output always validates', () => {
  let engine: MoeEngine
  beforeAll(async () => {
    engine = await loadTinyEngine(1, 512)
  })
  afterAll(async () => {
    await engine.close()
  })

  for (const [label, temperature, topP] of [
    ['temperature 1', 1, 1],
    ['temperature 2, top_p 0.9', 2, 0.9],
  ] as const) {
    it(`50 seeds at ${label} on the tiny random model`, async () => {
      const validate = new Ajv({ strict: false }).compile(PERSON)
      const grammar = new JsonGrammar(engine.tokenizer, engine.config.vocab_size)
      const prompt = engine.tokenizer.encodeChat([{ role: 'user', content: 'Describe a person as JSON.' }])
      let complete = 0
      for (let seed = 0; seed < 50; seed++) {
        const constraint = await grammar.constraint({ schema: PERSON })
        try {
          const r = await engine.generate({
            inputIds: prompt,
            maxTokens: 160,
            temperature,
            topP,
            seed,
            constraint,
          })
          if (r.finishReason === 'length') continue
          expect(r.finishReason).toBe('stop')
          const doc = JSON.parse(r.text)
          expect(validate(doc), `${r.text}: ${JSON.stringify(validate.errors)}`).toBe(true)
          complete++
        } finally {
          constraint.dispose()
        }
      }
      // The schema bounds every string and number, so most documents end inside max_tokens.
      expect(complete).toBeGreaterThanOrEqual(25)
    }, 120_000)
  }
})

describe('the demo model', () => {
  it('reads its vocabulary and constrains it', async () => {
    const tokenizer = await ChatTokenizer.fromFiles(DEMO_MODEL_DIR)
    const grammar = new JsonGrammar(tokenizer, 259)
    const c = await grammar.constraint({ schema: { type: 'array', items: { type: 'integer' }, maxItems: 1 } })
    expect(c.allowed().map((id) => tokenizer.decode([id]))).toEqual(['['])
    c.dispose()
  })
})
