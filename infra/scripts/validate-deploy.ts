// Offline checks of the deployment files: the worker Dockerfiles, compose.yaml, the Kubernetes
// manifests (base and every overlay, rendered), the Grafana dashboard and the Prometheus config.
// Nothing here needs a container engine, a cluster or the network. Exits 1 if any check fails.
//
//   bash infra/scripts/validate-deploy.sh     # or: node infra/scripts/validate-deploy.ts
//
// Tools (npm devDependencies): yaml, dockerfile-utils (Dockerfile linter, the one behind the
// VS Code Docker extension), dclint (Compose linter, validates against the compose-spec JSON
// schema it bundles), kubernetes-models, @kubernetes-models/keda and
// @kubernetes-models/prometheus-operator (validators generated from the Kubernetes OpenAPI
// document and the KEDA / Prometheus Operator CRD schemas; their TypeScript interfaces are also
// used, through the compiler, to reject fields the schemas do not know), @grafana/schema (the
// dashboard and panel-options types Grafana generates from its schemas, checked the same way).
// `kubectl kustomize` renders the overlays when kubectl is installed; otherwise a small renderer
// here does.
import { spawnSync } from 'node:child_process'
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join, relative } from 'node:path'
import { checkPoolManifests, DRAIN_TIMEOUT_MS } from './k8s-pools.ts'

const root = join(import.meta.dirname, '..', '..')
const require = createRequire(import.meta.url)

const DEV_DEPENDENCIES = [
  'yaml',
  'dockerfile-utils',
  'dockerfile-ast',
  'dclint',
  'kubernetes-models',
  '@kubernetes-models/keda',
  '@kubernetes-models/prometheus-operator',
  '@grafana/schema',
  'typescript',
]
const missing = DEV_DEPENDENCIES.filter((m) => {
  try {
    require.resolve(`${m}/package.json`)
    return false
  } catch {
    return true
  }
})
if (missing.length > 0) {
  console.error(
    `validate-deploy: missing npm packages ${missing.join(', ')}; run npm ci (they are devDependencies)`,
  )
  process.exit(1)
}

const YAML = await import('yaml')
const { DockerfileParser } = await import('dockerfile-ast')
const { validate: lintDockerfile } = await import('dockerfile-utils')
const ts = (await import('typescript')).default

// biome-ignore lint/suspicious/noExplicitAny: parsed YAML and JSON of any shape
type Doc = Record<string, any>

// ---------------------------------------------------------------------------------------------
// Reporting

let failed = 0
let passed = 0
function report(name: string, problems: string[], note = ''): void {
  if (problems.length === 0) {
    passed++
    console.log(`ok   ${name}${note ? ` (${note})` : ''}`)
  } else {
    failed++
    console.log(`FAIL ${name}`)
    for (const p of problems) console.log(`     - ${p}`)
  }
}
function attempt(name: string, fn: () => string[] | { problems: string[]; note: string }): void {
  try {
    const r = fn()
    if (Array.isArray(r)) report(name, r)
    else report(name, r.problems, r.note)
  } catch (e) {
    report(name, [`check crashed: ${(e as Error).stack ?? e}`])
  }
}

const read = (rel: string) => readFileSync(join(root, rel), 'utf8')
const rootPkg = JSON.parse(read('package.json'))
const poolNames: string[] = JSON.parse(read('infra/config/pools.json')).pools.map(
  (p: { name: string }) => p.name,
)
const tracked = spawnSync('git', ['ls-files'], { cwd: root, encoding: 'utf8' })
  .stdout.split('\n')
  .filter(Boolean)

// ---------------------------------------------------------------------------------------------
// Metrics the worker exports (names and label names, read from metrics.ts), for the dashboard and
// the autoscaling queries. moe_queue_depth{pool,priority} is the queue-depth gauge KEDA scales on.

const metricsSource = read('gpu-worker/src/service/metrics.ts')
const METRICS = new Map<string, { type: string; labels: string[] }>()
for (const m of metricsSource.matchAll(
  /new (Gauge|Counter|Histogram)\(\{\s*name: '([a-z_]+)',[\s\S]*?labelNames: \[([^\]]*)\]/g,
))
  METRICS.set(m[2]!, { type: m[1]!, labels: [...m[3]!.matchAll(/'(\w+)'/g)].map((x) => x[1]!) })
const queueDepthInWorker = METRICS.has('moe_queue_depth')
if (!queueDepthInWorker) METRICS.set('moe_queue_depth', { type: 'Gauge', labels: ['pool', 'priority'] })
/** Labels Prometheus adds at scrape time (worker_pool by the PodMonitor / compose relabeling). */
const SCRAPE_LABELS = ['worker_pool', 'instance', 'job', 'pod', 'namespace', 'container']

/** Problems with the metric names and label matchers of a PromQL expression. */
function checkPromQL(expr: string, where: string): string[] {
  const problems: string[] = []
  for (const m of expr.matchAll(/\b(moe_[a-z_]+)(\{([^}]*)\})?/g)) {
    let name = m[1]!
    let extra: string[] = []
    const base = name.replace(/_(bucket|sum|count)$/, '')
    if (base !== name && METRICS.get(base)?.type === 'Histogram') {
      extra = name.endsWith('_bucket') ? ['le'] : []
      name = base
    }
    const metric = METRICS.get(name)
    if (!metric) {
      problems.push(`${where}: ${m[1]} is not a metric the worker exports`)
      continue
    }
    for (const lm of (m[3] ?? '').matchAll(/(\w+)\s*(=~|!~|!=|=)/g))
      if (![...metric.labels, ...extra, ...SCRAPE_LABELS].includes(lm[1]!))
        problems.push(`${where}: ${name} has no label ${lm[1]} (it has ${metric.labels.join(', ')})`)
  }
  return problems
}

// ---------------------------------------------------------------------------------------------
// .dockerignore (Docker's rules: patterns in order, the last match wins, a match on a folder
// covers everything under it, ! re-includes)

