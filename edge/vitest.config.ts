import { packageConfig } from '../vitest.shared.ts'

export default packageConfig(import.meta.dirname, { testTimeout: 30_000, hookTimeout: 90_000 })
