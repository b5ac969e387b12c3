import type { OnnxGraphWriter } from './onnx-graph.ts'

/** One expert's two projections as graph builders: x [n,H] -> [n,2I] (gate then up), and [n,I] -> [n,H]. */
export interface ExpertProjections {
  gateUp: (x: string) => string
  down: (x: string) => string
}

/**
 * Routed experts spelled out in standard ops: top-k per token, then for each
 * expert gather the tokens that chose it, run its SwiGLU as one matrix
 * product per projection over all of them (so a step reads each expert's
 * weights once, however many tokens chose it), and scatter-add the weighted
 * result. Experts no token chose run on zero rows. Each entry of `experts` is
 * called once, in order, and may write its weights then, so a layer's experts
 * need never be in memory together.
 */
export function routedExpertsDispatch(
  g: OnnxGraphWriter,
  flat: string,
  logits: string,
  experts: ReadonlyArray<() => ExpertProjections>,
  opts: { k: number; normTopK: boolean; I: number },
): string {
  const { k, I } = opts
  // Weights as the MoE op computes them: softmax over the top-k logits, or top-k of the softmax over all.
  let weights: string
  let indices: string
  if (opts.normTopK) {
    const [v, i] = g.node('TopK', [logits, g.constInt64([k])], 2, { axis: -1 })
    weights = g.op('Softmax', [v!], { axis: -1 })
    indices = i!
  } else {
    const [v, i] = g.node('TopK', [g.op('Softmax', [logits], { axis: -1 }), g.constInt64([k])], 2, {
      axis: -1,
    })
    weights = v!
    indices = i!
  }
  let out = g.op('Mul', [flat, g.initializer(g.fresh('zero'), 'float32', [], Float32Array.of(0))])
  const splits = g.constInt64([I, I])
  experts.forEach((build, j) => {
    const e = build()
    // (token, slot) pairs that chose expert j; each token chooses an expert at most once.
    const pairs = g.op('Transpose', [g.op('NonZero', [g.op('Equal', [indices, g.constInt64([j], [])])])])
    const rows = g.op('Gather', [pairs, g.constInt64([0], [])], { axis: 1 })
    const w = g.op('GatherND', [weights, pairs])
    const x = g.op('Gather', [flat, rows], { axis: 0 })
    const [gate, up] = g.node('Split', [e.gateUp(x), splits], 2, { axis: -1 })
    const act = g.op('Mul', [g.op('Mul', [gate!, g.op('Sigmoid', [gate!])]), up!])
    const y = g.op('Mul', [e.down(act), g.op('Unsqueeze', [w, g.constInt64([1])])])
    out = g.op('ScatterND', [out, g.op('Unsqueeze', [rows, g.constInt64([1])]), y], { reduction: 'add' })
  })
  return out
}
