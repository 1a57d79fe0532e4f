// The public client: starts and supervises the runtime process and exposes request/notify/generate.

import { EventEmitter } from "node:events";
import { readFileSync } from "node:fs";
import { Connection, type CallOptions } from "./connection.js";
import { restartDelay } from "./backoff.js";
import { AbortError, ClosedError, ProcessExitError, RpcError, StartError, TimeoutError, type ExitInfo } from "./errors.js";
import { GenerateStream } from "./generate.js";
import { defaultCommand, RuntimeProcess } from "./process.js";
import {
  PROTOCOL_VERSION,
  type ClientNotifications,
  type Framing,
  type GenerateParams,
  type InitializeResult,
  type MethodName,
  type Methods,
  type ModelInfo,
  type ModelLoadParams,
  type Metrics,
  type ModelUnloadResult,
  type ProgressParams,
} from "./protocol.js";
import { Transport } from "./transport.js";

export interface RestartOptions {
  /** Give up after this many crashes within windowMs (default 5, VS Code's rule). */
  maxCrashes?: number;
  /** The crash-counting window (default 180000 ms). */
  windowMs?: number;
  /** Delay before the first restart; doubles per crash since the runtime was last healthy (default 250 ms). Each delay is spread ±20% at random. */
  initialDelayMs?: number;
  /** Longest delay between restarts before the ±20% spread (default 5000 ms). */
  maxDelayMs?: number;
  /** A process that ran this long before it crashed was healthy: the delay starts again at initialDelayMs (default 30000 ms). */
  healthyMs?: number;
}

export interface SidecarOptions {
  /** The program to run. Default: $MLX_SIDECAR_PYTHON -m mlx_sidecar, a checkout's .venv Python, or `mlx-sidecar`. */
  command?: string;
  /** Extra arguments (after the default `-m mlx_sidecar`, or the only ones for a custom command). */
  args?: string[];
  /** Environment variables added to (and overriding) process.env; undefined removes one. */
  env?: Record<string, string | undefined>;
  cwd?: string;
  /** Wire framing (default ndjson); passed to the runtime as --framing. */
  framing?: Framing;
  /** Restart the runtime when it dies, re-loading the models that were loaded. Default false. */
  autoRestart?: boolean | RestartOptions;
  /** How long the runtime may take to answer initialize (default 60000 ms). */
  startTimeoutMs?: number;
  /** close(): how long cancelled generations get to answer, within shutdownTimeoutMs (default 2000 ms). */
  cancelGraceMs?: number;
  /** close(): the budget for the graceful part (cancel grace, shutdown's answer, the exit) before SIGTERM (default 5000 ms). */
  shutdownTimeoutMs?: number;
  /** close(): how long to wait after SIGTERM before SIGKILL (default 2000 ms). */
  killTimeoutMs?: number;
  /** Chunks a generate stream buffers for its consumer at most; when full, stdout is not read (default 64). */
  streamBufferChunks?: number;
  /** A stream whose full buffer held stdout this long without its consumer taking a chunk is cancelled with StreamStalledError (default 30000 ms; negative or Infinity: never). */
  stallTimeoutMs?: number;
  /** Sent in initialize's client_info. */
  clientInfo?: { name: string; version?: string };
  /** Ask the runtime for a `metrics` event (its runtime/metrics snapshot) every this many ms (at least 50; default 0: none). */
  metricsIntervalMs?: number;
}

export interface ExitEvent extends ExitInfo {
  /** True when close() (or a failed start) ended the process; false for a crash or kill from outside. */
  expected: boolean;
}

export interface RestartEvent {
  pid: number | undefined;
  /** Restarts so far in this client's life. */
  restarts: number;
  /** Crashes since the runtime was last healthy (1 after a crash of a healthy process). */
  attempt: number;
  /** How long the client waited before this (successful) start. */
  delayMs: number;
  /** Models loaded again on the new process. */
  models: ModelInfo[];
  /** Models that failed to load again; they are forgotten. */
  failed: Array<{ params: ModelLoadParams; error: Error }>;
}

