// A generate call: an async iterable of chunks plus a promise of the final result.
// Its chunk buffer is bounded: when it is full the stream holds the transport (stdout is not
// read) until the consumer takes a chunk; a consumer stuck for stallTimeoutMs is cut off.

import { AbortError, ClosedError, RpcError, StreamStalledError } from "./errors.js";
import type { Connection } from "./connection.js";
import type { GenerateChunkParams, GenerateParams, GenerateResult, RequestId, Usage } from "./protocol.js";

export type GenerateChunk = GenerateChunkParams;

const CANCELLED = -32800;
const MAX_TIMER_MS = 2 ** 31 - 1;

/** @internal The flow-control settings a Sidecar gives each stream. */
export interface StreamLimits {
  /** Chunks buffered for the consumer at most. */
  bufferChunks: number;
  /** How long a full buffer may hold stdout without the consumer taking a chunk. */
  stallTimeoutMs: number;
}

export class GenerateStream implements AsyncIterable<GenerateChunk> {
  /** The final result. Rejects with AbortError (holding the partial text and usage) when aborted. */
  readonly result: Promise<GenerateResult>;
  /** The request id on the wire, once the request was sent. */
  id: RequestId | undefined;
  /** The text of the chunks received so far. */
  text = "";

  private resolveResult!: (r: GenerateResult) => void;
  private rejectResult!: (e: Error) => void;
  private readonly queue: GenerateChunk[] = [];
  private wakers: Array<() => void> = [];
  private ended = false; // no more chunks will be yielded
  private settled = false; // result resolved or rejected
  private aborted = false; // the caller aborted: iteration is over, result rejects with AbortError
  private cutOff: Error | undefined; // close() or a stall cancelled it: both end with this kind of error
  private iterationError: Error | undefined;
  private connection: Connection | undefined;
  private detachSignal: (() => void) | undefined;
  private iterating = false; // the consumer asked for a chunk at least once
  private holding = false; // this stream's full buffer holds the transport (stdout is not read)
  private stallTimer: NodeJS.Timeout | undefined;

  /** @internal Made by Sidecar.generate(); not meant to be constructed directly. */
  constructor(
    private readonly signal: AbortSignal | undefined,
    private readonly limits: StreamLimits = { bufferChunks: 64, stallTimeoutMs: 30_000 },
  ) {
    this.result = new Promise<GenerateResult>((resolve, reject) => {
      this.resolveResult = resolve;
      this.rejectResult = reject;
    });
    // Someone who only iterates must not get an unhandled rejection from `result`.
    this.result.catch(() => {});
    if (signal) {
      const onAbort = () => this.abort();
      signal.addEventListener("abort", onAbort, { once: true });
      this.detachSignal = () => signal.removeEventListener("abort", onAbort);
    }
  }

  /** Chunks received and not yet taken by the consumer. */
  get buffered(): number {
    return this.queue.length;
  }

  /** @internal Sends the request on `connection`. */
  start(connection: Connection, params: GenerateParams): void {
    if (this.settled) return;
    if (this.signal?.aborted) return this.abort();
    this.connection = connection;
    const { id, response } = connection.call("generate", params, {
      onChunk: (chunk) => this.onChunk(chunk),
      onInterrupt: (reason) => this.cut(new AbortError("generate was cancelled: the client is closing", { cause: reason })),
    });
    this.id = id;
    response.then(
      (r) => this.onResult(r as GenerateResult),
      (e: Error) => this.onError(e),
    );
  }

  /** @internal The call could not be sent (the runtime is gone or the client closed). */
  failBeforeStart(error: Error): void {
    this.finish(error, error);
  }

  [Symbol.asyncIterator](): AsyncIterator<GenerateChunk> {
    return {
      next: () => this.next(),
      // Leaving a for-await loop early cancels the generation.
      return: async () => {
        this.abort();
        return { done: true, value: undefined };
      },
    };
  }

  private async next(): Promise<IteratorResult<GenerateChunk>> {
    this.iterating = true;
    for (;;) {
      const chunk = this.queue.shift();
      if (chunk) {
        if (this.queue.length < this.limits.bufferChunks) this.unhold();
        return { done: false, value: chunk };
      }
      if (this.ended) {
        const error = this.iterationError;
        this.iterationError = undefined;
        if (error) throw error;
        return { done: true, value: undefined };
      }
      await new Promise<void>((resolve) => this.wakers.push(resolve));
    }
  }

  private signalWaiter(): void {
    const wakers = this.wakers;
    this.wakers = [];
    for (const wake of wakers) wake();
  }

