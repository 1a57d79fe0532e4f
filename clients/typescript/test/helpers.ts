// Shared test fixtures: the tiny model, the repository's Python, small async helpers.

import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { defaultCommand, FRAMINGS } from "mlx-sidecar";

export { FRAMINGS };

/** clients/typescript/ */
export const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
/** The repository root (protocol/ lives there). */
export const REPO_DIR = resolve(PACKAGE_DIR, "../..");

/** The Python that runs the runtime (MLX_SIDECAR_PYTHON or the checkout's .venv). */
export function python(): string {
  const spec = defaultCommand();
  if (spec.args[0] !== "-m") throw new Error("no Python with mlx_sidecar found: create the repository's .venv or set MLX_SIDECAR_PYTHON");
  return spec.command;
}

let model: string | undefined;

/**
 * A tiny random-weight model directory. scripts/run-tests.mjs makes one for the whole run
 * (MLX_SIDECAR_TEST_MODEL); a test file run on its own makes its own and removes it at exit.
 */
export function tinyModel(): string {
  if (model) return model;
  if (process.env.MLX_SIDECAR_TEST_MODEL) return (model = process.env.MLX_SIDECAR_TEST_MODEL);
  const dir = mkdtempSync(join(tmpdir(), "mlx-sidecar-ts-model-"));
  process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
  execFileSync(python(), ["-m", "mlx_sidecar.testing", "make-model", dir], { stdio: ["ignore", "ignore", "pipe"] });
  return (model = dir);
}

/** Resolves with the first event's arguments, or rejects after ms. */
export function nextEvent<T extends unknown[]>(emitter: { once(event: string, fn: (...args: any[]) => void): unknown; off(event: string, fn: (...args: any[]) => void): unknown }, event: string, ms = 20_000): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, on);
      reject(new Error(`no ${event} event within ${ms} ms`));
    }, ms);
    const on = (...args: unknown[]) => {
      clearTimeout(timer);
      resolve(args as T);
    };
    emitter.once(event, on);
  });
}

/** Rejects when p has not settled within ms (keeps a hung call from hanging the suite). */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms))),
  ]);
}

/** Whether process pid still exists. */
export function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
