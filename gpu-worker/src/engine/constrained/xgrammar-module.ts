import { readFileSync } from 'node:fs'
import { createRequire, Module } from 'node:module'
import { dirname } from 'node:path'

// @mlc-ai/web-xgrammar is xgrammar (the grammar engine vLLM and SGLang use) built to WebAssembly.
// Its package says "type": "module" but ships a UMD bundle that calls require(), so Node can load
// it neither as ES module nor through require(). It is evaluated here as the CommonJS it is.

export type XGrammar = typeof import('@mlc-ai/web-xgrammar')

const require = createRequire(import.meta.url)

/**
 * A fresh instance of the xgrammar module, with its own WebAssembly memory. A schema that trips
 * one of xgrammar's internal checks aborts the instance's current call; the caller may load a new
 * one rather than trust the old one's state.
 */
export function loadXGrammar(): XGrammar {
  const path = require.resolve('@mlc-ai/web-xgrammar')
  const source = readFileSync(path, 'utf8')
  // What require() does for a .js file of a CommonJS package.
  const module = new Module(path) as Module & {
    filename: string
    paths: string[]
    _compile(source: string, filename: string): void
  }
  module.filename = path
  module.paths = (Module as unknown as { _nodeModulePaths(dir: string): string[] })._nodeModulePaths(
    dirname(path),
  )
  module._compile(source, path)
  return module.exports as unknown as XGrammar
}
