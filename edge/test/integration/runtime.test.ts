import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type RunningEdge, startEdge } from '../wrangler-dev.ts'

// Runs the Worker in workerd through `wrangler dev`, as production would run it.
describe('edge in workerd', () => {
  let edge: RunningEdge
  beforeAll(async () => {
    edge = await startEdge()
  }, 90_000)
  afterAll(async () => edge?.stop())

  it('answers /healthz', async () => {
    const res = await fetch(`${edge.url}/healthz`)
    expect(res.status).toBe(200)
    expect(await res.json()).toMatchObject({ status: 'ok', service: 'moe-edge' })
  })

  it('answers unknown routes with 404 in the OpenAI error shape', async () => {
    const res = await fetch(`${edge.url}/v1/nope`)
    expect(res.status).toBe(404)
    const body = (await res.json()) as { error: { code: string; message: string } }
    expect(body.error.code).toBe('not_found')
    expect(body.error.message).toContain('/v1/nope')
  })
})
