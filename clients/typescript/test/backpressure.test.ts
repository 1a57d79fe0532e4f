// Flow control against the real runtime: bounded stream buffers, the stall cut-off, and what
// close() and a crash do to streams whose buffers are full.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  AbortError,
  ClosedError,
  ProcessExitError,
  Sidecar,
  StreamStalledError,
  type ExitEvent,
  type GenerateChunk,
  type GenerateStream,
} from "mlx-sidecar";
import { FRAMINGS, nextEvent, tinyModel, within } from "./helpers.js";

const BOUND = 4;
// Greedy decoding on the tiny model never reaches EOS: this runs to the context's end (~1000 tokens).
const LONG = { model: "m", prompt: "Hello", max_tokens: 100_000, temperature: 0, stream_options: { chunk_tokens: 1, max_latency_ms: 0 } };

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Resolves once the stream holds `n` unread chunks (its consumer is not reading). */
async function filled(stream: GenerateStream, n: number): Promise<void> {
  await within(
    (async () => {
      while (stream.buffered < n) await sleep(5);
    })(),
    20_000,
    `buffering ${n} chunks`,
  );
}

/** Starts iterating `stream` (the bound applies from then on); returns the iterator and the first chunk. */
async function startReading(stream: GenerateStream): Promise<[AsyncIterator<GenerateChunk>, GenerateChunk]> {
  const iterator = stream[Symbol.asyncIterator]();
  const first = await within(iterator.next(), 20_000, "the first chunk");
  assert.equal(first.done, false);
  return [iterator, first.value as GenerateChunk];
}

/** Records, for each chunk of `stream` read off the pipe, how many chunks it had buffered before. */
function watchArrivals(sidecar: Sidecar, stream: () => GenerateStream): number[] {
  const before: number[] = [];
  sidecar.transport.tap((m) => {
    const msg = m as { method?: string; params?: { id?: unknown } };
    if (msg.method === "generate/chunk" && msg.params?.id === stream().id) before.push(stream().buffered);
  });
  return before;
}

for (const framing of FRAMINGS) {
  describe(`a slow consumer over ${framing}`, { timeout: 60_000 }, () => {
    test("never has more than streamBufferChunks buffered, and loses nothing", async () => {
      const sidecar = await Sidecar.start({ framing, streamBufferChunks: BOUND });
      try {
        await sidecar.request("model/load", { model: tinyModel(), id: "m" });
        const stream = sidecar.generate({ ...LONG, max_tokens: 300 });
        const arrivals = watchArrivals(sidecar, () => stream);
        // Take one chunk, let the buffer fill up, then read slower than the runtime generates.
        const [iterator, first] = await startReading(stream);
        await filled(stream, BOUND);
        await sleep(100);
        assert.equal(stream.buffered, BOUND, "the pipe is not read while the buffer is full");
        const chunks: GenerateChunk[] = [first];
        for (let r = await iterator.next(); !r.done; r = await iterator.next()) {
          chunks.push(r.value);
          if (chunks.length % 3 === 0) await sleep(2);
        }
        const result = await stream.result;
        assert.ok(arrivals.length === chunks.length, `${arrivals.length} chunks read off the pipe, ${chunks.length} consumed`);
        assert.ok(Math.max(...arrivals) === BOUND - 1, `chunks arrived with at most ${Math.max(...arrivals)} buffered; the bound is ${BOUND}`);
        chunks.forEach((c, i) => assert.equal(c.index, i, "in order, none missing"));
        assert.equal(chunks.map((c) => c.text).join(""), result.text);
        assert.equal(chunks.reduce((n, c) => n + c.token_ids.length, 0), 300);
        assert.equal(result.usage.completion_tokens, 300);
      } finally {
        await sidecar.close();
      }
    });
  });
}

describe("a stream that is never iterated", { timeout: 60_000 }, () => {
  test("does not hold stdout: awaiting only its result works however long it is", async () => {
    const sidecar = await Sidecar.start({ streamBufferChunks: BOUND, stallTimeoutMs: 200 });
    try {
      await sidecar.request("model/load", { model: tinyModel(), id: "m" });
      const stream = sidecar.generate({ ...LONG, max_tokens: 200 });
      const result = await stream.result;
      assert.equal(result.usage.completion_tokens, 200);
      assert.ok(stream.buffered > BOUND, "its chunks are all kept for a later reader");
      let text = "";
      let tokens = 0;
      for await (const chunk of stream) {
        text += chunk.text;
        tokens += chunk.token_ids.length;
      }
      assert.equal(text, result.text);
      assert.equal(tokens, 200);
    } finally {
      await sidecar.close();
    }
  });
});