const ignoreRules = read('.dockerignore')
  .split('\n')
  .map((l) => l.trim())
  .filter((l) => l && !l.startsWith('#'))
  .map((l) => {
    const negate = l.startsWith('!')
    const pattern = (negate ? l.slice(1) : l).replace(/^\/+|\/+$/g, '')
    const re = pattern
      .split('/')
      .map((part) =>
        part === '**'
          ? '.*'
          : part
              .replace(/[.+^${}()|[\]\\]/g, '\\$&')
              .replace(/\*/g, '[^/]*')
              .replace(/\?/g, '[^/]'),
      )
      .join('/')
      .replace(/\.\*\//g, '(?:.*/)?')
    return { negate, re: new RegExp(`^${re}$`) }
  })
function dockerIgnored(path: string): boolean {
  const parts = path.split('/')
  let ignored = false
  for (const { negate, re } of ignoreRules)
    for (let i = 1; i <= parts.length; i++)
      if (re.test(parts.slice(0, i).join('/'))) {
        // A re-include must name the path or a folder above it; an exclude of a folder covers it.
        ignored = !negate
        break
      }
  return ignored
}

// ---------------------------------------------------------------------------------------------
// Dockerfiles

interface Stage {
  from: string
  name?: string
  instructions: Array<{
    keyword: string
    args: string
    flags: Record<string, string>
    env: Record<string, string>
  }>
}

function parseDockerfile(text: string): { args: Record<string, string>; stages: Stage[] } {
  const df = DockerfileParser.parse(text)
  const args: Record<string, string> = {}
  const stages: Stage[] = []
  for (const ins of df.getInstructions()) {
    const keyword = ins.getKeyword()
    const content = ins.getArgumentsContent() ?? ''
    const flags: Record<string, string> = {}
    const parts = ins as unknown as {
      getFlags?: () => Array<{ getName(): string; getValue(): string | null }>
      getProperties?: () => Array<{ getName(): string; getValue(): string | null }>
    }
    for (const f of parts.getFlags?.() ?? []) flags[f.getName()] = f.getValue() ?? ''
    const env: Record<string, string> = {}
    if (keyword === 'ENV' || keyword === 'ARG')
      for (const p of parts.getProperties?.() ?? []) env[p.getName()] = p.getValue() ?? ''
    if (keyword === 'FROM') {
      const [from, as, name] = content.split(/\s+/)
      stages.push({ from: from!, name: as?.toUpperCase() === 'AS' ? name : undefined, instructions: [] })
    } else if (stages.length === 0) {
      if (keyword === 'ARG') Object.assign(args, env)
    } else stages.at(-1)!.instructions.push({ keyword, args: content, flags, env })
  }
  return { args, stages }
}

function jsonArray(s: string): string[] | null {
  try {
    const v = JSON.parse(s)
    return Array.isArray(v) && v.every((x) => typeof x === 'string') ? v : null
  } catch {
    return null
  }
}

function checkDockerfile(rel: string, variant: 'cpu' | 'cuda'): string[] {
  const text = read(rel)
  const problems: string[] = []
  for (const d of lintDockerfile(text))
    problems.push(
      `dockerfile-utils ${d.severity === 1 ? 'error' : 'warning'} at line ${d.range.start.line + 1}: ${d.message}`,
    )
  const { args, stages } = parseDockerfile(text)
  const last = stages.at(-1)
  if (stages.length < 2 || !last)
    return [...problems, 'expected a multi-stage build (dependencies, then runtime)']
  const all = (s: Stage, k: string) => s.instructions.filter((i) => i.keyword === k)
  const env = (s: Stage) => Object.assign({}, ...all(s, 'ENV').map((i) => i.env)) as Record<string, string>

  const nodeTag = `node:${rootPkg.devDependencies.node}-`
  if (!args.NODE_IMAGE?.startsWith(nodeTag))
    problems.push(`ARG NODE_IMAGE=${args.NODE_IMAGE} should follow the node devDependency (${nodeTag}...)`)

  const npmVersion = String(rootPkg.packageManager).replace(/^npm@/, '')
  const ciStages = stages.filter((s) => all(s, 'RUN').some((r) => /\bnpm ci\b/.test(r.args)))
  if (ciStages.length === 0) problems.push('no stage runs npm ci')
  for (const s of ciStages) {
    const runs = s.instructions
    const ci = runs.findIndex((i) => i.keyword === 'RUN' && /\bnpm ci\b/.test(i.args))
    const skip = runs.findIndex((i) => i.keyword === 'ENV' && i.env.ONNXRUNTIME_NODE_INSTALL === 'skip')
    if (skip < 0 || skip > ci) problems.push('ENV ONNXRUNTIME_NODE_INSTALL=skip must come before npm ci')
    const cmd = runs[ci]!.args
    for (const flag of ['--omit=dev', '--workspace=@moe/shared', '--workspace=@moe/gpu-worker'])
      if (!cmd.includes(flag)) problems.push(`npm ci lacks ${flag}`)
    if (!runs.some((i) => i.keyword === 'RUN' && i.args.includes(`npm@${npmVersion}`)))
      problems.push(`the npm ci stage should install npm@${npmVersion} (packageManager in package.json)`)
    if (!runs.some((i) => i.keyword === 'COPY' && i.args.includes('package-lock.json')))
      problems.push('npm ci needs package-lock.json copied in')
    // npm ci checks every workspace of the lock file, so each manifest must be there.
    for (const ws of rootPkg.workspaces as string[])
      if (!runs.some((i) => i.keyword === 'COPY' && i.args.split(/\s+/).includes(`${ws}/package.json`)))
        problems.push(`the npm ci stage should COPY ${ws}/package.json (a workspace in package.json)`)
  }

  const user = all(last, 'USER').at(-1)?.args
  if (!user || !/^[1-9]\d*(:\d+)?$/.test(user))
    problems.push(`the runtime stage must end as a numeric non-root USER (got ${user ?? 'none'})`)
  const hc = all(last, 'HEALTHCHECK').at(-1)
  if (!hc?.args.includes('/healthz')) problems.push('no HEALTHCHECK on /healthz in the runtime stage')
  if (all(last, 'STOPSIGNAL').at(-1)?.args !== 'SIGTERM') problems.push('STOPSIGNAL SIGTERM missing')
  const entry = jsonArray(all(last, 'ENTRYPOINT').at(-1)?.args ?? '')
  if (!entry) problems.push('ENTRYPOINT must be in exec (JSON) form, so SIGTERM reaches node')
  else if (entry[0] !== 'node' || !entry.includes('gpu-worker/bin/moe.js'))
    problems.push(`ENTRYPOINT should run node gpu-worker/bin/moe.js directly (got ${entry.join(' ')})`)
  const cmd = jsonArray(all(last, 'CMD').at(-1)?.args ?? '')
  if (cmd?.[0] !== 'serve') problems.push('CMD should be ["serve"] in exec form')
  const volumes = all(last, 'VOLUME').flatMap((v) => jsonArray(v.args) ?? v.args.split(/\s+/))
  for (const v of ['/models', '/var/cache/moe'])
    if (!volumes.includes(v)) problems.push(`VOLUME ${v} missing`)
  const e = env(last)
  if (e.MOE_METRICS_HOST !== '0.0.0.0')
    problems.push(
      'MOE_METRICS_HOST must be 0.0.0.0, or probes from outside the container cannot reach /healthz',
    )
  if (!e.MOE_EXPORT_CACHE?.startsWith('/var/cache/moe/'))
    problems.push('MOE_EXPORT_CACHE should be on the /var/cache/moe volume')
  if (e.MOE_EP !== variant) problems.push(`MOE_EP should be ${variant} in this image`)
  if (!all(last, 'EXPOSE').some((x) => x.args.split(/\s+/).includes('9464')))
    problems.push('EXPOSE 9464 missing')

  // Every file the build copies from the context is in the repository and survives .dockerignore.
  for (const s of stages)
    for (const c of all(s, 'COPY').filter((i) => !('from' in i.flags))) {
      const parts = c.args.split(/\s+/)
      for (const src of parts.slice(0, -1)) {
        const path = src.replace(/\/+$/, '')
        const files = tracked.filter((f) => f === path || f.startsWith(`${path}/`))
        if (files.length === 0) problems.push(`COPY ${src}: nothing tracked by git at that path`)
        else if (files.every(dockerIgnored)) problems.push(`COPY ${src}: excluded by .dockerignore`)
      }
    }

  if (variant === 'cuda') {
    if (!args.CUDA_IMAGE?.startsWith('nvidia/cuda:') || !args.CUDA_IMAGE.includes('runtime'))
      problems.push(`ARG CUDA_IMAGE should be an nvidia/cuda runtime image (got ${args.CUDA_IMAGE})`)
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a Dockerfile variable, not a template
    if (last.from !== '${CUDA_IMAGE}') problems.push('the runtime stage should be FROM ${CUDA_IMAGE}')
    if (
      !stages.some((s) =>
        all(s, 'RUN').some((r) => /ONNXRUNTIME_NODE_INSTALL=cuda12\b.*install\.js/.test(r.args)),
      )
    )
      problems.push('no RUN installs the CUDA build (ONNXRUNTIME_NODE_INSTALL=cuda12 ... install.js)')
    if (!text.includes('UNTESTED ON A GPU')) problems.push('the CUDA image must say it is untested on a GPU')
  }
  return problems
}

attempt('docker: infra/docker/worker.Dockerfile (dockerfile-utils lint + image policy)', () =>
  checkDockerfile('infra/docker/worker.Dockerfile', 'cpu'),
)
attempt('docker: infra/docker/worker-cuda.Dockerfile (dockerfile-utils lint + image policy)', () =>
  checkDockerfile('infra/docker/worker-cuda.Dockerfile', 'cuda'),
)

// ---------------------------------------------------------------------------------------------
// compose.yaml

function seconds(v: unknown): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(String(v ?? ''))
  if (!m) return Number.NaN
  return Number(m[1]) * ({ ms: 0.001, s: 1, m: 60 } as Record<string, number>)[m[2] ?? 's']!
}

