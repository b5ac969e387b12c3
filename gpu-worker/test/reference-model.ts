import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { readSafetensorsHeader, readTensorF32 } from '../src/engine/safetensors.ts'

// An independent forward pass for every supported family, written plainly
// (loops over arrays, no ONNX Runtime) from Hugging Face transformers'
// modeling_{mixtral,qwen2_moe,qwen3_moe,olmoe,granitemoe}.py. It reads
// config.json and the tensor names itself rather than through the engine's
// loader, so a mistake in the loader's mapping shows up as a mismatch here.
// Tests hold the exported graph to it. It recomputes the whole sequence every call.

export interface ReferenceOutput {
  /** Logits of the last position. */
  logits: Float64Array
  /** experts[layer][position] = the top-k expert ids, best first ([] in dense layers). */
  experts: number[][][]
}

// biome-ignore lint/suspicious/noExplicitAny: config.json as Hugging Face writes it
type RawConfig = Record<string, any>

export class ReferenceModel {
  readonly cfg: RawConfig
  readonly type: string
  private readonly w = new Map<string, Float32Array>()
  private readonly H: number
  private readonly D: number
  private readonly nH: number
  private readonly kvH: number
  private readonly E: number

  constructor(dir: string) {
    this.cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'))
    this.type = this.cfg.model_type
    const index = join(dir, 'model.safetensors.index.json')
    const files = existsSync(index)
      ? [
          ...new Set(
            Object.values(JSON.parse(readFileSync(index, 'utf8')).weight_map as Record<string, string>),
          ),
        ]
      : ['model.safetensors']
    for (const f of files)
      for (const t of readSafetensorsHeader(join(dir, f)).tensors) this.w.set(t.name, readTensorF32(t))
    const c = this.cfg
    this.H = c.hidden_size
    this.nH = c.num_attention_heads
    this.kvH = c.num_key_value_heads ?? c.num_attention_heads
    this.D = c.head_dim ?? this.H / this.nH
    this.E = c.num_local_experts ?? c.num_experts
  }

  private t(name: string): Float32Array {
    const t = this.w.get(name)
    if (!t) throw new Error(`missing ${name}`)
    return t
  }

  /** y = W x (+ b) for W stored [out, in] as HF does; `rowOffset` picks rows from a stacked tensor. */
  private linear(
    W: Float32Array,
    x: Float64Array,
    out: number,
    bias?: Float32Array,
    rowOffset = 0,
  ): Float64Array {
    const n = x.length
    const y = new Float64Array(out)
    for (let o = 0; o < out; o++) {
      let s = bias ? bias[o]! : 0
      const row = (rowOffset + o) * n
      for (let i = 0; i < n; i++) s += W[row + i]! * x[i]!
      y[o] = s
    }
    return y
  }

  private proj(name: string, x: Float64Array, out: number, bias: boolean): Float64Array {
    return this.linear(this.t(`${name}.weight`), x, out, bias ? this.t(`${name}.bias`) : undefined)
  }

  private rmsNorm(x: Float64Array, weight: Float32Array): Float64Array {
    let ms = 0
    for (const v of x) ms += v * v
    const r = 1 / Math.sqrt(ms / x.length + this.cfg.rms_norm_eps)
    return x.map((v, i) => v * r * weight[i]!)
  }

  /** RMSNorm of each head's slice separately (qwen3_moe's q_norm / k_norm). */
  private headNorm(x: Float64Array, heads: number, weight: Float32Array): Float64Array {
    const out = new Float64Array(x.length)
    for (let h = 0; h < heads; h++)
      out.set(this.rmsNorm(x.subarray(h * this.D, (h + 1) * this.D), weight), h * this.D)
    return out
  }

  private rope(vec: Float64Array, pos: number, heads: number): void {
    const D = this.D
    const half = D / 2
    const theta = this.cfg.rope_theta ?? this.cfg.rope_parameters?.rope_theta ?? 10000
    for (let h = 0; h < heads; h++) {
      const b = h * D
      for (let i = 0; i < half; i++) {
        const a = pos / theta ** ((2 * i) / D)
        const x1 = vec[b + i]!
        const x2 = vec[b + i + half]!
        vec[b + i] = x1 * Math.cos(a) - x2 * Math.sin(a)
        vec[b + i + half] = x2 * Math.cos(a) + x1 * Math.sin(a)
      }
    }
  }

