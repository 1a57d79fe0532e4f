// The protocol types are generated from protocol/; this fails when src/protocol.ts drifts from it.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { ERROR_CODES, FRAMINGS, METHODS, PROTOCOL_VERSION, type GenerateParams, type Methods, type Sidecar, type TokenizeParams } from "mlx-sidecar";
import { PACKAGE_DIR, REPO_DIR } from "./helpers.js";

test("src/protocol.ts is what scripts/gen-types.mjs makes from protocol/ now", () => {
  const r = spawnSync(process.execPath, [join(PACKAGE_DIR, "scripts", "gen-types.mjs"), "--check"], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
});

test("the built constants agree with protocol.json", () => {
  const protocol = JSON.parse(readFileSync(join(REPO_DIR, "protocol", "protocol.json"), "utf8"));
  assert.equal(PROTOCOL_VERSION, protocol.protocol_version);
  assert.deepEqual([...FRAMINGS], protocol.framings);
  assert.deepEqual(ERROR_CODES, Object.fromEntries(protocol.errors.map((e: { type: string; code: number }) => [e.type, e.code])));
  assert.deepEqual([...METHODS], Object.keys(protocol.methods));
});

// Compile-time checks: these lines only build while the types say what the schemas say.
// Methods has exactly the keys METHODS lists (a missing or extra key fails to compile).
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
export const methodKeysMatch: Same<keyof Methods, (typeof METHODS)[number]> = true;
export const typeChecks = (): unknown[] => {
  const prompt: GenerateParams = { model: "m", prompt: "hi", max_tokens: 5, stop: ["\n"], stream_options: { chunk_tokens: 1 } };
  const chat: GenerateParams = { model: "m", messages: [{ role: "user", content: "hi" }], logit_bias: { "42": -100 } };
  // @ts-expect-error prompt and messages exclude each other
  const both: GenerateParams = { model: "m", prompt: "hi", messages: [{ role: "user", content: "hi" }] };
  // @ts-expect-error one of prompt and messages is required
  const neither: GenerateParams = { model: "m" };
  // @ts-expect-error unknown members are refused (additionalProperties: false)
  const extra: TokenizeParams = { model: "m", text: "x", bogus: 1 };
  return [prompt, chat, both, neither, extra];
};

// request() is typed by method name; unknown method names fall back to unknown params and result.
export const requestChecks = (sidecar: Sidecar): unknown[] => [
  sidecar.request("runtime/ping"),
  sidecar.request("model/list", {}, { timeoutMs: 1000 }),
  sidecar.request("generate", { model: "m", prompt: "hi" }).then((r) => r.usage.completion_tokens.toFixed()),
  sidecar.request("custom/method", { anything: 1 }),
  // @ts-expect-error generate needs params
  sidecar.request("generate"),
  // @ts-expect-error temperature is a number
  sidecar.request("generate", { model: "m", prompt: "hi", temperature: "hot" }),
  // @ts-expect-error ping takes no params
  sidecar.request("runtime/ping", { x: 1 }),
  sidecar.notify("$/cancelRequest", { id: 1 }),
  // @ts-expect-error $/cancelRequest needs an id
  sidecar.notify("$/cancelRequest", {}),
];
