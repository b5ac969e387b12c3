import { randomBytes } from 'node:crypto'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { adminCall, createTenant, type RunningEdge, startEdge } from '../wrangler-dev.ts'

// Webhook URLs are checked at registration (here) and again at every delivery (gpu-worker's
// webhook-delivery test). With the dev setting off, nothing private, loopback, link-local or
// metadata is accepted, and plain http is refused.

describe('webhook URL safety (SSRF) at registration', () => {
  let edge: RunningEdge
  beforeAll(async () => {
    edge = await startEdge({ QUEUE_PREFIX: `moessrf-${randomBytes(4).toString('hex')}` })
  }, 90_000)
  afterAll(async () => {
    await edge?.stop()
  })

  it.each([
    'https://127.0.0.1/hook',
    'https://127.8.9.10:8443/hook',
    'https://10.1.2.3/hook',
    'https://172.16.0.1/hook',
    'https://192.168.0.10/hook',
    'https://169.254.169.254/latest/meta-data/',
    'https://[::1]/hook',
    'https://[::ffff:127.0.0.1]/hook',
    'https://[fd00::1]/hook',
    'https://[fe80::1]/hook',
    'https://localhost/hook',
    'https://metadata.google.internal/computeMetadata/v1/',
    'http://127.0.0.1:9000/hook',
    'http://example.com/hook',
    'https://user:pw@example.com/hook',
  ])('refuses %s', async (url) => {
    const t = await createTenant(edge)
    const res = await adminCall(edge, 'POST', `/tenants/${t.id}/webhooks`, { url })
    expect(res.status).toBe(400)
    const body = (await res.json()) as { error: { message: string; param: string } }
    expect(body.error.message).toMatch(/^Webhook URL /)
    expect(body.error.param).toBe('url')
  })

  it('refuses the same URLs in a tenant config, and takes a valid secret only', async () => {
    const res = await adminCall(edge, 'POST', '/tenants', {
      id: `t_${randomBytes(6).toString('hex')}`,
      name: 'ssrf',
      allowedPools: ['general'],
      defaultPool: 'general',
      webhooks: [
        {
          id: 'we_1',
          url: 'https://10.0.0.1/x',
          secret: 'whsec_AAAAAAAAAAAAAAAAAAAAAAAA',
          events: ['batch.completed'],
        },
      ],
    })
    expect(res.status).toBe(400)
    const t = await createTenant(edge)
    const bad = await adminCall(edge, 'POST', `/tenants/${t.id}/webhooks`, {
      url: 'https://127.0.0.1/x',
      secret: 'not-a-secret',
    })
    expect(bad.status).toBe(400)
  })
})