  private swiglu(gate: Float64Array, up: Float64Array): Float64Array {
    return gate.map((v, i) => (v / (1 + Math.exp(-v))) * up[i]!)
  }

  /** q, k, v of one position after the family's norms and clamps, before rotary. */
  private qkv(p: string, h: Float64Array): [Float64Array, Float64Array, Float64Array] {
    const c = this.cfg
    const { nH, kvH, D } = this
    const bias = this.type === 'qwen2_moe' ? (c.qkv_bias ?? true) : (c.attention_bias ?? false)
    let q = this.proj(`${p}.self_attn.q_proj`, h, nH * D, bias)
    let k = this.proj(`${p}.self_attn.k_proj`, h, kvH * D, bias)
    const v = this.proj(`${p}.self_attn.v_proj`, h, kvH * D, bias)
    if (this.type === 'qwen3_moe') {
      q = this.headNorm(q, nH, this.t(`${p}.self_attn.q_norm.weight`))
      k = this.headNorm(k, kvH, this.t(`${p}.self_attn.k_norm.weight`))
    } else if (this.type === 'olmoe') {
      q = this.rmsNorm(q, this.t(`${p}.self_attn.q_norm.weight`))
      k = this.rmsNorm(k, this.t(`${p}.self_attn.k_norm.weight`))
      const clip = c.clip_qkv
      if (clip != null)
        for (const x of [q, k, v])
          for (let i = 0; i < x.length; i++) x[i] = Math.min(clip, Math.max(-clip, x[i]!))
    }
    return [q, k, v]
  }

  private isSparse(l: number): boolean {
    if (!this.type.startsWith('qwen')) return true
    const only: number[] = this.cfg.mlp_only_layers ?? []
    return !only.includes(l) && (l + 1) % (this.cfg.decoder_sparse_step ?? 1) === 0
  }

  /** Routing: the chosen experts and their weights, by the family's rule, over the allowed experts only. */
  private route(logits: Float64Array, allowed: number[]): { ranked: number[]; weights: number[] } {
    const K = this.cfg.num_experts_per_tok
    const ranked = [...allowed].sort((a, b) => logits[b]! - logits[a]!).slice(0, K)
    const max = logits[ranked[0]!]!
    const top = ranked.map((e) => Math.exp(logits[e]! - max))
    const topSum = top.reduce((a, b) => a + b, 0)
    // mixtral and granitemoe renormalise the top-k (granite: softmax over the top-k logits).
    const renorm = this.type === 'mixtral' || this.type === 'granitemoe' || this.cfg.norm_topk_prob === true
    if (renorm) return { ranked, weights: top.map((w) => w / topSum) }
    const allSum = allowed.reduce((a, e) => a + Math.exp(logits[e]! - max), 0)
    return { ranked, weights: top.map((w) => w / allSum) }
  }

  /** One token's MLP output (before the residual multiplier) and the experts it used. */
  private mlp(p: string, l: number, h: Float64Array, allowed: number[]): [Float64Array, number[]] {
    const { H } = this
    const c = this.cfg
    const out = new Float64Array(H)
    const add = (y: Float64Array, w: number) => {
      for (let i = 0; i < H; i++) out[i]! += w * y[i]!
    }
    if (!this.isSparse(l)) {
      const I = c.intermediate_size
      const act = this.swiglu(
        this.proj(`${p}.mlp.gate_proj`, h, I, false),
        this.proj(`${p}.mlp.up_proj`, h, I, false),
      )
      return [this.proj(`${p}.mlp.down_proj`, act, H, false), []]
    }
    const I = this.type.startsWith('qwen') ? c.moe_intermediate_size : c.intermediate_size
    if (this.type === 'granitemoe') {
      const m = `${p}.block_sparse_moe`
      const { ranked, weights } = this.route(this.proj(`${m}.router.layer`, h, this.E, false), allowed)
      const gu = this.t(`${m}.input_linear.weight`)
      const down = this.t(`${m}.output_linear.weight`)
      ranked.forEach((e, r) => {
        const act = this.swiglu(
          this.linear(gu, h, I, undefined, e * 2 * I),
          this.linear(gu, h, I, undefined, e * 2 * I + I),
        )
        add(this.linear(down, act, H, undefined, e * H), weights[r]!)
      })
      return [out, ranked]
    }
    const mixtral = this.type === 'mixtral'
    const m = mixtral ? `${p}.block_sparse_moe` : `${p}.mlp`
    const [g, u, d] = mixtral ? ['w1', 'w3', 'w2'] : ['gate_proj', 'up_proj', 'down_proj']
    const { ranked, weights } = this.route(this.proj(`${m}.gate`, h, this.E, false), allowed)
    ranked.forEach((e, r) => {
      const x = `${m}.experts.${e}`
      const act = this.swiglu(this.proj(`${x}.${g}`, h, I, false), this.proj(`${x}.${u}`, h, I, false))
      add(this.proj(`${x}.${d}`, act, H, false), weights[r]!)
    })
    if (this.type === 'qwen2_moe') {
      const S = c.shared_expert_intermediate_size
      const x = `${m}.shared_expert`
      const act = this.swiglu(
        this.proj(`${x}.gate_proj`, h, S, false),
        this.proj(`${x}.up_proj`, h, S, false),
      )
      const gate = 1 / (1 + Math.exp(-this.proj(`${m}.shared_expert_gate`, h, 1, false)[0]!))
      add(this.proj(`${x}.down_proj`, act, H, false), gate)
    }
    return [out, ranked]
  }

