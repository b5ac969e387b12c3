// Global setup of the Redis Cluster suite (vitest.cluster.config.ts): a 3-master Redis Cluster on
// loopback ports, and on it the stack the shared suites (happy.test.ts) run against: the edge
// and a worker with REDIS_CLUSTER_NODES and a hash-tagged queue prefix.
import type {} from 'vitest'
import type { TestProject } from 'vitest/node'
import { startRedisCluster } from './redis-cluster.ts'
import { startStack } from './stack.ts'

declare module 'vitest' {
  export interface ProvidedContext {
    redisCluster: { nodes: string; url: string }
  }
}

export default async function setup(project: TestProject) {
  const cluster = await startRedisCluster(3)
  try {
    const stack = await startStack({ redisUrl: cluster.url, clusterNodes: cluster.nodes })
    const { edge: _e, workers: _w, addWorker: _a, stop, ...info } = stack
    project.provide('stack', info)
    project.provide('redisCluster', { nodes: cluster.nodes, url: cluster.url })
    return async () => {
      await stop()
      await cluster.stop()
    }
  } catch (e) {
    await cluster.stop()
    throw e
  }
}