attempt('compose: compose.yaml against the compose-spec schema and dclint rules', () => {
  const bin = join(dirname(require.resolve('dclint/package.json')), 'bin', 'dclint.cjs')
  // infra/scripts/dclint.json: double-quoted ports (as biome formats YAML); the order rules are off
  // because services are listed in start-up order and keys in reading order.
  const r = spawnSync(
    process.execPath,
    [
      bin,
      join(root, 'compose.yaml'),
      '--config',
      join(root, 'infra/scripts/dclint.json'),
      '--max-warnings',
      '0',
      '--color',
      'false',
    ],
    { encoding: 'utf8' },
  )
  return r.status === 0 ? [] : [`dclint exited ${r.status}:\n${r.stdout}${r.stderr}`]
})

attempt('compose: workers, Redis and the edge as the deployment expects', () => {
  const problems: string[] = []
  const compose = YAML.parse(read('compose.yaml'), { merge: true }) as Doc
  const services = compose.services as Record<string, Doc>
  for (const pool of poolNames) {
    const svc = Object.entries(services).find(
      ([, s]) => JSON.stringify(s.command) === JSON.stringify(['serve', '--pools', pool]),
    )
    if (!svc) {
      problems.push(`no worker service runs serve --pools ${pool}`)
      continue
    }
    const [name, s] = svc
    if (s.deploy?.replicas === undefined) problems.push(`${name}: no deploy.replicas`)
    if (!existsSync(join(root, s.build?.dockerfile ?? '')))
      problems.push(`${name}: build.dockerfile not found`)
    const grace = seconds(s.stop_grace_period)
    if (!(grace >= DRAIN_TIMEOUT_MS / 1000 + 5))
      problems.push(`${name}: stop_grace_period ${s.stop_grace_period} is shorter than the drain plus margin`)
    if (!String(s.environment?.REDIS_URL ?? '').startsWith('redis://redis:'))
      problems.push(`${name}: REDIS_URL should point at the redis service`)
  }
  // The worker refuses an empty MOE_MODEL_DIR, an empty HF_ENDPOINT is not a URL: pass a variable
  // through with no value (`KEY:`) rather than defaulting it to nothing.
  for (const [name, s] of Object.entries(services))
    for (const [k, v] of Object.entries((s.environment ?? {}) as Record<string, unknown>))
      if (v === '' || /^\$\{\w+:?-\}$/.test(String(v)))
        problems.push(`${name}: ${k} is set to an empty string (or defaults to one)`)
  const redis = services.redis
  if (!redis?.volumes?.some((v: string) => v.startsWith('./infra/redis.conf:')))
    problems.push('redis: should mount infra/redis.conf')
  if (!JSON.stringify(services.edge?.command ?? '').includes('wrangler dev'))
    problems.push('edge: should run wrangler dev')
  for (const [name, s] of Object.entries(services))
    for (const v of (s.volumes ?? []) as string[])
      if (typeof v === 'string' && v.startsWith('./') && !existsSync(join(root, v.split(':')[0]!)))
        problems.push(`${name}: bind mount ${v.split(':')[0]} does not exist`)
  return problems
})

