// Proves that validate-deploy.ts catches what it claims to: in a scratch copy of the repository,
// each case breaks one deployment file the way a person might, and the validator must fail
// naming the problem. Run by `bash infra/scripts/validate-deploy.sh --self-test`.
import { spawnSync } from 'node:child_process'
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'

const root = join(import.meta.dirname, '..', '..')

interface Case {
  what: string
  file: string
  from: string | RegExp
  to: string
  /** A piece of the validator's output that names the problem. */
  expect: string
}

const CASES: Case[] = [
  {
    what: 'an unknown field in a Deployment spec',
    file: 'infra/k8s/base/pools/general.yaml',
    from: '  revisionHistoryLimit: 3',
    to: '  revisionHistoryLimit: 3\n  replicaz: 2',
    expect: "'replicaz' does not exist",
  },
  {
    what: 'a container port given as a string',
    file: 'infra/k8s/base/pools/code.yaml',
    from: 'containerPort: 9464',
    to: 'containerPort: "9464"',
    expect: 'containerPort must be integer',
  },
  {
    what: 'a KEDA trigger without a type',
    file: 'infra/k8s/base/pools/vision.yaml',
    from: '    - type: prometheus\n      metricType',
    to: '    - metricType',
    expect: 'must have required property type',
  },
  {
    what: 'an unknown field in the PodMonitor',
    file: 'infra/k8s/base/metrics.yaml',
    from: '      interval: 15s',
    to: '      interval: 15s\n      scrapeEvery: 15s',
    expect: "'scrapeEvery' does not exist",
  },
  {
    what: 'a drain longer than the termination grace period',
    file: 'infra/k8s/base/worker-config.yaml',
    from: 'MOE_DRAIN_TIMEOUT_MS: "30000"',
    to: 'MOE_DRAIN_TIMEOUT_MS: "120000"',
    expect: 'terminationGracePeriodSeconds 60 < MOE_DRAIN_TIMEOUT_MS/1000 + 15',
  },
  {
    what: 'the GPU request dropped from the CUDA overlay',
    file: 'infra/k8s/overlays/cuda/gpu-worker.patch.yaml',
    from: '      nvidia.com/gpu: 1\n    limits:',
    to: '    limits:',
    expect: 'should request and limit nvidia.com/gpu: 1',
  },
  {
    what: 'a pool added to pools.json without regenerating the manifests',
    file: 'infra/config/pools.json',
    from: '"name": "vision"',
    to: '"name": "vision2"',
    expect: 'infra/k8s/base/pools/vision2.yaml is missing',
  },
  {
    what: 'a shell-form ENTRYPOINT',
    file: 'infra/docker/worker.Dockerfile',
    from: 'ENTRYPOINT ["node", "gpu-worker/bin/moe.js"]',
    to: 'ENTRYPOINT npx moe',
    expect: 'ENTRYPOINT must be in exec (JSON) form',
  },
  {
    what: 'a root user in the runtime image',
    file: 'infra/docker/worker-cuda.Dockerfile',
    from: 'USER 10001:10001',
    to: 'USER root',
    expect: 'numeric non-root USER',
  },
  {
    what: 'a Dockerfile syntax error',
    file: 'infra/docker/worker.Dockerfile',
    from: 'EXPOSE 9464',
    to: 'EXPOSE 9464/tcpp',
    expect: 'dockerfile-utils error',
  },
  {
    what: '.dockerignore hiding sources the image copies',
    file: '.dockerignore',
    from: 'compose.yaml',
    to: 'compose.yaml\ngpu-worker/src',
    expect: 'COPY gpu-worker/src/: excluded by .dockerignore',
  },
  {
    what: 'a compose key the compose spec does not have',
    file: 'compose.yaml',
    // biome-ignore lint/suspicious/noTemplateCurlyInString: compose's variable syntax
    from: 'replicas: ${MOE_CODE_REPLICAS:-1}',
    to: 'replicaz: 1',
    expect: 'must NOT have additional properties',
  },
  {
    what: 'an empty MOE_MODEL_DIR in compose (the worker refuses it)',
    file: 'compose.yaml',
    from: /MOE_MODEL_DIR:\n/,
    to: 'MOE_MODEL_DIR: ""\n',
    expect: 'MOE_MODEL_DIR is set to an empty string',
  },
  {
    what: 'an environment variable defaulting to an empty string in compose',
    file: 'compose.yaml',
    from: /HF_ENDPOINT:\n/,
    // biome-ignore lint/suspicious/noTemplateCurlyInString: compose's variable syntax
    to: 'HF_ENDPOINT: ${HF_ENDPOINT:-}\n',
    expect: 'HF_ENDPOINT is set to an empty string',
  },
  {
    what: 'a dashboard query on a label the metric lacks',
    file: 'infra/grafana/moe-workers.json',
    from: 'sum(moe_requests_running{worker_pool=~\\"$pool\\"})',
    to: 'sum(moe_requests_running{pool=~\\"$pool\\"})',
    expect: 'moe_requests_running has no label pool',
  },
  {
    what: 'a misspelt heatmap option in the dashboard',
    file: 'infra/grafana/moe-workers.json',
    from: '"rowsFrame"',
    to: '"rowFrame"',
    expect: "'rowFrame' does not exist",
  },
  {
    what: 'a dashboard query on a metric that does not exist',
    file: 'infra/grafana/moe-workers.json',
    from: 'moe_prompt_tokens_total',
    to: 'moe_input_tokens_total',
    expect: 'moe_input_tokens_total is not a metric the worker exports',
  },
]

