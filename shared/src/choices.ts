import type { ChoiceResult, SampledLogprob } from './stream.ts'

// A job's choices as OpenAI's response objects show them, for the edge's responses and the
// worker's batch output lines alike: the choice list, and logprobs in the chat and the legacy
// text-completion shapes.

/** A finished job's choices: `choices` when the job wrote them, else its one choice. */
export function answerChoices<F extends string>(answer: {
  text: string
  finishReason: F
  usage: { completionTokens: number }
  choices?: ChoiceResult[] | undefined
}): Array<Omit<ChoiceResult, 'finishReason'> & { finishReason: F | ChoiceResult['finishReason'] }> {
  if (answer.choices && answer.choices.length > 0) return answer.choices
  return [
    {
      index: 0,
      text: answer.text,
      finishReason: answer.finishReason,
      completionTokens: answer.usage.completionTokens,
    },
  ]
}

/** One token's entry of chat's `logprobs.content`. */
export const chatLogprobEntry = (lp: SampledLogprob) => ({
  token: lp.token,
  logprob: lp.logprob,
  bytes: lp.bytes,
  top_logprobs: lp.top.map((t) => ({ token: t.token, logprob: t.logprob, bytes: t.bytes })),
})

/** Chat's `choices[].logprobs`: null unless the request asked for logprobs. */
export const chatLogprobs = (lps: readonly SampledLogprob[] | undefined) =>
  lps ? { content: lps.map(chatLogprobEntry), refusal: null } : null

/**
 * The legacy text-completion `logprobs` object. `textOffset` is where the first token starts in
 * the choice's text (a streamed chunk starts where the previous one ended).
 */
export function completionLogprobs(lps: readonly SampledLogprob[] | undefined, textOffset = 0) {
  if (!lps) return null
  const text_offset: number[] = []
  let offset = textOffset
  for (const lp of lps) {
    text_offset.push(offset)
    offset += lp.token.length
  }
  return {
    tokens: lps.map((lp) => lp.token),
    token_logprobs: lps.map((lp) => lp.logprob),
    // As OpenAI's: the sampled token is always among them, so up to logprobs + 1 entries.
    top_logprobs: lps.map((lp) => ({
      ...Object.fromEntries(lp.top.map((t) => [t.token, t.logprob])),
      [lp.token]: lp.logprob,
    })),
    text_offset,
  }
}
