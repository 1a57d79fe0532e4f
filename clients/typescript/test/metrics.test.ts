// Periodic $/metrics: asked for with metricsIntervalMs, delivered as typed `metrics` events.

import assert from "node:assert/strict";
import { test } from "node:test";
import { Sidecar, StartError, type Metrics } from "mlx-sidecar";
import { tinyModel, within } from "./helpers.js";

test("metrics events follow what was sent", { timeout: 90_000 }, async () => {
  const sidecar = await Sidecar.start({ metricsIntervalMs: 50 });
  try {
    const seen: Metrics[] = [];
    sidecar.on("metrics", (m) => seen.push(m));
    await sidecar.request("model/load", { model: tinyModel(), id: "m" });
    const result = await sidecar.request("generate", { model: "m", prompt: "Hi", max_tokens: 5 });
    // Snapshots taken after the answer show it; wait for one.
    const m = await within(
      new Promise<Metrics>((resolve) => {
        const check = (x: Metrics) => {
          if (x.requests["generate"]?.ok) {
            sidecar.off("metrics", check);
            resolve(x);
          }
        };
        seen.forEach(check);
        sidecar.on("metrics", check);
      }),
      30_000,
      "a metrics event that saw the generate answered",
    );
    assert.deepEqual(m.requests, { initialize: { ok: 1 }, "model/load": { ok: 1 }, generate: { ok: 1 } });
    assert.deepEqual(m.tokens, { prompt: result.usage.prompt_tokens, cached: 0, completion: 5 });
    assert.equal(m.latency_ms.inter_token.count, 4);
    assert.equal(m.gauges.requests_in_flight, 0);
  } finally {
    await sidecar.close();
  }
});

test("an interval under 50 ms is refused at start", { timeout: 60_000 }, async () => {
  await assert.rejects(Sidecar.start({ metricsIntervalMs: 10 }), (e: Error) => e instanceof StartError && /metrics_interval_ms/.test(e.message));
});