  private onChunk(chunk: GenerateChunk): void {
    if (this.ended || this.settled) return;
    this.text += chunk.text;
    if (this.cutOff) return; // cancelled: the text still counts, the chunk is not buffered
    this.queue.push(chunk);
    this.signalWaiter();
    if (this.queue.length >= this.limits.bufferChunks && this.iterating && this.connection && !this.holding) {
      // Full: stop reading stdout after this message until the consumer takes one. A stream
      // nobody iterates (only `result` is awaited) has no consumer to wait for, so never holds.
      this.holding = true;
      this.connection.transport.hold(this);
      const ms = this.limits.stallTimeoutMs;
      // A negative or infinite timeout waits for ever (setTimeout would fire at once past 2^31-1 ms).
      if (ms >= 0 && ms <= MAX_TIMER_MS) this.stallTimer = setTimeout(() => this.onStall(), ms);
    }
  }

  private onStall(): void {
    this.stallTimer = undefined;
    const error = new StreamStalledError(
      `generate was cancelled: its consumer took no chunk for ${this.limits.stallTimeoutMs} ms while ${this.queue.length} chunks waited, ` +
        "which held up every other call; read streams promptly, raise stallTimeoutMs or streamBufferChunks",
    );
    this.cut(error);
  }

  // Cancels on the runtime, drops unread chunks and stops buffering (their text is kept);
  // `error`, with the final text, ends the stream once the runtime answered.
  private cut(error: Error): void {
    if (this.cutOff || this.aborted || this.settled) return;
    this.cutOff = error;
    this.queue.length = 0;
    this.unhold();
    if (this.connection && this.id !== undefined) this.connection.cancel(this.id);
  }

  private unhold(): void {
    if (!this.holding) return;
    this.holding = false;
    clearTimeout(this.stallTimer);
    this.stallTimer = undefined;
    this.connection?.transport.release(this);
  }

  // Cancels on the runtime and ends the iteration now; `result` rejects when the runtime answers.
  private abort(): void {
    if (this.aborted || this.settled) return;
    this.aborted = true;
    this.ended = true;
    this.queue.length = 0;
    this.unhold();
    this.signalWaiter();
    if (this.connection && this.id !== undefined) this.connection.cancel(this.id);
    else this.finish(this.abortError({ text: this.text }), undefined);
  }

  private onResult(result: GenerateResult): void {
    if (this.aborted) {
      // The work finished before the cancel took effect; the caller asked to abort, so say so.
      this.finish(this.abortError({ text: result.text, usage: result.usage }), undefined);
    } else if (this.cutOff) {
      const error = this.cutError({ text: result.text, usage: result.usage });
      this.finish(error, error);
    } else this.finish(undefined, undefined, result);
  }

  private onError(error: Error): void {
    const data = error instanceof RpcError && error.code === CANCELLED ? (error.data as { text?: string; usage?: Usage } | undefined) : undefined;
    if (this.cutOff) {
      const cut = this.cutError({ text: data?.text ?? this.text, usage: data?.usage, data: data ? (error as RpcError).data : undefined }, data ? undefined : error);
      this.finish(cut, cut);
    } else if (data) {
      const abort = this.abortError({ text: data.text ?? this.text, usage: data.usage, data: (error as RpcError).data }, error);
      this.finish(abort, this.aborted ? undefined : abort);
    } else if (this.aborted) {
      this.finish(this.abortError({ text: this.text }, error), undefined);
    } else this.finish(error, error);
  }

  private abortError(extra: { text?: string; usage?: Usage | undefined; data?: RpcError["data"] }, cause?: unknown): AbortError {
    return new AbortError("generate was aborted", {
      text: extra.text,
      ...(extra.usage ? { usage: extra.usage } : {}),
      ...(extra.data ? { data: extra.data } : {}),
      cause: cause ?? this.signal?.reason,
    });
  }

  // The error of a stream cut off by close() or a stall, now with the final text and usage.
  private cutError(extra: { text?: string; usage?: Usage | undefined; data?: RpcError["data"] }, lateCause?: Error): AbortError {
    const cut = this.cutOff!;
    const Kind = cut instanceof StreamStalledError ? StreamStalledError : AbortError;
    const cause = cut instanceof StreamStalledError ? lateCause : (cut.cause ?? new ClosedError());
    return new Kind(cut.message, {
      text: extra.text,
      ...(extra.usage ? { usage: extra.usage } : {}),
      ...(extra.data ? { data: extra.data } : {}),
      cause,
    });
  }

  // Settles `result` once and ends the iteration (throwing iterationError to the reader, if any).
  private finish(error: Error | undefined, iterationError: Error | undefined, result?: GenerateResult): void {
    if (this.settled) return;
    this.settled = true;
    this.unhold();
    this.detachSignal?.();
    if (!this.ended) {
      this.ended = true;
      this.iterationError = iterationError;
    }
    this.signalWaiter();
    if (error) this.rejectResult(error);
    else this.resolveResult(result!);
  }
}