// ---------------------------------------------------------------------------------------------
// Kubernetes

type ModelClass = new (data: Doc) => { validate(): void }
const KINDS: Record<string, { module: string; export: string; type: string }> = {
  'v1/Namespace': { module: 'kubernetes-models/v1/Namespace', export: 'Namespace', type: 'INamespace' },
  'v1/ConfigMap': { module: 'kubernetes-models/v1/ConfigMap', export: 'ConfigMap', type: 'IConfigMap' },
  'v1/Secret': { module: 'kubernetes-models/v1/Secret', export: 'Secret', type: 'ISecret' },
  'v1/Service': { module: 'kubernetes-models/v1/Service', export: 'Service', type: 'IService' },
  'v1/PersistentVolumeClaim': {
    module: 'kubernetes-models/v1/PersistentVolumeClaim',
    export: 'PersistentVolumeClaim',
    type: 'IPersistentVolumeClaim',
  },
  'batch/v1/Job': { module: 'kubernetes-models/batch/v1/Job', export: 'Job', type: 'IJob' },
  'apps/v1/Deployment': {
    module: 'kubernetes-models/apps/v1/Deployment',
    export: 'Deployment',
    type: 'IDeployment',
  },
  'policy/v1/PodDisruptionBudget': {
    module: 'kubernetes-models/policy/v1/PodDisruptionBudget',
    export: 'PodDisruptionBudget',
    type: 'IPodDisruptionBudget',
  },
  'keda.sh/v1alpha1/ScaledObject': {
    module: '@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject',
    export: 'ScaledObject',
    type: 'IScaledObject',
  },
  'monitoring.coreos.com/v1/PodMonitor': {
    module: '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor',
    export: 'PodMonitor',
    type: 'IPodMonitor',
  },
}

interface Manifest {
  source: string
  doc: Doc
}

function parseYamlFile(path: string): { docs: Doc[]; errors: string[] } {
  const docs: Doc[] = []
  const errors: string[] = []
  for (const d of YAML.parseAllDocuments(readFileSync(path, 'utf8'))) {
    for (const e of d.errors) errors.push(`${relative(root, path)}: ${e.message}`)
    const js = d.toJS()
    if (js !== null && js !== undefined) docs.push(js)
  }
  return { docs, errors }
}

/** kustomize's own renderer when kubectl is installed; otherwise the subset our overlays use. */
const kubectl = spawnSync('kubectl', ['version', '--client'], { encoding: 'utf8' }).status === 0
function render(dir: string): Doc[] {
  if (kubectl) {
    const r = spawnSync('kubectl', ['kustomize', dir], { encoding: 'utf8', maxBuffer: 64 << 20 })
    if (r.status !== 0) throw new Error(`kubectl kustomize ${relative(root, dir)}: ${r.stderr}`)
    return YAML.parseAllDocuments(r.stdout).map((d) => d.toJS())
  }
  return renderOffline(dir)
}

function renderOffline(dir: string): Doc[] {
  const k = YAML.parse(readFileSync(join(dir, 'kustomization.yaml'), 'utf8')) as Doc
  const known = ['apiVersion', 'kind', 'resources', 'namespace', 'images', 'patches']
  const unknown = Object.keys(k).filter((f) => !known.includes(f))
  if (unknown.length > 0)
    throw new Error(`${relative(root, dir)} uses ${unknown.join(', ')}: install kubectl to render it`)
  let docs: Doc[] = []
  for (const r of (k.resources ?? []) as string[]) {
    const p = join(dir, r)
    docs.push(...(statSync(p).isDirectory() ? renderOffline(p) : parseYamlFile(p).docs))
  }
  docs = structuredClone(docs)
  if (k.namespace) for (const d of docs) if (d.kind !== 'Namespace') d.metadata.namespace = k.namespace
  for (const img of (k.images ?? []) as Doc[])
    for (const d of docs)
      for (const c of d.spec?.template?.spec?.containers ?? [])
        if (c.image === img.name || c.image.startsWith(`${img.name}:`))
          c.image = `${img.newName ?? img.name}${img.newTag ? `:${img.newTag}` : ''}`
  for (const p of (k.patches ?? []) as Doc[]) {
    if (!p.path || !p.target)
      throw new Error(`${relative(root, dir)}: only JSON 6902 patches from a file are rendered offline`)
    const ops = YAML.parse(readFileSync(join(dir, p.path), 'utf8')) as Doc[]
    const [lk, lv] = String(p.target.labelSelector ?? '=').split('=')
    for (const d of docs)
      if ((!p.target.kind || d.kind === p.target.kind) && (!lk || d.metadata?.labels?.[lk] === lv))
        applyJsonPatch(d, ops)
  }
  return docs
}

