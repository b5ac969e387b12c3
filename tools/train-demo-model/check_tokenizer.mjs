// Checks that the Python tokenizer (common.encode) and chat template
// (common.render_chat) agree with @huggingface/tokenizers and
// @huggingface/jinja on tokenizer/tokenizer.json and tokenizer_config.json.
// Usage: node tools/train-demo-model/check_tokenizer.mjs <expected.json>
// where expected.json is written by `python3 check_tokenizer.py`.
import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Template } from '@huggingface/jinja'
import { Tokenizer } from '@huggingface/tokenizers'

const here = dirname(fileURLToPath(import.meta.url))
const tj = JSON.parse(readFileSync(join(here, 'tokenizer', 'tokenizer.json'), 'utf8'))
const tc = JSON.parse(readFileSync(join(here, 'tokenizer', 'tokenizer_config.json'), 'utf8'))
const expected = JSON.parse(readFileSync(process.argv[2], 'utf8'))
const tok = new Tokenizer(tj, tc)
let bad = 0
for (const c of expected.texts) {
  const ids = tok.encode(c.text, { add_special_tokens: false }).ids
  const same = ids.length === c.ids.length && ids.every((v, i) => v === c.ids[i])
  const back = tok.decode(ids, { skip_special_tokens: false })
  if (!same || back !== c.text) {
    bad++
    console.log(
      `MISMATCH ${c.name}: ids ${same ? 'ok' : 'differ'}, round trip ${back === c.text ? 'ok' : 'differs'}`,
    )
  }
}
const tpl = new Template(tc.chat_template)
for (const c of expected.chats) {
  const out = tpl.render({
    messages: c.messages,
    bos_token: tc.bos_token,
    eos_token: tc.eos_token,
    add_generation_prompt: true,
  })
  if (out !== c.rendered) {
    bad++
    console.log(`TEMPLATE MISMATCH:\n${JSON.stringify(out)}\n${JSON.stringify(c.rendered)}`)
  }
}
console.log(`${expected.texts.length} texts, ${expected.chats.length} chats, ${bad} mismatches`)
process.exit(bad ? 1 : 0)