export interface SidecarEvents {
  progress: [progress: ProgressParams];
  /** A $/metrics snapshot, every SidecarOptions.metricsIntervalMs. */
  metrics: [metrics: Metrics];
  stderr: [line: string];
  exit: [event: ExitEvent];
  restart: [event: RestartEvent];
  /** Any other notification from the runtime. */
  notification: [method: string, params: unknown];
  /** Something went wrong that no call owns (a bad frame from the runtime, a model that did not re-load). */
  warning: [error: Error];
}

export interface GenerateOptions {
  /** Aborting cancels the generation: iteration ends and `result` rejects with AbortError. */
  signal?: AbortSignal;
}

/** request()'s arguments after the method: params (optional when the method requires none), options. */
export type RequestArgs<M extends MethodName> =
  Record<string, never> extends Methods[M]["params"]
    ? [params?: Methods[M]["params"], options?: CallOptions]
    : [params: Methods[M]["params"], options?: CallOptions];

type State = "starting" | "ready" | "restarting" | "failed" | "closing" | "closed";

interface Live {
  proc: RuntimeProcess;
  transport: Transport;
  conn: Connection;
  init?: InitializeResult;
  stopping?: boolean;
  /** When it started serving (Date.now()). */
  readyAt?: number;
}

interface Waiter {
  resolve(live: Live): void;
  reject(error: Error): void;
}

export interface Sidecar {
  on<E extends keyof SidecarEvents>(event: E, listener: (...args: SidecarEvents[E]) => void): this;
  once<E extends keyof SidecarEvents>(event: E, listener: (...args: SidecarEvents[E]) => void): this;
  off<E extends keyof SidecarEvents>(event: E, listener: (...args: SidecarEvents[E]) => void): this;
  emit<E extends keyof SidecarEvents>(event: E, ...args: SidecarEvents[E]): boolean;
}

export class Sidecar extends EventEmitter {
  private state: State = "starting";
  private live: Live | undefined;
  private launching: Live | undefined;
  private failure: Error | undefined;
  private waiters: Waiter[] = [];
  private readonly models = new Map<string, ModelLoadParams>();
  private crashes: number[] = [];
  private streak = 0; // crashes since the runtime was last healthy
  private restarts = 0;
  private lastId = 0;
  private closing: Promise<void> | undefined;
  private wakeSleep: (() => void) | undefined;
  private readonly options: SidecarOptions;
  private readonly restart: Required<RestartOptions> | undefined;

  /** Spawns the runtime and resolves once it answered initialize; rejects with StartError otherwise. */
  static async start(options: SidecarOptions = {}): Promise<Sidecar> {
    const sidecar = new Sidecar(options);
    await sidecar.startFirst();
    return sidecar;
  }

  private constructor(options: SidecarOptions) {
    super();
    this.options = options;
    const r = options.autoRestart;
    this.restart = r
      ? { maxCrashes: 5, windowMs: 180_000, initialDelayMs: 250, maxDelayMs: 5000, healthyMs: 30_000, ...(r === true ? {} : r) }
      : undefined;
  }

  /** The runtime's initialize result (of the current process). */
  get initializeResult(): InitializeResult | undefined {
    return this.live?.init;
  }

  /** The current process id, if one is running. */
  get pid(): number | undefined {
    return this.live?.proc.pid;
  }

  get framing(): Framing {
    return this.options.framing ?? "ndjson";
  }

  /** The model/load params that will be re-sent after a restart, in load order. */
  get loadedModels(): ModelLoadParams[] {
    return [...this.models.values()];
  }

  /** Low-level access to the current process's transport (raw writes, message taps). */
  get transport(): Transport {
    const live = this.readyLive();
    if (!live) throw this.notReadyError();
    return live.transport;
  }

  /** Calls a method; params and result types follow the method name (params may be left out when none are required). */
  request<M extends MethodName>(method: M, ...args: RequestArgs<M>): Promise<Methods[M]["result"]>;
  /** Calls a method this client has no types for. */
  request<M extends string>(method: M extends MethodName ? never : M, params?: unknown, options?: CallOptions): Promise<unknown>;
  request(method: string, params?: unknown, options: CallOptions = {}): Promise<unknown> {
    const live = this.readyLive();
    if (live) return this.send(live, method, params, options);
    return this.whenReady(options.signal).then((l) => this.send(l, method, params, options));
  }

