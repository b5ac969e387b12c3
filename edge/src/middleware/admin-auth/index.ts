import { MoeError } from '@moe/shared'
import type { MiddlewareHandler } from 'hono'
import { timingSafeEqual } from 'hono/utils/buffer'
import { bearerToken } from '../../auth.ts'
import type { AppEnv, Ctx } from '../../http.ts'

export interface AdminAuthOptions {
  /** The configured admin token; null or empty disables the admin API (every call is a 401). */
  token: (c: Ctx) => string | null
}

/** `Authorization: Bearer <admin token>`, compared in constant time, or 401. */
export const adminAuth = (options: AdminAuthOptions): MiddlewareHandler<AppEnv> => {
  if (typeof options?.token !== 'function') {
    throw new Error('adminAuth needs token: (c) => the configured admin token')
  }
  return async function adminAuth(c, next) {
    const expected = options.token(c)
    if (!expected) {
      throw new MoeError('invalid_api_key', 'The admin API is disabled: the ADMIN_TOKEN secret is not set')
    }
    const presented = bearerToken(c.req.header('authorization'))
    // Hono's comparison hashes both sides first, so neither the length nor the first differing
    // character of the token shows in the time it takes.
    if (presented === null || !(await timingSafeEqual(presented, expected))) {
      throw new MoeError('invalid_api_key', 'Invalid admin token')
    }
    await next()
  }
}
