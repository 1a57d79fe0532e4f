// Codec tests: every framing round-trips messages however the byte stream is cut.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { encode as msgpackEncode } from "@msgpack/msgpack";
import { codecFor } from "#dist/framing.js";
import { FRAMINGS } from "./helpers.js";

const MESSAGES: unknown[] = [
  { jsonrpc: "2.0", id: 1, result: {} },
  { jsonrpc: "2.0", method: "generate/chunk", params: { id: 7, index: 0, text: "héllo wörld ✓ 🎉", token_ids: [1, 2, 300, 70000] } },
  [{ jsonrpc: "2.0", id: "a", result: { x: -1.5, y: null, z: true } }, { jsonrpc: "2.0", id: 2, error: { code: -32601, message: "no", data: { type: "method_not_found" } } }],
  { jsonrpc: "2.0", id: 3, result: { text: "x".repeat(70_000), big: 2 ** 40, neg: -(2 ** 33), f: 0.1 } },
];

// Feeds `bytes` to the codec cut into the given sizes, as a pipe would deliver them.
async function decodeAll(framing: (typeof FRAMINGS)[number], bytes: Buffer, cut: (n: number) => number[]): Promise<{ messages: unknown[]; errors: Error[] }> {
  return collect(framing, piecesOf(bytes, cut(bytes.length)));
}

function piecesOf(bytes: Buffer, sizes: number[]): Buffer[] {
  const pieces: Buffer[] = [];
  let pos = 0;
  for (const size of sizes) {
    pieces.push(bytes.subarray(pos, pos + size));
    pos += size;
  }
  return pieces;
}

async function* source(pieces: Buffer[]): AsyncGenerator<Buffer> {
  for (const piece of pieces) yield piece;
}

async function collect(framing: (typeof FRAMINGS)[number], pieces: Buffer[]): Promise<{ messages: unknown[]; errors: Error[] }> {
  const messages: unknown[] = [];
  const errors: Error[] = [];
  for await (const batch of codecFor(framing).decode(source(pieces))) {
    assert.ok(batch.length > 0, "no empty batches");
    for (const item of batch) {
      if (item.error) errors.push(item.error);
      else messages.push(item.message);
    }
  }
  return { messages, errors };
}

const whole = (n: number) => [n];
const bytewise = (n: number) => new Array<number>(n).fill(1);
function randomCuts(seed: number) {
  return (n: number) => {
    const sizes: number[] = [];
    let s = seed;
    for (let left = n; left > 0; ) {
      s = (s * 1103515245 + 12345) % 2 ** 31;
      const size = Math.min(left, 1 + (s % 5000));
      sizes.push(size);
      left -= size;
    }
    return sizes;
  };
}

for (const framing of FRAMINGS) {
  describe(`${framing} codec`, () => {
    const codec = codecFor(framing);
    const bytes = Buffer.concat(MESSAGES.map((m) => codec.encode(m)));

    test("decodes a stream written in one piece", async () => {
      assert.deepEqual(await decodeAll(framing, bytes, whole), { messages: MESSAGES, errors: [] });
    });
    test("decodes a stream cut at random places", async () => {
      for (const seed of [1, 2, 3, 4, 5]) assert.deepEqual(await decodeAll(framing, bytes, randomCuts(seed)), { messages: MESSAGES, errors: [] });
    });
    test("decodes a stream fed one byte at a time (split UTF-8 included)", async () => {
      const small = Buffer.concat(MESSAGES.slice(0, 3).map((m) => codec.encode(m)));
      assert.deepEqual(await decodeAll(framing, small, bytewise), { messages: MESSAGES.slice(0, 3), errors: [] });
    });
    test("reads the source only as far as batches are pulled (what backpressure relies on)", async () => {
      const message = { jsonrpc: "2.0", method: "generate/chunk", params: { id: 1, index: 0, text: "x", token_ids: [1] } };
      let reads = 0;
      async function* counted(): AsyncGenerator<Uint8Array> {
        for (let i = 0; i < 10; i++) {
          reads++;
          yield codec.encode(message);
        }
      }
      const batches = codec.decode(counted());
      assert.deepEqual((await batches.next()).value, [{ message }]);
      assert.deepEqual((await batches.next()).value, [{ message }]);
      assert.equal(reads, 2, "two batches pulled, two reads made");
      await batches.return();
    });
  });
}

describe("bad frames", () => {
  test("ndjson skips a bad line and blank lines, and reads on", async () => {
    const bytes = Buffer.from('{"a":1}\n\n  \r\n{oops\n{"b":2}\n');
    const { messages, errors } = await decodeAll("ndjson", bytes, whole);
    assert.deepEqual(messages, [{ a: 1 }, { b: 2 }]);
    assert.equal(errors.length, 1);
  });
  test("lsp reads extra headers and skips a header block without Content-Length", async () => {
    const bytes = Buffer.from('Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}X-Other: 1\r\n\r\nContent-Length: 7\r\n\r\n{"b":2}');
    const { messages, errors } = await decodeAll("lsp", bytes, bytewise);
    assert.deepEqual(messages, [{ a: 1 }, { b: 2 }]);
    assert.equal(errors.length, 1);
  });
  test("msgpack drops the rest of a read on a byte that cannot start a value, then decodes the next reads", async () => {
    const good = Buffer.from(msgpackEncode({ ok: 1 }));
    const { messages, errors } = await collect("msgpack", [Buffer.concat([good, Buffer.from([0xc1, 0x01]), good]), good, Buffer.concat([good.subarray(0, 2)]), good.subarray(2)]);
    assert.deepEqual(messages, [{ ok: 1 }, { ok: 1 }, { ok: 1 }], "the value before the bad byte and those in later reads");
    assert.equal(errors.length, 1);
    assert.match(errors[0]!.message, /not MessagePack/);
  });
  test("msgpack: a map with a key that is neither string nor number is a bad frame, not a crash", async () => {
    const badKey = Buffer.from([0x81, 0xc0, 0x01]); // {nil: 1}
    const { messages, errors } = await collect("msgpack", [badKey, Buffer.from(msgpackEncode({ ok: 2 }))]);
    assert.deepEqual(messages, [{ ok: 2 }]);
    assert.equal(errors.length, 1);
  });
});
