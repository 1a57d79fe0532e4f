// The client against the real runtime, once per framing: calls, streaming, errors, abort, timeout.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { AbortError, METHODS, RpcError, Sidecar, TimeoutError, type GenerateChunk, type GenerateParams, type ProgressParams } from "mlx-sidecar";
import { FRAMINGS, tinyModel, within } from "./helpers.js";

for (const framing of FRAMINGS) {
  describe(`client over ${framing}`, { timeout: 90_000 }, () => {
    let sidecar: Sidecar;
    const progress: ProgressParams[] = [];

    before(async () => {
      sidecar = await Sidecar.start({ framing });
      sidecar.on("progress", (p) => progress.push(p));
    });
    after(() => sidecar?.close());

    test("initialize answered in the requested framing", () => {
      assert.equal(sidecar.initializeResult?.capabilities.framing, framing);
      assert.equal(sidecar.framing, framing);
      assert.deepEqual(sidecar.initializeResult?.capabilities.methods, [...METHODS]);
    });

    test("model/load reports progress and is remembered", async () => {
      const info = await sidecar.request("model/load", { model: tinyModel(), id: "m" });
      assert.equal(info.id, "m");
      assert.equal(info.architecture, "llama");
      const kinds = progress.filter((p) => typeof p.token === "number").map((p) => p.value.kind);
      assert.equal(kinds[0], "begin");
      assert.equal(kinds[kinds.length - 1], "end");
      assert.deepEqual(sidecar.loadedModels, [{ model: tinyModel(), id: "m" }]);
    });

    test("runtime/metrics is typed and counts the load", async () => {
      const metrics = await sidecar.request("runtime/metrics");
      assert.equal(metrics.requests["model/load"]?.ok, 1);
      assert.equal(metrics.gauges.requests_in_flight, 1);
      assert.equal(typeof metrics.latency_ms.ttft.count, "number");
    });

    test("generate streams chunks that add up to the result", async () => {
      const stream = sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 40, temperature: 0, stream_options: { chunk_tokens: 4 } });
      const chunks: GenerateChunk[] = [];
      for await (const chunk of stream) chunks.push(chunk);
      const result = await stream.result;
      assert.ok(chunks.length >= 5, `expected several chunks, got ${chunks.length}`);
      chunks.forEach((c, i) => {
        assert.equal(c.index, i);
        assert.equal(c.id, stream.id);
      });
      assert.equal(chunks.map((c) => c.text).join(""), result.text);
      assert.equal(stream.text, result.text);
      assert.equal(chunks.reduce((n, c) => n + c.token_ids.length, 0), 40);
      assert.equal(result.finish_reason, "length");
      assert.equal(result.usage.completion_tokens, 40);
      assert.equal(result.model, "m");
    });

    test("generate with stream: false sends no chunks; chat messages work", async () => {
      const stream = sidecar.generate({ model: "m", messages: [{ role: "user", content: "Hi" }], max_tokens: 5, temperature: 0, stream: false });
      const chunks: GenerateChunk[] = [];
      for await (const chunk of stream) chunks.push(chunk);
      assert.equal(chunks.length, 0);
      const result = await stream.result;
      assert.equal(result.usage.completion_tokens, 5);
    });

    test("result can be awaited without iterating", async () => {
      const result = await sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 8, temperature: 0 }).result;
      assert.equal(result.usage.completion_tokens, 8);
    });

    test("tokenize and detokenize", async () => {
      const { tokens } = await sidecar.request("tokenize", { model: "m", text: "Hello world" });
      assert.ok(tokens.length > 0);
      const { text } = await sidecar.request("detokenize", { model: "m", tokens });
      assert.equal(typeof text, "string");
    });

    test("errors are RpcError with code, type and path", async () => {
      const bad = { model: "m", prompt: "x", temperature: "hot" } as unknown as GenerateParams;
      await assert.rejects(sidecar.request("generate", bad), (e: unknown) => {
        assert.ok(e instanceof RpcError);
        assert.equal(e.code, -32602);
        assert.equal(e.type, "invalid_params");
        assert.equal(e.data?.path, "/temperature");
        return true;
      });
      await assert.rejects(sidecar.generate({ model: "nope", prompt: "x" }).result, (e: unknown) => e instanceof RpcError && e.code === -32000 && e.type === "model_not_found");
      await assert.rejects(sidecar.request("no/such"), (e: unknown) => e instanceof RpcError && e.code === -32601);
    });

    test("model/load then generate can be pipelined without waiting", async () => {
      const load = sidecar.request("model/load", { model: tinyModel(), id: "p" });
      const gen = sidecar.generate({ model: "p", prompt: "Hello", max_tokens: 3, temperature: 0 });
      const [info, result] = await Promise.all([load, gen.result]);
      assert.equal(info.id, "p");
      assert.equal(result.usage.completion_tokens, 3);
      await sidecar.request("model/unload", { model: "p" });
      assert.deepEqual(sidecar.loadedModels.map((m) => m.id), ["m"]);
    });

    test("many pipelined pings all come back", async () => {
      const answers = await Promise.all(Array.from({ length: 500 }, () => sidecar.request("runtime/ping")));
      assert.equal(answers.length, 500);
      assert.deepEqual(answers[499], {});
    });

    test("aborting mid-stream cancels, ends iteration, and rejects with the partial text and usage", async () => {
      const controller = new AbortController();
      const stream = sidecar.generate(
        { model: "m", prompt: "Hello", max_tokens: 100_000, temperature: 0, stream_options: { chunk_tokens: 1, max_latency_ms: 0 } },
        { signal: controller.signal },
      );
      const seen: GenerateChunk[] = [];
      const started = Date.now();
      for await (const chunk of stream) {
        seen.push(chunk);
        if (seen.length === 5) controller.abort();
      }
      assert.equal(seen.length, 5, "iteration ends right after the abort");
      const error = await within(stream.result.then(() => null, (e: unknown) => e), 5000, "the cancelled answer");
      assert.ok(error instanceof AbortError, `expected AbortError, got ${error}`);
      assert.equal(error.data?.type, "cancelled");
      assert.equal(error.data?.finish_reason, "cancelled");
      const seenText = seen.map((c) => c.text).join("");
      assert.ok(error.text !== undefined && error.text.startsWith(seenText), "the partial text starts with what was streamed");
      assert.ok(error.usage && error.usage.completion_tokens >= 5 && error.usage.completion_tokens < 100_000);
      assert.ok(Date.now() - started < 10_000);
      // The runtime serves on.
      const again = await sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 2 }).result;
      assert.equal(again.usage.completion_tokens, 2);
    });

    test("leaving the loop early cancels the generation", async () => {
      const stream = sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 100_000, temperature: 0, stream_options: { chunk_tokens: 1 } });
      for await (const chunk of stream) if (chunk.index === 2) break;
      const error = await within(stream.result.then(() => null, (e: unknown) => e), 5000, "the cancelled answer");
      assert.ok(error instanceof AbortError);
      assert.ok((error.usage?.completion_tokens ?? 0) >= 3);
    });

    test("an already aborted signal sends nothing and rejects at once", async () => {
      const stream = sidecar.generate({ model: "m", prompt: "Hello" }, { signal: AbortSignal.abort() });
      await assert.rejects(stream.result, AbortError);
      await assert.rejects(sidecar.request("runtime/ping", {}, { signal: AbortSignal.abort() }), AbortError);
    });

    test("request() with a signal or timeoutMs cancels on the runtime", async () => {
      // Greedy decoding never reaches EOS, so this runs to the context's end (~1000 tokens, ~1 s).
      const long = { model: "m", prompt: "Hello", max_tokens: 100_000, temperature: 0, stream: false };
      await assert.rejects(sidecar.request("generate", long, { timeoutMs: 200 }), (e: unknown) => e instanceof TimeoutError && e.timeoutMs === 200);
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 50);
      await assert.rejects(sidecar.request("generate", long, { signal: controller.signal }), AbortError);
      // Both were cancelled on the runtime: soon nothing is left in flight (but this info call).
      const deadline = Date.now() + 2000;
      let info = await sidecar.request("runtime/info");
      while (info.in_flight.requests > 1 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
        info = await sidecar.request("runtime/info");
      }
      assert.deepEqual(info.in_flight, { requests: 1, generating: 0, queued: 0 });
    });
  });
}
