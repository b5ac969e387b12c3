import { MoeError } from '@moe/shared'
import { Hono } from 'hono'
import { timingSafeEqual } from 'hono/utils/buffer'
import { beforeEach, describe, expect, it, vi } from 'vitest'
import { type AppEnv, errorResponse } from '../../http.ts'
import { adminAuth } from './index.ts'

// A spy around Hono's own constant-time comparison (the real one still answers), so the test can
// see that the token goes through it and nowhere else.
vi.mock('hono/utils/buffer', async (importOriginal) => {
  const real = await importOriginal<typeof import('hono/utils/buffer')>()
  return { ...real, timingSafeEqual: vi.fn(real.timingSafeEqual) }
})

function adminApp(token: string | null) {
  const app = new Hono<AppEnv>()
  app.use('/admin/*', adminAuth({ token: () => token }))
  app.get('/admin/ping', (c) => c.text('pong'))
  app.onError((e, c) => (e instanceof MoeError ? errorResponse(c, e) : c.text(String(e), 500)))
  return app
}

const call = (app: Hono<AppEnv>, authorization?: string) =>
  app.request('/admin/ping', authorization === undefined ? {} : { headers: { authorization } })

async function errorOf(res: Response): Promise<{ code: string; message: string }> {
  expect(res.status).toBe(401)
  return ((await res.json()) as { error: { code: string; message: string } }).error
}

describe('adminAuth', () => {
  beforeEach(() => vi.mocked(timingSafeEqual).mockClear())

  it('lets the configured token through, compared with the platform’s constant-time comparison', async () => {
    const res = await call(adminApp('s3cret'), 'Bearer s3cret')
    expect(res.status).toBe(200)
    expect(await res.text()).toBe('pong')
    expect(timingSafeEqual).toHaveBeenCalledWith('s3cret', 's3cret')
  })

  it('401s tokens that differ only in the last character or in length', async () => {
    const app = adminApp('s3cret')
    for (const presented of ['s3creT', 's3cre', 's3crets', 'x']) {
      const err = await errorOf(await call(app, `Bearer ${presented}`))
      expect(err).toMatchObject({ code: 'invalid_api_key', message: 'Invalid admin token' })
      expect(timingSafeEqual).toHaveBeenLastCalledWith(presented, 's3cret')
    }
  })

  it('401s a request without a bearer token', async () => {
    const err = await errorOf(await call(adminApp('s3cret')))
    expect(err.message).toBe('Invalid admin token')
    expect((await errorOf(await call(adminApp('s3cret'), 'Basic czNjcmV0'))).code).toBe('invalid_api_key')
  })

  it('keeps the admin API closed when no token is configured', async () => {
    for (const token of [null, '']) {
      const err = await errorOf(await call(adminApp(token), 'Bearer anything'))
      expect(err.message).toContain('ADMIN_TOKEN')
    }
    expect(timingSafeEqual).not.toHaveBeenCalled()
  })

  it('refuses to be built without a token source', () => {
    expect(() => adminAuth({} as never)).toThrow(/token/)
  })
})
