// JSON-RPC 2.0 over a Transport: ids, pending calls, answers, notifications, cancel and timeout.

import { AbortError, RpcError, TimeoutError } from "./errors.js";
import type { ErrorData, GenerateChunkParams, RequestId } from "./protocol.js";
import type { Transport } from "./transport.js";

export interface CallOptions {
  /** Aborting sends $/cancelRequest and rejects the call with AbortError. */
  signal?: AbortSignal | undefined;
  /** Rejects with TimeoutError (and cancels on the runtime) when no answer came in time. */
  timeoutMs?: number | undefined;
}

interface Pending {
  method: string;
  resolve(value: unknown): void;
  reject(error: Error): void;
  cleanup?: () => void;
  onInterrupt?: ((reason: Error) => void) | undefined;
}

type ChunkListener = (chunk: GenerateChunkParams) => void;

export interface CallHooks {
  /** Receives the call's generate/chunk notifications. */
  onChunk?: ChunkListener;
  /** Told when interrupt() cancels the call; it must send $/cancelRequest itself. */
  onInterrupt?: (reason: Error) => void;
}

export class Connection {
  private readonly pending = new Map<RequestId, Pending>();
  private readonly chunkListeners = new Map<RequestId, ChunkListener>();
  private failure: Error | undefined;
  private readonly settleListeners = new Set<() => void>();

  constructor(
    readonly transport: Transport,
    private readonly nextId: () => number,
    private readonly onNotification: (method: string, params: unknown) => void,
  ) {}

  /** Number of calls still waiting for an answer. */
  get pendingCount(): number {
    return this.pending.size;
  }

  /** Sends a request; `hooks.onChunk` receives its generate/chunk notifications. */
  call(method: string, params: unknown, hooks: CallHooks = {}): { id: RequestId; response: Promise<unknown> } {
    const id = this.nextId();
    if (this.failure) return { id, response: Promise.reject(this.failure) };
    const response = new Promise<unknown>((resolve, reject) => {
      this.pending.set(id, { method, resolve, reject, onInterrupt: hooks.onInterrupt });
    });
    if (hooks.onChunk) this.chunkListeners.set(id, hooks.onChunk);
    this.transport.send(params === undefined ? { jsonrpc: "2.0", id, method } : { jsonrpc: "2.0", id, method, params });
    return { id, response };
  }

  /** A call with an optional AbortSignal and timeout. */
  request(method: string, params: unknown, options: CallOptions = {}): Promise<unknown> {
    const { signal, timeoutMs } = options;
    if (signal?.aborted) return Promise.reject(abortError(method, signal));
    const { id, response } = this.call(method, params);
    if (!signal && !timeoutMs) return response;
    const entry = this.pending.get(id);
    if (!entry) return response;
    let timer: NodeJS.Timeout | undefined;
    const onAbort = () => this.abandon(id, abortError(method, signal!));
    if (timeoutMs) timer = setTimeout(() => this.abandon(id, new TimeoutError(method, timeoutMs)), timeoutMs);
    signal?.addEventListener("abort", onAbort, { once: true });
    entry.cleanup = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    };
    return response;
  }

  /** Sends a notification (no answer comes). */
  notify(method: string, params?: unknown): void {
    if (this.failure) return;
    this.transport.send(params === undefined ? { jsonrpc: "2.0", method } : { jsonrpc: "2.0", method, params });
  }

  /** Asks the runtime to cancel request `id`; its answer still arrives (error -32800). */
  cancel(id: RequestId): void {
    this.notify("$/cancelRequest", { id });
  }

  /** Settles call `id` locally with `error` now, cancels it on the runtime, and drops its late answer. */
  abandon(id: RequestId, error: Error): void {
    const entry = this.take(id);
    if (!entry) return;
    this.cancel(id);
    entry.reject(error);
  }

  /** Cancels every pending call of `method` on the runtime (their answers still come); returns their ids. */
  interrupt(method: string, reason: Error): RequestId[] {
    const ids: RequestId[] = [];
    for (const [id, entry] of this.pending) {
      if (entry.method !== method) continue;
      ids.push(id);
      // A hook (a stream) cancels by itself, once; a plain call is cancelled here.
      if (entry.onInterrupt) entry.onInterrupt(reason);
      else this.cancel(id);
    }
    return ids;
  }

  /** Resolves once none of `ids` is pending any more. */
  whenSettled(ids: RequestId[]): Promise<void> {
    return new Promise((resolve) => {
      const check = () => {
        if (ids.some((id) => this.pending.has(id))) return;
        this.settleListeners.delete(check);
        resolve();
      };
      this.settleListeners.add(check);
      check();
    });
  }

  /** Rejects every pending call with `error` and refuses new ones (the process is gone). */
  fail(error: Error): void {
    if (this.failure) return;
    this.failure = error;
    const entries = [...this.pending.keys()].map((id) => this.take(id)!);
    for (const entry of entries) entry.reject(error);
  }

  /** Feeds one decoded message (or batch array) from the runtime. */
  handle(message: unknown): void {
    if (Array.isArray(message)) {
      for (const item of message) this.handle(item);
      return;
    }
    if (typeof message !== "object" || message === null) return;
    const m = message as { id?: RequestId | null; method?: unknown; params?: unknown; result?: unknown; error?: WireError };
    if (typeof m.method === "string") {
      if (m.id === undefined || m.id === null) this.dispatchNotification(m.method, m.params);
      else this.transport.send({ jsonrpc: "2.0", id: m.id, error: { code: -32601, message: `this client serves no requests (got ${m.method})`, data: { type: "method_not_found" } } });
      return;
    }
    if (m.id === undefined || m.id === null) return; // e.g. a parse error about a raw write; taps see it
    const entry = this.take(m.id);
    if (!entry) return; // an answer to a call that was abandoned (aborted or timed out)
    if (m.error) {
      const e = m.error;
      entry.reject(new RpcError(typeof e.code === "number" ? e.code : -32603, String(e.message ?? "error"), e.data, entry.method));
    } else entry.resolve(m.result);
  }

  private dispatchNotification(method: string, params: unknown): void {
    if (method === "generate/chunk") {
      const chunk = params as GenerateChunkParams;
      const listener = chunk && this.chunkListeners.get(chunk.id);
      if (listener) {
        listener(chunk);
        return;
      }
    }
    this.onNotification(method, params);
  }

  private take(id: RequestId): Pending | undefined {
    const entry = this.pending.get(id);
    if (!entry) return undefined;
    this.pending.delete(id);
    this.chunkListeners.delete(id);
    entry.cleanup?.();
    // Run after the caller settled the entry, so listeners see the call as done.
    if (this.settleListeners.size) queueMicrotask(() => this.settleListeners.forEach((check) => check()));
    return entry;
  }
}

interface WireError {
  code?: unknown;
  message?: unknown;
  data?: ErrorData;
}

function abortError(method: string, signal: AbortSignal): AbortError {
  return new AbortError(`${method} was aborted`, { cause: signal.reason });
}
