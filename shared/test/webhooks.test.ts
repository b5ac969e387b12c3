import { describe, expect, it } from 'vitest'
import { checkWebhookUrl, classifyIp } from '../src/webhooks.ts'

// Addresses that must never receive a webhook, in their many spellings.
describe('webhook address classification', () => {
  it.each([
    ['127.0.0.1', 'loopback'],
    ['::1', 'loopback'],
    ['10.1.2.3', 'private'],
    ['192.168.0.9', 'private'],
    ['169.254.169.254', 'metadata'],
    ['::ffff:10.0.0.1', 'private'],
    ['64:ff9b::a00:1', 'private'], // NAT64 of 10.0.0.1
    ['2002:a00:1::', 'private'], // 6to4 of 10.0.0.1
    ['2002:7f00:1::', 'loopback'], // 6to4 of 127.0.0.1
    ['fe80::1', 'link-local'],
    ['fd00::1', 'private'],
    ['::7f00:1', 'loopback'], // IPv4-compatible ::127.0.0.1, as a URL spells it
    ['::a9fe:a9fe', 'metadata'], // ::169.254.169.254
    ['::a00:1', 'private'], // ::10.0.0.1
    ['::', 'reserved'],
  ])('%s is %s', (ip, kind) => {
    expect(classifyIp(ip)).toBe(kind)
  })

  it('lets public addresses through, including 6to4 of a public one', () => {
    expect(classifyIp('93.184.216.34')).toBe('public')
    expect(classifyIp('2002:5db8:d822::')).toBe('public')
    expect(classifyIp('2606:4700::1111')).toBe('public')
  })

  it('refuses http, credentials and internal names unless loopback is allowed for tests', () => {
    const prod = { allowLoopback: false }
    expect(checkWebhookUrl('https://example.com/hook', prod)).toBeNull()
    expect(checkWebhookUrl('http://example.com/hook', prod)).not.toBeNull()
    expect(checkWebhookUrl('https://user:pw@example.com/hook', prod)).not.toBeNull()
    expect(checkWebhookUrl('https://[64:ff9b::a9fe:a9fe]/', prod)).not.toBeNull()
    expect(checkWebhookUrl('https://metadata.google.internal/', prod)).not.toBeNull()
    expect(checkWebhookUrl('https://[::7f00:1]/', prod)).toMatch(/loopback/)
    expect(checkWebhookUrl('https://[::127.0.0.1]/', prod)).toMatch(/loopback/)
    expect(checkWebhookUrl('https://[::169.254.169.254]/', prod)).toMatch(/metadata/)
    expect(classifyIp('::808:808')).toBe('public') // ::8.8.8.8
    expect(checkWebhookUrl('http://127.0.0.1:9999/hook', { allowLoopback: true })).toBeNull()
  })
})

describe('secret rotation: signing with several secrets', () => {
  it('signs with each space-separated secret; a receiver holding either one verifies', async () => {
    const { Webhook } = await import('standardwebhooks')
    const { generateWebhookSecret, signingEndpoint, webhookHeaders } = await import('../src/webhooks.ts')
    const [next, prev] = [generateWebhookSecret(), generateWebhookSecret()]
    const ep = signingEndpoint(
      {
        id: 'we_1',
        url: 'https://93.184.216.34/h',
        secret: next,
        events: ['batch.completed'],
        disabled: false,
        previousSecret: { secret: prev, expiresAt: Date.now() + 60_000 },
      },
      Date.now(),
    )
    const body = JSON.stringify({ type: 'batch.completed' })
    const headers = await webhookHeaders(ep.secret, 'msg_1', body)
    expect(headers['webhook-signature']!.split(' ')).toHaveLength(2)
    for (const s of [next, prev]) expect(() => new Webhook(s).verify(body, headers)).not.toThrow()
    // Once the grace is over, only the new secret signs.
    const after = signingEndpoint({ ...ep, secret: next, previousSecret: { secret: prev, expiresAt: 1 } })
    expect(after.secret).toBe(next)
    expect(after).not.toHaveProperty('previousSecret')
  })
})
