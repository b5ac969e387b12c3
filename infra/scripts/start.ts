// `npm start`: brings up what exists of the service locally.
import { spawn, spawnSync } from 'node:child_process'
import { join } from 'node:path'

const root = join(import.meta.dirname, '..', '..')

const redis = spawnSync('bash', [join(root, 'infra/scripts/ensure-redis.sh')], { stdio: 'inherit' })
if (redis.status !== 0) process.exit(1)

console.log('moe-edge: starting the edge Worker under wrangler dev on http://127.0.0.1:8787')
console.log('moe-edge: the GPU worker service is not part of this build yet; only the edge runs.')
const edge = spawn(
  'npx',
  ['wrangler', 'dev', '--ip', '127.0.0.1', '--port', process.env.EDGE_PORT ?? '8787'],
  {
    cwd: root,
    stdio: 'inherit',
  },
)
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => edge.kill(sig))
edge.on('exit', (code) => process.exit(code ?? 0))
