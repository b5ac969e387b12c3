#!/usr/bin/env python3
"""Measure the exported demo-moe model: held-out bits per byte per domain,
expert affinity per layer by domain and by token type, expert load CV,
expert subsets for a code pool and a general pool, and sample generations.

    python3 evaluate.py --model ../../gpu-worker/models/demo-moe

Writes results.json (read by plot_affinity.py and RESULTS.md)."""
import argparse, json, math, os, sys, time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BOS, DOMAINS, EOS, TOKEN_TYPES, decode, encode, render_chat, token_type  # noqa: E402
from model import Mixtral, load_hf_state, load_safetensors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WINDOW = 255  # tokens per window; with the leading <s> a window fills the 256-token training context
CODE_POOL = ["code", "arithmetic"]
GENERAL_POOL = ["prose", "translation", "extraction", "chat"]

PROMPTS = [
    [{"role": "user", "content": "What is 23 + 58?"}],
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "user", "content": "Translate to German: Save the file"}],
    [{"role": "user", "content": "Translate to French: Open the file"}],
    [{"role": "user", "content": "Extract name, age, city as JSON: Maria Rossi is 29 years old and lives in Vienna."}],
    [{"role": "user", "content": "What does the ls command do?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Who are you?"}],
]


def load_model(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    m = Mixtral(cfg)
    load_hf_state(m, load_safetensors(os.path.join(d, "model.safetensors")))
    m.eval()
    return m, cfg


@torch.no_grad()
def score(model, text, bias=None):
    """Bits of every token of encode(text), cut into windows of WINDOW tokens;
    each window is fed as [<s>] + window with no earlier context and every
    window token is predicted from the ones before it (the protocol of the
    engine's `moe eval --window WINDOW`)."""
    ids = encode(text)
    bits, routes, inputs = 0.0, None, []
    for s in range(0, len(ids), WINDOW):
        chunk = torch.tensor([[BOS] + ids[s:s + WINDOW]])
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits, routing = model(x, bias)
        lp = F.log_softmax(logits.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        bits += float(-lp.sum()) / math.log(2)
        topi = np.stack([r[2].numpy() for r in routing])  # [L, T, 2]
        routes = topi if routes is None else np.concatenate([routes, topi], axis=1)
        inputs.extend(x[0].tolist())
    return bits, len(ids), routes, inputs


def mutual_info(joint):
    """I(X;E) in bits from a count table [X, E]."""
    p = joint / joint.sum()
    px, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (px @ pe)[nz])).sum())


def cv(c):
    c = np.asarray(c, dtype=float)
    return float(c.std() / c.mean())


