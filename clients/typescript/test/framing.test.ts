// Codec tests: every framing round-trips messages however the byte stream is cut.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { encode as msgpackEncode } from "@msgpack/msgpack";
import { codecFor, msgpackValueEnd } from "#dist/framing.js";
import { FRAMINGS } from "./helpers.js";

const MESSAGES: unknown[] = [
  { jsonrpc: "2.0", id: 1, result: {} },
  { jsonrpc: "2.0", method: "generate/chunk", params: { id: 7, index: 0, text: "héllo wörld ✓ 🎉", token_ids: [1, 2, 300, 70000] } },
  [{ jsonrpc: "2.0", id: "a", result: { x: -1.5, y: null, z: true } }, { jsonrpc: "2.0", id: 2, error: { code: -32601, message: "no", data: { type: "method_not_found" } } }],
  { jsonrpc: "2.0", id: 3, result: { text: "x".repeat(70_000), big: 2 ** 40, neg: -(2 ** 33), f: 0.1 } },
];

function decodeAll(framing: (typeof FRAMINGS)[number], bytes: Buffer, cut: (n: number) => number[]): { messages: unknown[]; errors: Error[] } {
  const decoder = codecFor(framing).decoder();
  const messages: unknown[] = [];
  const errors: Error[] = [];
  let pos = 0;
  for (const size of cut(bytes.length)) {
    decoder.push(bytes.subarray(pos, pos + size), (m) => messages.push(m), (e) => errors.push(e));
    pos += size;
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

    test("decodes a stream written in one piece", () => {
      assert.deepEqual(decodeAll(framing, bytes, whole), { messages: MESSAGES, errors: [] });
    });
    test("decodes a stream cut at random places", () => {
      for (const seed of [1, 2, 3, 4, 5]) assert.deepEqual(decodeAll(framing, bytes, randomCuts(seed)), { messages: MESSAGES, errors: [] });
    });
    test("decodes a stream fed one byte at a time (split UTF-8 included)", () => {
      const small = Buffer.concat(MESSAGES.slice(0, 3).map((m) => codec.encode(m)));
      assert.deepEqual(decodeAll(framing, small, bytewise), { messages: MESSAGES.slice(0, 3), errors: [] });
    });
  });
}

describe("bad frames", () => {
  test("ndjson skips a bad line and blank lines, and reads on", () => {
    const bytes = Buffer.from('{"a":1}\n\n  \r\n{oops\n{"b":2}\n');
    const { messages, errors } = decodeAll("ndjson", bytes, whole);
    assert.deepEqual(messages, [{ a: 1 }, { b: 2 }]);
    assert.equal(errors.length, 1);
  });
  test("lsp reads extra headers and skips a header block without Content-Length", () => {
    const bytes = Buffer.from('Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}X-Other: 1\r\n\r\nContent-Length: 7\r\n\r\n{"b":2}');
    const { messages, errors } = decodeAll("lsp", bytes, bytewise);
    assert.deepEqual(messages, [{ a: 1 }, { b: 2 }]);
    assert.equal(errors.length, 1);
  });
  test("msgpack drops its buffer on a byte that cannot start a value, then decodes afresh", () => {
    const decoder = codecFor("msgpack").decoder();
    const messages: unknown[] = [];
    const errors: Error[] = [];
    decoder.push(Buffer.from([0xc1, 0x01]), (m) => messages.push(m), (e) => errors.push(e));
    decoder.push(Buffer.from(msgpackEncode({ ok: 1 })), (m) => messages.push(m), (e) => errors.push(e));
    assert.deepEqual(messages, [{ ok: 1 }]);
    assert.equal(errors.length, 1);
  });
});

describe("msgpackValueEnd", () => {
  const values: unknown[] = [
    0, 127, -1, -32, 200, -200, 70_000, -70_000, 2 ** 40, -(2 ** 40), 1.5, null, true, false,
    "", "a".repeat(31), "a".repeat(32), "a".repeat(300), "a".repeat(70_000),
    new Uint8Array(5), new Uint8Array(300), new Uint8Array(70_000),
    [], [1, [2, [3, {}]]], new Array(20).fill(1), new Array(70_000).fill(0),
    { a: { b: { c: [1, "x"] } } }, Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`k${i}`, i])),
  ];
  test("finds the end of every kind of value and reports incomplete prefixes", () => {
    for (const v of values) {
      const bytes = msgpackEncode(v);
      const padded = new Uint8Array(bytes.length + 3);
      padded.set(bytes);
      assert.equal(msgpackValueEnd(padded, 0), bytes.length, `value ${JSON.stringify(v)?.slice(0, 40)}`);
      for (const cut of [0, 1, Math.floor(bytes.length / 2), bytes.length - 1]) {
        if (cut >= bytes.length) continue;
        const end = msgpackValueEnd(bytes.subarray(0, cut), 0);
        assert.ok(end < 0 && -end > cut && -end <= bytes.length, `prefix ${cut}/${bytes.length} of ${JSON.stringify(v)?.slice(0, 40)} gave ${end}`);
      }
    }
  });
  test("handles ext and fixext values", () => {
    for (const ext of [[0xd4, 1, 9], [0xd5, 1, 9, 9], [0xd6, 1, 0, 0, 0, 0], [0xd7, 1, ...new Array(8).fill(0)], [0xd8, 1, ...new Array(16).fill(0)], [0xc7, 2, 5, 1, 2], [0xc8, 0, 2, 5, 1, 2], [0xc9, 0, 0, 0, 1, 5, 7]]) {
      assert.equal(msgpackValueEnd(Uint8Array.from(ext), 0), ext.length);
    }
  });
});
