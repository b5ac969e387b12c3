// The dashboard's two HTML pages. Everything they load is served by the Worker itself
// (/dashboard/*.js, *.css); no inline script, so the Content-Security-Policy can forbid it.

const escapeHtml = (s: string): string => s.replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`)

export const CONTENT_SECURITY_POLICY =
  "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

const head = (title: string): string => `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/uplot.css">
<link rel="stylesheet" href="/dashboard/dashboard.css">
</head>`

/** The login form: the token travels in a POST body, never in a URL. */
export function loginPage(error: string | null): string {
  return `${head('moe-edge dashboard: sign in')}
<body>
<form class="login" method="post" action="/dashboard/login">
  <h1>moe-edge dashboard</h1>
  <p>Sign in with the admin token (every tenant's traffic) or a tenant's API key (its own traffic).</p>
  ${error ? `<p class="error" id="login-error">${escapeHtml(error)}</p>` : ''}
  <label for="token">Admin token or API key</label>
  <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
  <button type="submit">Sign in</button>
</form>
</body>
</html>`
}

/** The dashboard itself; dashboard.js fills each panel from /dashboard/data. */
export function dashboardPage(): string {
  return `${head('moe-edge dashboard')}
<body>
<header>
  <h1>moe-edge</h1>
  <span id="viewer"></span>
  <label>pool <select id="pool"></select></label>
  <label>window <select id="window">
    <option value="5">5 min</option>
    <option value="15" selected>15 min</option>
    <option value="60">60 min</option>
  </select></label>
  <span class="right">
    <span id="error"></span>
    <span id="updated"></span>
    <form method="post" action="/dashboard/logout"><button type="submit">Sign out</button></form>
  </span>
</header>
<main>
  <section class="wide">
    <h2>Expert load</h2>
    <p class="hint">Tokens the router sent to each expert of each MoE layer, for the chosen pool and window (prompt and generated). CV: standard deviation over mean of a layer's loads; max/mean: the busiest expert against an even share.</p>
    <div id="expert-load"></div>
  </section>
  <section>
    <h2>Routing</h2>
    <p class="hint">What the edge's router saw and chose.</p>
    <div id="routing"></div>
  </section>
  <section>
    <h2>Queues</h2>
    <p class="hint">Jobs waiting per pool and priority now, and the workers taking them.</p>
    <div id="queues"></div>
  </section>
  <section class="wide">
    <h2>Speed</h2>
    <div class="stats" id="speed-stats"></div>
    <div class="charts"><div class="chart" id="chart-tokens"></div><div class="chart" id="chart-latency"></div></div>
    <div id="speed-pools"></div>
    <h3>Batch occupancy per worker</h3>
    <div id="workers"></div>
  </section>
  <section>
    <h2>Edge</h2>
    <div class="stats" id="edge-stats"></div>
    <div class="charts"><div class="chart" id="chart-requests"></div></div>
    <div id="edge-routes"></div>
  </section>
  <section>
    <h2>Prefix cache</h2>
    <div id="prefix-cache"></div>
  </section>
</main>
<script src="/dashboard/uplot.js"></script>
<script src="/dashboard/dashboard.js"></script>
</body>
</html>`
}