  /** Sends a notification to the current process; throws when none is running. */
  notify<M extends keyof ClientNotifications>(method: M, params?: ClientNotifications[M]): void;
  notify<M extends string>(method: M extends keyof ClientNotifications ? never : M, params?: unknown): void;
  notify(method: string, params?: unknown): void {
    const live = this.readyLive();
    if (!live) throw this.notReadyError();
    live.conn.notify(method, params);
  }

  /** Starts a generation: iterate it for chunks, await `.result` for the final answer. */
  generate(params: GenerateParams, options: GenerateOptions = {}): GenerateStream {
    const stream = new GenerateStream(options.signal, {
      bufferChunks: Math.max(1, this.options.streamBufferChunks ?? 64),
      stallTimeoutMs: this.options.stallTimeoutMs ?? 30_000,
    });
    const live = this.readyLive();
    if (live) stream.start(live.conn, params);
    else {
      this.whenReady(options.signal).then(
        (l) => stream.start(l.conn, params),
        (e: Error) => stream.failBeforeStart(e),
      );
    }
    return stream;
  }

  /**
   * Refuses new calls, cancels in-flight generations (waits up to cancelGraceMs for their answers),
   * then shutdown, exit, close stdin; SIGTERM and SIGKILL if needed. Safe to call many times.
   */
  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  // ---- lifecycle ----

  private async startFirst(): Promise<void> {
    try {
      this.live = await this.launch();
      this.live.readyAt = Date.now();
      this.state = "ready";
    } catch (e) {
      this.state = "failed";
      this.failure = e as Error;
      throw e;
    } finally {
      this.launching = undefined;
    }
  }

  private async launch(): Promise<Live> {
    const base = this.options.command ? { command: this.options.command, args: [] } : defaultCommand(this.mergedEnv(), this.options.cwd);
    const proc = new RuntimeProcess({
      command: base.command,
      args: [...base.args, ...(this.options.args ?? []), "--framing", this.framing],
      env: this.mergedEnv(),
      cwd: this.options.cwd,
      onStderrLine: (line) => this.emit("stderr", line),
    });
    let conn!: Connection;
    const transport = new Transport(
      proc.child.stdout!,
      proc.child.stdin!,
      this.framing,
      (message) => conn.handle(message),
      (error) => this.emit("warning", error),
    );
    conn = new Connection(transport, () => ++this.lastId, (method, params) => this.onNotification(method, params));
    // Once the process is gone, read what it wrote whatever the streams' limits (a pipe's worth).
    proc.child.once("exit", () => transport.drain());
    const live: Live = { proc, transport, conn };
    this.launching = live;
    void proc.exited.then((info) => this.onExit(live, info));
    const timeoutMs = this.options.startTimeoutMs ?? 60_000;
    try {
      live.init = (await conn.request(
        "initialize",
        {
          protocol_version: PROTOCOL_VERSION,
          client_info: this.options.clientInfo ?? { name: "mlx-sidecar-typescript", version: clientVersion() },
          ...(this.options.metricsIntervalMs ? { metrics_interval_ms: this.options.metricsIntervalMs } : {}),
        },
        { timeoutMs },
      )) as InitializeResult;
      return live;
    } catch (e) {
      live.stopping = true;
      proc.kill("SIGKILL");
      const info = await proc.exited;
      if (this.launching === live) this.launching = undefined;
      throw this.startError(proc, info, e as Error, timeoutMs);
    }
  }

  private startError(proc: RuntimeProcess, info: ExitInfo, error: Error, timeoutMs: number): StartError {
    const cmd = proc.describe();
    const hint = "Set MLX_SIDECAR_PYTHON to a Python that has mlx_sidecar installed, or pass options.command.";
    if (proc.spawnError) return new StartError(`could not run ${cmd}: ${proc.spawnError.message}. ${hint}`, info, { cause: proc.spawnError });
    if (error instanceof TimeoutError) return new StartError(`${cmd} did not answer initialize within ${timeoutMs} ms and was killed; raise startTimeoutMs if it is just slow.`, info, { cause: error });
    if (error instanceof RpcError) return new StartError(`${cmd} refused initialize: ${error.message}`, info, { cause: error });
    return new StartError(`${cmd} exited ${describeExit(info)} before answering initialize. ${hint}`, info, { cause: error });
  }

