import { configDefaults } from 'vitest/config'
import { packageConfig } from '../vitest.shared.ts'

// The suites drive real processes (workerd, the worker, Redis) on a 2-core machine: one file at a
// time, generous timeouts (nothing asserts on timings).
export default packageConfig(import.meta.dirname, {
  globalSetup: ['./src/global-setup.ts'],
  // Needs the Redis Cluster of vitest.cluster.config.ts (npm run test:cluster).
  exclude: [...configDefaults.exclude, 'test/cluster.test.ts'],
  fileParallelism: false,
  testTimeout: 180_000,
  hookTimeout: 240_000,
})
