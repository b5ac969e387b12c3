// Ambient stand-in for the workerd built-in module, for typechecking tests on Node (see workers-globals.d.ts).
declare module 'cloudflare:workers' {
  export abstract class DurableObject<Env = unknown> {
    protected ctx: unknown
    protected env: Env
    constructor(ctx: unknown, env: Env)
    alarm?(): void | Promise<void>
  }
}