/** Order-free JSON of a set of objects, for comparing two renderings. */
function canonical(docs: Doc[]): string {
  const sortKeys = (v: unknown): unknown =>
    Array.isArray(v)
      ? v.map(sortKeys)
      : v && typeof v === 'object'
        ? Object.fromEntries(
            Object.keys(v)
              .sort()
              .map((k) => [k, sortKeys((v as Doc)[k])]),
          )
        : v
  return JSON.stringify(docs.map((d) => JSON.stringify(sortKeys(d))).sort())
}

function applyJsonPatch(doc: Doc, ops: Doc[]): void {
  for (const op of ops) {
    const keys = String(op.path)
      .split('/')
      .slice(1)
      .map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'))
    const last = keys.pop()!
    // biome-ignore lint/suspicious/noExplicitAny: walks objects and arrays alike
    let parent: any = doc
    for (const key of keys) {
      parent = parent?.[Array.isArray(parent) ? Number(key) : key]
      if (parent === undefined) throw new Error(`patch path ${op.path} does not exist`)
    }
    if (op.op === 'test') {
      if (JSON.stringify(parent?.[last]) !== JSON.stringify(op.value))
        throw new Error(`patch test ${op.path} failed`)
    } else if (op.op === 'remove')
      Array.isArray(parent) ? parent.splice(Number(last), 1) : delete parent[last]
    else if (op.op === 'add' && Array.isArray(parent))
      last === '-' ? parent.push(op.value) : parent.splice(Number(last), 0, op.value)
    else if (op.op === 'add' || op.op === 'replace') {
      if (op.op === 'replace' && !(last in parent))
        throw new Error(`patch replaces ${op.path}, which does not exist`)
      parent[last] = op.value
    } else throw new Error(`patch op ${op.op} is not rendered offline`)
  }
}

/** The API schemas' checks (types, enums, required fields, formats) through kubernetes-models. */
async function schemaProblems(manifests: Manifest[]): Promise<string[]> {
  const problems: string[] = []
  for (const { source, doc } of manifests) {
    const kind = KINDS[`${doc.apiVersion}/${doc.kind}`]
    if (!kind) {
      problems.push(`${source}: no schema for ${doc.apiVersion} ${doc.kind}`)
      continue
    }
    const Model = (await import(kind.module))[kind.export] as ModelClass
    try {
      new Model(doc).validate()
    } catch (e) {
      problems.push(`${source}: ${(e as Error).message}`)
    }
  }
  return problems
}

/**
 * Fields the schemas do not know (what `kubeconform -strict` reports; the API server would drop
 * them or refuse the object): each manifest becomes an object literal typed with the model's
 * interface, and the compiler's excess-property and type checks run over it.
 */
function strictFieldProblems(manifests: Manifest[]): string[] {
  const entries: TypedValue[] = []
  for (const { source, doc } of manifests) {
    const kind = KINDS[`${doc.apiVersion}/${doc.kind}`]
    if (kind)
      entries.push({
        source,
        value: doc,
        type: kind.type,
        imports: [`import type { ${kind.type} } from '${kind.module}'`],
      })
  }
  return typeProblems(entries)
}

interface TypedValue {
  source: string
  value: unknown
  /** A TypeScript type the value must satisfy as an object literal (excess properties are errors). */
  type: string
  imports: string[]
}

/** Type-checks JSON values against TypeScript types with the compiler; messages name each value's source. */
function typeProblems(entries: TypedValue[], prelude: string[] = []): string[] {
  const lines: string[] = []
  const owners: Array<{ from: number; source: string }> = []
  const imports = new Set<string>()
  entries.forEach(({ source, value, type, imports: need }, i) => {
    for (const im of need) imports.add(im)
    owners.push({ from: lines.length, source })
    lines.push(...`export const v${i}: ${type} = ${JSON.stringify(value, null, 2)}`.split('\n'))
  })
  const header = [...imports, ...prelude]
  const text = [...header, ...lines].join('\n')
  const file = join(root, 'infra/scripts/.validate-deploy-typecheck.ts')
  const options: import('typescript').CompilerOptions = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    types: [],
  }
  const host = ts.createCompilerHost(options)
  const getSourceFile = host.getSourceFile
  host.getSourceFile = (name, lang, ...rest) =>
    name === file ? ts.createSourceFile(name, text, lang) : getSourceFile.call(host, name, lang, ...rest)
  const fileExists = host.fileExists
  host.fileExists = (name) => name === file || fileExists.call(host, name)
  const program = ts.createProgram([file], options, host)
  const problems: string[] = []
  for (const d of ts.getPreEmitDiagnostics(program)) {
    const msg = ts.flattenDiagnosticMessageText(d.messageText, ' ').replace(/'"([^"']+)"'/g, "'$1'")
    if (d.file?.fileName !== file || d.start === undefined) {
      problems.push(`typescript: ${msg}`)
      continue
    }
    const { line } = d.file.getLineAndCharacterOfPosition(d.start)
    const at = line - header.length
    const owner = owners.filter((o) => o.from <= at).at(-1)
    const context = text.split('\n')[line]!.trim()
    problems.push(
      `${owner?.source ?? '?'}: ${msg.length > 400 ? `${msg.slice(0, 400)}...` : msg} (at ${context})`,
    )
  }
  return problems
}

function podPorts(container: Doc): Map<string, number> {
  return new Map(((container.ports ?? []) as Doc[]).map((p) => [p.name, p.containerPort]))
}

