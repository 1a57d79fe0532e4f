// One runtime process: finding the command, spawning it, keeping its stderr tail, reporting its exit.

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { ExitInfo } from "./errors.js";

const TAIL_LINES = 40;
const TAIL_BYTES = 8192;
// After "exit", wait this long at most for stdout/stderr to drain before reporting.
const DRAIN_GRACE_MS = 500;

export interface CommandSpec {
  command: string;
  args: string[];
}

/**
 * The command that starts the runtime when none is given: $MLX_SIDECAR_PYTHON -m mlx_sidecar;
 * else a repository checkout's .venv Python (searched upward from this package and from the
 * working directory: a dir with .venv/bin/python and runtime/mlx_sidecar); else `mlx-sidecar`.
 */
export function defaultCommand(env: NodeJS.ProcessEnv = process.env, cwd: string = process.cwd()): CommandSpec {
  const python = env.MLX_SIDECAR_PYTHON;
  if (python) return { command: python, args: ["-m", "mlx_sidecar"] };
  const here = dirname(fileURLToPath(import.meta.url));
  for (const start of [here, cwd]) {
    const found = findRepoPython(start);
    if (found) return { command: found, args: ["-m", "mlx_sidecar"] };
  }
  return { command: "mlx-sidecar", args: [] };
}

function findRepoPython(start: string): string | undefined {
  for (let dir = start; ; dir = dirname(dir)) {
    const python = join(dir, ".venv", "bin", "python");
    if (existsSync(python) && existsSync(join(dir, "runtime", "mlx_sidecar"))) return python;
    if (dirname(dir) === dir) return undefined;
  }
}

export interface SpawnOptions extends CommandSpec {
  env?: NodeJS.ProcessEnv | undefined;
  cwd?: string | undefined;
  onStderrLine?: ((line: string) => void) | undefined;
}

export class RuntimeProcess {
  readonly child: ChildProcess;
  /** Resolves once the process is gone and its output is drained. */
  readonly exited: Promise<ExitInfo>;
  /** Set when the command could not be spawned at all (e.g. ENOENT). */
  spawnError: Error | undefined;
  exitInfo: ExitInfo | undefined;
  private tail: string[] = [];
  private partialLine = "";

  constructor(readonly spec: SpawnOptions) {
    this.child = spawn(spec.command, spec.args, {
      stdio: ["pipe", "pipe", "pipe"],
      env: spec.env,
      cwd: spec.cwd,
    });
    const child = this.child;
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (text: string) => this.onStderr(text));
    this.exited = new Promise<ExitInfo>((resolve) => {
      let reported = false;
      const report = (code: number | null, signal: NodeJS.Signals | null) => {
        if (reported) return;
        reported = true;
        if (this.partialLine) this.pushLine(this.partialLine);
        this.partialLine = "";
        this.exitInfo = { code, signal, stderrTail: this.stderrTail(), pid: child.pid };
        resolve(this.exitInfo);
      };
      child.on("error", (err) => {
        // Spawn failures come here without an "exit"; later errors (kill on a dead pid) are ignored.
        if (child.pid === undefined) {
          this.spawnError = err;
          report(null, null);
        }
      });
      // "close" comes after "exit" once stdout/stderr are drained; the timer covers a grandchild
      // that keeps the pipes open.
      let timer: NodeJS.Timeout | undefined;
      child.on("exit", (code, signal) => {
        timer = setTimeout(() => report(code, signal), DRAIN_GRACE_MS);
      });
      child.on("close", (code, signal) => {
        clearTimeout(timer);
        report(code, signal);
      });
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get alive(): boolean {
    return this.exitInfo === undefined && this.spawnError === undefined && this.child.exitCode === null && this.child.signalCode === null;
  }

  kill(signal: NodeJS.Signals): void {
    if (this.alive) this.child.kill(signal);
  }

  /** Resolves true if the process exited within ms, false otherwise. */
  async waitExit(ms: number): Promise<boolean> {
    if (this.exitInfo) return true;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
    const done = await Promise.race([this.exited.then(() => true as const), timeout]);
    clearTimeout(timer);
    return done;
  }

  /** The last stderr lines (up to 40 lines / 8 KiB). */
  stderrTail(): string {
    const lines = this.partialLine ? [...this.tail, this.partialLine] : this.tail;
    const text = lines.join("\n");
    return text.length > TAIL_BYTES ? text.slice(text.length - TAIL_BYTES) : text;
  }

  /** The command line, for error messages. */
  describe(): string {
    return [this.spec.command, ...this.spec.args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : JSON.stringify(a))).join(" ");
  }

  private onStderr(text: string): void {
    const parts = (this.partialLine + text).split("\n");
    this.partialLine = parts.pop() ?? "";
    for (const line of parts) this.pushLine(line.endsWith("\r") ? line.slice(0, -1) : line);
  }

  private pushLine(line: string): void {
    this.tail.push(line);
    if (this.tail.length > TAIL_LINES) this.tail.shift();
    this.spec.onStderrLine?.(line);
  }
}
