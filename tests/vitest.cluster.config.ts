import { join } from 'node:path'
import { packageConfig } from '../vitest.shared.ts'

// The end-to-end suite on a Redis Cluster (`npm run test:cluster -w @moe/tests`): the happy
// paths (the same file as on a single Redis) and the worker-kill fault, against a 3-master
// cluster started on loopback ports.
export default packageConfig(import.meta.dirname, {
  include: ['test/happy.test.ts', 'test/cluster.test.ts'],
  // Its own report, beside the single-Redis run's tests.json.
  reporters: [
    'default',
    ['json', { outputFile: join(import.meta.dirname, '..', '.test-results', 'tests-cluster.json') }],
  ],
  globalSetup: ['./src/cluster-setup.ts'],
  fileParallelism: false,
  testTimeout: 180_000,
  hookTimeout: 240_000,
})
