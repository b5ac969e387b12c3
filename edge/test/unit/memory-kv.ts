/** Just enough of KVNamespace for unit tests (get text/json, put, list by prefix). */
export class MemoryKV {
  readonly data = new Map<string, string>()
  async get(key: string, type?: 'text' | 'json'): Promise<unknown> {
    const v = this.data.get(key)
    if (v === undefined) return null
    return type === 'json' ? JSON.parse(v) : v
  }
  async put(key: string, value: string): Promise<void> {
    this.data.set(key, value)
  }
  async list(opts: { prefix?: string } = {}) {
    const keys = [...this.data.keys()]
      .filter((k) => k.startsWith(opts.prefix ?? ''))
      .map((name) => ({ name }))
    return { keys, list_complete: true, cursor: '' }
  }
}
