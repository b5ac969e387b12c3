// The worker-kill fault, shared by the fault suite (single Redis) and the Redis Cluster suite:
// 20 live streams over two workers, one of them SIGKILLed mid-generation.
import { expect } from 'vitest'
import { type SseResult, streamRequest } from './sse.ts'
import type { Stack, StackInfo, TestTenant } from './stack.ts'

// Workers take a crashed worker's jobs back after a short lock (MOE_LOCK_MS) and stalled-check
// interval. At most 10 sequences per worker, so the 20 streams below are shared by both workers:
// with a larger batch the first worker to poll could take all of them, and the kill would test
// nothing.
export const FAST_RECOVERY = { MOE_LOCK_MS: '2000', MOE_STALLED_INTERVAL_MS: '1000', MOE_MAX_BATCH: '10' }

export interface JobView {
  status: string
  result?: { choices: Array<{ message: { content: string } }>; usage: { completion_tokens: number } }
}

/** GET /v1/jobs/{id} as the tenant. */
export async function jobOf(stack: StackInfo, tenant: TestTenant, id: string): Promise<JobView> {
  const res = await fetch(`${stack.url}/v1/jobs/${id}`, {
    headers: { authorization: `Bearer ${tenant.key}` },
    signal: AbortSignal.timeout(60_000),
  })
  expect(res.status).toBe(200)
  return (await res.json()) as JobView
}

/**
 * Kills `stack.workers[0]` once 20 streams are well under way; every stream must still complete,
 * with exactly its job's final text (no duplicated or missing token), and the survivor must have
 * resumed jobs the killed worker had started.
 */
export async function streamsSurviveWorkerKill(stack: Stack, tenant: TestTenant): Promise<void> {
  let pieces = 0
  let killed = false
  const victim = stack.workers[0]!
  const survivor = stack.workers[1]!
  const kill = async () => {
    killed = true
    await victim.kill('SIGKILL')
  }
  let killing: Promise<void> | null = null
  const streams = Array.from({ length: 20 }, (_, i) =>
    streamRequest(
      `${stack.url}/v1/chat/completions`,
      tenant.key,
      {
        model: 'auto',
        messages: [{ role: 'user', content: `Stream ${i}: tell me a long story about experts.` }],
        max_tokens: 400,
        temperature: 1,
        stream_options: { include_usage: true },
      },
      {
        timeoutMs: 150_000,
        onChunk: () => {
          // Kill once the streams are well under way (every stream has sent ~8 tokens on average).
          if (++pieces === 160 && !killed) killing = kill()
        },
      },
    ),
  )
  const results: SseResult[] = await Promise.all(streams)
  await killing
  expect(killed).toBe(true)
  for (const [i, r] of results.entries()) {
    expect(r.status, `stream ${i}`).toBe(200)
    expect(r.error, `stream ${i}`).toBeNull()
    expect(r.done, `stream ${i}`).toBe(true)
    // The streamed pieces add up to exactly the job's final text and token count.
    const id = r.headers.get('x-request-id')!
    const j = await jobOf(stack, tenant, id)
    expect(j.status, `stream ${i}`).toBe('completed')
    expect(r.text, `stream ${i} (${id})`).toBe(j.result!.choices[0]!.message.content)
    expect(r.completionTokens, `stream ${i}`).toBe(j.result!.usage.completion_tokens)
  }
  // The survivor really resumed jobs the killed worker had started.
  expect(survivor.log()).toMatch(/resuming a retried job/)
}
