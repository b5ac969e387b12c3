#!/usr/bin/env python3
"""Write the tables of RESULTS.md from results.json. The findings section is
kept from an existing RESULTS.md (text between the FINDINGS markers)."""
import json, os, re, sys

HERE = os.path.dirname(os.path.abspath(__file__))


def fmt_row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main():
    res = json.load(open(os.path.join(HERE, "results.json")))
    path = os.path.join(HERE, "RESULTS.md")
    findings = "_(fill in)_"
    if os.path.exists(path):
        m = re.search(r"<!-- FINDINGS -->\n(.*?)\n<!-- /FINDINGS -->", open(path).read(), re.S)
        if m:
            findings = m.group(1)
    c = res["model"]
    runs = res["training_runs"]
    main_run = runs.get("main", {})
    out = ["# demo-moe: training results", "",
           "Produced by `train.py` and `evaluate.py` in this folder; every figure below is in `results.json`.", "",
           "<!-- FINDINGS -->", findings, "<!-- /FINDINGS -->", "",
           "## Model", "",
           f"Mixtral family: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads / "
           f"{c['num_key_value_heads']} KV heads (head_dim {c['head_dim']}), {c['num_local_experts']} experts of intermediate "
           f"{c['intermediate_size']}, top-{c['num_experts_per_tok']}, vocab {c['vocab_size']} (bytes), rope_theta {c['rope_theta']}, "
           f"max positions {c['max_position_embeddings']}. "
           + (f"{main_run['params']/1e6:.2f}M parameters, {main_run['active_params']/1e6:.2f}M active per token." if main_run else ""), ""]
    if main_run:
        out += ["## Training", "",
                fmt_row(["run", "aux coef", "z coef", "steps", "tokens", "time (s)", "tokens/s", "final train CE (nats/token, EMA)", "expert load CV per layer (2nd half)", "mean CV"]),
                fmt_row(["---"] * 10)]
        for name in ("short-noaux", "short-aux", "main"):
            if name in runs:
                r = runs[name]
                out.append(fmt_row([name, r["aux_coef"], r["z_coef"], r["steps"], r["tokens"], r["elapsed_s"], r["tok_per_s"], r["final_ce_ema"],
                                    ", ".join(f"{v:.3f}" for v in r["expert_load_cv_per_layer"]), r["mean_cv"]]))
        out.append("")
    out += ["## Held-out bits per byte", "", res["heldout_protocol"] + ".", "",
            fmt_row(["domain", "bytes", "tokens", "bits/byte", "code pool only", "general pool only"]), fmt_row(["---"] * 6)]
    sub = res["expert_subsets"]
    for d, v in res["bits_per_byte"].items():
        out.append(fmt_row([d, res["heldout"]["bytes"][d], res["heldout"]["tokens"][d], v,
                            sub["bits_per_byte_restricted"]["code"][d], sub["bits_per_byte_restricted"]["general"][d]]))
    out += ["", f"Chat with each turn ending in the real `</s>` token instead of a newline (as the model was trained): {res.get('chat_bits_per_byte_with_eos_token')} bits per byte of chat.txt.",
            "", f"Mean over domains: {res['bits_per_byte_mean']}. The last two columns restrict every layer's router to the 4 experts of a pool (see below).", ""]
    out += ["## Expert load on the held-out slices (all domains)", "",
            "CV (std / mean of the 8 experts' assignment counts) per layer: " + ", ".join(f"{v:.3f}" for v in res["expert_load_cv_heldout"]), ""]
    out += ["## Specialisation: domain or token type?", "", res["specialisation"]["description"] + ".", "",
            fmt_row(["layer", "I(E;domain)", "I(E;type)", "I(E;domain given type)", "I(E;type given domain)", "max share, domain x expert", "max share, type x expert"]),
            fmt_row(["---"] * 7)]
    for s in res["specialisation"]["per_layer"]:
        out.append(fmt_row([s["layer"], s["I(expert;domain)"], s["I(expert;token_type)"], s["I(expert;domain|token_type)"],
                            s["I(expert;token_type|domain)"], s["max_domain_share"], s["max_token_type_share"]]))
    base = res["specialisation"].get("untrained_baseline")
    if base:
        out += ["", "Same measures for the untrained initialisation (seed 12), as a floor: " + "; ".join(
            f"layer {b['layer']}: I(E;domain) {b['I(expert;domain)']}, I(E;type) {b['I(expert;token_type)']}" for b in base) + "."]
    aff = res["expert_affinity"]
    out += ["", "![expert affinity](expert-affinity.png)", "", "Share of each domain's assignments per expert (percent, uniform = 12.5):", ""]
    for l, m in enumerate(aff["by_domain"]):
        out += [f"Layer {l}:", "", fmt_row(["domain"] + [f"e{e}" for e in range(len(m[0]))]), fmt_row(["---"] * (len(m[0]) + 1))]
        for d, row in zip(aff["domains"], m):
            out.append(fmt_row([d] + [f"{v*100:.1f}" for v in row]))
        out.append("")
    out += ["Share of each token type's assignments per expert (percent; the type is that of the token being routed):", ""]
    for l, m in enumerate(aff["by_token_type"]):
        out += [f"Layer {l}:", "", fmt_row(["type (tokens)"] + [f"e{e}" for e in range(len(m[0]))]), fmt_row(["---"] * (len(m[0]) + 1))]
        for t, n, row in zip(aff["token_types"], aff["token_type_counts"], m):
            if n:
                out.append(fmt_row([f"{t} ({n})"] + [f"{v*100:.1f}" for v in row]))
        out.append("")
    out += ["## Expert subsets for pools", "", sub["rule"] + ".", "",
            f"- code pool ({' + '.join(sub['code_pool_domains'])}): experts **{sub['code']}**",
            f"- general pool ({' + '.join(sub['general_pool_domains'])}): experts **{sub['general']}**",
            f"- code affinity, summed over layers, per expert: {sub['code_affinity_sum_over_layers']}",
            f"- general affinity, summed over layers, per expert: {sub['general_affinity_sum_over_layers']}",
            f"- best 4 per layer (code): {sub['per_layer_best']['code']}; (general): {sub['per_layer_best']['general']}", ""]
    out += ["## Sample generations", "", "Prompts rendered with the chat template; greedy and sampled (temperature 0.7, seeded) continuations up to `</s>` or 200 tokens.", ""]
    for s in res["samples"]:
        prompt = " / ".join(f"{m['role']}: {m['content']}" for m in s["messages"])
        out.append(f"- **{prompt}**")
        for k, v in s.items():
            if k != "messages":
                out.append(f"  - {k}: `{v}`" if "`" not in v and "\n" not in v else f"  - {k}: {json.dumps(v, ensure_ascii=False)}")
    out.append("")
    open(path, "w").write("\n".join(out))
    print("wrote", path)


if __name__ == "__main__":
    main()