  private onExit(live: Live, info: ExitInfo): void {
    const expected = !!live.stopping || this.state === "closing" || this.state === "closed";
    const wasCurrent = live === this.live;
    const restarting = wasCurrent && !expected && !!this.restart;
    const what = `mlx-sidecar (pid ${info.pid}) exited ${describeExit(info)}`;
    const advice = expected ? "" : restarting ? "; it is being restarted" : "; start a new Sidecar (or pass autoRestart: true)";
    const error = new ProcessExitError(`${what}${advice}`, info);
    live.conn.fail(expected ? new ClosedError(`the mlx-sidecar client was closed before this call was answered; ${what}`) : error);
    this.emit("exit", { ...info, expected });
    if (!wasCurrent) return;
    this.live = undefined;
    if (this.state !== "ready") return;
    if (restarting) void this.restartLoop(info, live.readyAt === undefined ? 0 : Date.now() - live.readyAt);
    else {
      this.state = "failed";
      this.failure = error;
    }
  }

  private async restartLoop(lastExit: ExitInfo, uptimeMs: number): Promise<void> {
    const r = this.restart!;
    this.state = "restarting";
    if (uptimeMs >= r.healthyMs) this.streak = 0;
    for (;;) {
      const now = Date.now();
      this.crashes = this.crashes.filter((t) => now - t < r.windowMs);
      this.crashes.push(now);
      this.streak++;
      if (this.crashes.length >= r.maxCrashes) {
        const error = new ProcessExitError(
          `mlx-sidecar crashed ${this.crashes.length} times within ${r.windowMs / 1000} s; giving up on restarts. Read the stderr below, fix the cause, then start a new Sidecar.`,
          lastExit,
        );
        this.state = "failed";
        this.failure = error;
        this.settleWaiters(undefined, error);
        return;
      }
      const delayMs = restartDelay(this.streak, r.initialDelayMs, r.maxDelayMs);
      await this.sleep(delayMs);
      if (this.state !== "restarting") return;
      let live: Live | undefined;
      try {
        live = await this.launch();
        const { models, failed } = await this.reloadModels(live);
        if (this.state !== "restarting") return; // close() took over and stops this.launching
        this.launching = undefined;
        this.live = live;
        live.readyAt = Date.now();
        this.state = "ready";
        this.restarts++;
        this.settleWaiters(live, undefined);
        this.emit("restart", { pid: live.proc.pid, restarts: this.restarts, attempt: this.streak, delayMs, models, failed });
        return;
      } catch (e) {
        // launch() cleans up after itself; a process that died while re-loading models is killed here.
        if (live) {
          if (this.launching === live) this.launching = undefined;
          live.stopping = true;
          live.proc.kill("SIGKILL");
        }
        if (e instanceof ProcessExitError) lastExit = { code: e.code, signal: e.signal, stderrTail: e.stderrTail, pid: e.pid };
        if (this.state !== "restarting") return;
      }
    }
  }

  private async reloadModels(live: Live): Promise<{ models: ModelInfo[]; failed: RestartEvent["failed"] }> {
    const entries = [...this.models.entries()];
    const settled = await Promise.allSettled(entries.map(([, params]) => live.conn.request("model/load", params)));
    const models: ModelInfo[] = [];
    const failed: RestartEvent["failed"] = [];
    settled.forEach((s, i) => {
      const [id, params] = entries[i]!;
      if (s.status === "fulfilled") models.push(s.value as ModelInfo);
      else if (s.reason instanceof ProcessExitError) throw s.reason;
      else {
        this.models.delete(id);
        failed.push({ params, error: s.reason as Error });
        this.emit("warning", new Error(`model ${id} did not load again after the restart: ${(s.reason as Error).message}`));
      }
    });
    return { models, failed };
  }

  private async doClose(): Promise<void> {
    this.state = "closing";
    this.wakeSleep?.();
    const closed = new ClosedError("the mlx-sidecar client was closed while this call waited for the runtime");
    this.settleWaiters(undefined, closed);
    const deadline = Date.now() + (this.options.shutdownTimeoutMs ?? 5000);
    const lives = [this.live, this.launching].filter((l): l is Live => !!l);
    await Promise.all(lives.map((l) => this.stop(l, l === this.live, deadline)));
    this.live = undefined;
    this.launching = undefined;
    this.failure = new ClosedError();
    this.state = "closed";
  }

