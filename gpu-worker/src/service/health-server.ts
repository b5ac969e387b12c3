import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { WorkerMetrics } from './metrics.ts'

export interface HealthSource {
  health(): { ok: boolean; [key: string]: unknown }
}

/** /metrics (Prometheus text) and /healthz (JSON; 503 when not ready or draining). */
export async function startHealthServer(
  host: string,
  port: number,
  metrics: WorkerMetrics,
  source: HealthSource,
): Promise<{ server: Server; port: number }> {
  const server = createServer(async (req, res) => {
    const path = (req.url ?? '/').split('?')[0]
    if (req.method === 'GET' && path === '/metrics') {
      res.writeHead(200, { 'content-type': metrics.registry.contentType })
      res.end(await metrics.registry.metrics())
    } else if (req.method === 'GET' && path === '/healthz') {
      const h = source.health()
      res.writeHead(h.ok ? 200 : 503, { 'content-type': 'application/json' })
      res.end(JSON.stringify(h))
    } else {
      res.writeHead(404, { 'content-type': 'application/json' })
      res.end(
        JSON.stringify({
          error: { message: 'not found', type: 'invalid_request_error', param: null, code: 'not_found' },
        }),
      )
    }
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => resolve())
  })
  return { server, port: (server.address() as AddressInfo).port }
}
