// Byte-level I/O with the runtime: encodes messages onto its stdin, decodes its stdout.
// Writes made in the same tick are joined into one write, so pipelined requests cost one syscall
// (the flush runs on nextTick, after the promise callbacks of every answer in one read).
// Reading stops while anyone holds the transport (a stream whose buffer is full): the child's
// stdout is then not read, the pipe fills, and the runtime's own backpressure pauses generation.

import type { Readable, Writable } from "node:stream";
import { codecFor, type Codec, type Framing } from "./framing.js";

export type MessageListener = (message: unknown) => void;

export class Transport {
  readonly framing: Framing;
  /** Resolves once stdout has ended (or failed) and every message in it was delivered. */
  readonly readDone: Promise<void>;
  private readonly codec: Codec;
  private queue: Uint8Array[] = [];
  private flushScheduled = false;
  private ended = false;
  private readonly taps = new Set<MessageListener>();
  private readonly holds = new Set<object>();
  private draining = false;
  private wakeReader: (() => void) | undefined;

  constructor(
    input: Readable,
    private readonly output: Writable,
    framing: Framing,
    private readonly onMessage: MessageListener,
    private readonly onBadFrame: (error: Error) => void,
  ) {
    this.framing = framing;
    this.codec = codecFor(framing);
    // A write to a dead process fails with EPIPE; the exit handler reports that, so ignore it here.
    output.on("error", () => {});
    this.readDone = this.read(input);
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

  /** Stops reading stdout after the message being delivered, until release(key). */
  hold(key: object): void {
    this.holds.add(key);
  }

  /** Drops key's hold; reading resumes once nobody holds the transport. */
  release(key: object): void {
    if (this.holds.delete(key) && this.holds.size === 0) this.wake();
  }

  /** True while reading is stopped by a hold. */
  get held(): boolean {
    return this.holds.size > 0 && !this.draining;
  }

  /** Reads the rest of stdout whatever the holds (the process is gone; a pipe's worth is left at most). */
  drain(): void {
    this.draining = true;
    this.wake();
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

  private async read(input: Readable): Promise<void> {
    try {
      for await (const batch of this.codec.decode(input)) {
        for (const item of batch) {
          if (item.error) this.onBadFrame(item.error);
          else this.deliver(item.message);
          // Held: deliver nothing more (and read nothing more) until released.
          while (this.held) await new Promise<void>((resolve) => (this.wakeReader = resolve));
        }
      }
    } catch (e) {
      this.onBadFrame(new Error(`reading the runtime's stdout failed: ${(e as Error).message}`, { cause: e }));
    }
  }

  private deliver(message: unknown): void {
    try {
      for (const tap of this.taps) tap(message);
      this.onMessage(message);
    } catch (e) {
      // A listener threw: surface it as an uncaught error, as an event listener's would be, and read on.
      process.nextTick(() => {
        throw e;
      });
    }
  }

  private wake(): void {
    const wake = this.wakeReader;
    this.wakeReader = undefined;
    wake?.();
  }

  private write(bytes: Uint8Array): void {
    if (this.isEnded) return;
    this.queue.push(bytes);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(() => this.flush());
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
