// A generate call: an async iterable of chunks plus a promise of the final result.

import { AbortError, RpcError } from "./errors.js";
import type { Connection } from "./connection.js";
import type { GenerateChunkParams, GenerateParams, GenerateResult, RequestId, Usage } from "./protocol.js";

export type GenerateChunk = GenerateChunkParams;

const CANCELLED = -32800;

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
  private aborted = false;
  private iterationError: Error | undefined;
  private connection: Connection | undefined;
  private detachSignal: (() => void) | undefined;

  /** @internal Made by Sidecar.generate(); not meant to be constructed directly. */
  constructor(private readonly signal: AbortSignal | undefined) {
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

  /** @internal Sends the request on `connection`. */
  start(connection: Connection, params: GenerateParams): void {
    if (this.settled) return;
    if (this.signal?.aborted) return this.abort();
    this.connection = connection;
    const { id, response } = connection.call("generate", params, (chunk) => this.onChunk(chunk));
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
    for (;;) {
      const chunk = this.queue.shift();
      if (chunk) return { done: false, value: chunk };
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
    if (this.ended) return;
    this.text += chunk.text;
    this.queue.push(chunk);
    this.signalWaiter();
  }

  // Cancels on the runtime and ends the iteration now; `result` rejects when the runtime answers.
  private abort(): void {
    if (this.aborted || this.settled) return;
    this.aborted = true;
    this.ended = true;
    this.queue.length = 0;
    this.signalWaiter();
    if (this.connection && this.id !== undefined) this.connection.cancel(this.id);
    else this.finish(this.abortError({ text: this.text }), undefined);
  }

  private onResult(result: GenerateResult): void {
    if (this.aborted) {
      // The work finished before the cancel took effect; the caller asked to abort, so say so.
      this.finish(this.abortError({ text: result.text, usage: result.usage }), undefined);
    } else this.finish(undefined, undefined, result);
  }

  private onError(error: Error): void {
    if (error instanceof RpcError && error.code === CANCELLED) {
      const data = error.data as { text?: string; usage?: Usage } | undefined;
      const abort = this.abortError({ text: data?.text ?? this.text, usage: data?.usage, data: error.data }, error);
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

  // Settles `result` once and ends the iteration (throwing iterationError to the reader, if any).
  private finish(error: Error | undefined, iterationError: Error | undefined, result?: GenerateResult): void {
    if (this.settled) return;
    this.settled = true;
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
