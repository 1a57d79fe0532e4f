// Byte-level I/O with the runtime: encodes messages onto its stdin, decodes its stdout.
// Writes made in the same tick are joined into one write, so pipelined requests cost one syscall.

import type { Readable, Writable } from "node:stream";
import { codecFor, type Codec, type Framing } from "./framing.js";

export type MessageListener = (message: unknown) => void;

export class Transport {
  readonly framing: Framing;
  private readonly codec: Codec;
  private queue: Uint8Array[] = [];
  private flushScheduled = false;
  private ended = false;
  private readonly taps = new Set<MessageListener>();

  constructor(
    input: Readable,
    private readonly output: Writable,
    framing: Framing,
    private readonly onMessage: MessageListener,
    onBadFrame: (error: Error) => void,
  ) {
    this.framing = framing;
    this.codec = codecFor(framing);
    const decoder = this.codec.decoder();
    const deliver = (message: unknown) => {
      for (const tap of this.taps) tap(message);
      this.onMessage(message);
    };
    input.on("data", (chunk: Buffer) => decoder.push(chunk, deliver, onBadFrame));
    // A write to a dead process fails with EPIPE; the exit handler reports that, so ignore it here.
    output.on("error", () => {});
  }

  /** Encodes one message (or a batch array) in this connection's framing and writes it. */
  send(message: unknown): void {
    this.write(this.codec.encode(message));
  }

  /** Writes bytes exactly as given (for conformance tests of malformed input). */
  writeRaw(data: string | Uint8Array): void {
    this.write(typeof data === "string" ? Buffer.from(data, "utf8") : data);
  }

  /** Calls listener with every message the runtime sends; returns a function that stops it. */
  tap(listener: MessageListener): () => void {
    this.taps.add(listener);
    return () => this.taps.delete(listener);
  }

  /** Flushes what is queued and closes the runtime's stdin (it treats EOF as "host gone"). */
  end(): void {
    if (this.ended) return;
    this.flush();
    this.ended = true;
    this.output.end();
  }

  get isEnded(): boolean {
    return this.ended || this.output.destroyed || this.output.writableEnded;
  }

  private write(bytes: Uint8Array): void {
    if (this.isEnded) return;
    this.queue.push(bytes);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(() => this.flush());
    }
  }

  private flush(): void {
    this.flushScheduled = false;
    const q = this.queue;
    if (!q.length || this.isEnded) return;
    this.queue = [];
    this.output.write(q.length === 1 ? q[0]! : Buffer.concat(q));
  }
}
