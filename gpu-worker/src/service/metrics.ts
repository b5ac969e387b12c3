import { Counter, Gauge, Histogram, Registry } from 'prom-client'

const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

/** What an operator asks of an MoE worker, named as vLLM names it where the concept is the same. */
export class WorkerMetrics {
  readonly registry = new Registry()
  readonly requestsRunning = new Gauge({
    name: 'moe_requests_running',
    help: 'Sequences in the running batch',
    labelNames: ['model'],
    registers: [this.registry],
  })
  readonly requestsWaiting = new Gauge({
    name: 'moe_requests_waiting',
    help: 'Jobs taken from the queue and waiting for a batch slot',
    labelNames: ['model'],
    registers: [this.registry],
  })
  readonly batchSize = new Histogram({
    name: 'moe_batch_size',
    help: 'Rows per forward pass',
    labelNames: ['model', 'kind'],
    buckets: [1, 2, 4, 8, 16, 32, 64, 128],
    registers: [this.registry],
  })
  readonly stepSeconds = new Histogram({
    name: 'moe_step_seconds',
    help: 'Wall time of one forward pass',
    labelNames: ['model', 'kind'],
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  })
  readonly timeToFirstToken = new Histogram({
    name: 'moe_time_to_first_token_seconds',
    help: 'From the job reaching the worker to its first token',
    labelNames: ['pool'],
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  })
  readonly interTokenLatency = new Histogram({
    name: 'moe_inter_token_latency_seconds',
    help: 'Time between consecutive tokens of one sequence',
    labelNames: ['pool'],
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  })
  readonly queueWait = new Histogram({
    name: 'moe_queue_wait_seconds',
    help: 'From the edge accepting the request to a worker taking the job',
    labelNames: ['pool'],
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  })
  readonly generatedTokens = new Counter({
    name: 'moe_generated_tokens_total',
    help: 'Tokens generated',
    labelNames: ['pool'],
    registers: [this.registry],
  })
  readonly promptTokens = new Counter({
    name: 'moe_prompt_tokens_total',
    help: 'Prompt tokens prefilled',
    labelNames: ['pool'],
    registers: [this.registry],
  })
  readonly requests = new Counter({
    name: 'moe_requests_total',
    help: 'Jobs finished, by outcome (stop, length, cancelled, handed_back, or an error code)',
    labelNames: ['pool', 'outcome'],
    registers: [this.registry],
  })
  readonly expertTokens = new Counter({
    name: 'moe_expert_tokens_total',
    help: 'Tokens the router sent to each expert of each MoE layer (prompt and generated)',
    labelNames: ['pool', 'layer', 'expert'],
    registers: [this.registry],
  })
  readonly kvCacheBytes = new Gauge({
    name: 'moe_kv_cache_bytes',
    help: 'Bytes held by the KV cache',
    labelNames: ['model'],
    registers: [this.registry],
  })
  readonly kvCacheUsage = new Gauge({
    name: 'moe_kv_cache_usage_ratio',
    help: 'Share of KV-cache slots in use',
    labelNames: ['model'],
    registers: [this.registry],
  })
  readonly prefixCacheQueries = new Counter({
    name: 'moe_prefix_cache_queries_total',
    help: 'Prompt tokens looked up in the prefix cache as sequences were admitted (vLLM: prefix_cache_queries)',
    labelNames: ['model'],
    registers: [this.registry],
  })
  readonly prefixCacheHits = new Counter({
    name: 'moe_prefix_cache_hits_total',
    help: 'Prompt tokens not prefilled: KV found in the prefix cache or shared with an identical prompt (vLLM: prefix_cache_hits)',
    labelNames: ['model'],
    registers: [this.registry],
  })
  readonly prefixCacheTokens = new Gauge({
    name: 'moe_prefix_cache_tokens',
    help: 'Prompt positions whose KV the prefix cache holds (at most MOE_PREFIX_CACHE_TOKENS)',
    labelNames: ['model'],
    registers: [this.registry],
  })

  readonly requestDuration = new Histogram({
    name: 'moe_request_duration_seconds',
    help: 'End to end: from the edge accepting the request to its last token (vLLM: e2e_request_latency)',
    labelNames: ['pool'],
    buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    registers: [this.registry],
  })
  readonly batchOccupancy = new Gauge({
    name: 'moe_batch_occupancy',
    help: 'Running sequences as a share of the batch the worker allows (MOE_MAX_BATCH)',
    labelNames: ['model'],
    registers: [this.registry],
  })
  /** Read from Redis at each scrape (see WorkerService), so an autoscaler sees the queue itself. */
  readonly queueDepth = new Gauge({
    name: 'moe_queue_depth',
    help: 'Jobs queued for a pool and not yet taken by a worker, by priority class (live, async, batch)',
    labelNames: ['pool', 'priority'],
    registers: [this.registry],
    collect: async () => {
      await this.queueDepthSource?.()
    },
  })
  private queueDepthSource: (() => Promise<void>) | null = null

  /** Sets what fills moe_queue_depth at scrape time. */
  collectQueueDepth(source: () => Promise<void>): void {
    this.queueDepthSource = source
  }

  /** Adds a finished sequence's expert-load matrix [layer][expert]. */
  addExpertLoad(pool: string, load: number[][]): void {
    load.forEach((row, layer) => {
      row.forEach((n, expert) => {
        if (n > 0) this.expertTokens.inc({ pool, layer: String(layer), expert: String(expert) }, n)
      })
    })
  }
}
