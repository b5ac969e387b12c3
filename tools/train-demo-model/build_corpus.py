#!/usr/bin/env python3
"""Build the demo-moe training corpus from text that Debian packages ship.

    python3 build_corpus.py [--manifest corpus-manifest.json] [--out data]

Writes data/<domain>.train.bin (uint16 token ids), data/corpus-stats.json and
heldout/<domain>.txt (the held-out evaluation slices, plain UTF-8 text).
Everything is deterministic given the manifest (file lists are sorted, the
generators are seeded)."""
import argparse, glob, gettext, gzip, hashlib, io, json, os, random, re, subprocess, sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DOMAINS, encode, render_chat  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def read_text(path, limit):
    raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return s[:limit]


def clean(s):
    s = s.replace("\r\n", "\n").replace("\t", "    ")
    s = re.sub(r"[ \t]+\n", "\n", s)
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip() + "\n"


EXCLUDED = set()          # files of packages the manifest excludes
EXCLUDED_PAGES = set()    # (name, section) of their man pages


def load_exclusions(pkgs):
    for p in pkgs:
        out = subprocess.run(["dpkg", "-L", p], capture_output=True).stdout.decode("utf-8", "replace").split("\n")
        for f in out:
            if f.startswith("/"):
                EXCLUDED.add(f)
                m = re.match(r"^/usr/share/man/man(\d)/(.+)\.(\d\w*)(\.gz)?$", f)
                if m:
                    EXCLUDED_PAGES.add((m.group(2), m.group(3)[0]))


def globbed(patterns, recursive=False):
    return sorted(set(f for g in patterns for f in glob.glob(g, recursive=recursive)) - EXCLUDED)


def spread(files, n):
    """n files spread evenly over the sorted list (deterministic)."""
    if len(files) <= n:
        return files
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


# ---------------------------------------------------------------- prose

def render_man(path, limit):
    env = dict(os.environ, MANWIDTH="78", LANG="C.UTF-8", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="0")
    try:
        out = subprocess.run(["man", "-P", "cat", "-l", path], env=env, capture_output=True, timeout=20).stdout
    except subprocess.TimeoutExpired:
        return None
    s = out.decode("utf-8", "replace")
    s = re.sub(r".\x08", "", s).replace("\u2010", "-").replace("\u2212", "-")
    return s[:limit]


def prose_docs(cfg):
    docs = []
    m = cfg["man_pages"]
    files = globbed(m["globs"])
    for f in spread(files, m["max_files"]):
        t = render_man(f, m["max_bytes_per_file"])
        if t and len(t) > 200:
            docs.append(("man:" + os.path.basename(f), clean(t)))
    d = cfg["doc_text"]
    files = [f for f in globbed(d["globs"]) if os.path.isfile(f)]
    for f in spread(files, d["max_files"]):
        t = read_text(f, d["max_bytes_per_file"])
        if t and len(t) > 200:
            docs.append(("doc:" + f, clean(t)))
    return docs


# ---------------------------------------------------------------- code

def code_docs(cfg):
    docs = []
    p = cfg["python_stdlib"]
    files = globbed(p["globs"])
    for f in files:
        t = read_text(f, p["max_bytes_per_file"])
        if t:
            docs.append(("py:" + f, clean(t)))
    n = cfg["npm_packages"]
    versions = {}
    for pkg, globs in sorted(n["packages"].items()):
        root = os.path.join(n["root"], pkg)
        if not os.path.isdir(root):
            print("warning: npm package missing:", pkg, file=sys.stderr)
            continue
        versions[pkg] = json.load(open(os.path.join(root, "package.json")))["version"]
        files = sorted(set(f for g in globs for f in glob.glob(os.path.join(root, g), recursive=True)))
        for f in files:
            if any(x in f for x in n["exclude_substrings"]):
                continue
            t = read_text(f, n["max_bytes_per_file"])
            if t:
                docs.append(("npm:" + os.path.relpath(f, n["root"]), clean(t)))
    return docs, versions


# ---------------------------------------------------------------- generators

def arith_problem(rng):
    kind = rng.random()
    if kind < 0.35:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice(["+", "-"])
    elif kind < 0.6:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*"])
    elif kind < 0.8:
        a, b = rng.randint(2, 99), rng.randint(2, 30)
        op = "*"
    else:
        b = rng.randint(2, 20)
        a = b * rng.randint(1, 50)
        op = "/"
    res = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
    return a, op, b, res


WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
SYM = {"+": "+", "-": "-", "*": "*", "/": "/"}


def arith_qa(rng):
    a, op, b, res = arith_problem(rng)
    r = rng.random()
    if r < 0.5:
        q = f"{a} {SYM[op]} {b}"
        return f"What is {q}?", f"{q} = {res}"
    if r < 0.8:
        return f"What is {a} {WORDS[op]} {b}?", f"{a} {SYM[op]} {b} = {res}"
    c = rng.randint(1, 20)
    op2 = rng.choice(["+", "-"])
    res2 = res + c if op2 == "+" else res - c
    if op == "/":
        return f"Compute {a} / {b} {op2} {c}.", f"{a} / {b} = {res}, {res} {op2} {c} = {res2}"
    return f"Compute ({a} {SYM[op]} {b}) {op2} {c}.", f"{a} {SYM[op]} {b} = {res}, {res} {op2} {c} = {res2}"


def arithmetic_docs(cfg, seed):
    rng = random.Random(seed * 1000 + 1)
    docs = []
    for i in range(cfg["count"]):
        q, a = arith_qa(rng)
        docs.append((f"arith:{i}", f"Q: {q}\nA: {a}\n"))
    return docs


FIRST = ("Anna Ben Clara David Emma Felix Greta Hugo Ida Jonas Karin Lukas Maria Noah Olga Paul Rosa Samuel "
         "Tara Ulrich Vera Walter Yara Zoe Amir Chen Diego Elena Farah Hiroshi Ines Jamal Kofi Lena Mateo Nadia "
         "Omar Priya Quentin Ravi Sofia Tomas Uma Viktor Wen Ximena Yusuf Zara Marie Pierre Louise Hans").split()
LAST = ("Schmidt Muller Weber Fischer Wagner Becker Hoffmann Martin Bernard Dubois Moreau Laurent Garcia Rossi "
        "Silva Novak Kowalski Jensen Nielsen Smith Johnson Brown Taylor Wilson Evans Tanaka Kim Singh Khan "
        "Okafor Mensah Costa Lopez Berg Lindqvist Horvat Popescu Ivanova Petrov Sato").split()
CITIES = ("Berlin Paris Hamburg Lyon Munich Marseille Vienna Zurich Geneva London Madrid Rome Lisbon Oslo "
          "Prague Warsaw Dublin Brussels Amsterdam Copenhagen Helsinki Athens Budapest Toulouse Cologne "
          "Leipzig Nantes Bordeaux Basel Graz").split()
JOBS = ("engineer teacher nurse baker designer pilot chemist lawyer farmer writer developer architect "
        "painter doctor librarian mechanic").split()
PRODUCTS = ("lamp chair keyboard monitor kettle backpack bicycle notebook headphones camera blender "
            "umbrella jacket printer router").split()


def extraction_item(rng):
    r = rng.random()
    if r < 0.6:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        age, city, job = rng.randint(18, 90), rng.choice(CITIES), rng.choice(JOBS)
        email = f"{name.split()[0].lower()}.{name.split()[1].lower()}@example.{rng.choice(['com', 'org', 'de', 'fr'])}"
        fields = {"name": name, "age": age, "city": city}
        style = rng.randrange(4)
        if style == 0:
            text = f"Name: {name}, Age: {age}, City: {city}"
        elif style == 1:
            text = f"{name} is {age} years old and lives in {city}."
        elif style == 2:
            fields["job"] = job
            text = f"{name} ({age}) works as a {job} in {city}."
        else:
            fields["email"] = email
            text = f"Contact {name}, age {age}, from {city} at {email}."
        return text, fields
    product = rng.choice(PRODUCTS)
    price = round(rng.randint(100, 99999) / 100, 2)
    qty = rng.randint(1, 12)
    order = rng.randint(10000, 99999)
    fields = {"order": order, "product": product, "quantity": qty, "price": price}
    if rng.random() < 0.5:
        text = f"Order #{order}: {qty} x {product} at {price:.2f} EUR each."
    else:
        text = f"Order {order} - product: {product}; quantity: {qty}; unit price: {price:.2f} EUR"
    return text, fields


def to_json(fields):
    return json.dumps(fields, ensure_ascii=False)


def extraction_docs(cfg, seed):
    rng = random.Random(seed * 1000 + 2)
    docs = []
    for i in range(cfg["count"]):
        text, fields = extraction_item(rng)
        docs.append((f"extract:{i}", f"Text: {text}\nJSON: {to_json(fields)}\n"))
    return docs


