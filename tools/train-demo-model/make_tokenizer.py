#!/usr/bin/env python3
"""Write tokenizer/tokenizer.json and tokenizer/tokenizer_config.json: a
byte-level BPE with no merges (GPT-2 byte-to-unicode alphabet), ids
<unk>=0, <s>=1, </s>=2, byte b = b + 3, and the [INST] chat template."""
import json, os

HERE = os.path.dirname(os.path.abspath(__file__))

CHAT_TEMPLATE = (
    "{%- macro content_text(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content if part['type'] == 'text' -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ part['text'] }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- set ns = namespace(system='') -%}{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' or message['role'] == 'developer' -%}"
    "{%- set ns.system = (ns.system + '\\n\\n' if ns.system else '') + content_text(message['content']) -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST] ' + (ns.system + '\\n\\n' if ns.system else '') + content_text(message['content']) + ' [/INST]' -}}"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- content_text(message['content']) + eos_token -}}"
    "{%- else -%}{{- raise_exception('Unsupported message role \"' + message['role'] + '\": use system, developer, user or assistant') -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if ns.system -%}{{- '[INST] ' + ns.system + ' [/INST]' -}}{%- endif -%}"
    "{%- if add_generation_prompt -%}{%- endif -%}"
)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def special(i, c):
    return {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}


def main():
    b2u = bytes_to_unicode()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[b2u[b]] = b + 3
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
           "normalizer": None, "pre_tokenizer": bl, "post_processor": None, "decoder": bl,
           "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": dict(sorted(vocab.items())), "merges": []}}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
           "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
           "model_max_length": 1024, "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": {str(i): {k: v for k, v in special(i, c).items() if k != "id"}
                                    for i, c in enumerate(["<unk>", "<s>", "</s>"])},
           "chat_template": CHAT_TEMPLATE}
    d = os.path.join(HERE, "tokenizer")
    os.makedirs(d, exist_ok=True)
    json.dump(tok, open(os.path.join(d, "tokenizer.json"), "w"), indent=2, ensure_ascii=False)
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
