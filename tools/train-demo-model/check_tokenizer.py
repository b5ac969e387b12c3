#!/usr/bin/env python3
"""Writes the Python side's token ids and rendered chats for check_tokenizer.mjs."""
import glob, json, os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import encode, render_chat  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
texts = [{"name": os.path.basename(p), "text": open(p).read()} for p in sorted(glob.glob(os.path.join(HERE, "heldout", "*.txt")))]
texts.append({"name": "unicode", "text": "Grüße, ça va? 日本語 🙂 \t\r\n <s>x</s><unk>"})
for t in texts:
    t["ids"] = encode(t["text"])
chats = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Translate to German: Open file"},
     {"role": "assistant", "content": "Datei öffnen"}, {"role": "user", "content": "And to French?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]
out = {"texts": texts, "chats": [{"messages": m, "rendered": render_chat(m)} for m in chats]}
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tokenizer-expected.json", "w"))
