#!/usr/bin/env node
// The `moe` command. The source is TypeScript run by Node's type stripping (Node >= 22.18 / 24).
const [major, minor] = process.versions.node.split('.').map(Number)
if (major < 22 || (major === 22 && minor < 18)) {
  console.error(
    `moe needs Node.js 24 (found ${process.version}); run it through npm (npx moe ...) to use the project's pinned Node.`,
  )
  process.exit(1)
}
await import('../src/cli.ts')
