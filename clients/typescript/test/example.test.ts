// The chat example runs end to end: loads the model, streams the answer, exits 0.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { PACKAGE_DIR, tinyModel } from "./helpers.js";

const run = promisify(execFile);

test("examples/chat streams an answer", { timeout: 30_000 }, async () => {
  const script = join(PACKAGE_DIR, "build", "examples", "chat.js");
  const { stdout, stderr } = await run(process.execPath, [script, "--model", tinyModel(), "--max-tokens", "12", "--temperature", "0", "Hello there"], { cwd: PACKAGE_DIR });
  assert.ok(stdout.trim().length > 0, "printed the answer");
  assert.match(stderr, /\[12 tokens, \d+ tokens\/s, finish: length\]/);
});

test("examples/chat without arguments prints its usage and exits 2", async () => {
  const script = join(PACKAGE_DIR, "build", "examples", "chat.js");
  await assert.rejects(run(process.execPath, [script]), (e: { code?: number; stderr?: string }) => e.code === 2 && /usage: npm run example:chat/.test(e.stderr ?? ""));
});
