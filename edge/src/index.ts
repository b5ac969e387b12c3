import { app } from './app.ts'

export { app } from './app.ts'
/** The Durable Object that keeps a warm Redis connection (bound as REDIS_GATEWAY in wrangler.toml). */
export { RedisGateway } from './redis-gateway.ts'

export default app
