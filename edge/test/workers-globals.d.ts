// The tests run on Node (and typecheck with Node's types) but import src/, whose types name a
// few Workers globals. Borrow just those from the module form of @cloudflare/workers-types.
type CfTypes = typeof import('@cloudflare/workers-types/index.ts')

declare global {
  type KVNamespace = import('@cloudflare/workers-types/index.ts').KVNamespace
  type R2Bucket = import('@cloudflare/workers-types/index.ts').R2Bucket
  type AnalyticsEngineDataset = import('@cloudflare/workers-types/index.ts').AnalyticsEngineDataset
  type AnalyticsEngineDataPoint = import('@cloudflare/workers-types/index.ts').AnalyticsEngineDataPoint
  type DurableObjectNamespace<T = undefined> = { get(id: unknown): T; idFromName(name: string): unknown }
}

export type { CfTypes }
