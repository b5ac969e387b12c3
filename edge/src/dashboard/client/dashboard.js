// The dashboard page's script: polls /dashboard/data (the session cookie rides along) and draws
// it. Plain DOM for tables and the heatmap, uPlot (served beside it) for the time series.
/* global uPlot */
;(() => {
  const POLL_MS = 2000
  const ROUTE_ROWS = 12
  const $ = (id) => document.getElementById(id)
  const poolSelect = $('pool')
  const windowSelect = $('window')
  const charts = {}

  const fmt = (x, digits = 1) => (x === null || x === undefined ? '–' : Number(x).toFixed(digits))
  const ms = (seconds) =>
    seconds === null || seconds === undefined ? '–' : `${(seconds * 1000).toFixed(1)} ms`
  const pct = (x) => (x === null || x === undefined ? '–' : `${(x * 100).toFixed(1)}%`)

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag)
    for (const [k, v] of Object.entries(attrs)) {
      if (k === 'class') node.className = v
      else if (k === 'style') Object.assign(node.style, v)
      else node.setAttribute(k, String(v))
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)))
    return node
  }

  function table(head, rows, empty = 'no traffic in this window') {
    const t = el('table')
    t.append(el('thead', {}, el('tr', {}, ...head.map((h) => el('th', {}, h)))))
    const body = el('tbody')
    if (rows.length === 0)
      body.append(el('tr', {}, el('td', { colspan: head.length, class: 'muted' }, empty)))
    for (const r of rows)
      body.append(el('tr', {}, ...r.map((c) => (c instanceof Node ? c : el('td', {}, c)))))
    t.append(body)
    return t
  }

  function replace(id, ...nodes) {
    const target = $(id)
    target.replaceChildren(...nodes)
  }

  function heatmap(load, pool) {
    const max = Math.max(1, ...load.tokens.flat())
    const head = [
      'layer',
      ...Array.from({ length: load.experts }, (_, e) => `expert ${e}`),
      load.allowed ? `CV (${load.allowed.length} experts)` : 'CV',
      'max/mean',
    ]
    const rows = load.tokens.map((row, layer) => {
      const b = load.balance[layer]
      return [
        el('th', {}, String(layer)),
        ...row.map((n, expert) => {
          const share = n / max
          const outside = load.allowed !== null && !load.allowed.includes(expert)
          return el(
            'td',
            {
              class: outside ? 'cell outside' : 'cell',
              'data-layer': layer,
              'data-expert': expert,
              'data-tokens': n,
              title: `layer ${layer}, expert ${expert}: ${n} tokens${outside ? ' (not in this pool)' : ''}`,
              style: {
                backgroundColor: n === 0 ? '#f4f5f7' : `rgba(217, 72, 15, ${0.12 + 0.88 * share})`,
                color: share > 0.55 ? '#fff' : '#222',
              },
            },
            n === 0 ? '0' : n.toLocaleString(),
          )
        }),
        el('td', { class: 'num' }, fmt(b?.cv, 2)),
        el('td', { class: 'num' }, fmt(b?.maxOverMean, 2)),
      ]
    })
    const t = table(head, rows, 'no model reported for this pool yet')
    t.id = 'heatmap'
    t.dataset.pool = pool
    return t
  }

  function chart(id, title, labels, unit) {
    if (charts[id]) return charts[id]
    const target = $(id)
    const colors = ['#d9480f', '#1c7ed6', '#2b8a3e', '#862e9c']
    const opts = {
      title,
      width: Math.max(280, target.clientWidth - 8),
      height: 180,
      scales: { x: { time: true } },
      series: [
        {},
        ...labels.map((label, i) => ({ label, stroke: colors[i % colors.length], width: 2, spanGaps: true })),
      ],
      axes: [{}, { values: (_u, vals) => vals.map((v) => `${v}${unit}`), size: 60 }],
    }
    charts[id] = new uPlot(opts, [[], ...labels.map(() => [])], target)
    return charts[id]
  }

  function render(d) {
    $('viewer').textContent = d.scope === 'admin' ? 'admin: every tenant' : `tenant ${d.tenantId}`
    if (poolSelect.options.length !== d.pools.length) {
      poolSelect.replaceChildren(...d.pools.map((p) => el('option', { value: p }, p)))
      poolSelect.value = d.pool
    }

    // Expert load
    replace('expert-load', heatmap(d.expertLoad, d.pool))

    // Routing
    replace(
      'routing',
      el('h3', {}, 'Requests by task and modality'),
      table(
        ['task', 'modality', 'requests'],
        d.routing.tasks.map((r) => [r.task, r.modality, r.requests]),
      ),
      el('h3', {}, "Router's decisions per pool"),
      table(
        ['pool', 'chosen by', 'requests'],
        d.routing.decisions.map((r) => [r.pool, r.via, r.requests]),
      ),
    )

    // Queues
    replace(
      'queues',
      table(
        ['pool', 'live', 'async', 'batch', 'workers', 'BullMQ connections'],
        d.queues.map((q) => [q.pool, q.live, q.async, q.batch, q.workers, q.bullmqWorkers ?? 'n/a']),
      ),
    )

    // Speed
    const s = d.speed
    replace(
      'speed-stats',
      stat('tokens/s (last minute)', fmt(s.tokensPerSecond, 1)),
      stat('TTFT p50 / p99', `${ms(s.ttft.p50)} / ${ms(s.ttft.p99)}`),
      stat('ITL p50 / p99', `${ms(s.itl.p50)} / ${ms(s.itl.p99)}`),
    )
    replace(
      'speed-pools',
      table(
        ['pool', 'tokens', 'tokens/s', 'TTFT p50', 'TTFT p99', 'ITL p50', 'ITL p99'],
        s.perPool.map((p) => [
          p.pool,
          p.tokens,
          fmt(p.tokensPerSecond),
          ms(p.ttft.p50),
          ms(p.ttft.p99),
          ms(p.itl.p50),
          ms(p.itl.p99),
        ]),
      ),
    )
    replace(
      'workers',
      table(
        ['worker', 'status', 'model', 'pools', 'running / max', 'batch occupancy'],
        d.workers.flatMap((w) =>
          w.models.map((m) => [
            w.id,
            w.status,
            m.model,
            m.pools.join(', '),
            `${m.running} / ${m.maxBatch}`,
            el(
              'td',
              {},
              el(
                'span',
                { class: 'bar' },
                el('span', { style: { width: `${Math.round(m.occupancy * 100)}%` } }),
              ),
              ` ${pct(m.occupancy)}`,
            ),
          ]),
        ),
        'no worker has reported in the last 15 s',
      ),
    )
    chart('chart-tokens', 'tokens/s', ['tokens/s'], '').setData([s.series.t, s.series.tokensPerSecond])
    const toMs = (xs) => xs.map((x) => (x === null ? null : x * 1000))
    chart(
      'chart-latency',
      'latency per minute',
      ['TTFT p50', 'TTFT p99', 'ITL p50', 'ITL p99'],
      ' ms',
    ).setData([
      s.series.t,
      toMs(s.series.ttftP50),
      toMs(s.series.ttftP99),
      toMs(s.series.itlP50),
      toMs(s.series.itlP99),
    ])

    // Edge
    const e = d.edge
    replace(
      'edge-stats',
      stat('requests', e.requests),
      stat('cache hit rate', pct(e.cache.hitRate)),
      stat('hits / misses / bypass', `${e.cache.hit} / ${e.cache.miss} / ${e.cache.bypass}`),
      stat('admission p50 / p99', `${ms(e.admission.p50)} / ${ms(e.admission.p99)}`),
    )
    replace(
      'edge-routes',
      table(
        ['route', 'status', 'pool', 'cache', 'requests'],
        e.byRoute.slice(0, ROUTE_ROWS).map((r) => [r.route, r.status, r.pool, r.cache, r.requests]),
      ),
      ...(e.byRoute.length > ROUTE_ROWS
        ? [el('p', { class: 'muted' }, `and ${e.byRoute.length - ROUTE_ROWS} more, fewer requests each`)]
        : []),
    )
    chart('chart-requests', 'requests per minute', ['requests'], '').setData([s.series.t, s.series.requests])

    // Prefix cache
    const pc = d.prefixCache
    replace(
      'prefix-cache',
      pc.available
        ? stat('hit rate', pct(pc.hitRate))
        : el('p', { class: 'muted', id: 'prefix-cache-na' }, `not available: ${pc.reason}`),
      ...(pc.available
        ? [
            table(
              ['counter', 'increase in window'],
              Object.entries(pc.counters).map(([k, v]) => [k, v]),
            ),
          ]
        : []),
    )

    $('updated').textContent = `updated ${new Date(d.now).toLocaleTimeString()}`
    document.body.dataset.loaded = 'true'
  }

  function stat(label, value) {
    return el(
      'div',
      { class: 'stat' },
      el('div', { class: 'value' }, value),
      el('div', { class: 'label' }, label),
    )
  }

  let timer = null
  let latest = 0
  async function poll() {
    clearTimeout(timer)
    // A change of pool or window polls at once; an answer to an older poll is dropped.
    const seq = ++latest
    const q = new URLSearchParams({ window: windowSelect.value })
    if (poolSelect.value) q.set('pool', poolSelect.value)
    try {
      const res = await fetch(`/dashboard/data?${q}`, { credentials: 'same-origin', cache: 'no-store' })
      if (res.status === 401) {
        location.reload() // the session ended: back to the login form
        return
      }
      if (!res.ok) throw new Error(`HTTP ${res.status}`)
      const d = await res.json()
      if (seq !== latest) return
      render(d)
      $('error').textContent = ''
    } catch (err) {
      if (seq !== latest) return
      $('error').textContent = `could not refresh: ${err.message}`
    }
    timer = setTimeout(poll, POLL_MS)
  }

  poolSelect.addEventListener('change', poll)
  windowSelect.addEventListener('change', poll)
  poll()
})()
