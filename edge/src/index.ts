import { app } from './app.ts'

export { app } from './app.ts'
/** The Durable Object that admits a tenant's requests (bound as TENANT_ADMISSION in wrangler.toml). */
export { TenantAdmission } from './tenant-admission.ts'

export default app
