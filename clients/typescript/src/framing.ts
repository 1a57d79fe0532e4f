// Framing codecs: how messages become bytes on stdin and are cut back out of stdout.
// ndjson: one JSON value per line. lsp: "Content-Length: N\r\n\r\n" + N bytes of JSON.
// msgpack: a plain stream of MessagePack values (no length prefix).

import { Decoder as MsgpackDecoder, Encoder as MsgpackEncoder } from "@msgpack/msgpack";
import type { Framing } from "./protocol.js";

export type { Framing };

/** A stateful decoder for one byte stream. */
export interface FrameDecoder {
  /** Feeds bytes: calls onMessage per complete message and onError per bad frame (then reads on). */
  push(chunk: Buffer, onMessage: (message: unknown) => void, onError: (error: Error) => void): void;
}

export interface Codec {
  readonly name: Framing;
  encode(message: unknown): Uint8Array;
  decoder(): FrameDecoder;
}

const EMPTY = Buffer.alloc(0);
const MAX_LSP_HEADER = 8192;

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

function parseJson(bytes: Buffer, start: number, end: number, onMessage: (m: unknown) => void, onError: (e: Error) => void): void {
  const text = bytes.toString("utf8", start, end);
  let message: unknown;
  try {
    message = JSON.parse(text);
  } catch (e) {
    onError(new Error(`the runtime sent a frame that is not JSON (${(e as Error).message}): ${text.slice(0, 200)}`));
    return;
  }
  onMessage(message);
}

class NdjsonDecoder implements FrameDecoder {
  private partial: Buffer[] = [];

  push(chunk: Buffer, onMessage: (m: unknown) => void, onError: (e: Error) => void): void {
    let start = 0;
    let nl = chunk.indexOf(10);
    if (nl !== -1 && this.partial.length) {
      // Finish the line that began in earlier chunks.
      this.partial.push(chunk.subarray(0, nl));
      const line = Buffer.concat(this.partial);
      this.partial = [];
      if (!isBlank(line, 0, line.length)) parseJson(line, 0, line.length, onMessage, onError);
      start = nl + 1;
      nl = chunk.indexOf(10, start);
    }
    while (nl !== -1) {
      if (!isBlank(chunk, start, nl)) parseJson(chunk, start, nl, onMessage, onError);
      start = nl + 1;
      nl = chunk.indexOf(10, start);
    }
    if (start < chunk.length) this.partial.push(start ? chunk.subarray(start) : chunk);
  }
}

function isBlank(buf: Buffer, start: number, end: number): boolean {
  for (let i = start; i < end; i++) {
    const c = buf[i];
    if (c !== 32 && c !== 9 && c !== 13) return false;
  }
  return true;
}

class LspDecoder implements FrameDecoder {
  private queue = new ByteQueue();
  private bodyLength = -1; // -1 while reading a header block

  push(chunk: Buffer, onMessage: (m: unknown) => void, onError: (e: Error) => void): void {
    const q = this.queue;
    q.push(chunk);
    for (;;) {
      if (this.bodyLength < 0) {
        const buf = q.flat();
        const end = buf.indexOf("\r\n\r\n");
        if (end === -1) {
          if (q.size > MAX_LSP_HEADER) {
            onError(new Error("the runtime sent an LSP header block without a blank line; dropped it"));
            q.clear();
          }
          return;
        }
        const header = buf.toString("latin1", 0, end);
        q.consume(end + 4);
        const m = /(?:^|\r\n)content-length:\s*(\d+)\s*(?:\r\n|$)/i.exec(header);
        if (!m) {
          onError(new Error(`the runtime sent an LSP header without Content-Length: ${JSON.stringify(header.slice(0, 200))}`));
          continue;
        }
        this.bodyLength = Number(m[1]);
      }
      if (q.size < this.bodyLength) return;
      const buf = q.flat();
      const n = this.bodyLength;
      this.bodyLength = -1;
      parseJson(buf, 0, n, onMessage, onError);
      q.consume(n);
    }
  }
}

/**
 * The end offset of the MessagePack value that starts at `pos`, without decoding it.
 * Returns -(a lower bound of the bytes needed) when the value is not complete yet.
 * Throws on the one byte (0xc1) that can never start a value.
 */
