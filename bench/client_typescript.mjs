#!/usr/bin/env node
// The TypeScript client against a raw pipe, in one run, on a tiny random-weight model:
//   (a) single-stream generation tokens/s through the client vs a hand-parsed ndjson pipe;
//   (b) pipelined runtime/ping round trips/s (up to 256 in flight) through both.
// Client and pipe runs alternate; medians are reported with client/raw ratios.
//
//   cd clients/typescript && npm ci        (builds dist/)
//   node bench/client_typescript.mjs [--json] [--reps 7] [--max-tokens 2000] [--pings 20000]
//                                    [--inflight 256] [--framing ndjson|lsp|msgpack]
//
// Tokens/s is completion tokens over the wall time the caller sees (request sent → final answer).
// The tiny model's context is 1024 tokens, so max_tokens 2000 is capped by the runtime at ~1020.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir, cpus } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "clients", "typescript", "dist", "index.js");
if (!existsSync(dist)) {
  console.error(`${dist} is missing: run \`cd clients/typescript && npm ci\` (or npm run build) first.`);
  process.exit(1);
}
const { Sidecar, defaultCommand } = await import(dist);

const { values: opts } = parseArgs({
  options: {
    json: { type: "boolean", default: false },
    reps: { type: "string", default: "7" },
    "max-tokens": { type: "string", default: "2000" },
    pings: { type: "string", default: "20000" },
    inflight: { type: "string", default: "256" },
    framing: { type: "string", default: "ndjson" },
  },
});
const REPS = Number(opts.reps);
const MAX_TOKENS = Number(opts["max-tokens"]);
const PINGS = Number(opts.pings);
const INFLIGHT = Number(opts.inflight);
const log = (...a) => console.error(...a);

// ---- the raw pipe: spawn the runtime, write ndjson, split stdout on newlines by hand ----

class RawPipe {
  constructor(python) {
    this.child = spawn(python, ["-m", "mlx_sidecar", "--framing", "ndjson"], { stdio: ["pipe", "pipe", "ignore"] });
    this.nextId = 0;
    this.waiting = new Map(); // id -> {resolve, reject, onChunk}
    this.rest = "";
    this.child.stdout.setEncoding("utf8");
    this.child.stdout.on("data", (text) => {
      const lines = (this.rest + text).split("\n");
      this.rest = lines.pop();
      for (const line of lines) if (line) this.onMessage(JSON.parse(line));
    });
  }

  onMessage(m) {
    if (m.method === "generate/chunk") return this.waiting.get(m.params.id)?.onChunk?.(m.params);
    if (m.method) return;
    const w = this.waiting.get(m.id);
    if (!w) return;
    this.waiting.delete(m.id);
    if (m.error) w.reject(new Error(m.error.message));
    else w.resolve(m.result);
  }

  // Returns the request line; the caller writes it (so a batch of them can go in one write).
  line(method, params, w) {
    const id = ++this.nextId;
    this.waiting.set(id, w);
    return JSON.stringify({ jsonrpc: "2.0", id, method, params }) + "\n";
  }

  request(method, params, onChunk) {
    return new Promise((resolve, reject) => this.child.stdin.write(this.line(method, params, { resolve, reject, onChunk })));
  }

  // n pings with up to `inflight` outstanding; each answer's callback queues the next ping.
  pings(n, inflight) {
    return new Promise((resolve, reject) => {
      let sent = 0;
      let answered = 0;
      let batch = "";
      let flushQueued = false;
      const flush = () => {
        flushQueued = false;
        if (batch) this.child.stdin.write(batch);
        batch = "";
      };
      const send = () => {
        sent++;
        batch += this.line("runtime/ping", {}, { resolve: done, reject });
        if (!flushQueued) {
          flushQueued = true;
          queueMicrotask(flush);
        }
      };
      const done = () => {
        answered++;
        if (answered === n) resolve();
        else if (sent < n) send();
      };
      for (let i = 0; i < Math.min(n, inflight); i++) send();
    });
  }

  async close() {
    await this.request("shutdown", {});
    this.child.stdin.write(JSON.stringify({ jsonrpc: "2.0", method: "exit" }) + "\n");
    this.child.stdin.end();
    await new Promise((r) => (this.child.exitCode !== null ? r() : this.child.once("exit", r)));
  }
}

// ---- measurements ----

const GEN = { model: "m", prompt: "Hello", max_tokens: MAX_TOKENS, temperature: 0 };

async function clientGenerate(sidecar) {
  const t0 = performance.now();
  const stream = sidecar.generate(GEN);
  let chunks = 0;
  for await (const _ of stream) chunks++;
  const r = await stream.result;
  const ms = performance.now() - t0;
  return { tps: (r.usage.completion_tokens / ms) * 1000, tokens: r.usage.completion_tokens, chunks, engine_tps: r.timings.generation_tps };
}

async function rawGenerate(pipe) {
  const t0 = performance.now();
  let chunks = 0;
  const r = await pipe.request("generate", GEN, () => chunks++);
  const ms = performance.now() - t0;
  return { tps: (r.usage.completion_tokens / ms) * 1000, tokens: r.usage.completion_tokens, chunks, engine_tps: r.timings.generation_tps };
}

async function clientPings(sidecar) {
  let left = PINGS;
  const t0 = performance.now();
  const worker = async () => {
    while (left > 0) {
      left--;
      await sidecar.request("runtime/ping");
    }
  };
  await Promise.all(Array.from({ length: Math.min(INFLIGHT, PINGS) }, worker));
  return (PINGS / (performance.now() - t0)) * 1000;
}

