/**
 * Waiting requests, queued per tenant and served round-robin: each admission
 * takes the next tenant in turn, so one tenant's burst of a thousand requests
 * waits behind its own requests, not in front of another tenant's single one.
 * Within a tenant, order is first come, first served.
 */
export class FairQueue<T extends { tenantId: string }> {
  private readonly queues = new Map<string, T[]>()
  /** Tenants with waiting items, in the order they will next be served. */
  private readonly turn: string[] = []
  private count = 0

  get size(): number {
    return this.count
  }

  push(item: T): void {
    let q = this.queues.get(item.tenantId)
    if (!q) {
      q = []
      this.queues.set(item.tenantId, q)
      this.turn.push(item.tenantId)
    }
    q.push(item)
    this.count++
  }

  /** The item shift() would return, left in place. */
  peek(): T | undefined {
    const tenant = this.turn[0]
    return tenant === undefined ? undefined : this.queues.get(tenant)![0]
  }

  /** The next item in tenant round-robin order. */
  shift(): T | undefined {
    const tenant = this.turn.shift()
    if (tenant === undefined) return undefined
    const q = this.queues.get(tenant)!
    const item = q.shift()!
    this.count--
    if (q.length > 0) this.turn.push(tenant)
    else this.queues.delete(tenant)
    return item
  }

  /** Every waiting item, in no particular order. */
  *[Symbol.iterator](): IterableIterator<T> {
    for (const q of this.queues.values()) yield* q
  }

  /** Removes and returns the items matching `pred` (cancellations). */
  remove(pred: (item: T) => boolean): T[] {
    const removed: T[] = []
    for (const [tenant, q] of this.queues) {
      const keep = q.filter((item) => {
        if (!pred(item)) return true
        removed.push(item)
        return false
      })
      if (keep.length === 0) {
        this.queues.delete(tenant)
        this.turn.splice(this.turn.indexOf(tenant), 1)
      } else this.queues.set(tenant, keep)
    }
    this.count -= removed.length
    return removed
  }
}
