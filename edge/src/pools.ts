import { type ExpertPool, PoolsFile } from '@moe/shared'
// Bundled into the Worker by esbuild: pools change with GPU deployments (same repo, same
// release), and every request needs them, so a KV read per request would buy nothing.
import poolsJson from '../../infra/config/pools.json' with { type: 'json' }

export const POOLS: ReadonlyMap<string, ExpertPool> = new Map(
  PoolsFile.parse(poolsJson).pools.map((p) => [p.name, p]),
)
