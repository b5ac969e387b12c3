import type { MixtralConfig } from '../src/engine/model-config.ts'
import { type ModelDir, tensorEntry } from '../src/engine/model-dir.ts'
import { readTensorF32 } from '../src/engine/safetensors.ts'

// An independent Mixtral forward pass written plainly (loops over arrays, no
// ONNX Runtime), following Hugging Face's modeling_mixtral.py. Tests hold the
// exported graph to it. It recomputes the whole sequence every call.

export interface ReferenceOutput {
  /** Logits of the last position. */
  logits: Float64Array
  /** experts[layer][position] = the top-k expert ids, best first. */
  experts: number[][][]
}

export class ReferenceMixtral {
  readonly c: MixtralConfig
  private readonly w = new Map<string, Float32Array>()

  constructor(model: ModelDir) {
    this.c = model.config
    for (const name of model.tensors.keys()) this.w.set(name, readTensorF32(tensorEntry(model, name)))
  }

  private t(name: string): Float32Array {
    const t = this.w.get(name)
    if (!t) throw new Error(`missing ${name}`)
    return t
  }

  /** y = W x for W stored [out, in] as HF does. */
  private linear(W: Float32Array, x: Float64Array, out: number): Float64Array {
    const n = x.length
    const y = new Float64Array(out)
    for (let o = 0; o < out; o++) {
      let s = 0
      for (let i = 0; i < n; i++) s += W[o * n + i]! * x[i]!
      y[o] = s
    }
    return y
  }

  private rmsNorm(x: Float64Array, weight: Float32Array): Float64Array {
    let ms = 0
    for (const v of x) ms += v * v
    const r = 1 / Math.sqrt(ms / x.length + this.c.rms_norm_eps)
    return x.map((v, i) => v * r * weight[i]!)
  }

  private rope(vec: Float64Array, pos: number, heads: number): void {
    const D = this.c.head_dim
    const half = D / 2
    for (let h = 0; h < heads; h++) {
      const b = h * D
      for (let i = 0; i < half; i++) {
        const a = pos / this.c.rope_theta ** ((2 * i) / D)
        const x1 = vec[b + i]!
        const x2 = vec[b + i + half]!
        vec[b + i] = x1 * Math.cos(a) - x2 * Math.sin(a)
        vec[b + i + half] = x2 * Math.cos(a) + x1 * Math.sin(a)
      }
    }
  }

  /**
   * Forward over `ids`. `allowedExperts` (if given) removes the other experts
   * from routing entirely, as if the model had only those.
   */
  forward(ids: number[], allowedExperts: number[] | null = null): ReferenceOutput {
    const c = this.c
    const { hidden_size: H, head_dim: D, num_attention_heads: nH, num_key_value_heads: kvH } = c
    const E = c.num_local_experts
    const K = c.num_experts_per_tok
    const emb = this.t('model.embed_tokens.weight')
    let xs = ids.map((id) => Float64Array.from(emb.subarray(id * H, (id + 1) * H)))
    const experts: number[][][] = []
    for (let l = 0; l < c.num_hidden_layers; l++) {
      const p = `model.layers.${l}`
      const qs: Float64Array[] = []
      const ks: Float64Array[] = []
      const vs: Float64Array[] = []
      xs.forEach((x, pos) => {
        const h = this.rmsNorm(x, this.t(`${p}.input_layernorm.weight`))
        const q = this.linear(this.t(`${p}.self_attn.q_proj.weight`), h, nH * D)
        const k = this.linear(this.t(`${p}.self_attn.k_proj.weight`), h, kvH * D)
        this.rope(q, pos, nH)
        this.rope(k, pos, kvH)
        qs.push(q)
        ks.push(k)
        vs.push(this.linear(this.t(`${p}.self_attn.v_proj.weight`), h, kvH * D))
      })
      const layerExperts: number[][] = []
      xs = xs.map((x, pos) => {
        // Causal attention, each query head reading its group's KV head.
        const attn = new Float64Array(nH * D)
        for (let h = 0; h < nH; h++) {
          const kv = Math.floor(h / (nH / kvH))
          const scores = new Float64Array(pos + 1)
          for (let j = 0; j <= pos; j++) {
            let s = 0
            for (let d = 0; d < D; d++) s += qs[pos]![h * D + d]! * ks[j]![kv * D + d]!
            scores[j] = s / Math.sqrt(D)
          }
          const max = Math.max(...scores)
          let sum = 0
          for (let j = 0; j <= pos; j++) sum += scores[j] = Math.exp(scores[j]! - max)
          for (let j = 0; j <= pos; j++)
            for (let d = 0; d < D; d++) attn[h * D + d]! += (scores[j]! / sum) * vs[j]![kv * D + d]!
        }
        const o = this.linear(this.t(`${p}.self_attn.o_proj.weight`), attn, H)
        const x1 = x.map((v, i) => v + o[i]!)
        // Router: softmax over the allowed experts, top-k, renormalise.
        const h2 = this.rmsNorm(x1, this.t(`${p}.post_attention_layernorm.weight`))
        const logits = this.linear(this.t(`${p}.block_sparse_moe.gate.weight`), h2, E)
        const allowed = allowedExperts ?? [...Array(E).keys()]
        const ranked = [...allowed].sort((a, b) => logits[b]! - logits[a]!).slice(0, K)
        layerExperts.push(ranked)
        const maxL = logits[ranked[0]!]!
        const weights = ranked.map((e) => Math.exp(logits[e]! - maxL))
        const wsum = weights.reduce((a, b) => a + b, 0)
        const out = new Float64Array(H)
        ranked.forEach((e, r) => {
          const q = `${p}.block_sparse_moe.experts.${e}`
          const a = this.linear(this.t(`${q}.w1.weight`), h2, c.intermediate_size)
          const b = this.linear(this.t(`${q}.w3.weight`), h2, c.intermediate_size)
          const act = a.map((v, i) => (v / (1 + Math.exp(-v))) * b[i]!)
          const y = this.linear(this.t(`${q}.w2.weight`), act, H)
          for (let i = 0; i < H; i++) out[i]! += (weights[r]! / wsum) * y[i]!
        })
        return x1.map((v, i) => v + out[i]!)
      })
      experts.push(layerExperts)
    }
    const last = this.rmsNorm(xs[xs.length - 1]!, this.t('model.norm.weight'))
    const lm = c.tie_word_embeddings ? emb : this.t('lm_head.weight')
    return { logits: this.linear(lm, last, c.vocab_size), experts }
  }
}
