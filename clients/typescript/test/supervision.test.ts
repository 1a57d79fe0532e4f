// Process supervision against the real runtime: crashes, restarts, failed starts, close().

import assert from "node:assert/strict";
import { chmodSync, cpSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import {
  ClosedError,
  defaultCommand,
  ProcessExitError,
  RpcError,
  Sidecar,
  StartError,
  type ExitEvent,
  type RestartEvent,
} from "mlx-sidecar";
import { restartDelay } from "#dist/backoff.js";
import { nextEvent, processExists, python, REPO_DIR, tinyModel, within } from "./helpers.js";

const scratch = mkdtempSync(join(tmpdir(), "mlx-sidecar-ts-sup-"));
after(() => rmSync(scratch, { recursive: true, force: true }));

describe("a crash (SIGKILL mid-stream)", { timeout: 60_000 }, () => {
  test("rejects every pending call at once with the exit error; without autoRestart the client stays down", async () => {
    const sidecar = await Sidecar.start();
    try {
      await sidecar.request("model/load", { model: tinyModel(), id: "m" });
      const pid = sidecar.pid!;
      const exits: ExitEvent[] = [];
      sidecar.on("exit", (e) => exits.push(e));
      const stream = sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 100_000, temperature: 0, stream_options: { chunk_tokens: 1 } });
      const other = sidecar.request("generate", { model: "m", prompt: "Hi", max_tokens: 100_000, temperature: 0 });
      const otherSettled = other.then(() => "resolved", (e: unknown) => e);
      let killedAt = 0;
      const iteration = (async () => {
        for await (const chunk of stream) {
          if (chunk.index === 2) {
            killedAt = Date.now();
            process.kill(pid, "SIGKILL");
          }
        }
      })();
      await assert.rejects(iteration, (e: unknown) => e instanceof ProcessExitError && e.signal === "SIGKILL" && e.pid === pid);
      await assert.rejects(stream.result, (e: unknown) => e instanceof ProcessExitError && e.signal === "SIGKILL");
      assert.ok((await otherSettled) instanceof ProcessExitError);
      assert.ok(Date.now() - killedAt < 1000, `pending calls rejected ${Date.now() - killedAt} ms after the kill`);
      assert.deepEqual(exits.map((e) => [e.signal, e.expected]), [["SIGKILL", false]]);
      assert.equal(typeof exits[0]!.stderrTail, "string");
      // Without autoRestart the client stays down and says so.
      await assert.rejects(sidecar.request("runtime/ping"), (e: unknown) => e instanceof ProcessExitError && /autoRestart/.test(e.message));
    } finally {
      await sidecar.close();
    }
  });

  test("with autoRestart a new process comes up, re-loads the models, and serves", async () => {
    const sidecar = await Sidecar.start({ autoRestart: { initialDelayMs: 50 } });
    try {
      await sidecar.request("model/load", { model: tinyModel(), id: "m" });
      await sidecar.request("model/load", { model: tinyModel(), id: "gone" });
      await sidecar.request("model/unload", { model: "gone" });
      const pid = sidecar.pid!;
      const stream = sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 100_000, temperature: 0, stream_options: { chunk_tokens: 1 } });
      const restarted = nextEvent<[RestartEvent]>(sidecar, "restart");
      await assert.rejects(async () => {
        for await (const chunk of stream) if (chunk.index === 1) process.kill(pid, "SIGKILL");
      }, ProcessExitError);
      await assert.rejects(stream.result, ProcessExitError);
      // A call made while the runtime restarts waits for it instead of failing.
      const during = sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 5, temperature: 0 });
      const [event] = await restarted;
      assert.notEqual(event.pid, pid);
      assert.equal(event.restarts, 1);
      assert.equal(event.attempt, 1);
      assert.deepEqual(event.models.map((m) => m.id), ["m"]);
      assert.deepEqual(event.failed, []);
      assert.equal(sidecar.pid, event.pid);
      assert.equal((await during.result).usage.completion_tokens, 5);
      const { models } = await sidecar.request("model/list");
      assert.deepEqual(models.map((m) => m.id), ["m"]);
      const again = await sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 7, temperature: 0 }).result;
      assert.equal(again.usage.completion_tokens, 7);
    } finally {
      await sidecar.close();
    }
  });

  test("a model that cannot be loaded again after a restart is reported and forgotten", async () => {
    const copy = join(scratch, "model-copy");
    cpSync(tinyModel(), copy, { recursive: true });
    const sidecar = await Sidecar.start({ autoRestart: { initialDelayMs: 20 } });
    const warnings: Error[] = [];
    sidecar.on("warning", (w) => warnings.push(w));
    try {
      await sidecar.request("model/load", { model: copy, id: "c" });
      rmSync(copy, { recursive: true });
      const restarted = nextEvent<[RestartEvent]>(sidecar, "restart");
      process.kill(sidecar.pid!, "SIGKILL");
      const [event] = await restarted;
      assert.deepEqual(event.models, []);
      assert.deepEqual(event.failed.map((f) => f.params), [{ model: copy, id: "c" }]);
      assert.ok(event.failed[0]!.error instanceof RpcError);
      assert.deepEqual(sidecar.loadedModels, []);
      assert.match(warnings[0]?.message ?? "", /model c did not load again/);
      assert.deepEqual(await sidecar.request("runtime/ping"), {});
    } finally {
      await sidecar.close();
    }
  });

  test("gives up after 5 crashes within 180 s", async () => {
    const sidecar = await Sidecar.start({ autoRestart: { initialDelayMs: 10, maxDelayMs: 50 } });
    try {
      for (let crash = 1; crash <= 4; crash++) {
        const restarted = nextEvent<[RestartEvent]>(sidecar, "restart");
        process.kill(sidecar.pid!, "SIGKILL");
        assert.equal((await restarted)[0].restarts, crash);
      }
      const exited = nextEvent<[ExitEvent]>(sidecar, "exit");
      process.kill(sidecar.pid!, "SIGKILL");
      await exited;
      await assert.rejects(
        within(sidecar.request("runtime/ping"), 5000, "the ping"),
        (e: unknown) => e instanceof ProcessExitError && /crashed 5 times within 180 s; giving up/.test(e.message),
      );
    } finally {
      await sidecar.close();
    }
  });
});

