// Cost of constrained decoding per step on a vocabulary of real size: a byte-level BPE vocabulary of
// 32,000 tokens (the 256 bytes plus merged byte strings drawn from English-like text), a tool-call
// schema, and the mask + advance of each step of one document, timed over many documents.
//   node src/bench/grammar-bench.ts      (VOCAB to change the size)
import { JsonGrammar } from '../engine/constrained/json-grammar.ts'
import { SeededRandom } from '../engine/random.ts'
import { byteLevelTokenizerFiles, byteToUnicode } from '../engine/tiny-tokenizer.ts'
import { ChatTokenizer } from '../engine/tokenizer.ts'

const size = Number(process.env.VOCAB ?? 32000)
const files = byteLevelTokenizerFiles() as {
  tokenizerJson: { model: { vocab: Record<string, number> } }
  tokenizerConfig: object
}
const vocab = { ...files.tokenizerJson.model.vocab }
const chars = byteToUnicode()
const random = new SeededRandom(1)
const alphabet = ' etaoinshrdlucmfwypvbgkqjxz"{}:,[]0123456789ETAOIN'
let next = Object.keys(vocab).length
while (next < size) {
  const len = 2 + Math.floor(random.nextDouble() * 7)
  let token = ''
  for (let i = 0; i < len; i++)
    token += chars[alphabet.charCodeAt(Math.floor(random.nextDouble() * alphabet.length))]
  if (vocab[token] === undefined) vocab[token] = next++
}
const tokenizer = new ChatTokenizer(
  { ...files.tokenizerJson, model: { ...files.tokenizerJson.model, vocab } },
  files.tokenizerConfig,
)
const schema = {
  type: 'array',
  minItems: 1,
  maxItems: 2,
  items: {
    type: 'object',
    properties: {
      name: { const: 'get_weather' },
      arguments: {
        type: 'object',
        properties: { city: { type: 'string', maxLength: 24 }, unit: { enum: ['celsius', 'fahrenheit'] } },
        required: ['city', 'unit'],
        additionalProperties: false,
      },
    },
    required: ['name', 'arguments'],
    additionalProperties: false,
  },
}

let t = performance.now()
const grammar = new JsonGrammar(tokenizer, size)
const first = await grammar.constraint({ schema })
first.dispose()
console.log(
  `vocabulary ${size}: setup (vocabulary scan, xgrammar load, schema compile) ${(performance.now() - t).toFixed(0)} ms`,
)

const logits = new Float32Array(size)
let steps = 0
let maskMs = 0
t = performance.now()
for (let doc = 0; doc < 50; doc++) {
  const c = await grammar.constraint({ schema })
  for (let step = 0; step < 400; step++) {
    for (let i = 0; i < size; i++) logits[i] = random.nextDouble()
    const m0 = performance.now()
    c.mask(logits)
    maskMs += performance.now() - m0
    let best = 0
    for (let i = 1; i < size; i++) if (logits[i]! > logits[best]!) best = i
    c.advance(best)
    steps++
    if (tokenizer.isEos(best)) break
  }
  c.dispose()
}
const total = performance.now() - t
console.log(
  `${steps} steps over 50 documents: mask ${(maskMs / steps).toFixed(3)} ms/step, whole step ${(total / steps).toFixed(3)} ms/step (incl. random logits and argmax)`,
)