export function msgpackValueEnd(b: Uint8Array, pos: number): number {
  let pending = 1; // values still to step over
  const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
  while (pending > 0) {
    if (pos >= b.length) return -(pos + 1);
    const h = b[pos]!;
    pending--;
    let head = 1; // bytes of the type byte plus its length/fixed-size fields
    let body = 0; // payload bytes after the head
    let items = 0; // nested values that follow
    if (h <= 0x7f || h >= 0xe0 || h === 0xc0 || h === 0xc2 || h === 0xc3) {
      // fixint, nil, false, true: one byte
    } else if (h <= 0x8f) items = (h & 0x0f) * 2; // fixmap
    else if (h <= 0x9f) items = h & 0x0f; // fixarray
    else if (h <= 0xbf) body = h & 0x1f; // fixstr
    else {
      const sized = (n: number) => (pos + 1 + n <= b.length ? readUint(view, pos + 1, n) : -1);
      let len: number;
      switch (h) {
        case 0xc4: case 0xd9: case 0xc5: case 0xda: case 0xc6: case 0xdb: {
          // bin8/16/32, str8/16/32
          const n = h === 0xc4 || h === 0xd9 ? 1 : h === 0xc5 || h === 0xda ? 2 : 4;
          head = 1 + n;
          if ((len = sized(n)) < 0) return -(pos + head);
          body = len;
          break;
        }
        case 0xc7: case 0xc8: case 0xc9: {
          // ext8/16/32: length, then a type byte, then data
          const n = h === 0xc7 ? 1 : h === 0xc8 ? 2 : 4;
          head = 2 + n;
          if ((len = sized(n)) < 0) return -(pos + head);
          body = len;
          break;
        }
        case 0xca: head = 5; break; // float32
        case 0xcb: head = 9; break; // float64
        case 0xcc: case 0xd0: head = 2; break;
        case 0xcd: case 0xd1: head = 3; break;
        case 0xce: case 0xd2: head = 5; break;
        case 0xcf: case 0xd3: head = 9; break;
        case 0xd4: head = 3; break; // fixext1..16: type byte + data
        case 0xd5: head = 4; break;
        case 0xd6: head = 6; break;
        case 0xd7: head = 10; break;
        case 0xd8: head = 18; break;
        case 0xdc: case 0xdd: case 0xde: case 0xdf: {
          // array16/32, map16/32
          const n = h === 0xdc || h === 0xde ? 2 : 4;
          head = 1 + n;
          if ((len = sized(n)) < 0) return -(pos + head);
          items = h >= 0xde ? len * 2 : len;
          break;
        }
        default:
          throw new Error(`byte 0x${h.toString(16)} cannot start a MessagePack value`);
      }
    }
    pos += head + body;
    if (pos > b.length) return -pos;
    pending += items;
  }
  return pos;
}

function readUint(view: DataView, at: number, n: number): number {
  return n === 1 ? view.getUint8(at) : n === 2 ? view.getUint16(at) : view.getUint32(at);
}

class MsgpackFrameDecoder implements FrameDecoder {
  private queue = new ByteQueue();
  private need = 0; // bytes the next value needs at least; skip scanning until they are here
  private decoder = new MsgpackDecoder();

  push(chunk: Buffer, onMessage: (m: unknown) => void, onError: (e: Error) => void): void {
    const q = this.queue;
    q.push(chunk);
    if (q.size < this.need) return;
    const buf = q.flat();
    let pos = 0;
    while (pos < buf.length) {
      let end: number;
      try {
        end = msgpackValueEnd(buf, pos);
      } catch (e) {
        // No lengths to resynchronise on: drop what is buffered, like the runtime does.
        onError(new Error(`the runtime sent bytes that are not MessagePack (${(e as Error).message}); dropped ${buf.length - pos} buffered bytes`));
        q.clear();
        this.need = 0;
        return;
      }
      if (end < 0) {
        this.need = -end - pos;
        break;
      }
      let message: unknown;
      try {
        message = this.decoder.decode(buf.subarray(pos, end));
      } catch (e) {
        onError(new Error(`the runtime sent a MessagePack value that does not decode: ${(e as Error).message}`));
        pos = end;
        continue;
      }
      pos = end;
      onMessage(message);
    }
    if (pos >= buf.length) {
      q.clear();
      this.need = 0;
    } else q.consume(pos);
  }
}

const ndjson: Codec = {
  name: "ndjson",
  encode: (message) => Buffer.from(JSON.stringify(message) + "\n", "utf8"),
  decoder: () => new NdjsonDecoder(),
};

const lsp: Codec = {
  name: "lsp",
  encode(message) {
    const body = Buffer.from(JSON.stringify(message), "utf8");
    return Buffer.concat([Buffer.from(`Content-Length: ${body.length}\r\n\r\n`, "latin1"), body]);
  },
  decoder: () => new LspDecoder(),
};

const packer = new MsgpackEncoder({ ignoreUndefined: true });
const msgpack: Codec = {
  name: "msgpack",
  encode: (message) => packer.encode(message),
  decoder: () => new MsgpackFrameDecoder(),
};

const CODECS: Record<Framing, Codec> = { ndjson, lsp, msgpack };

/** The codec for a framing name; throws a helpful error for an unknown one. */
export function codecFor(name: Framing): Codec {
  const codec = CODECS[name];
  if (!codec) throw new TypeError(`unknown framing ${JSON.stringify(name)}; use one of ndjson, lsp, msgpack`);
  return codec;
}