  // Cancel generations, shutdown (waits for other in-flight calls), exit, close stdin, all by
  // `deadline`; then SIGTERM and SIGKILL.
  private async stop(live: Live, graceful: boolean, deadline: number): Promise<void> {
    const { proc, conn, transport } = live;
    const killMs = this.options.killTimeoutMs ?? 2000;
    const left = () => Math.max(0, deadline - Date.now());
    live.stopping = true;
    if (graceful && proc.alive) {
      const cancelled = conn.interrupt("generate", new ClosedError("the mlx-sidecar client is closing"));
      if (cancelled.length) await waitUntil(conn.whenSettled(cancelled), Math.min(this.options.cancelGraceMs ?? 2000, left()));
      try {
        await conn.request("shutdown", undefined, { timeoutMs: Math.max(1, left()) });
      } catch {
        // Timed out, refused (already shutting down) or the process died: go on with exit.
      }
      conn.notify("exit");
    }
    transport.end();
    if (await proc.waitExit(left())) return;
    proc.kill("SIGTERM");
    if (await proc.waitExit(killMs)) return;
    proc.kill("SIGKILL");
    await proc.exited;
  }

  // ---- helpers ----

  private send(live: Live, method: string, params: unknown, options: CallOptions): Promise<unknown> {
    const response = live.conn.request(method, params, options);
    if (method === "model/load") {
      return response.then((info) => {
        const id = (info as ModelInfo).id;
        this.models.delete(id); // keep load order: the latest load goes last
        this.models.set(id, { ...(params as ModelLoadParams) });
        return info;
      });
    }
    if (method === "model/unload") {
      return response.then((r) => {
        this.models.delete((r as ModelUnloadResult).id);
        return r;
      });
    }
    return response;
  }

  private onNotification(method: string, params: unknown): void {
    if (method === "$/progress") this.emit("progress", params as ProgressParams);
    else if (method === "$/metrics") this.emit("metrics", params as Metrics);
    else this.emit("notification", method, params);
  }

  private readyLive(): Live | undefined {
    return this.state === "ready" ? this.live : undefined;
  }

  private notReadyError(): Error {
    if (this.state === "closing" || this.state === "closed") return new ClosedError();
    if (this.failure) return this.failure;
    return new Error(`mlx-sidecar is ${this.state}; wait for it (calls made now are queued until it is ready)`);
  }

  private whenReady(signal: AbortSignal | undefined): Promise<Live> {
    if (this.state === "ready" && this.live) return Promise.resolve(this.live);
    if (this.state !== "starting" && this.state !== "restarting") return Promise.reject(this.notReadyError());
    if (signal?.aborted) return Promise.reject(new AbortError("aborted while the runtime was restarting", { cause: signal.reason }));
    return new Promise<Live>((resolve, reject) => {
      const onAbort = () => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        reject(new AbortError("aborted while the runtime was restarting", { cause: signal?.reason }));
      };
      const waiter: Waiter = {
        resolve: (l) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(l);
        },
        reject: (e) => {
          signal?.removeEventListener("abort", onAbort);
          reject(e);
        },
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.waiters.push(waiter);
    });
  }

  private settleWaiters(live: Live | undefined, error: Error | undefined): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) {
      if (live) w.resolve(live);
      else w.reject(error!);
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(timer);
        self.wakeSleep = undefined;
        resolve();
      }
      this.wakeSleep = done;
    });
  }

  private mergedEnv(): NodeJS.ProcessEnv {
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const [k, v] of Object.entries(this.options.env ?? {})) {
      if (v === undefined) delete env[k];
      else env[k] = v;
    }
    return env;
  }
}

// Resolves when p settles or after ms, whichever comes first.
async function waitUntil(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([p, new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
  clearTimeout(timer);
}

function describeExit(info: ExitInfo): string {
  if (info.signal) return `after signal ${info.signal}`;
  if (info.code !== null) return `with code ${info.code}`;
  return "without an exit code";
}

let version: string | undefined;
function clientVersion(): string {
  if (version === undefined) {
    try {
      version = String(JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")).version);
    } catch {
      version = "0.0.0";
    }
  }
  return version;
}
