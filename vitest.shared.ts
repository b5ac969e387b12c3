import { basename, dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { defineConfig, type ViteUserConfig } from 'vitest/config'

const root = dirname(fileURLToPath(import.meta.url))

/** Vitest settings every package shares: a JSON report per package that `.ci/run` sums up. */
export function packageConfig(packageDir: string, test: NonNullable<ViteUserConfig['test']> = {}) {
  return defineConfig({
    test: {
      reporters: [
        'default',
        ['json', { outputFile: join(root, '.test-results', `${basename(packageDir)}.json`) }],
      ],
      ...test,
    },
  })
}
