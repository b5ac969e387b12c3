import type { StepRow } from '../engine/engine.ts'
import { BENCH_CONFIG } from '../engine/random-model.ts'

// Bytes of weights and KV cache a decode step of the bench model reads.

export const c = { ...BENCH_CONFIG, head_dim: BENCH_CONFIG.head_dim ?? 64 }
export const F = 4 // bytes per fp32 weight
export const H = c.hidden_size
export const attnParams =
  (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim * H +
  c.num_attention_heads * c.head_dim * H
export const routerParams = c.num_local_experts * H
export const expertParams = 3 * c.intermediate_size * H
export const lmHeadParams = c.vocab_size * H

/** Weight and KV bytes one decode step reads, given which experts it touched. */
export function decodeBytes(touchedPerLayer: number[], rows: readonly StepRow[]): number {
  let bytes = lmHeadParams * F
  for (const touched of touchedPerLayer) bytes += (attnParams + routerParams + touched * expertParams) * F
  const kvPerToken = 2 * c.num_key_value_heads * c.head_dim * F * c.num_hidden_layers
  for (const r of rows) bytes += (r.pastLength + 1) * kvPerToken
  return bytes
}

export function touchedExperts(counts: Uint32Array, rows: number): number[] {
  const L = c.num_hidden_layers
  const E = c.num_local_experts
  return Array.from({ length: L }, (_, l) => {
    let touched = 0
    for (let e = 0; e < E; e++) {
      let n = 0
      for (let r = 0; r < rows; r++) n += counts[(r * L + l) * E + e]!
      if (n > 0) touched++
    }
    return touched
  })
}
