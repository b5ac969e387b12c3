"""A Mixtral-family decoder in plain torch whose math and tensor names match
Hugging Face's modeling_mixtral, plus a safetensors reader/writer."""
import json, math, struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def rope_cache(cfg, T, device=None):
    d = cfg["head_dim"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    t = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(H, nh * hd, bias=False)
        self.k_proj = nn.Linear(H, nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
        att = att + mask
        att = F.softmax(att.float(), dim=-1).to(q.dtype)
        y = (att @ v).transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.o_proj(y)


class SparseMoe(nn.Module):
    """Experts are stored stacked ([E, I, H] / [E, H, I]) for speed and split
    into experts.E.w1/w2/w3 when saved."""

    def __init__(self, cfg):
        super().__init__()
        H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
        self.E, self.k = E, cfg["num_experts_per_tok"]
        self.gate = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, I, H))
        self.w3 = nn.Parameter(torch.empty(E, I, H))
        self.w2 = nn.Parameter(torch.empty(E, H, I))
        for w, fan_in in ((self.w1, H), (self.w3, H), (self.w2, I)):
            nn.init.normal_(w, std=1.0 / math.sqrt(fan_in))

    def forward(self, x, expert_bias=None):
        B, T, H = x.shape
        xf = x.reshape(-1, H)
        logits = self.gate(xf)
        if expert_bias is not None:  # [E]; -inf removes an expert (restricts the pool to a subset)
            logits = logits + expert_bias
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        topw, topi = torch.topk(probs, self.k, dim=-1)
        topw = topw / topw.sum(dim=-1, keepdim=True)
        topw = topw.to(x.dtype)
        out = torch.zeros_like(xf)
        for e in range(self.E):
            tok, slot = torch.nonzero(topi == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            xe = xf.index_select(0, tok)
            h = F.silu(xe @ self.w1[e].t()) * (xe @ self.w3[e].t())
            ye = (h @ self.w2[e].t()) * topw[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, ye)
        return out.view(B, T, H), logits, probs, topi


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.block_sparse_moe = SparseMoe(cfg)

    def forward(self, x, cos, sin, mask, expert_bias=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        m, logits, probs, topi = self.block_sparse_moe(self.post_attention_layernorm(x), expert_bias)
        return x + m, (logits, probs, topi)


class Mixtral(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        std_out = 0.02 / math.sqrt(2 * cfg["num_hidden_layers"])
        for l in self.layers:
            for lin in (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.block_sparse_moe.gate):
                nn.init.normal_(lin.weight, std=0.02)
            nn.init.normal_(l.self_attn.o_proj.weight, std=std_out)
            nn.init.normal_(l.block_sparse_moe.w2, std=std_out)

    def forward(self, ids, expert_bias=None):
        B, T = ids.shape
        cos, sin = rope_cache(self.cfg, T)
        mask = torch.full((T, T), float("-inf")).triu(1)
        x = self.embed_tokens(ids)
        routing = []
        for l in self.layers:
            x, r = l(x, cos, sin, mask, expert_bias)
            routing.append(r)
        return self.lm_head(self.norm(x)), routing


def aux_losses(routing, k):
    """Switch-Transformer load-balancing loss (E * sum_e f_e * P_e, f over the
    top-k assignments, 1.0 when balanced) and router z-loss, layer means."""
    lb, z = 0.0, 0.0
    for logits, probs, topi in routing:
        E = probs.shape[-1]
        f = F.one_hot(topi, E).float().sum(1).mean(0) / k
        P = probs.mean(0)
        lb = lb + E * (f * P).sum()
        z = z + torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
    n = len(routing)
    return lb / n, z / n


# ------------------------------------------------------------------ HF naming

def hf_state(model, dtype=torch.float16):
    out = {"model.embed_tokens.weight": model.embed_tokens.weight}
    for i, l in enumerate(model.layers):
        p = f"model.layers.{i}."
        a = l.self_attn
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = getattr(a, n).weight
        m = l.block_sparse_moe
        out[p + "block_sparse_moe.gate.weight"] = m.gate.weight
        for e in range(m.E):
            out[p + f"block_sparse_moe.experts.{e}.w1.weight"] = m.w1[e]
            out[p + f"block_sparse_moe.experts.{e}.w2.weight"] = m.w2[e]
            out[p + f"block_sparse_moe.experts.{e}.w3.weight"] = m.w3[e]
        out[p + "input_layernorm.weight"] = l.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = l.post_attention_layernorm.weight
    out["model.norm.weight"] = model.norm.weight
    out["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def load_hf_state(model, tensors):
    sd = {}
    for k, v in tensors.items():
        sd[k] = v.float()
    with torch.no_grad():
        model.embed_tokens.weight.copy_(sd["model.embed_tokens.weight"])
        for i, l in enumerate(model.layers):
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(l.self_attn, n).weight.copy_(sd[p + f"self_attn.{n}.weight"])
            m = l.block_sparse_moe
            m.gate.weight.copy_(sd[p + "block_sparse_moe.gate.weight"])
            for e in range(m.E):
                m.w1[e].copy_(sd[p + f"block_sparse_moe.experts.{e}.w1.weight"])
                m.w2[e].copy_(sd[p + f"block_sparse_moe.experts.{e}.w2.weight"])
                m.w3[e].copy_(sd[p + f"block_sparse_moe.experts.{e}.w3.weight"])
            l.input_layernorm.weight.copy_(sd[p + "input_layernorm.weight"])
            l.post_attention_layernorm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
        model.norm.weight.copy_(sd["model.norm.weight"])
        model.lm_head.weight.copy_(sd["lm_head.weight"])


# ------------------------------------------------------------------ safetensors

_DT = {torch.float32: ("F32", np.float32), torch.float16: ("F16", np.float16)}
_NP = {"F32": np.float32, "F16": np.float16}


def save_safetensors(tensors, path, metadata=None):
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        t = tensors[name]
        code, npdt = _DT[t.dtype]
        b = t.numpy().astype(npdt, copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        if info["dtype"] == "BF16":
            raw = np.frombuffer(data[s:e], dtype=np.uint16).astype(np.uint32) << 16
            arr = raw.view(np.float32)
        else:
            arr = np.frombuffer(data[s:e], dtype=_NP[info["dtype"]])
        out[name] = torch.from_numpy(arr.copy().reshape(info["shape"]))
    return out
