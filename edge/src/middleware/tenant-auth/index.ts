import type { MiddlewareHandler } from 'hono'
import { authenticate } from '../../auth.ts'
import type { AppEnv, Ctx } from '../../http.ts'

export interface TenantAuthOptions {
  /** The KV namespace that holds API keys (by hash) and tenant configs. */
  keys: (c: Ctx) => KVNamespace
}

/**
 * `Authorization: Bearer <API key>` -> the key's tenant as `principal` on the context, or 401 in
 * the OpenAI error shape (missing, unknown, revoked or expired key).
 */
export const tenantAuth = (options: TenantAuthOptions): MiddlewareHandler<AppEnv> => {
  if (typeof options?.keys !== 'function') {
    throw new Error('tenantAuth needs keys: (c) => the KV namespace of API keys')
  }
  return async function tenantAuth(c, next) {
    const principal = await authenticate(options.keys(c), c.req.header('authorization'))
    c.set('principal', principal)
    c.get('logFields').tenant = principal.tenant.id
    await next()
  }
}