describe("restart backoff", { timeout: 60_000 }, () => {
  test("doubles from initialDelayMs to maxDelayMs, spread ±20%", () => {
    const delays = (random: number) => [1, 2, 3, 4, 5, 6, 7, 12].map((n) => restartDelay(n, 250, 5000, () => random));
    assert.deepEqual(delays(0.5), [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
    assert.deepEqual(delays(0), [200, 400, 800, 1600, 3200, 4000, 4000, 4000]);
    assert.deepEqual(delays(1), [300, 600, 1200, 2400, 4800, 6000, 6000, 6000]);
  });

  test("starts again at initialDelayMs after the runtime stayed up healthyMs", async () => {
    const sidecar = await Sidecar.start({ autoRestart: { initialDelayMs: 20, maxDelayMs: 1000, healthyMs: 400 } });
    try {
      const crash = async () => {
        const restarted = nextEvent<[RestartEvent]>(sidecar, "restart");
        process.kill(sidecar.pid!, "SIGKILL");
        return (await restarted)[0];
      };
      const first = await crash();
      const second = await crash(); // at once: not healthy in between
      await new Promise((resolve) => setTimeout(resolve, 600));
      const third = await crash(); // after 600 ms up: healthy
      assert.deepEqual([first.attempt, second.attempt, third.attempt], [1, 2, 1]);
      for (const e of [first, second, third]) {
        const base = 20 * 2 ** (e.attempt - 1);
        assert.ok(e.delayMs >= Math.floor(0.8 * base) && e.delayMs <= Math.ceil(1.2 * base), `attempt ${e.attempt} waited ${e.delayMs} ms`);
      }
      assert.deepEqual(await sidecar.request("runtime/ping"), {});
    } finally {
      await sidecar.close();
    }
  });
});

describe("a start that fails", { timeout: 30_000 }, () => {
  test("MLX_SIDECAR_PYTHON=/bin/false rejects with the exit code", async () => {
    await assert.rejects(Sidecar.start({ env: { MLX_SIDECAR_PYTHON: "/bin/false" } }), (e: unknown) => {
      assert.ok(e instanceof StartError);
      assert.ok(e instanceof ProcessExitError);
      assert.equal(e.code, 1);
      assert.match(e.message, /\/bin\/false -m mlx_sidecar --framing ndjson exited with code 1 before answering initialize/);
      assert.match(e.message, /MLX_SIDECAR_PYTHON/);
      return true;
    });
  });

  test("a Python that cannot import mlx_sidecar rejects with code and stderr tail", async () => {
    const wrapper = join(scratch, "python-without-mlx-sidecar");
    writeFileSync(wrapper, `#!/bin/sh\nexec ${JSON.stringify(python())} -I -S "$@"\n`);
    chmodSync(wrapper, 0o755);
    await assert.rejects(Sidecar.start({ env: { MLX_SIDECAR_PYTHON: wrapper } }), (e: unknown) => {
      assert.ok(e instanceof StartError);
      assert.equal(e.code, 1);
      assert.match(e.stderrTail, /No module named mlx_sidecar/);
      assert.match(e.message, /No module named mlx_sidecar/);
      return true;
    });
  });

  test("a runtime that crashes at start (bad argument) rejects with its usage message", async () => {
    await assert.rejects(Sidecar.start({ args: ["--no-such-flag"] }), (e: unknown) => e instanceof StartError && e.code === 2 && /unrecognized arguments: --no-such-flag/.test(e.stderrTail));
  });

  test("a command that does not exist rejects with the spawn error", async () => {
    await assert.rejects(Sidecar.start({ command: join(scratch, "missing") }), (e: unknown) => e instanceof StartError && /ENOENT/.test(e.message) && e.code === null);
  });

  test("a runtime that never answers initialize is killed after startTimeoutMs", async () => {
    const started = Date.now();
    await assert.rejects(
      Sidecar.start({ command: "/bin/sh", args: ["-c", "exec sleep 30", "sh"], startTimeoutMs: 300 }),
      (e: unknown) => e instanceof StartError && /did not answer initialize within 300 ms/.test(e.message) && e.signal === "SIGKILL",
    );
    assert.ok(Date.now() - started < 3000);
  });
});

describe("close()", { timeout: 30_000 }, () => {
  test("is idempotent and safe to call concurrently; the runtime exits 0", async () => {
    const sidecar = await Sidecar.start();
    const pid = sidecar.pid!;
    const exited = nextEvent<[ExitEvent]>(sidecar, "exit");
    const ping = sidecar.request("runtime/ping");
    const a = sidecar.close();
    const b = sidecar.close();
    assert.equal(a, b);
    await Promise.all([a, b, sidecar.close()]);
    assert.deepEqual(await ping, {}, "a call in flight at close() is answered (shutdown waits for it)");
    const [event] = await exited;
    assert.equal(event.code, 0);
    assert.equal(event.expected, true);
    assert.equal(processExists(pid), false);
    await sidecar.close();
    await assert.rejects(sidecar.request("runtime/ping"), ClosedError);
    assert.throws(() => sidecar.notify("exit"), ClosedError);
    await assert.rejects(sidecar.generate({ model: "m", prompt: "x" }).result, ClosedError);
  });

  test("does not wait past shutdownTimeoutMs for a long generation", async () => {
    // Each step is bounded, so a hang names its step instead of timing out the whole suite.
    const sidecar = await within(Sidecar.start({ shutdownTimeoutMs: 200 }), 20_000, "start");
    await within(sidecar.request("model/load", { model: tinyModel(), id: "m" }), 20_000, "model/load");
    const stream = sidecar.generate({ model: "m", prompt: "Hello", max_tokens: 100_000, temperature: 0, stream_options: { chunk_tokens: 1 } });
    await within(
      (async () => {
        for await (const chunk of stream) if (chunk.index === 0) break;
      })(),
      20_000,
      "the first chunk",
    );
    const long = sidecar.request("generate", { model: "m", prompt: "Hello", max_tokens: 100_000, temperature: 0 });
    const longSettled = long.then(() => "resolved", (e: unknown) => e);
    const started = Date.now();
    await within(sidecar.close(), 10_000, "close()");
    assert.ok(Date.now() - started < 3000, `close took ${Date.now() - started} ms`);
    // close() cancelled it (a generate in flight), and the runtime answered -32800.
    const error = await within(longSettled, 5000, "the long generation's answer");
    assert.ok(error instanceof RpcError && error.code === -32800, `expected a -32800 answer, got ${error}`);
  });


  test("after a crash without autoRestart, close() still resolves", async () => {
    const sidecar = await Sidecar.start();
    const exited = nextEvent(sidecar, "exit");
    process.kill(sidecar.pid!, "SIGKILL");
    await exited;
    await within(sidecar.close(), 2000, "close()");
  });
});

describe("events", () => {
  test("stderr delivers the runtime's log lines", async () => {
    const sidecar = await Sidecar.start({ args: ["--log-level", "debug"] });
    const lines: string[] = [];
    sidecar.on("stderr", (line) => lines.push(line));
    try {
      await sidecar.request("model/load", { model: tinyModel(), id: "m" });
      await sidecar.request("runtime/ping");
    } finally {
      await sidecar.close();
    }
    assert.ok(lines.length > 0 && lines.every((l) => typeof l === "string" && !l.includes("\n")));
  });
});

describe("the default command", () => {
  test("is the checkout's .venv Python, or MLX_SIDECAR_PYTHON", () => {
    assert.deepEqual(defaultCommand({}, "/"), { command: join(REPO_DIR, ".venv", "bin", "python"), args: ["-m", "mlx_sidecar"] });
    assert.deepEqual(defaultCommand({ MLX_SIDECAR_PYTHON: "/opt/py" }), { command: "/opt/py", args: ["-m", "mlx_sidecar"] });
  });
});
