// Tool calls, logprobs and score through the client, and the chat example's agent loop.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { RpcError, Sidecar, type GenerateParams, type TokenLogprob, type Tool } from "mlx-sidecar";
import { PACKAGE_DIR, tinyModel } from "./helpers.js";

const run = promisify(execFile);

const TIME: Tool = {
  type: "function",
  function: {
    name: "get_time",
    parameters: { type: "object", properties: { timezone: { enum: ["UTC", "Asia/Tokyo"] } }, required: ["timezone"], additionalProperties: false },
  },
};

describe("tools, logprobs and score", { timeout: 90_000 }, () => {
  let sidecar: Sidecar;
  before(async () => {
    sidecar = await Sidecar.start();
    await sidecar.request("model/load", { model: tinyModel(), id: "m" });
  });
  after(() => sidecar?.close());

  test("a forced call streams as deltas, then call → tool → answer", async () => {
    const params: GenerateParams = {
      model: "m", messages: [{ role: "user", content: "What time is it in Tokyo?" }], max_tokens: 80,
      temperature: 1, seed: 5, tools: [TIME], tool_choice: "required", stream_options: { chunk_tokens: 1 },
    };
    const stream = sidecar.generate(params);
    let id = "", name = "", args = "";
    for await (const chunk of stream) {
      assert.equal(chunk.text, "");
      for (const d of chunk.tool_calls ?? []) {
        id += d.id ?? "";
        name += d.function.name ?? "";
        args += d.function.arguments ?? "";
      }
    }
    const result = await stream.result;
    assert.equal(result.finish_reason, "tool_calls");
    assert.deepEqual(result.tool_calls, [{ id, type: "function", function: { name, arguments: args } }]);
    assert.ok(["UTC", "Asia/Tokyo"].includes(JSON.parse(args).timezone));
    const call = result.tool_calls![0]!;
    params.messages!.push({ role: "assistant", content: null, tool_calls: result.tool_calls }, { role: "tool", tool_call_id: call.id, content: '{"time":"12:00"}' });
    params.tool_choice = "none";
    params.max_tokens = 6;
    const answer = await sidecar.generate(params).result;
    assert.equal(answer.finish_reason, "length");
    assert.equal(answer.tool_calls, undefined);
    params.messages!.push({ role: "tool", tool_call_id: "nope", content: "x" });
    await assert.rejects(sidecar.generate(params).result, (e: unknown) => e instanceof RpcError && e.code === -32602 && (e.data as { path?: string }).path === "/messages/3/tool_call_id");
  });

  test("logprobs line up with token ids; score gives one item per token", async () => {
    const stream = sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 10, logprobs: true, top_logprobs: 2 });
    const items: TokenLogprob[] = [];
    for await (const chunk of stream) {
      assert.equal(chunk.logprobs?.length, chunk.token_ids.length);
      items.push(...chunk.logprobs!);
    }
    const result = await stream.result;
    assert.deepEqual(result.logprobs?.content, items);
    assert.ok(items.every((i) => i.logprob !== null && i.logprob <= 0 && i.top_logprobs.length === 2));
    const score = await sidecar.request("score", { model: "m", prompt: "Hello world" });
    assert.equal(score.logprobs.content.length, score.usage.prompt_tokens);
    assert.equal(score.logprobs.content[0]?.logprob, null);
  });
});

test("examples/chat --tools runs call → get_time → answer", { timeout: 60_000 }, async () => {
  const script = join(PACKAGE_DIR, "build", "examples", "chat.js");
  const { stderr } = await run(process.execPath, [script, "--model", tinyModel(), "--tools", "--tool-choice", "required", "--max-tokens", "80", "--temperature", "0", "What time is it in Tokyo?"], { cwd: PACKAGE_DIR });
  assert.match(stderr, /\[tool get_time\(\{"timezone":"[A-Za-z/_]+"\}\) -> \{"timezone":"[^"]+","time":"[^"]+"\}\]/);
  assert.match(stderr, /finish: (length|stop)\]/);
});
