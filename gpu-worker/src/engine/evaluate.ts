import type { StepEngine, StepRow } from './engine.ts'

/** Held-out quality of a model on a text: what `moe eval` prints. */
export interface TextEvaluation {
  /** Average code length of the text under the model, in bits per UTF-8 byte. */
  bits_per_byte: number
  /** Tokens scored (each predicted from the ones before it in its window). */
  tokens: number
  /** UTF-8 bytes those tokens spell. */
  bytes: number
  /** Windows the text was cut into (each starts a fresh context). */
  windows: number
  /** exp of the mean negative log-likelihood per scored token. */
  perplexity: number
}

export interface EvaluateOptions {
  /** Tokens per window, BOS excluded (default: the engine's context limit less one). */
  window?: number
  /** Restrict routing to these experts, as a pool does. */
  allowedExperts?: readonly number[] | null
}

/** log2 of softmax(logits)[target], in float64. */
function log2Prob(logits: Float32Array, target: number): number {
  let max = Number.NEGATIVE_INFINITY
  for (let i = 0; i < logits.length; i++) if (logits[i]! > max) max = logits[i]!
  let sum = 0
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i]! - max)
  return (logits[target]! - max - Math.log(sum)) / Math.LN2
}

/**
 * Scores a text with the engine's own forward pass. The text is tokenized whole and cut into
 * windows; each window starts from BOS (or, for a model without one, from its first token, which
 * is then context only) and every later token is predicted from the ones before it. Windows run
 * as rows of one batch, a token per step, so the graph's last-position logits are all it needs.
 */
export async function evaluateText(
  engine: StepEngine,
  text: string,
  opts: EvaluateOptions = {},
): Promise<TextEvaluation> {
  const tokenizer = engine.tokenizer
  const bos = tokenizer.bosTokenId
  const window = opts.window ?? engine.maxContext - 1
  if (!Number.isInteger(window) || window < 2 || window > engine.maxContext - 1)
    throw new Error(`window must be an integer in [2, ${engine.maxContext - 1}] (got ${window})`)
  const allowedExperts = opts.allowedExperts ?? null
  engine.validateExperts(allowedExperts)
  const ids = tokenizer.encode(text)
  if (ids.length === 0) throw new Error('the text is empty: there is nothing to score')

  // Each window: the tokens fed, and from which position on they are scored.
  const windows: Array<{ input: number[]; scoredFrom: number }> = []
  for (let at = 0; at < ids.length; at += window) {
    const chunk = ids.slice(at, at + window)
    if (bos !== null) windows.push({ input: [bos, ...chunk], scoredFrom: 1 })
    else if (chunk.length > 1) windows.push({ input: chunk, scoredFrom: 1 })
  }
  if (windows.length === 0)
    throw new Error('the text is one token, and the model has no BOS to predict it from')

  let bits = 0
  let tokens = 0
  const scored: number[] = []
  const V = engine.config.vocab_size
  for (let w0 = 0; w0 < windows.length; w0 += engine.maxBatch) {
    const wave = windows.slice(w0, w0 + engine.maxBatch)
    const longest = Math.max(...wave.map((w) => w.input.length))
    // Step t feeds token t of every row and reads the prediction of token t + 1. Rows that ran out
    // feed their last token again (padding, not scored) so slots stay contiguous.
    for (let t = 0; t < longest - 1; t++) {
      const rows: StepRow[] = wave.map((w, slot) => ({
        slot,
        tokens: [w.input[Math.min(t, w.input.length - 1)]!],
        pastLength: t,
        allowedExperts,
      }))
      const out = await engine.forward(rows)
      wave.forEach((w, i) => {
        const target = t + 1
        if (target >= w.input.length || target < w.scoredFrom) return
        bits -= log2Prob(out.logits.subarray(i * V, (i + 1) * V), w.input[target]!)
        tokens++
        scored.push(w.input[target]!)
      })
    }
  }
  // Bytes of what was scored: the whole text, unless windows began with an unscored token.
  const bytes =
    bos !== null
      ? Buffer.byteLength(text, 'utf8')
      : Buffer.byteLength(tokenizer.decode(scored, { skipSpecialTokens: false }), 'utf8')
  return {
    bits_per_byte: bits / bytes,
    tokens,
    bytes,
    windows: windows.length,
    perplexity: 2 ** (bits / tokens),
  }
}
