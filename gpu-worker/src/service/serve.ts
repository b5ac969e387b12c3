import { parseArgs } from 'node:util'
import { startBatchServices } from './batch-coordinator.ts'
import { ConfigError, loadWorkerConfig } from './config.ts'
import { WorkerService } from './worker-service.ts'

/** `moe serve [--pools a,b]`: runs the worker until SIGTERM/SIGINT, then drains and exits 0. */
export async function serve(argv: string[]): Promise<void> {
  let pools: string | undefined
  try {
    pools = parseArgs({ args: argv, strict: true, options: { pools: { type: 'string' } } }).values.pools
  } catch (e) {
    console.error(`moe serve: ${(e as Error).message}\nusage: moe serve [--pools a,b]`)
    process.exit(2)
  }
  let service: WorkerService
  try {
    // A dead engine makes this process useless: drain what can be, then exit 1 for a restart.
    service = new WorkerService(loadWorkerConfig(process.env, pools), undefined, () =>
      stop('engine failure', 1),
    )
  } catch (e) {
    if (e instanceof ConfigError) {
      console.error(`moe serve: configuration error:\n${e.message}`)
      process.exit(1)
    }
    throw e
  }
  let batchServices: { close(): Promise<void> } | null = null
  let stopping = false
  function stop(reason: string, code = 0) {
    if (stopping) return
    stopping = true
    service.log.info({ reason }, 'stopping')
    Promise.all([service.close(), batchServices?.close()]).then(
      () => process.exit(code),
      (err) => {
        service.log.error({ err: String(err) }, 'error while draining')
        process.exit(1)
      },
    )
  }
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
  await service.start()
  batchServices = await startBatchServices(service.config, service.log)
}
