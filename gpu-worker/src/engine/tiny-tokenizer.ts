// The tokenizer of the tiny test model: byte-level BPE with no merges, so every UTF-8 byte is one token
// and any string round-trips. Ids: 0 <unk>, 1 <s>, 2 </s>, then byte b at id b + 3.

export const UNK_TOKEN = '<unk>'
export const BOS_TOKEN = '<s>'
export const EOS_TOKEN = '</s>'
/** Id of byte 0; byte b is token b + BYTE_TOKEN_OFFSET. */
export const BYTE_TOKEN_OFFSET = 3

/**
 * Mixtral-style chat template. System and developer messages are prepended to the next user turn (as
 * Mistral does); content may be a string or OpenAI content parts, of which only text parts are kept,
 * joined by newlines. The model answers right after `[/INST]`, so add_generation_prompt adds nothing.
 */
export const CHAT_TEMPLATE = [
  '{%- macro content_text(content) -%}',
  '{%- if content is string -%}{{ content }}',
  '{%- else -%}',
  "{%- for part in content if part['type'] == 'text' -%}",
  "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}{{ part['text'] }}",
  '{%- endfor -%}',
  '{%- endif -%}',
  '{%- endmacro -%}',
  "{%- set ns = namespace(system='') -%}",
  '{{- bos_token -}}',
  '{%- for message in messages -%}',
  "{%- if message['role'] == 'system' or message['role'] == 'developer' -%}",
  "{%- set ns.system = (ns.system + '\\n\\n' if ns.system else '') + content_text(message['content']) -%}",
  "{%- elif message['role'] == 'user' -%}",
  "{{- '[INST] ' + (ns.system + '\\n\\n' if ns.system else '') + content_text(message['content']) + ' [/INST]' -}}",
  "{%- set ns.system = '' -%}",
  "{%- elif message['role'] == 'assistant' -%}",
  "{{- content_text(message['content']) + eos_token -}}",
  '{%- else -%}',
  "{{- raise_exception('Unsupported message role \"' + message['role'] + '\": use system, developer, user or assistant') -}}",
  '{%- endif -%}',
  '{%- endfor -%}',
  // A system message with no user turn after it still reaches the model.
  "{%- if ns.system -%}{{- '[INST] ' + ns.system + ' [/INST]' -}}{%- endif -%}",
  '{%- if add_generation_prompt -%}{%- endif -%}',
].join('')

/** GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to U+0100 onwards. */
export function byteToUnicode(): string[] {
  const printable = (b: number) =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)
  const chars: string[] = []
  let next = 256
  for (let b = 0; b < 256; b++) chars.push(String.fromCharCode(printable(b) ? b : next++))
  return chars
}

function addedToken(id: number, content: string) {
  return { id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }
}

/** The `tokenizer.json` and `tokenizer_config.json` of the tiny test model. */
export function byteLevelTokenizerFiles(): { tokenizerJson: object; tokenizerConfig: object } {
  const specials = [addedToken(0, UNK_TOKEN), addedToken(1, BOS_TOKEN), addedToken(2, EOS_TOKEN)]
  const vocab: Record<string, number> = {}
  for (const t of specials) vocab[t.content] = t.id
  byteToUnicode().forEach((symbol, byte) => {
    vocab[symbol] = byte + BYTE_TOKEN_OFFSET
  })
  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: specials,
    normalizer: null,
    // No regex split: with no merges it would not change the tokens, only cost time.
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false },
    // bos is added by the chat template or by the caller, never by encode.
    post_processor: null,
    decoder: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: UNK_TOKEN,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: [],
    },
  }
  const tokenizerConfig = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    add_bos_token: true,
    add_eos_token: false,
    bos_token: BOS_TOKEN,
    eos_token: EOS_TOKEN,
    unk_token: UNK_TOKEN,
    pad_token: null,
    model_max_length: 4096,
    clean_up_tokenization_spaces: false,
    added_tokens_decoder: Object.fromEntries(specials.map(({ id, ...rest }) => [String(id), rest])),
    chat_template: CHAT_TEMPLATE,
  }
  return { tokenizerJson, tokenizerConfig }
}