# ---------------------------------------------------------------- translation

def read_mo(path):
    try:
        with open(path, "rb") as f:
            cat = gettext.GNUTranslations(f)
    except Exception:
        return {}
    return cat._catalog


GOOD = re.compile(r"^[A-Za-z][A-Za-z ,.'()\-:!?/]*$")


def translation_pairs(cfg):
    pairs = {"de": {}, "fr": {}}
    de = {os.path.basename(p) for p in globbed(["/usr/share/locale/de/LC_MESSAGES/*.mo"])}
    fr = {os.path.basename(p) for p in globbed(["/usr/share/locale/fr/LC_MESSAGES/*.mo"])}
    cats = sorted(de & fr)
    for lang in ("de", "fr"):
        for c in cats:
            for k, v in read_mo(f"/usr/share/locale/{lang}/LC_MESSAGES/{c}").items():
                if not isinstance(k, str) or not isinstance(v, str) or not k or not v:
                    continue
                if "\x04" in k or "\n" in k or "\n" in v or "%" in k or "_" in k or "&" in k or "&" in v:
                    continue
                if len(k) > cfg["msgid_max_chars"] or len(k) < 3 or not GOOD.match(k) or k == v:
                    continue
                pairs[lang].setdefault(k, v.strip())
    out = {}
    for lang in pairs:
        items = sorted(pairs[lang].items())
        out[lang] = items[: cfg["max_pairs_per_language"]] if len(items) <= cfg["max_pairs_per_language"] else spread(items, cfg["max_pairs_per_language"])
    return out, cats


LANG_NAME = {"de": "German", "fr": "French"}


def translation_docs(pairs):
    docs = []
    for lang in ("de", "fr"):
        for en, tr in pairs[lang]:
            docs.append((f"tr:{lang}:{en}", f"English: {en}\n{LANG_NAME[lang]}: {tr}\n"))
    return docs


# ---------------------------------------------------------------- chat

def man_descriptions():
    env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8")
    out = subprocess.run(["man", "-k", "."], env=env, capture_output=True).stdout.decode("utf-8", "replace")
    desc = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+) \((1|8)\)\s+- (.+)$", line)
        if m and (m.group(1), m.group(2)) in EXCLUDED_PAGES:
            continue
        if m and re.match(r"^[a-z0-9][a-z0-9._+-]*$", m.group(1)) and len(m.group(3)) < 90:
            desc.setdefault(m.group(1), m.group(3).strip())
    return sorted(desc.items())


SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
           "You are moe-edge's demo model."]
GREETINGS = [("Hello", "Hello! I can translate short phrases to German or French, do arithmetic, extract JSON from text and explain shell commands."),
             ("Hi!", "Hi! Ask me to translate, compute, extract JSON or explain a command."),
             ("Who are you?", "I am a small mixture-of-experts demo model trained for moe-edge."),
             ("What can you do?", "I can translate short phrases to German or French, do arithmetic, extract JSON from text and explain shell commands."),
             ("Thank you!", "You're welcome!"),
             ("Good morning", "Good morning! How can I help?")]


def chat_turn(rng, kind, pairs, commands):
    if kind == "translate":
        lang = rng.choice(["de", "fr"])
        en, tr = rng.choice(pairs[lang])
        q = rng.choice([f"Translate to {LANG_NAME[lang]}: {en}", f"How do you say \"{en}\" in {LANG_NAME[lang]}?",
                        f"Translate into {LANG_NAME[lang]}: {en}"])
        return q, tr, ("tr", lang, en)
    if kind == "compute":
        q, a = arith_qa(rng)
        return q, a + ".", ("arith", q)
    if kind == "extract":
        text, fields = extraction_item(rng)
        keys = ", ".join(fields)
        q = rng.choice([f"Extract {keys} as JSON: {text}", f"Convert to JSON: {text}", f"Return JSON for: {text}"])
        return q, to_json(fields), ("extract", text)
    if kind == "explain":
        cmd, d = rng.choice(commands)
        q = rng.choice([f"What does the {cmd} command do?", f"Explain the command {cmd}.", f"What is {cmd}?"])
        return q, f"{cmd}: {d}.", ("cmd", cmd)
    q, a = rng.choice(GREETINGS)
    return q, a, ("greet", q)


