#!/usr/bin/env node
// Runs the compiled test suite (build/test/*.test.js) with node's test runner.
// Makes one tiny model for the whole run and passes it on as MLX_SIDECAR_TEST_MODEL.
// Extra arguments go to `node --test` (e.g. --test-name-pattern=abort).

import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { defaultCommand } from "../dist/index.js";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const testDir = join(root, "build", "test");
const files = readdirSync(testDir).filter((f) => f.endsWith(".test.js")).sort().map((f) => join(testDir, f));

const spec = defaultCommand();
if (spec.args[0] !== "-m") {
  console.error("No Python with mlx_sidecar found. Create the repository's .venv (see the top-level README) or set MLX_SIDECAR_PYTHON.");
  process.exit(1);
}
const modelDir = mkdtempSync(join(tmpdir(), "mlx-sidecar-ts-model-"));
let status = 1;
try {
  execFileSync(spec.command, ["-m", "mlx_sidecar.testing", "make-model", modelDir], { stdio: ["ignore", "ignore", "inherit"] });
  // --test-force-exit: a test that timed out may leave a runtime running; do not wait for it.
  const result = spawnSync(process.execPath, ["--test", "--test-force-exit", ...process.argv.slice(2), ...files], {
    stdio: "inherit",
    env: { ...process.env, MLX_SIDECAR_TEST_MODEL: modelDir },
  });
  status = result.status ?? 1;
} finally {
  rmSync(modelDir, { recursive: true, force: true });
}
process.exit(status);
