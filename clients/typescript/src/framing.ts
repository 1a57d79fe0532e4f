// Framing codecs: how messages become bytes on stdin and are cut back out of stdout.
// ndjson: one JSON value per line. lsp: "Content-Length: N\r\n\r\n" + N bytes of JSON.
// msgpack: a plain stream of MessagePack values (no length prefix).
//
// Decoding is pull-based: a codec turns an async byte source into an async sequence of batches
// (the frames that one read completed) and reads the source only when asked for the next batch,
// so a caller that stops asking stops reading the pipe (that is how the client applies backpressure).

import { DecodeError, Decoder as MsgpackDecoder, Encoder as MsgpackEncoder } from "@msgpack/msgpack";
import type { Framing } from "./protocol.js";

export type { Framing };

/** One decoded frame: a message, or the error of a bad frame (decoding reads on after it). */
export type Decoded = { message: unknown; error?: undefined } | { error: Error; message?: undefined };

export type ByteSource = AsyncIterable<Uint8Array>;

export interface Codec {
  readonly name: Framing;
  encode(message: unknown): Uint8Array;
  /** Frames cut out of `source`, in order, a batch per read; the source is read only as far as the caller pulls. */
  decode(source: ByteSource): AsyncGenerator<Decoded[], void, undefined>;
}

const EMPTY = Buffer.alloc(0);
const MAX_LSP_HEADER = 8192;

function toBuffer(chunk: Uint8Array): Buffer {
  return Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
}

function parseJson(bytes: Buffer, start: number, end: number): Decoded {
  const text = bytes.toString("utf8", start, end);
  try {
    return { message: JSON.parse(text) };
  } catch (e) {
    return { error: new Error(`the runtime sent a frame that is not JSON (${(e as Error).message}): ${text.slice(0, 200)}`) };
  }
}

function isBlank(buf: Buffer, start: number, end: number): boolean {
  for (let i = start; i < end; i++) {
    const c = buf[i];
    if (c !== 32 && c !== 9 && c !== 13) return false;
  }
  return true;
}

async function* decodeNdjson(source: ByteSource): AsyncGenerator<Decoded[], void, undefined> {
  let partial: Buffer[] = []; // the start of a line that began in earlier reads
  for await (const piece of source) {
    const chunk = toBuffer(piece);
    const batch: Decoded[] = [];
    let start = 0;
    for (let nl = chunk.indexOf(10); nl !== -1; nl = chunk.indexOf(10, start)) {
      let line = chunk;
      let from = start;
      let to = nl;
      if (partial.length) {
        partial.push(chunk.subarray(start, nl));
        line = Buffer.concat(partial);
        partial = [];
        from = 0;
        to = line.length;
      }
      start = nl + 1;
      if (!isBlank(line, from, to)) batch.push(parseJson(line, from, to));
    }
    if (start < chunk.length) partial.push(start ? chunk.subarray(start) : chunk);
    if (batch.length) yield batch;
  }
}

/** Collects chunks and joins them only when a whole frame is needed. */
class ByteQueue {
  private chunks: Buffer[] = [];
  size = 0;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.size += chunk.length;
  }

  /** All queued bytes as one Buffer (joins them once). */
  flat(): Buffer {
    if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks, this.size)];
    return this.chunks[0] ?? EMPTY;
  }

  /** Drops the first n bytes. */
  consume(n: number): void {
    const buf = this.flat().subarray(n);
    this.chunks = buf.length ? [buf] : [];
    this.size = buf.length;
  }

  clear(): void {
    this.chunks = [];
    this.size = 0;
  }
}

async function* decodeLsp(source: ByteSource): AsyncGenerator<Decoded[], void, undefined> {
  const q = new ByteQueue();
  let bodyLength = -1; // -1 while reading a header block
  for await (const piece of source) {
    q.push(toBuffer(piece));
    const batch: Decoded[] = [];
    for (;;) {
      if (bodyLength < 0) {
        const buf = q.flat();
        const end = buf.indexOf("\r\n\r\n");
        if (end === -1) {
          if (q.size > MAX_LSP_HEADER) {
            q.clear();
            batch.push({ error: new Error("the runtime sent an LSP header block without a blank line; dropped it") });
          }
          break;
        }
        const header = buf.toString("latin1", 0, end);
        q.consume(end + 4);
        const m = /(?:^|\r\n)content-length:\s*(\d+)\s*(?:\r\n|$)/i.exec(header);
        if (!m) {
          batch.push({ error: new Error(`the runtime sent an LSP header without Content-Length: ${JSON.stringify(header.slice(0, 200))}`) });
          continue;
        }
        bodyLength = Number(m[1]);
      }
      if (q.size < bodyLength) break;
      const buf = q.flat();
      const n = bodyLength;
      bodyLength = -1;
      q.consume(n);
      batch.push(parseJson(buf, 0, n));
    }
    if (batch.length) yield batch;
  }
}

/** Iterates `source` without ever closing it, so a decoder that gives up does not end the pipe. */
function keepOpen(source: ByteSource): ByteSource {
  const it = source[Symbol.asyncIterator]();
  return { [Symbol.asyncIterator]: () => ({ next: () => it.next() }) };
}

// @msgpack/msgpack's stream decoder does the work, values split across reads included. It stops at
// bytes that are not MessagePack; there are no lengths to resync on, so what it had buffered is
// dropped (as the runtime does) and a fresh decoder goes on with the next read. The library
// yields value by value, so each batch holds one frame.
async function* decodeMsgpack(source: ByteSource): AsyncGenerator<Decoded[], void, undefined> {
  const bytes = keepOpen(source);
  for (;;) {
    try {
      for await (const message of new MsgpackDecoder().decodeStream(bytes)) yield [{ message }];
      return;
    } catch (e) {
      if (!(e instanceof DecodeError)) throw e;
      yield [{ error: new Error(`the runtime sent bytes that are not MessagePack (${e.message}); dropped the rest of that read`) }];
    }
  }
}

const ndjson: Codec = {
  name: "ndjson",
  encode: (message) => Buffer.from(JSON.stringify(message) + "\n", "utf8"),
  decode: decodeNdjson,
};

const lsp: Codec = {
  name: "lsp",
  encode(message) {
    const body = Buffer.from(JSON.stringify(message), "utf8");
    return Buffer.concat([Buffer.from(`Content-Length: ${body.length}\r\n\r\n`, "latin1"), body]);
  },
  decode: decodeLsp,
};

const packer = new MsgpackEncoder({ ignoreUndefined: true });
const msgpack: Codec = {
  name: "msgpack",
  encode: (message) => packer.encode(message),
  decode: decodeMsgpack,
};

const CODECS: Record<Framing, Codec> = { ndjson, lsp, msgpack };

/** The codec for a framing name; throws a helpful error for an unknown one. */
export function codecFor(name: Framing): Codec {
  const codec = CODECS[name];
  if (!codec) throw new TypeError(`unknown framing ${JSON.stringify(name)}; use one of ndjson, lsp, msgpack`);
  return codec;
}
