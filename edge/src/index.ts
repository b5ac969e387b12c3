import { MoeError } from '@moe/shared'
import { Hono } from 'hono'
import type { Env } from './env.ts'

export const app = new Hono<{ Bindings: Env }>()

app.get('/healthz', (c) => c.json({ status: 'ok', service: 'moe-edge', environment: c.env.ENVIRONMENT }))

app.notFound((c) => {
  const err = new MoeError('not_found', `No route for ${c.req.method} ${new URL(c.req.url).pathname}`)
  return c.json(err.toBody(), 404)
})

app.onError((error, c) => {
  if (error instanceof MoeError) return c.json(error.toBody(), error.status as 400)
  console.error(JSON.stringify({ level: 'error', msg: 'unhandled', error: String(error) }))
  return c.json(new MoeError('internal_error', 'Internal error').toBody(), 500)
})

export default app