describe("a consumer that stops reading", { timeout: 60_000 }, () => {
  test("is cut off after stallTimeoutMs; the other calls are then answered and lose nothing", async () => {
    const sidecar = await Sidecar.start({ streamBufferChunks: BOUND, stallTimeoutMs: 300 });
    try {
      await sidecar.request("model/load", { model: tinyModel(), id: "m" });
      const stuck = sidecar.generate(LONG);
      const stuckChunks: GenerateChunk[] = [];
      const iterator = stuck[Symbol.asyncIterator]();
      stuckChunks.push((await iterator.next()).value as GenerateChunk);
      // It reads one chunk, then no more. Meanwhile another stream and a ping are under way.
      const other = sidecar.generate({ ...LONG, max_tokens: 50 });
      const otherChunks: GenerateChunk[] = [];
      const reading = (async () => {
        for await (const chunk of other) otherChunks.push(chunk);
      })();
      const ping = sidecar.request("runtime/ping");
      assert.deepEqual(await within(ping, 20_000, "the ping"), {});
      await within(reading, 20_000, "the other stream");
      const otherResult = await other.result;
      assert.equal(otherChunks.map((c) => c.text).join(""), otherResult.text);
      assert.equal(otherResult.usage.completion_tokens, 50);

      const error = await within(stuck.result.then(() => null, (e: unknown) => e), 20_000, "the stalled stream's answer");
      assert.ok(error instanceof StreamStalledError, `expected StreamStalledError, got ${error}`);
      assert.ok(error instanceof AbortError);
      assert.equal(error.data?.finish_reason, "cancelled");
      assert.ok(error.text?.startsWith(stuckChunks[0]!.text), "its text is the whole text, from the first chunk on");
      assert.ok(error.text!.startsWith(stuck.text) && stuck.text.length > stuckChunks[0]!.text.length, "the text of dropped chunks is kept");
      assert.ok(error.usage && error.usage.completion_tokens > BOUND);
      // Coming back, the consumer gets the same error (the chunks it never read were dropped).
      await assert.rejects(iterator.next(), (e: unknown) => e === error);
    } finally {
      await sidecar.close();
    }
  });
});

describe("close()", { timeout: 60_000 }, () => {
  test("cancels in-flight generations, lets other calls finish, and exits 0", async () => {
    const sidecar = await Sidecar.start();
    await sidecar.request("model/load", { model: tinyModel(), id: "m" });
    const exited = nextEvent<[ExitEvent]>(sidecar, "exit");
    const stream = sidecar.generate(LONG);
    const seen: GenerateChunk[] = [];
    const reading = (async () => {
      for await (const chunk of stream) seen.push(chunk);
    })().then(() => null, (e: unknown) => e);
    await within(
      (async () => {
        while (seen.length < 3) await sleep(5);
      })(),
      20_000,
      "three chunks",
    );
    const tokenize = sidecar.request("tokenize", { model: "m", text: "Hello world" });
    const closing = sidecar.close();
    await assert.rejects(sidecar.request("runtime/ping"), ClosedError, "no new calls once close() began");
    await closing;
    const error = await reading;
    assert.ok(error instanceof AbortError, `the stream ends with AbortError, got ${error}`);
    assert.ok(error.cause instanceof ClosedError, "whose cause is the close");
    assert.equal(error.data?.finish_reason, "cancelled", "the runtime's cancellation answer was waited for");
    assert.ok(error.text?.startsWith(seen.map((c) => c.text).join("")));
    await assert.rejects(stream.result, (e: unknown) => e === error);
    assert.ok((await tokenize).tokens.length > 0, "a call that is not a generation is answered");
    const [event] = await exited;
    assert.deepEqual([event.code, event.signal, event.expected], [0, null, true], "no signal was needed");
  });

  test("reads the cancellation answer even when a stream's full buffer holds stdout", async () => {
    const sidecar = await Sidecar.start({ streamBufferChunks: 2, stallTimeoutMs: Infinity });
    await sidecar.request("model/load", { model: tinyModel(), id: "m" });
    const exited = nextEvent<[ExitEvent]>(sidecar, "exit");
    const stream = sidecar.generate(LONG);
    const [iterator, first] = await startReading(stream);
    await filled(stream, 2);
    await within(sidecar.close(), 10_000, "close()");
    const error = await stream.result.then(() => null, (e: unknown) => e);
    assert.ok(error instanceof AbortError && error.cause instanceof ClosedError, `got ${error}`);
    assert.equal(error.data?.finish_reason, "cancelled");
    // The buffered chunks were dropped (their text is in the error): the consumer gets the error next.
    const chunks: GenerateChunk[] = [first];
    await assert.rejects(
      (async () => {
        for (let r = await iterator.next(); !r.done; r = await iterator.next()) chunks.push(r.value);
      })(),
      (e: unknown) => e === error,
    );
    assert.deepEqual(chunks.map((c) => c.index), [0]);
    assert.ok(error.text!.startsWith(stream.text) && stream.text.length > first.text.length);
    const [event] = await exited;
    assert.deepEqual([event.code, event.signal], [0, null]);
  });
});

describe("a crash while a stream's buffer is full", { timeout: 60_000 }, () => {
  test("fails pending calls at once; the stream yields every chunk the runtime wrote, in order, then the exit error", async () => {
    const sidecar = await Sidecar.start({ streamBufferChunks: BOUND, stallTimeoutMs: -1 }); // never cut off
    try {
      await sidecar.request("model/load", { model: tinyModel(), id: "m" });
      const stream = sidecar.generate(LONG);
      const [iterator, first] = await startReading(stream);
      await filled(stream, BOUND);
      const ping = sidecar.request("runtime/ping").then(() => null, (e: unknown) => e);
      process.kill(sidecar.pid!, "SIGKILL");
      const pingError = await within(ping, 10_000, "the ping's failure");
      assert.ok(pingError instanceof ProcessExitError && pingError.signal === "SIGKILL", `got ${pingError}`);
      const chunks: GenerateChunk[] = [first];
      const error = await (async () => {
        for (let r = await iterator.next(); !r.done; r = await iterator.next()) chunks.push(r.value);
      })().then(() => null, (e: unknown) => e);
      assert.ok(error instanceof ProcessExitError && error === pingError, "the same exit error");
      assert.ok(chunks.length >= BOUND);
      chunks.forEach((c, i) => assert.equal(c.index, i));
      assert.equal(stream.text, chunks.map((c) => c.text).join(""));
    } finally {
      await sidecar.close();
    }
  });
});