@torch.no_grad()
def generate(model, messages, max_new=int(os.environ.get("EVAL_MAX_NEW", "200")), temperature=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = encode(render_chat(messages))
    out = []
    for _ in range(max_new):
        logits, _ = model(torch.tensor([ids[-1024:]]))
        l = logits[0, -1].float()
        if temperature <= 0:
            t = int(l.argmax())
        else:
            t = int(torch.multinomial(F.softmax(l / temperature, -1), 1, generator=g))
        if t == EOS:
            break
        ids.append(t)
        out.append(t)
    return decode(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "..", "..", "gpu-worker", "models", "demo-moe"))
    ap.add_argument("--runs", default=os.path.join(HERE, "runs"))
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, cfg = load_model(a.model)
    L, E = cfg["num_hidden_layers"], cfg["num_local_experts"]
    res = {"model": cfg, "heldout_protocol": (
        f"tokens = tokenizer.json encoding of heldout/<domain>.txt (plain text, no special tokens); cut into windows of {WINDOW} tokens, each fed as [<s>] + window with no earlier context, every "
        "window token predicted from the ones before it; bits per byte = total -log2 p / UTF-8 bytes of the file. "
        f"This is the engine's protocol: `moe eval --model gpu-worker/models/demo-moe --text-file <file> --window {WINDOW}`")}

    # held-out scoring with routing capture
    by_dom = np.zeros((L, len(DOMAINS), E))
    by_type = np.zeros((L, len(TOKEN_TYPES), E))
    joint = np.zeros((L, len(TOKEN_TYPES), len(DOMAINS), E))
    bpb, ntok, nbytes = {}, {}, {}
    for di, d in enumerate(DOMAINS):
        text = open(os.path.join(HERE, "heldout", f"{d}.txt")).read()
        bits, n, routes, inputs = score(model, text)
        nbytes[d] = len(text.encode("utf-8"))
        bpb[d] = round(bits / nbytes[d], 4)
        ntok[d] = n
        types = np.array([TOKEN_TYPES.index(token_type(t)) for t in inputs])
        for l in range(L):
            for k in range(routes.shape[2]):
                np.add.at(joint[l], (types, di, routes[l, :, k]), 1)
        print(d, "bpb", bpb[d], flush=True)
    # chat with the real end-of-turn token: every turn end (a newline before "[INST] " or at the end) becomes </s>
    chat = open(os.path.join(HERE, "heldout", "chat.txt")).read()
    chat_eos = chat.replace("\n[INST] ", "</s>[INST] ")
    chat_eos = chat_eos[:-1] + "</s>" if chat_eos.endswith("\n") else chat_eos
    bits, _, _, _ = score(model, chat_eos)
    res["chat_bits_per_byte_with_eos_token"] = round(bits / len(chat.encode("utf-8")), 4)
    print("chat with </s>", res["chat_bits_per_byte_with_eos_token"], flush=True)
    by_dom = joint.sum(1)
    by_type = joint.sum(2)
    res["heldout"] = {"bytes": nbytes, "tokens": ntok}
    res["bits_per_byte"] = bpb
    res["bits_per_byte_mean"] = round(float(np.mean(list(bpb.values()))), 4)
    share = lambda c: (c / np.maximum(c.sum(-1, keepdims=True), 1))
    res["expert_affinity"] = {
        "description": "share of a group's top-2 assignments that each expert receives, per layer [layer][group][expert]; uniform = 0.125",
        "domains": DOMAINS, "token_types": TOKEN_TYPES,
        "by_domain": np.round(share(by_dom), 4).tolist(),
        "by_token_type": np.round(share(by_type), 4).tolist(),
        "token_type_counts": by_type[0].sum(-1).astype(int).tolist(),
    }
    # does specialisation follow domain or token type?
    spec = []
    for l in range(L):
        i_d = mutual_info(by_dom[l])
        i_t = mutual_info(by_type[l])
        # I(E;D|T) = sum_t p(t) I(E;D | T=t)
        tot = joint[l].sum()
        i_d_t = sum(joint[l, t].sum() / tot * mutual_info(joint[l, t]) for t in range(len(TOKEN_TYPES)) if joint[l, t].sum() > 0)
        i_t_d = sum(joint[l, :, d].sum() / tot * mutual_info(joint[l, :, d]) for d in range(len(DOMAINS)) if joint[l, :, d].sum() > 0)
        spec.append({"layer": l, "I(expert;domain)": round(i_d, 4), "I(expert;token_type)": round(i_t, 4),
                     "I(expert;domain|token_type)": round(i_d_t, 4), "I(expert;token_type|domain)": round(i_t_d, 4),
                     "max_domain_share": round(float(share(by_dom[l]).max()), 4),
                     "max_token_type_share": round(float(share(by_type[l]).max()), 4)})
    res["specialisation"] = {"description": "mutual information in bits between the chosen expert (each of the 2 slots) and the token's domain or type, on the held-out slices; the entropy of a uniform choice among 8 experts is 3 bits",
                             "per_layer": spec}
    # floor: the same measures for the untrained initialisation
    torch.manual_seed(12)
    init = Mixtral(cfg).eval()
    bdom = np.zeros((L, len(DOMAINS), E))
    btyp = np.zeros((L, len(TOKEN_TYPES), E))
    for di, d in enumerate(DOMAINS):
        _, _, routes, inputs = score(init, open(os.path.join(HERE, "heldout", f"{d}.txt")).read())
        types = np.array([TOKEN_TYPES.index(token_type(t)) for t in inputs])
        for l in range(L):
            for k in range(routes.shape[2]):
                np.add.at(bdom[l], (di, routes[l, :, k]), 1)
                np.add.at(btyp[l], (types, routes[l, :, k]), 1)
    res["specialisation"]["untrained_baseline"] = [
        {"layer": l, "I(expert;domain)": round(mutual_info(bdom[l]), 4), "I(expert;token_type)": round(mutual_info(btyp[l]), 4)}
        for l in range(L)]
    res["expert_load_cv_heldout"] = [round(cv(by_dom[l].sum(0)), 4) for l in range(L)]

    # training-run load statistics (short runs with / without the aux loss, and the main run)
    runs = {}
    for name in ("short-noaux", "short-aux", "main"):
        p = os.path.join(a.runs, name, "summary.json")
        if os.path.exists(p):
            s = json.load(open(p))
            runs[name] = {k: s[k] for k in ("steps", "tokens", "elapsed_s", "tok_per_s", "final_ce_ema", "aux_coef", "z_coef",
                                            "expert_load_cv_per_layer", "expert_load_share_second_half", "params", "active_params")}
            runs[name]["mean_cv"] = round(float(np.mean(s["expert_load_cv_per_layer"])), 4)
    res["training_runs"] = runs

    # expert subsets: sum over layers of the affinity of the pool's tokens (same expert index in every layer)
    def pool_affinity(doms):
        idx = [DOMAINS.index(d) for d in doms]
        c = by_dom[:, idx, :].sum(1)           # [L, E] counts
        return share(c).sum(0)                 # sum over layers of shares
    code_aff, gen_aff = pool_affinity(CODE_POOL), pool_affinity(GENERAL_POOL)
    code_set = sorted(np.argsort(-(code_aff - gen_aff))[:4].tolist())
    gen_set = sorted(np.argsort(-(gen_aff - code_aff))[:4].tolist())
    per_layer = {"code": [], "general": []}
    for l in range(L):
        ca = share(by_dom[l, [DOMAINS.index(d) for d in CODE_POOL]].sum(0))
        ga = share(by_dom[l, [DOMAINS.index(d) for d in GENERAL_POOL]].sum(0))
        per_layer["code"].append(sorted(np.argsort(-(ca - ga))[:4].tolist()))
        per_layer["general"].append(sorted(np.argsort(-(ga - ca))[:4].tolist()))
    subsets = {"rule": "an expert's score is the sum over layers of its share of the pool's tokens minus its share of the other pool's tokens; the 4 best form the pool (the same expert indices in every layer)",
               "code_pool_domains": CODE_POOL, "general_pool_domains": GENERAL_POOL,
               "code_affinity_sum_over_layers": np.round(code_aff, 4).tolist(),
               "general_affinity_sum_over_layers": np.round(gen_aff, 4).tolist(),
               "code": code_set, "general": gen_set, "per_layer_best": per_layer, "bits_per_byte_restricted": {}}
    for name, sset in (("code", code_set), ("general", gen_set)):
        bias = torch.full((E,), float("-inf"))
        bias[sset] = 0.0
        subsets["bits_per_byte_restricted"][name] = {}
        for d in DOMAINS:
            text = open(os.path.join(HERE, "heldout", f"{d}.txt")).read()
            bits, _, _, _ = score(model, text, bias)
            subsets["bits_per_byte_restricted"][name][d] = round(bits / len(text.encode()), 4)
        print("restricted", name, subsets["bits_per_byte_restricted"][name], flush=True)
    res["expert_subsets"] = subsets

    # sample generations
    samples = []
    for i, msgs in enumerate(PROMPTS):
        t0 = time.time()
        greedy = generate(model, msgs)
        sampled = generate(model, msgs, temperature=0.7, seed=i)
        samples.append({"messages": msgs, "greedy": greedy, "sampled_t0.7_seed%d" % i: sampled})
        print(json.dumps(samples[-1], ensure_ascii=False), round(time.time() - t0, 1), flush=True)
    res["samples"] = samples
    json.dump(res, open(a.out, "w"), indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