async function rawPings(pipe) {
  const t0 = performance.now();
  await pipe.pings(PINGS, INFLIGHT);
  return (PINGS / (performance.now() - t0)) * 1000;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

// ---- run ----

const spec = defaultCommand();
if (spec.args[0] !== "-m") {
  console.error("No Python with mlx_sidecar found: create the repository's .venv or set MLX_SIDECAR_PYTHON.");
  process.exit(1);
}
const python = spec.command;
const modelDir = mkdtempSync(join(tmpdir(), "mlx-sidecar-bench-ts-"));
let sidecar;
let pipe;
try {
  log(`making a tiny model in ${modelDir} ...`);
  execFileSync(python, ["-m", "mlx_sidecar.testing", "make-model", modelDir], { stdio: ["ignore", "ignore", "ignore"] });
  sidecar = await Sidecar.start({ framing: opts.framing });
  pipe = new RawPipe(python);
  await pipe.request("initialize", { protocol_version: "1.0" });
  await sidecar.request("model/load", { model: modelDir, id: "m" });
  await pipe.request("model/load", { model: modelDir, id: "m" });

  // Warm up both (first generation compiles kernels; first pings warm the JIT).
  await clientGenerate(sidecar);
  await rawGenerate(pipe);
  await clientPings(sidecar);
  await rawPings(pipe);

  const gen = { client: [], raw: [] };
  const ping = { client: [], raw: [] };
  for (let i = 0; i < REPS; i++) {
    // Alternate which side goes first, so drift (thermal, caches) hits both alike.
    const order = i % 2 ? ["raw", "client"] : ["client", "raw"];
    for (const side of order) gen[side].push(side === "client" ? await clientGenerate(sidecar) : await rawGenerate(pipe));
    for (const side of order) ping[side].push(side === "client" ? await clientPings(sidecar) : await rawPings(pipe));
    log(`rep ${i + 1}/${REPS}: gen client ${gen.client.at(-1).tps.toFixed(0)} raw ${gen.raw.at(-1).tps.toFixed(0)} tok/s; ping client ${ping.client.at(-1).toFixed(0)} raw ${ping.raw.at(-1).toFixed(0)} /s`);
  }

  const result = {
    bench: "client_typescript",
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
    cpus: cpus().length,
    client_framing: opts.framing,
    raw_framing: "ndjson",
    reps: REPS,
    generate: {
      params: GEN,
      completion_tokens: gen.client[0].tokens,
      chunks_per_run: { client: gen.client[0].chunks, raw: gen.raw[0].chunks },
      client_tps_median: median(gen.client.map((r) => r.tps)),
      raw_tps_median: median(gen.raw.map((r) => r.tps)),
      client_engine_tps_median: median(gen.client.map((r) => r.engine_tps)),
      raw_engine_tps_median: median(gen.raw.map((r) => r.engine_tps)),
      // Wall tokens/s over the runtime's own generation_tps, per run: how much of the engine's
      // speed reaches the caller. Robust to the two runtime processes running at different speeds
      // (other load on the machine), so its ratio isolates the client's own overhead.
      client_delivery_median: median(gen.client.map((r) => r.tps / r.engine_tps)),
      raw_delivery_median: median(gen.raw.map((r) => r.tps / r.engine_tps)),
      client_tps: gen.client.map((r) => r.tps),
      raw_tps: gen.raw.map((r) => r.tps),
    },
    ping: {
      pings: PINGS,
      inflight: INFLIGHT,
      client_per_s_median: median(ping.client),
      raw_per_s_median: median(ping.raw),
      client_per_s: ping.client,
      raw_per_s: ping.raw,
    },
  };
  result.generate.ratio = result.generate.client_tps_median / result.generate.raw_tps_median;
  result.generate.delivery_ratio = result.generate.client_delivery_median / result.generate.raw_delivery_median;
  result.ping.ratio = result.ping.client_per_s_median / result.ping.raw_per_s_median;

  const row = (name, c, r, ratio) => `${name.padEnd(42)} ${c.padStart(12)} ${r.padStart(12)} ${ratio.toFixed(3).padStart(8)}`;
  const table = [
    `mlx-sidecar TypeScript client vs raw pipe (${REPS} alternating reps, medians; node ${process.version}, ${cpus().length} CPUs)`,
    `${"".padEnd(42)} ${"client".padStart(12)} ${"raw pipe".padStart(12)} ${"ratio".padStart(8)}`,
    row(`generate tokens/s (${result.generate.completion_tokens} tok)`, result.generate.client_tps_median.toFixed(0), result.generate.raw_tps_median.toFixed(0), result.generate.ratio),
    row("  engine generation_tps", result.generate.client_engine_tps_median.toFixed(0), result.generate.raw_engine_tps_median.toFixed(0), result.generate.client_engine_tps_median / result.generate.raw_engine_tps_median),
    row("  wall tok/s ÷ engine tok/s", result.generate.client_delivery_median.toFixed(3), result.generate.raw_delivery_median.toFixed(3), result.generate.delivery_ratio),
    row(`pipelined pings/s (${PINGS}, ${INFLIGHT} in flight)`, result.ping.client_per_s_median.toFixed(0), result.ping.raw_per_s_median.toFixed(0), result.ping.ratio),
  ].join("\n");
  if (opts.json) {
    log(table);
    process.stdout.write(JSON.stringify(result, null, 2) + "\n");
  } else console.log(table);
} finally {
  await sidecar?.close();
  await pipe?.close().catch(() => pipe.child.kill("SIGKILL"));
  rmSync(modelDir, { recursive: true, force: true });
}
