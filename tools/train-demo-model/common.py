"""Shared pieces of the demo-moe tools: the byte-level tokenizer, the chat
template (the same one tokenizer_config.json carries) and the domain list."""
import re

UNK, BOS, EOS = 0, 1, 2
SPECIALS = {"<unk>": UNK, "<s>": BOS, "</s>": EOS}
BYTE_OFFSET = 3          # byte b has token id b + 3 (tokenizer.json vocab order)
VOCAB_SIZE = 3 + 256
DOMAINS = ["prose", "code", "arithmetic", "translation", "extraction", "chat"]

_special_re = re.compile("(<unk>|<s>|</s>)")


def encode(text):
    """Token ids exactly as tokenizer.json produces them: the added special
    tokens are matched anywhere in the text, every other byte maps to b + 3."""
    ids = []
    for part in _special_re.split(text):
        if not part:
            continue
        if part in SPECIALS:
            ids.append(SPECIALS[part])
        else:
            ids.extend(b + BYTE_OFFSET for b in part.encode("utf-8"))
    return ids


def decode(ids, skip_special=True):
    out, buf = [], bytearray()
    for i in ids:
        if i >= BYTE_OFFSET:
            buf.append(i - BYTE_OFFSET)
        else:
            if not skip_special:
                out.append(buf.decode("utf-8", "replace"))
                buf = bytearray()
                out.append(["<unk>", "<s>", "</s>"][i])
    out.append(buf.decode("utf-8", "replace"))
    return "".join(out)


def render_chat(messages, bos="<s>", eos="</s>"):
    """Python twin of the Jinja chat_template in tokenizer_config.json."""
    out = bos
    system = ""
    for m in messages:
        role, content = m["role"], m["content"]
        if role in ("system", "developer"):
            system = (system + "\n\n" if system else "") + content
        elif role == "user":
            out += "[INST] " + (system + "\n\n" if system else "") + content + " [/INST]"
            system = ""
        elif role == "assistant":
            out += content + eos
        else:
            raise ValueError("unsupported role " + role)
    if system:
        out += "[INST] " + system + " [/INST]"
    return out


def token_type(tid):
    """Coarse type of a token: letter, digit, whitespace, punctuation, special, other."""
    if tid < BYTE_OFFSET:
        return "special"
    b = tid - BYTE_OFFSET
    c = chr(b)
    if b >= 128:
        return "non-ascii"
    if c.isalpha():
        return "letter"
    if c.isdigit():
        return "digit"
    if c.isspace():
        return "whitespace"
    if 33 <= b <= 126:
        return "punctuation"
    return "whitespace"  # remaining ASCII control bytes


TOKEN_TYPES = ["letter", "digit", "whitespace", "punctuation", "non-ascii", "special"]