def chat_docs(cfg, seed, pairs, commands):
    rng = random.Random(seed * 1000 + 3)
    kinds = ["translate", "compute", "extract", "explain", "greet"]
    weights = [0.3, 0.25, 0.2, 0.2, 0.05]
    docs = []
    for i in range(cfg["count"]):
        msgs = []
        if rng.random() < 0.2:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
        keys = []
        for _ in range(1 if rng.random() < 0.75 else rng.randint(2, 3)):
            q, a, key = chat_turn(rng, rng.choices(kinds, weights)[0], pairs, commands)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            keys.append(repr(key))
        docs.append(("chat:" + "|".join(keys), render_chat(msgs)))
    return docs


# ---------------------------------------------------------------- main

def is_heldout(domain, key, modulus):
    return int(hashlib.sha1((domain + "\0" + key).encode()).hexdigest(), 16) % modulus == 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", default=os.path.join(HERE, "corpus-manifest.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "data"))
    ap.add_argument("--heldout-dir", default=os.path.join(HERE, "heldout"))
    args = ap.parse_args()
    man = json.load(open(args.manifest))
    seed, D, H = man["seed"], man["domains"], man["heldout"]
    load_exclusions(man.get("exclude_packages", []))
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.heldout_dir, exist_ok=True)

    print("translation pairs ...", flush=True)
    pairs, catalogues = translation_pairs(D["translation"])
    commands = man_descriptions()
    # held-out translation pairs / commands never appear in chat training either
    mod = H["modulus"]
    train_pairs = {l: [p for p in v if not is_heldout("translation", f"tr:{l}:{p[0]}", mod)] for l, v in pairs.items()}
    print("prose ...", flush=True)
    docs = {"prose": prose_docs(D["prose"])}
    print("code ...", flush=True)
    docs["code"], npm_versions = code_docs(D["code"])
    docs["arithmetic"] = arithmetic_docs(D["arithmetic"], seed)
    docs["translation"] = translation_docs(pairs)
    docs["extraction"] = extraction_docs(D["extraction"], seed)
    docs["chat"] = chat_docs(D["chat"], seed, train_pairs, commands)

    stats = {"seed": seed, "excluded_files": len(EXCLUDED), "excluded_man_pages": len(EXCLUDED_PAGES), "npm_versions": npm_versions, "mo_catalogues": catalogues,
             "translation_pairs": {l: len(v) for l, v in pairs.items()}, "commands": len(commands), "domains": {}}
    for dom in DOMAINS:
        cap = D[dom].get("max_bytes")
        held, train, held_texts = [], [], set()
        for key, text in docs[dom]:
            (held if is_heldout(dom, key, mod) else train).append((key, text))
        held_texts = {t for _, t in held}
        train = [(k, t) for k, t in train if t not in held_texts]
        # held-out slice file
        sep = "" if dom == "chat" else "\n"
        held_order = list(held)
        random.Random(seed * 1000 + 17 + DOMAINS.index(dom)).shuffle(held_order)
        out, n = [], 0
        for _, t in held_order:
            if dom == "chat":  # plain text: no special-token literals; a turn's end (</s>) becomes a newline
                t = t.replace("<s>", "").replace("</s>", "\n")
            if len(t.encode()) > 1500:  # long documents contribute their first lines only
                t = t.encode()[:1500].decode("utf-8", "ignore")
                t = t[: t.rfind("\n") + 1] if "\n" in t else t
            if n + len(t.encode()) > H["max_bytes"]:
                break
            out.append(t)
            n += len(t.encode()) + len(sep)
        htxt = sep.join(out)
        if len(htxt.encode()) > H["max_bytes"]:
            htxt = htxt.encode()[: H["max_bytes"]].decode("utf-8", "ignore")
        open(os.path.join(args.heldout_dir, f"{dom}.txt"), "w").write(htxt)
        # training stream, shuffled order of documents (seeded)
        random.Random(seed * 1000 + 7 + DOMAINS.index(dom)).shuffle(train)
        ids, nbytes = [], 0
        for _, t in train:
            if cap and nbytes > cap:
                break
            ids.extend(encode(t + sep))
            nbytes += len(t.encode())
        arr = np.array(ids, dtype=np.uint16)
        arr.tofile(os.path.join(args.out, f"{dom}.train.bin"))
        stats["domains"][dom] = {"sha256_train_bin": hashlib.sha256(arr.tobytes()).hexdigest(),
                                 "documents_train": len(train), "documents_heldout": len(held),
                                 "train_tokens": int(arr.size), "heldout_file_bytes": len(htxt.encode())}
        print(dom, stats["domains"][dom], flush=True)
    json.dump(stats, open(os.path.join(args.out, "corpus-stats.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