const files = spawnSync('git', ['ls-files', '--cached', '--others', '--exclude-standard'], {
  cwd: root,
  encoding: 'utf8',
})
  .stdout.split('\n')
  .filter(Boolean)
const scratch = mkdtempSync(join(tmpdir(), 'validate-deploy-selftest-'))
for (const f of files) {
  mkdirSync(dirname(join(scratch, f)), { recursive: true })
  try {
    cpSync(join(root, f), join(scratch, f))
  } catch {} // deleted in the work tree but still in the index
}
symlinkSync(join(root, 'node_modules'), join(scratch, 'node_modules'))
const git = (...args: string[]) => spawnSync('git', args, { cwd: scratch, encoding: 'utf8' })
git('init', '-q')
git('add', '-A')

const run = () =>
  spawnSync(process.execPath, [join(scratch, 'infra/scripts/validate-deploy.ts')], {
    cwd: scratch,
    encoding: 'utf8',
  })

let bad = 0
const clean = run()
if (clean.status !== 0) {
  console.log(`FAIL the unmodified copy does not validate:\n${clean.stdout}${clean.stderr}`)
  bad++
}
for (const c of CASES) {
  const path = join(scratch, c.file)
  const original = readFileSync(path, 'utf8')
  const broken = original.replace(c.from, c.to)
  if (broken === original) {
    console.log(`FAIL ${c.what}: the case no longer applies (${c.file} changed); update the self-test`)
    bad++
    continue
  }
  writeFileSync(path, broken)
  git('add', '-A')
  const r = run()
  writeFileSync(path, original)
  const caught = r.status !== 0 && r.stdout.includes(c.expect)
  console.log(`${caught ? 'ok  ' : 'FAIL'} catches ${c.what}`)
  if (!caught) {
    bad++
    console.log(
      r.stdout
        .split('\n')
        .filter((l) => l.startsWith('FAIL') || l.startsWith('     -'))
        .join('\n'),
    )
  }
}
git('add', '-A')
rmSync(scratch, { recursive: true, force: true })
console.log(
  bad === 0
    ? `validate-deploy self-test: all ${CASES.length} broken cases caught`
    : `validate-deploy self-test: ${bad} problem(s)`,
)
process.exit(bad === 0 ? 0 : 1)
