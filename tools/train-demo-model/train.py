#!/usr/bin/env python3
"""Train the demo Mixtral-family MoE on the corpus from build_corpus.py.

    nice -n 10 python3 train.py --steps N --out runs/main --export ../../gpu-worker/models/demo-moe

Loss = next-token cross-entropy + aux_coef * Switch load-balancing loss
+ z_coef * router z-loss. Deterministic given --seed (data order, init)."""
import argparse, json, math, os, shutil, sys, time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DOMAINS, VOCAB_SIZE, BOS, EOS  # noqa: E402
from model import Mixtral, aux_losses, hf_state, save_safetensors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAIN_WEIGHTS = {"prose": 0.15, "code": 0.15, "arithmetic": 0.12, "translation": 0.16, "extraction": 0.12, "chat": 0.30}


def make_config(a):
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": a.hidden,
        "intermediate_size": a.inter,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.hidden // a.heads,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "torch_dtype": "float16",
    }


def export(model, cfg, out_dir, meta):
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_safetensors(hf_state(model, torch.float16), tmp, {"format": "pt", **{k: str(v) for k, v in meta.items()}})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    json.dump({"bos_token_id": BOS, "eos_token_id": EOS, "max_new_tokens": 256}, open(os.path.join(out_dir, "generation_config.json"), "w"), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(HERE, "tokenizer", f), os.path.join(out_dir, f))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--out", default=os.path.join(HERE, "runs", "main"))
    ap.add_argument("--export", default=None, help="model directory to write (HF layout) at every checkpoint")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--inter", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--z-coef", type=float, default=0.001)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=300, help="steps between checkpoints")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop early (and save) after this wall time")
    ap.add_argument("--minutes", type=float, default=0,
                    help="wall-time budget: the cosine schedule follows elapsed time and training stops at the budget; "
                         "the learning rate of every step is written to <out>/lr-schedule.json")
    ap.add_argument("--lr-schedule", default=None, help="replay a recorded lr-schedule.json exactly (sets --steps)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    assert (a.hidden // a.heads) % 16 == 0, "head_dim must be a multiple of 16"
    cfg = make_config(a)
    os.makedirs(a.out, exist_ok=True)
    json.dump(vars(a), open(os.path.join(a.out, "args.json"), "w"), indent=2)

    streams = {d: np.fromfile(os.path.join(a.data, f"{d}.train.bin"), dtype=np.uint16) for d in DOMAINS}
    w = np.array([DOMAIN_WEIGHTS[d] for d in DOMAINS])
    w = w / w.sum()

    model = Mixtral(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    E, I, H, L = 8, a.inter, a.hidden, a.layers
    n_active = n_params - L * (E - 2) * 3 * I * H
    print(f"params {n_params/1e6:.2f}M, active per token {n_active/1e6:.2f}M", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)

    replay = json.load(open(a.lr_schedule)) if a.lr_schedule else None
    if replay:
        a.steps, a.minutes = len(replay), 0
    if a.minutes:
        a.steps = 10 ** 9
    used_lr = []

    def lr_at(s):
        if replay:
            return replay[s]
        if s < a.warmup:
            return a.lr * (s + 1) / a.warmup
        if a.minutes:
            p = (time.time() - t_warm) / max(1.0, a.minutes * 60 - (t_warm - t0))
        else:
            p = (s - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    log = open(os.path.join(a.out, "log.jsonl"), "a")
    load = np.zeros((L, E))          # assignment counts over the run's second half
    t0 = time.time()
    tokens = 0
    ema = None
    step = 0
    t_warm = t0
    for step in range(a.steps):
        if step == a.warmup:
            t_warm = time.time()
        doms = rng.choice(len(DOMAINS), size=a.batch, p=w)
        rows = []
        for d in doms:
            s = streams[DOMAINS[d]]
            o = int(rng.integers(0, len(s) - a.ctx - 1))
            rows.append(s[o:o + a.ctx + 1].astype(np.int64))
        batch = torch.from_numpy(np.stack(rows))
        x, y = batch[:, :-1], batch[:, 1:]
        lr = lr_at(step)
        used_lr.append(lr)
        for g in opt.param_groups:
            g["lr"] = lr
        logits, routing = model(x)
        ce = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1))
        lb, z = aux_losses(routing, 2)
        loss = ce + a.aux_coef * lb + a.z_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += x.numel()
        ema = ce.item() if ema is None else 0.95 * ema + 0.05 * ce.item()
        if (a.minutes and time.time() - t0 > a.minutes * 30) or (not a.minutes and step >= a.steps // 2):
            for li, (_, _, topi) in enumerate(routing):
                load[li] += np.bincount(topi.reshape(-1).numpy(), minlength=E)
        elapsed = time.time() - t0
        if step % a.log_every == 0 or step == a.steps - 1:
            cv = [float(np.std(c) / np.mean(c)) for c in (np.stack([np.bincount(r[2].reshape(-1).numpy(), minlength=E) for r in routing]))]
            rec = {"step": step, "ce": round(ce.item(), 4), "ce_ema": round(ema, 4), "lb": round(lb.item(), 4), "z": round(z.item(), 3),
                   "lr": round(lr, 6), "tokens": tokens, "elapsed_s": round(elapsed, 1), "tok_per_s": round(tokens / elapsed, 1),
                   "batch_cv": [round(c, 3) for c in cv]}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n"); log.flush()
        stop = (a.max_minutes and elapsed > a.max_minutes * 60) or (a.minutes and elapsed > a.minutes * 60)
        if (a.save_every and step > 0 and step % a.save_every == 0) or stop or step == a.steps - 1:
            json.dump(used_lr, open(os.path.join(a.out, "lr-schedule.json"), "w"))
            torch.save({"model": model.state_dict(), "config": cfg, "step": step}, os.path.join(a.out, "checkpoint.pt"))
            if a.export:
                export(model, cfg, a.export, {"step": step, "seed": a.seed})
        if stop:
            print("stopping at the time budget", flush=True)
            break

    elapsed = time.time() - t0
    cv = [float(np.std(c) / np.mean(c)) for c in load]
    summary = {"steps": step + 1, "tokens": tokens, "elapsed_s": round(elapsed, 1), "tok_per_s": round(tokens / elapsed, 1),
               "final_ce_ema": round(ema, 4), "params": n_params, "active_params": n_active,
               "aux_coef": a.aux_coef, "z_coef": a.z_coef,
               "expert_load_second_half": load.astype(int).tolist(),
               "expert_load_share_second_half": [[round(v, 4) for v in (c / c.sum())] for c in load],
               "expert_load_cv_per_layer": [round(c, 4) for c in cv], "config": cfg}
    json.dump(summary, open(os.path.join(a.out, "summary.json"), "w"), indent=2)
    print(json.dumps({k: summary[k] for k in ("steps", "tokens", "elapsed_s", "tok_per_s", "final_ce_ema", "expert_load_cv_per_layer")}), flush=True)


if __name__ == "__main__":
    main()