  /**
   * Forward over `ids`. `allowedExperts` (if given) removes the other experts
   * from routing entirely, as if the model had only those.
   */
  forward(ids: number[], allowedExperts: number[] | null = null): ReferenceOutput {
    const c = this.cfg
    const { H, D, nH, kvH } = this
    const granite = this.type === 'granitemoe'
    const residual = granite ? (c.residual_multiplier ?? 1) : 1
    const scale = granite ? (c.attention_multiplier ?? 1) : 1 / Math.sqrt(D)
    const allowed = allowedExperts ?? [...Array(this.E).keys()]
    const emb = this.t('model.embed_tokens.weight')
    const embMul = granite ? (c.embedding_multiplier ?? 1) : 1
    let xs = ids.map((id) => Float64Array.from(emb.subarray(id * H, (id + 1) * H), (v) => v * embMul))
    const experts: number[][][] = []
    for (let l = 0; l < c.num_hidden_layers; l++) {
      const p = `model.layers.${l}`
      const qs: Float64Array[] = []
      const ks: Float64Array[] = []
      const vs: Float64Array[] = []
      xs.forEach((x, pos) => {
        const [q, k, v] = this.qkv(p, this.rmsNorm(x, this.t(`${p}.input_layernorm.weight`)))
        this.rope(q, pos, nH)
        this.rope(k, pos, kvH)
        qs.push(q)
        ks.push(k)
        vs.push(v)
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
            scores[j] = s * scale
          }
          const max = Math.max(...scores)
          let sum = 0
          for (let j = 0; j <= pos; j++) sum += scores[j] = Math.exp(scores[j]! - max)
          for (let j = 0; j <= pos; j++)
            for (let d = 0; d < D; d++) attn[h * D + d]! += (scores[j]! / sum) * vs[j]![kv * D + d]!
        }
        const oBias = this.type !== 'qwen2_moe' && this.type !== 'mixtral' && (c.attention_bias ?? false)
        const o = this.proj(`${p}.self_attn.o_proj`, attn, H, oBias)
        const x1 = x.map((v, i) => v + residual * o[i]!)
        const h2 = this.rmsNorm(x1, this.t(`${p}.post_attention_layernorm.weight`))
        const [m, chosen] = this.mlp(p, l, h2, allowed)
        layerExperts.push(chosen)
        return x1.map((v, i) => v + residual * m[i]!)
      })
      experts.push(layerExperts)
    }
    const last = this.rmsNorm(xs[xs.length - 1]!, this.t('model.norm.weight'))
    const lm = c.tie_word_embeddings ? emb : this.t('lm_head.weight')
    const logits = this.linear(lm, last, c.vocab_size)
    const div = granite ? (c.logits_scaling ?? 1) : 1
    return { logits: logits.map((v) => v / div), experts }
  }
}

/**
 * Greedy decoding on the reference: up to maxTokens ids, including a final
 * EOS as the engine reports it (pass isEos = () => false to ignore EOS).
 */
export function referenceGreedy(
  ref: ReferenceModel,
  prompt: readonly number[],
  maxTokens: number,
  isEos: (id: number) => boolean,
): number[] {
  const ids = [...prompt]
  const out: number[] = []
  while (out.length < maxTokens) {
    let best = 0
    const logits = ref.forward(ids).logits
    for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[best]!) best = i
    out.push(best)
    ids.push(best)
    if (isEos(best)) break
  }
  return out
}
