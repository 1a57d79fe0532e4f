// generateJson against the real runtime: a schema-held answer parses into the value, a cut one
// is an IncompleteJsonError, an unenforceable schema an RpcError with a path.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { generateJson, IncompleteJsonError, jsonSchemaFormat, RpcError, Sidecar } from "mlx-sidecar";
import { tinyModel } from "./helpers.js";

interface Pick {
  color: "red" | "green" | "blue";
  size: number;
}

const pickSchema = {
  type: "object",
  properties: { color: { enum: ["red", "green", "blue"] }, size: { type: "integer", minimum: 1, maximum: 9 } },
  required: ["color", "size"],
  additionalProperties: false,
};

describe("generateJson", { timeout: 90_000 }, () => {
  let sidecar: Sidecar;
  before(async () => {
    sidecar = await Sidecar.start();
    await sidecar.request("model/load", { model: tinyModel(), id: "m" });
  });
  after(() => sidecar?.close());

  test("resolves with a value that the schema holds, streamed like any generate", async () => {
    for (let seed = 0; seed < 5; seed++) {
      const { value, result } = await generateJson<Pick>(sidecar, { model: "m", prompt: "pick", max_tokens: 60, seed }, pickSchema);
      assert.ok(["red", "green", "blue"].includes(value.color), JSON.stringify(value));
      assert.ok(Number.isInteger(value.size) && value.size >= 1 && value.size <= 9, JSON.stringify(value));
      assert.deepEqual(JSON.parse(result.text), value);
      assert.equal(result.finish_reason, "stop");
    }
    const stream = sidecar.generate({ model: "m", prompt: "pick", max_tokens: 60, seed: 1, response_format: jsonSchemaFormat(pickSchema) });
    let text = "";
    for await (const chunk of stream) text += chunk.text;
    assert.equal(text, (await stream.result).text);
  });

  test("an answer cut by max_tokens rejects with IncompleteJsonError", async () => {
    await assert.rejects(generateJson(sidecar, { model: "m", prompt: "pick", max_tokens: 2 }, pickSchema), (e: unknown) => {
      assert.ok(e instanceof IncompleteJsonError);
      assert.equal(e.result.finish_reason, "length");
      assert.equal(e.result.parsed, null);
      assert.equal(e.result.format_complete, false);
      return true;
    });
  });

  test("a schema that cannot be enforced rejects with -32602 and where", async () => {
    const bad = { type: "object", properties: { a: { type: "array", uniqueItems: true } } };
    await assert.rejects(generateJson(sidecar, { model: "m", prompt: "x" }, bad), (e: unknown) => {
      assert.ok(e instanceof RpcError);
      assert.equal(e.code, -32602);
      assert.equal((e.data as { path?: string }).path, "/response_format/json_schema/schema/properties/a/uniqueItems");
      return true;
    });
  });

  test("without a schema: any JSON object", async () => {
    try {
      const { value } = await generateJson<Record<string, unknown>>(sidecar, { model: "m", prompt: "x", max_tokens: 40, seed: 3 });
      assert.equal(typeof value, "object");
      assert.ok(value !== null && !Array.isArray(value));
    } catch (e) {
      assert.ok(e instanceof IncompleteJsonError, String(e)); // a random model may not close its object in time
    }
  });
});
