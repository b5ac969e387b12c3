// A seeded generator of malformed requests: the same seed gives the same requests, so a failure
// names the seed and the case number that reproduce it.

/** mulberry32: small, fast, good enough for test inputs. */
export function rng(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

export interface FuzzCase {
  kind: string
  method: string
  path: string
  headers: Record<string, string>
  body?: string | Uint8Array
}

export interface FuzzContext {
  key: string
  /** Another tenant's key and one of its job ids. */
  otherKey: string
  otherJobId: string
}

const UNICODE = [
  '\u0000',
  '\ud800',
  '\udfff',
  '\ud83d\ude00',
  '\u202e',
  '\u2028\u2029',
  '\ufeff',
  '\uffff',
  'e\u0301\u0301\u0301\u0301',
  '\u{1f468}\u200d\u{1f469}\u200d\u{1f467}',
  '\u0000\u0001\u0002\u001f\u007f',
  'Z\u0351\u0360\u035b\u0302',
  '\ufffd',
  '𝕳𝖊𝖑𝖑𝖔',
  '\\u0000',
]

const TRAVERSAL = [
  '..%2F..%2Fadmin%2Ftenants',
  '%2e%2e%2f%2e%2e%2fadmin',
  '..%5C..%5Cadmin',
  '%00',
  'req_abc%00.json',
  'a%2Fb',
  '%252e%252e%252f',
  '....%2F%2F',
  '%C0%AE%C0%AE%2F',
  'x'.repeat(129),
  'x'.repeat(5000),
  '%F0%9F%98%80',
  'job%20id',
  "'%20OR%201=1--",
  '*',
  '%2A',
]

export function generate(seed: number, count: number, ctx: FuzzContext): FuzzCase[] {
  const r = rng(seed)
  const int = (n: number) => Math.floor(r() * n)
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!
  const auth = { authorization: `Bearer ${ctx.key}` }
  const json = { ...auth, 'content-type': 'application/json' }
  const endpoint = () => pick(['/v1/chat/completions', '/v1/completions', '/v1/route', '/v1/jobs'])
  const baseChat = () => ({
    model: 'auto',
    messages: [{ role: 'user', content: 'hi' }],
    max_tokens: 1 + int(3),
    temperature: 0,
  })
  const baseFor = (path: string): Record<string, unknown> =>
    path === '/v1/completions'
      ? { model: 'general', prompt: 'hi', max_tokens: 1 + int(3) }
      : path === '/v1/jobs'
        ? { endpoint: '/v1/chat/completions', body: baseChat() }
        : baseChat()
  const weird = (): unknown =>
    pick<() => unknown>([
      () => null,
      () => true,
      () => -1,
      () => 0,
      () => 1.5,
      () => 1e308,
      () => -1e308,
      () => Number.MAX_SAFE_INTEGER + 2,
      () => '',
      () => '1',
      () => 'NaN',
      () => pick(UNICODE),
      () => [],
      () => [null],
      () => [1, 'a', {}],
      () => ({}),
      () => ({ role: 'user' }),
      () => ({ __proto__: { polluted: true } }),
      () => JSON.parse('{"__proto__":{"polluted":1},"constructor":{"prototype":{"x":1}}}'),
      () => 'x'.repeat(1 + int(20_000)),
      () => Array.from({ length: 1 + int(2000) }, () => 0),
    ])()
  const FIELDS = [
    'model',
    'messages',
    'prompt',
    'max_tokens',
    'max_completion_tokens',
    'temperature',
    'top_p',
    'top_k',
    'seed',
    'stop',
    'stream',
    'stream_options',
    'n',
    'metadata',
    'user',
    'tools',
    'logit_bias',
    'response_format',
    'frequency_penalty',
    'endpoint',
    'body',
  ]
  const nested = (depth: number, arr: boolean) =>
    arr ? `${'['.repeat(depth)}${']'.repeat(depth)}` : `${'{"a":'.repeat(depth)}1${'}'.repeat(depth)}`

  const gens: Array<[string, () => Omit<FuzzCase, 'kind'>]> = [
    [
      'bad-json',
      () => {
        const path = endpoint()
        const good = JSON.stringify(baseFor(path))
        const body = pick<() => string>([
          () => good.slice(0, int(good.length)),
          () => `${good},`,
          () => good.replace(/"/g, "'"),
          () => good.replace('}', ',}'),
          () => good.replace(/:/, '::'),
          () => `\ufeff${good}`,
          () => '',
          () => 'null',
          () => '[]',
          () => '"string"',
          () => '1e999',
          () => 'NaN',
          () => '{"model": undefined}',
          () => '{"a":1}{"b":2}',
          () => good.replace('"hi"', '"\\ud800"'),
          () => good.replace('"hi"', '"\\x41"'),
          () => `${good}\u0000`,
        ])()
        return { method: 'POST', path, headers: json, body }
      },
    ],
    [
      'invalid-utf8',
      () => {
        const path = endpoint()
        const good = new TextEncoder().encode(JSON.stringify(baseFor(path)))
        const bad = pick([[0xc0, 0xae], [0xff], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xe2, 0x82]])
        const at = good.indexOf(0x68) // the "h" of "hi"
        const body = new Uint8Array([...good.slice(0, at), ...bad, ...good.slice(at)])
        return { method: 'POST', path, headers: json, body }
      },
    ],
    [
      'wrong-type',
      () => {
        const path = endpoint()
        const body = baseFor(path)
        const target = path === '/v1/jobs' && r() < 0.5 ? (body.body as Record<string, unknown>) : body
        for (let i = 0, n = 1 + int(3); i < n; i++) target[pick(FIELDS)] = weird()
        return { method: 'POST', path, headers: json, body: JSON.stringify(body) }
      },
    ],
    [
      'wrong-message',
      () => {
        const body = baseChat() as Record<string, unknown>
        const msg: Record<string, unknown> = { role: 'user', content: 'hi' }
        msg[pick(['role', 'content', 'name', 'tool_calls', 'extra'])] = weird()
        if (r() < 0.3)
          msg.content = [
            pick<unknown>([
              { type: 'image_url', image_url: weird() },
              { type: 'image_url', image_url: { url: weird() } },
              { type: 'text', text: weird() },
              { type: weird(), text: 'x' },
              { type: 'input_audio', input_audio: { data: weird(), format: weird() } },
            ]),
          ]
        body.messages = r() < 0.2 ? [] : [msg]
        return {
          method: 'POST',
          path: pick(['/v1/chat/completions', '/v1/route']),
          headers: json,
          body: JSON.stringify(body),
        }
      },
    ],
    [
      'huge',
      () => {
        const path = endpoint()
        const body = baseFor(path)
        const size = pick([100_000, 600_000, 1_048_577, 1_500_000])
        const big = pick(['a', '\u{1f600}', '\u0000', 'é'])
        const s = big.repeat(Math.ceil(size / big.length))
        pick<() => void>([
          () => {
            body.model = s
          },
          () => {
            body.stop = [s.slice(0, 200_000)]
          },
          () => {
            body.user = s
          },
          () => {
            body.messages = [{ role: 'user', content: s }]
          },
          () => {
            body.messages = Array.from({ length: 20_000 }, () => ({ role: 'user', content: 'x' }))
          },
        ])()
        return { method: 'POST', path, headers: json, body: JSON.stringify(body) }
      },
    ],
    [
      'deep-nesting',
      () => {
        const path = endpoint()
        const depth = pick([64, 1000, 10_000, 100_000])
        const arr = r() < 0.5
        const body = JSON.stringify(baseFor(path)).replace('"hi"', nested(depth, arr))
        return { method: 'POST', path, headers: json, body: r() < 0.3 ? nested(depth, arr) : body }
      },
    ],
    [
      'unicode',
      () => {
        const path = pick(['/v1/chat/completions', '/v1/completions', '/v1/route'])
        const body = baseFor(path)
        const u = Array.from({ length: 1 + int(6) }, () => pick(UNICODE)).join('')
        pick<() => void>([
          () => {
            body.model = u
          },
          () => {
            body.stop = [u]
          },
          () => {
            if ('prompt' in body) body.prompt = u
            else body.messages = [{ role: 'user', content: u }]
          },
          () => {
            body.metadata = { task: u }
          },
          () => {
            body[u] = 1
          },
        ])()
        return { method: 'POST', path, headers: json, body: JSON.stringify(body) }
      },
    ],
    [
      'headers',
      () => {
        const path = pick(['/v1/chat/completions', '/v1/completions'])
        const headers: Record<string, string> = { ...json }
        const v = pick([
          'code, math',
          '../../admin',
          'x'.repeat(8000),
          '%0d%0aSet-Cookie: a=b',
          'code\tmath',
          'Ã©Ã¨',
          '',
          ' ',
          'null',
          ctx.otherKey,
          '\u00ff\u00fe',
        ])
        pick<() => void>([
          () => {
            headers['x-moe-task'] = v
          },
          () => {
            headers['idempotency-key'] = v
          },
          () => {
            headers.prefer = `${v}, respond-async`
          },
          () => {
            headers['cache-control'] = v
          },
          () => {
            headers['x-client-request-id'] = v
          },
          () => {
            headers['content-type'] = pick([
              'text/plain',
              'application/x-www-form-urlencoded',
              'multipart/form-data; boundary=x',
              'application/json; charset=utf-16',
              'application/jsonx',
              '',
              v,
            ])
          },
          () => {
            headers['content-encoding'] = pick(['gzip', 'br', 'deflate', 'x'])
          },
          () => {
            headers['x-request-id'] = ctx.otherJobId
          },
          () => {
            headers.authorization = pick([
              `Bearer ${ctx.key}${v}`,
              `Bearer ${v}`,
              v,
              `Bearer ${ctx.otherKey.slice(0, 20)}`,
            ])
          },
        ])()
        return { method: 'POST', path, headers, body: JSON.stringify(baseFor(path)) }
      },
    ],
    [
      'job-ids',
      () => {
        const id = pick([...TRAVERSAL, ctx.otherJobId, `${ctx.otherJobId}%00`, `${ctx.otherJobId}/../x`])
        return { method: pick(['GET', 'DELETE', 'POST', 'PUT']), path: `/v1/jobs/${id}`, headers: json }
      },
    ],
    [
      'paths',
      () => ({
        method: pick(['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'HEAD']),
        path: pick([
          '/v1/chat/completions',
          '/v1/models',
          '/v1/',
          '/v1//chat//completions',
          '/v1/chat/completions/',
          '/V1/CHAT/COMPLETIONS',
          '/v1/models/../jobs',
          '/v1/%2e%2e/admin/tenants',
          '/admin/tenants',
          '/admin/tenants/dev/keys',
          '/admin/%2e%2e',
          `/v1/${'a/'.repeat(500)}`,
          '/v1/jobs?id=../../admin',
          '/v1/chat/completions?stream=true&model[]=1',
          '/%00',
          '/v1/files/../../etc/passwd',
          '/v1/batches/..%2F..%2F',
        ]),
        headers: r() < 0.5 ? json : { ...json, authorization: `Bearer ${ctx.otherKey}` },
        body: '{}',
      }),
    ],
  ]
  const out: FuzzCase[] = []
  for (let i = 0; i < count; i++) {
    const [kind, gen] = pick(gens)
    const c = gen()
    // GET/HEAD cannot carry a body in fetch.
    if (c.method === 'GET' || c.method === 'HEAD') delete c.body
    out.push({ kind, ...c })
  }
  return out
}
