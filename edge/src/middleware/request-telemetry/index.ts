import { latencyBucket, TelemetryField } from '@moe/shared'
import type { MiddlewareHandler } from 'hono'
import { routePath } from 'hono/route'
import { type AppEnv, type Ctx, log } from '../../http.ts'

// Every API request, counted twice:
// - in Workers Analytics Engine (the EDGE_METRICS binding, staging and production), where
//   Cloudflare operators query it with the SQL API or Grafana; it keeps months, but a query
//   needs an account API token and lags by a minute or so;
// - in per-minute Redis counters (shared/src/telemetry.ts), which the dashboard reads in every
//   environment, `wrangler dev` included (no local Analytics Engine to query there), seconds
//   behind. The write goes through the tenant's Durable Object, which holds a warm connection:
//   one pipelined round trip after the response, on nobody's critical path.

/** What the edge knows of one request once it is answered. */
export interface EdgeRequestRecord {
  /** Method and route pattern (`POST /v1/chat/completions`), never the raw path: ids stay out. */
  route: string
  status: number
  tenantId: string | null
  pool: string | null
  cache: string | null
  task: string | null
  modality: string | null
  /** How the router chose the pool: model, poolMap, default or modality. */
  via: string | null
  /** Time spent admitting (rate limits, queue depth, enqueue), when the request got that far. */
  admissionMs: number | null
}

const text = (v: unknown): string | null => (typeof v === 'string' && v !== '' ? v : null)

/** The record of a request from its context, once the handler has run. */
export function requestRecordOf(c: Ctx): EdgeRequestRecord {
  const fields = c.get('logFields') ?? {}
  const pattern = routePath(c, -1)
  const matched = pattern !== '' && !pattern.endsWith('*')
  return {
    route: matched ? `${c.req.method} ${pattern}` : 'unmatched',
    status: c.res.status,
    tenantId: text(fields.tenant),
    pool: text(fields.pool),
    cache: text(fields.cache),
    task: text(fields.task),
    modality: text(fields.modality),
    via: text(fields.via),
    admissionMs: typeof fields.admission_ms === 'number' ? fields.admission_ms : null,
  }
}

/** The per-minute counter increments of one request. */
export function telemetryFieldsOf(r: EdgeRequestRecord): Record<string, number> {
  const fields: Record<string, number> = {
    [TelemetryField.request(r.route, r.status, r.pool ?? '-', r.cache ?? '-')]: 1,
  }
  if (r.task && r.modality) fields[TelemetryField.task(r.task, r.modality)] = 1
  if (r.pool && r.via) fields[TelemetryField.decision(r.pool, r.via)] = 1
  if (r.admissionMs !== null) fields[TelemetryField.admission(latencyBucket(r.admissionMs / 1000))] = 1
  return fields
}

/**
 * One Analytics Engine data point. Columns: index1 tenant; blob1 route, blob2 status, blob3 pool,
 * blob4 cache (HIT, MISS, BYPASS), blob5 tenant, blob6 task, blob7 modality, blob8 router's via;
 * double1 admission milliseconds (-1 when not admitted). Count requests with SUM(_sample_interval).
 */
export function analyticsDataPoint(r: EdgeRequestRecord): AnalyticsEngineDataPoint {
  return {
    indexes: [r.tenantId ?? '-'],
    blobs: [
      r.route,
      String(r.status),
      r.pool ?? '-',
      r.cache ?? '-',
      r.tenantId ?? '-',
      r.task ?? '-',
      r.modality ?? '-',
      r.via ?? '-',
    ],
    doubles: [r.admissionMs ?? -1],
  }
}

export interface RequestTelemetryOptions {
  /** Paths not counted (the dashboard's own polling, health checks). */
  skip: (path: string) => boolean
}

/** Counts each answered request in Analytics Engine (where bound) and in Redis. */
export const requestTelemetry = (options: RequestTelemetryOptions): MiddlewareHandler<AppEnv> => {
  if (typeof options?.skip !== 'function') throw new Error('requestTelemetry needs skip: (path) => boolean')
  return async function requestTelemetry(c, next) {
    await next()
    if (c.req.method === 'OPTIONS' || options.skip(c.req.path)) return
    // Counting never costs the client its answer: whatever fails here is logged and dropped.
    try {
      const record = requestRecordOf(c)
      c.env.EDGE_METRICS?.writeDataPoint(analyticsDataPoint(record))
      const ns = c.env.TENANT_ADMISSION
      if (!ns) return // unit tests through app.request bind no Durable Objects
      // Requests without a tenant (401s, unknown routes) are counted by an object of their own.
      const object = ns.get(ns.idFromName(record.tenantId ? `tenant:${record.tenantId}` : 'edge-telemetry'))
      const write = object.recordTelemetry(record.tenantId, telemetryFieldsOf(record))
      c.executionCtx.waitUntil(
        write.catch((e: unknown) => log('warn', 'telemetry not recorded', { error: String(e) })),
      )
    } catch (e) {
      log('warn', 'telemetry not recorded', { error: String(e) })
    }
  }
}
