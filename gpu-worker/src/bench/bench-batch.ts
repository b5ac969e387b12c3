import type { GenerationParams, Sequence } from '../engine/sequence.ts'
import type { StepEngine, StepRow } from '../engine/step-engine.ts'

// The decode benchmarks' common ground: a batch of sequences in KV slots 0..n-1, prefilled the way
// the scheduler bounds a padded batch, then stepped one decode pass at a time.

/** Rows feeding each sequence's next input on top of what its slot already holds. */
export const stepRows = (seqs: readonly Sequence[]): StepRow[] =>
  seqs.map((s) => ({ slot: s.slot, tokens: s.nextInput(), pastLength: s.pastLength, allowedExperts: null }))

/** One sequence per prompt in slots 0..n-1, prefilled in groups of up to 8 rows. */
export async function prefilledBatch(
  engine: StepEngine,
  prompts: readonly (readonly number[])[],
  params: (b: number) => Partial<GenerationParams> & { seed: number },
): Promise<Sequence[]> {
  const seqs = prompts.map((prompt, b) => {
    const s = engine.createSequence(`b${b}`, prompt, params(b))
    s.slot = b
    return s
  })
  for (let i = 0; i < seqs.length; i += 8) {
    const group = seqs.slice(i, i + 8)
    const rows = stepRows(group)
    engine.acceptStep(group, rows, await engine.forward(rows))
  }
  return seqs
}

/** One decode pass of every sequence; returns the pass's output. */
export async function decodeStep(engine: StepEngine, seqs: readonly Sequence[]) {
  const rows = stepRows(seqs)
  const out = await engine.forward(rows)
  engine.acceptStep(seqs, rows, out)
  return out
}