/** The deployment's own rules: every pool served, probes, drain, volumes, scaling, scraping. */
function policyProblems(overlay: string, docs: Doc[]): string[] {
  const problems: string[] = []
  const find = (kind: string, name: string) => docs.find((d) => d.kind === kind && d.metadata?.name === name)
  const config = find('ConfigMap', 'moe-worker-config')?.data ?? {}
  const drainMs = Number(config.MOE_DRAIN_TIMEOUT_MS ?? 30_000)
  if (config.MOE_METRICS_HOST !== '0.0.0.0')
    problems.push('moe-worker-config: MOE_METRICS_HOST must be 0.0.0.0')
  if (config.MOE_METRICS_PORT !== '9464') problems.push('moe-worker-config: MOE_METRICS_PORT should be 9464')
  const dockerUser = Number(/^USER (\d+)/m.exec(read('infra/docker/worker.Dockerfile'))?.[1])
  const podMonitor = docs.find((d) => d.kind === 'PodMonitor')
  const metricsService = find('Service', 'moe-worker-metrics')
  const deployments = docs.filter((d) => d.kind === 'Deployment')
  for (const pool of poolNames) {
    const name = `moe-worker-${pool}`
    const dep = find('Deployment', name)
    if (!dep) {
      problems.push(`no Deployment ${name} for pool ${pool}`)
      continue
    }
    const p = `${overlay} ${name}`
    const pod = dep.spec.template.spec
    const labels = dep.spec.template.metadata.labels as Record<string, string>
    const c = pod.containers[0]
    if (dep.spec.replicas !== undefined) problems.push(`${p}: sets replicas, which the ScaledObject owns`)
    if (JSON.stringify(c.args) !== JSON.stringify(['serve', '--pools', pool]))
      problems.push(`${p}: args should be serve --pools ${pool}`)
    const ports = podPorts(c)
    for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
      const get = c[probe]?.httpGet
      const port = typeof get?.port === 'string' ? ports.get(get.port) : get?.port
      if (get?.path !== '/healthz' || port !== 9464)
        problems.push(`${p}: ${probe} should GET /healthz on 9464`)
    }
    const live = c.livenessProbe
    if (live && live.periodSeconds * live.failureThreshold < drainMs / 1000)
      problems.push(`${p}: liveness would fail a draining pod (503) before the drain can finish`)
    const grace = pod.terminationGracePeriodSeconds
    if (!(grace >= drainMs / 1000 + 15))
      problems.push(`${p}: terminationGracePeriodSeconds ${grace} < MOE_DRAIN_TIMEOUT_MS/1000 + 15`)
    if (!c.lifecycle?.preStop) problems.push(`${p}: no preStop hook`)
    const redis = (c.env ?? []).find((e: Doc) => e.name === 'REDIS_URL')
    if (!redis?.valueFrom?.secretKeyRef) problems.push(`${p}: REDIS_URL should come from a Secret`)
    if (!(c.envFrom ?? []).some((e: Doc) => e.configMapRef?.name === 'moe-worker-config'))
      problems.push(`${p}: envFrom moe-worker-config missing`)
    const mounts = new Map(((c.volumeMounts ?? []) as Doc[]).map((m) => [m.mountPath, m]))
    const vols = new Map(((pod.volumes ?? []) as Doc[]).map((v) => [v.name, v]))
    const models = mounts.get('/models')
    if (!models?.readOnly || !vols.get(models.name)?.persistentVolumeClaim?.readOnly)
      problems.push(`${p}: the model PVC should be mounted read-only at /models`)
    const cache = [...mounts.keys()].find((m) => String(config.MOE_EXPORT_CACHE ?? '').startsWith(`${m}/`))
    if (!cache)
      problems.push(`${p}: MOE_EXPORT_CACHE (${config.MOE_EXPORT_CACHE}) is not on a mounted volume`)
    if (!String(config.MOE_MODEL_DIR ?? '').startsWith('/models/'))
      problems.push(`${p}: MOE_MODEL_DIR should point into /models`)
    const sc = pod.securityContext ?? {}
    if (!sc.runAsNonRoot || sc.runAsUser !== dockerUser)
      problems.push(`${p}: runAsNonRoot with runAsUser ${dockerUser} (the image's USER) expected`)
    if (c.securityContext?.readOnlyRootFilesystem && !mounts.has('/tmp'))
      problems.push(`${p}: a read-only root filesystem needs a /tmp volume`)
    const gpu = c.resources?.limits?.['nvidia.com/gpu']
    if (overlay.endsWith('cuda')) {
      if (gpu !== 1 || c.resources?.requests?.['nvidia.com/gpu'] !== 1)
        problems.push(`${p}: should request and limit nvidia.com/gpu: 1`)
      if (!(c.env ?? []).some((e: Doc) => e.name === 'MOE_EP' && e.value === 'cuda'))
        problems.push(`${p}: MOE_EP=cuda expected`)
    } else if (gpu !== undefined) problems.push(`${p}: a CPU worker should not ask for a GPU`)
    if (!c.image || c.image === 'moe-worker') problems.push(`${p}: the overlay should set the image`)

    const selects = (sel: Record<string, string> | undefined) =>
      !!sel && Object.keys(sel).length > 0 && Object.entries(sel).every(([k, v]) => labels[k] === v)
    const pdb = docs.find((d) => d.kind === 'PodDisruptionBudget' && selects(d.spec?.selector?.matchLabels))
    if (!pdb) problems.push(`${p}: no PodDisruptionBudget selects its pods`)
    const so = docs.find((d) => d.kind === 'ScaledObject' && d.spec?.scaleTargetRef?.name === name)
    if (!so) problems.push(`${p}: no ScaledObject scales it`)
    else {
      if (!(so.spec.minReplicaCount >= 1))
        problems.push(`${p}: ScaledObject minReplicaCount should be at least 1`)
      for (const t of so.spec.triggers as Doc[]) {
        const q = String(t.metadata?.query ?? '')
        if (t.type !== 'prometheus') problems.push(`${p}: trigger ${t.type} cannot see prioritized jobs`)
        if (!q.includes(`moe_queue_depth{pool="${pool}"}`))
          problems.push(`${p}: query ignores moe_queue_depth of ${pool}`)
        problems.push(...checkPromQL(q, `${p} ScaledObject query`))
      }
    }
    if (!selects(podMonitor?.spec?.selector?.matchLabels))
      problems.push(`${p}: the PodMonitor does not select it`)
    else if (!podMonitor!.spec.podMetricsEndpoints.every((e: Doc) => ports.has(e.port)))
      problems.push(`${p}: the PodMonitor's port is not a named container port`)
    if (!selects(metricsService?.spec?.selector))
      problems.push(`${p}: the metrics Service does not select it`)
  }
  const relabel = podMonitor?.spec?.podMetricsEndpoints?.[0]?.relabelings ?? []
  const poolLabel = Object.keys(deployments[0]?.spec.template.metadata.labels ?? {}).find((l) =>
    l.endsWith('/pool'),
  )
  const meta = `__meta_kubernetes_pod_label_${String(poolLabel).replace(/[^a-zA-Z0-9]/g, '_')}`
  if (!relabel.some((r: Doc) => r.sourceLabels?.includes(meta) && r.targetLabel === 'worker_pool'))
    problems.push(`${overlay}: the PodMonitor should copy ${meta} into worker_pool`)
  const extra = deployments.filter((d) => !poolNames.some((p) => d.metadata.name === `moe-worker-${p}`))
  for (const d of extra)
    problems.push(`${overlay}: Deployment ${d.metadata.name} serves no pool in pools.json`)
  return problems
}

const k8sDir = join(root, 'infra/k8s')
const k8sFiles = readdirSync(k8sDir, { recursive: true })
  .map((f) => `infra/k8s/${f}`)
  .filter((f) => /\.ya?ml$/.test(f))
  .sort()
const manifestFiles = k8sFiles.filter((f) => !f.endsWith('kustomization.yaml') && !f.endsWith('.patch.yaml'))
const overlays = readdirSync(join(k8sDir, 'overlays')).map((o) => join(k8sDir, 'overlays', o))

attempt('k8s: infra/k8s/base/pools is generated from infra/config/pools.json', () => checkPoolManifests())

const sourceManifests: Manifest[] = []
attempt('k8s: every manifest parses as YAML', () => {
  const problems: string[] = []
  for (const f of manifestFiles) {
    const { docs, errors } = parseYamlFile(join(root, f))
    problems.push(...errors)
    for (const [i, doc] of docs.entries()) sourceManifests.push({ source: `${f}#${i}`, doc })
  }
  return problems
})

const rendered: Array<{ overlay: string; docs: Doc[] }> = []
attempt(
  `k8s: overlays render (${kubectl ? 'kubectl kustomize' : 'offline renderer; kubectl not installed'})`,
  () => {
    const problems: string[] = []
    for (const o of overlays) {
      const docs = render(o)
      rendered.push({ overlay: relative(root, o), docs })
      // Keeps the offline renderer honest wherever kubectl can check it.
      if (kubectl && canonical(renderOffline(o)) !== canonical(docs))
        problems.push(`${relative(root, o)}: the offline renderer disagrees with kubectl kustomize`)
    }
    return { problems, note: rendered.map((r) => `${r.overlay}: ${r.docs.length} objects`).join(', ') }
  },
)

const allManifests = [
  ...sourceManifests,
  ...rendered.flatMap(({ overlay, docs }) =>
    docs.map((doc) => ({ source: `${overlay} ${doc.kind}/${doc.metadata?.name}`, doc })),
  ),
]
const schemaResult = await schemaProblems(allManifests)
report(
  'k8s: manifests valid against the Kubernetes, KEDA and Prometheus Operator schemas',
  schemaResult,
  `${allManifests.length} objects`,
)
attempt('k8s: no fields the schemas do not know (strict)', () => strictFieldProblems(allManifests))
for (const { overlay, docs } of rendered)
  attempt(
    `k8s: ${overlay} meets the deployment rules (probes, drain, volumes, GPU, PDB, KEDA, scraping)`,
    () => policyProblems(overlay, docs),
  )

attempt('k8s: the optional shared export-cache patch applies to every worker Deployment', () => {
  const problems: string[] = []
  const ops = YAML.parse(read('infra/k8s/optional/export-cache-pvc.patch.yaml')) as Doc[]
  for (const { source, doc } of sourceManifests.filter((m) => m.doc.kind === 'Deployment')) {
    const d = structuredClone(doc)
    try {
      applyJsonPatch(d, ops)
    } catch (e) {
      problems.push(`${source}: ${(e as Error).message}`)
      continue
    }
    const c = d.spec.template.spec.containers[0]
    const mount = c.volumeMounts.find((m: Doc) => m.name === 'export-cache')
    const vol = d.spec.template.spec.volumes.find((v: Doc) => v.name === 'export-cache')
    if (mount?.mountPath !== '/var/cache/moe' || vol?.persistentVolumeClaim?.claimName !== 'moe-export-cache')
      problems.push(`${source}: the patched pod does not mount moe-export-cache at /var/cache/moe`)
  }
  return problems
})

// ---------------------------------------------------------------------------------------------
// Grafana, Prometheus, Redis

attempt('grafana: dashboards use only metrics and labels the worker exports, and cover them all', () => {
  const problems: string[] = []
  const dir = join(root, 'infra/grafana')
  const files = readdirSync(dir).filter((f) => f.endsWith('.json'))
  if (files.length === 0) return ['no dashboard JSON in infra/grafana']
  const used = new Set<string>()
  for (const f of files) {
    const dash = JSON.parse(readFileSync(join(dir, f), 'utf8')) as Doc
    if (!dash.uid || !dash.title) problems.push(`${f}: uid and title are required`)
    const panels = (dash.panels as Doc[]).flatMap((p) => [p, ...((p.panels as Doc[]) ?? [])])
    const ids = panels.map((p) => p.id)
    if (new Set(ids).size !== ids.length) problems.push(`${f}: panel ids repeat`)
    for (const p of panels) {
      const g = p.gridPos
      if (!g || g.x < 0 || g.w < 1 || g.x + g.w > 24 || g.h < 1)
        problems.push(`${f}: panel ${p.id} gridPos out of the 24-column grid`)
      for (const t of (p.targets ?? []) as Doc[]) {
        // biome-ignore lint/suspicious/noTemplateCurlyInString: Grafana's variable syntax
        if (t.datasource?.uid !== '${datasource}')
          problems.push(`${f}: panel ${p.id} does not use the datasource variable`)
        problems.push(...checkPromQL(t.expr, `${f} panel "${p.title}"`))
        for (const m of String(t.expr).matchAll(/\bmoe_[a-z_]+/g))
          used.add(m[0].replace(/_(bucket|sum|count)$/, ''))
      }
    }
    if (
      !panels.some(
        (p) => p.type === 'heatmap' && JSON.stringify(p.targets).includes('moe_expert_tokens_total'),
      )
    )
      problems.push(`${f}: no expert-load heatmap on moe_expert_tokens_total`)
    for (const v of (dash.templating?.list ?? []) as Doc[])
      if (v.type === 'query') problems.push(...checkPromQL(v.definition ?? '', `${f} variable ${v.name}`))
  }
  for (const m of METRICS.keys()) if (!used.has(m)) problems.push(`no panel shows ${m}`)
  return problems
})

/** @grafana/schema's types of each panel type's options (the plugin's panelcfg). */
const PANEL_OPTIONS: Record<string, string> = {
  timeseries: 'TimeSeries',
  stat: 'Stat',
  bargauge: 'BarGauge',
  heatmap: 'Heatmap',
}
attempt("grafana: dashboards match Grafana's dashboard and panel schemas (@grafana/schema)", () => {
  const dir = join(root, 'infra/grafana')
  const base = '@grafana/schema/dist/esm/raw/composable'
  const entries: TypedValue[] = []
  const problems: string[] = []
  for (const f of readdirSync(dir).filter((x) => x.endsWith('.json'))) {
    const { panels, ...dashboard } = JSON.parse(readFileSync(join(dir, f), 'utf8')) as Doc
    // `definition` (the query text Grafana shows for a query variable) is written by Grafana's own
    // exports but is not in the schema's VariableModel.
    for (const v of (dashboard.templating?.list ?? []) as Doc[]) delete v.definition
    const schema = "import type { Dashboard, Panel, RowPanel } from '@grafana/schema'"
    entries.push({
      source: `${f} (dashboard)`,
      value: { ...dashboard, panels: [] },
      type: 'Json<Dashboard>',
      imports: [schema],
    })
    for (const p of (panels as Doc[]).flatMap((x) => [x, ...((x.panels as Doc[]) ?? [])])) {
      if (p.type === 'row') {
        entries.push({ source: `${f} row "${p.title}"`, value: p, type: 'Json<RowPanel>', imports: [schema] })
        continue
      }
      const name = PANEL_OPTIONS[p.type]
      if (!name) {
        problems.push(`${f}: panel type ${p.type} has no options schema here; add it to PANEL_OPTIONS`)
        continue
      }
      const dir = name.toLowerCase()
      entries.push({
        source: `${f} panel "${p.title}"`,
        value: p,
        type: `Json<Omit<Panel, 'options'> & { options?: ${name}Options }>`,
        imports: [
          schema,
          `import type { Options as ${name}Options } from '${base}/${dir}/panelcfg/x/${name}PanelCfg_types.gen'`,
        ],
      })
    }
  }
  // The schema's enums as the strings JSON holds.
  const json =
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a TypeScript template literal type
    'type Json<T> = T extends string ? `${T}` : T extends (infer U)[] ? Json<U>[] : T extends object ? { [K in keyof T]: Json<T[K]> } : T'
  return [...problems, ...typeProblems(entries, [json])]
})

attempt('grafana + prometheus: provisioning and compose scrape config parse, relabel worker_pool', () => {
  const problems: string[] = []
  for (const f of [
    'infra/grafana/provisioning/datasources/prometheus.yaml',
    'infra/grafana/provisioning/dashboards/moe.yaml',
    'infra/prometheus/compose-prometheus.yml',
  ])
    problems.push(...parseYamlFile(join(root, f)).errors)
  const prom = YAML.parse(read('infra/prometheus/compose-prometheus.yml')) as Doc
  const job = (prom.scrape_configs as Doc[]).find((j) => j.job_name === 'moe-worker')
  const names = (job?.dns_sd_configs?.[0]?.names ?? []) as string[]
  const compose = YAML.parse(read('compose.yaml'), { merge: true }) as Doc
  const workers = Object.keys(compose.services).filter((s) => s.startsWith('worker-'))
  for (const w of workers)
    if (!names.includes(w)) problems.push(`compose-prometheus.yml does not scrape ${w}`)
  if (!job?.relabel_configs?.some((r: Doc) => r.target_label === 'worker_pool'))
    problems.push('compose-prometheus.yml should set worker_pool')
  return problems
})

attempt('redis: infra/redis.conf keeps jobs (AOF on, noeviction)', () => {
  const conf = read('infra/redis.conf')
  const problems: string[] = []
  if (!/^appendonly yes$/m.test(conf)) problems.push('appendonly yes missing')
  if (!/^maxmemory-policy noeviction$/m.test(conf)) problems.push('maxmemory-policy noeviction missing')
  return problems
})

if (!queueDepthInWorker)
  console.log(
    'note moe_queue_depth{pool,priority} is not in gpu-worker/src/service/metrics.ts yet; KEDA needs it',
  )
console.log(
  failed === 0
    ? `validate-deploy: all ${passed} checks passed`
    : `validate-deploy: ${failed} of ${passed + failed} checks failed`,
)
process.exit(failed === 0 ? 0 : 1)
