// Error classes. Every failure of a call is one of these, so callers can branch with instanceof.

import type { ErrorData, Usage } from "./protocol.js";

/** The runtime answered with a JSON-RPC error. `data.type` is the machine-readable kind. */
export class RpcError extends Error {
  override name = "RpcError";
  readonly code: number;
  readonly data: ErrorData | undefined;
  readonly method: string | undefined;

  constructor(code: number, message: string, data?: ErrorData, method?: string) {
    super(method ? `${method}: ${message}` : message);
    this.code = code;
    this.data = data;
    this.method = method;
  }

  /** data.type, e.g. "invalid_params" or "model_not_found". */
  get type(): string | undefined {
    return this.data?.type;
  }
}

/** What is known about a runtime process that exited. */
export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** The last lines the runtime wrote to stderr (its logs and any traceback). */
  stderrTail: string;
  pid: number | undefined;
}

/** The runtime process exited (or could not be started) while calls were pending. */
export class ProcessExitError extends Error {
  override name = "ProcessExitError";
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stderrTail: string;
  readonly pid: number | undefined;

  constructor(message: string, info: ExitInfo, options?: { cause?: unknown }) {
    super(withTail(message, info.stderrTail), options);
    this.code = info.code;
    this.signal = info.signal;
    this.stderrTail = info.stderrTail;
    this.pid = info.pid;
  }
}

/** The runtime did not come up: it exited, could not be spawned, or never answered initialize. */
export class StartError extends ProcessExitError {
  override name = "StartError";
}

/** The call was cancelled through its AbortSignal. For generate, holds the text made so far. */
export class AbortError extends Error {
  override name = "AbortError";
  /** Text generated before the cancellation took effect (generate only). */
  readonly text: string | undefined;
  /** Token counts at cancellation (generate only, when the runtime reported them). */
  readonly usage: Usage | undefined;
  /** The error data of the runtime's -32800 answer, when it came. */
  readonly data: ErrorData | undefined;

  constructor(message: string, extra: { text?: string; usage?: Usage; data?: ErrorData; cause?: unknown } = {}) {
    super(message, { cause: extra.cause });
    this.text = extra.text;
    this.usage = extra.usage;
    this.data = extra.data;
  }
}

/**
 * A stream's consumer took no chunk for stallTimeoutMs while its buffer was full and so held the
 * runtime's stdout (every other call's answers waited behind it). The client cancelled the
 * generation; `text` is all the text generated, also of chunks that were dropped unread.
 */
export class StreamStalledError extends AbortError {
  override name = "StreamStalledError";
}

/** No answer came within the call's timeoutMs; the request was cancelled on the runtime. */
export class TimeoutError extends Error {
  override name = "TimeoutError";
  readonly method: string;
  readonly timeoutMs: number;

  constructor(method: string, timeoutMs: number) {
    super(`${method} got no answer within ${timeoutMs} ms; it was cancelled. Raise timeoutMs if the work is expected to take longer.`);
    this.method = method;
    this.timeoutMs = timeoutMs;
  }
}

/** The client was closed (or is closing) and accepts no more calls. */
export class ClosedError extends Error {
  override name = "ClosedError";

  constructor(message = "the mlx-sidecar client is closed; start a new one with Sidecar.start()") {
    super(message);
  }
}

function withTail(message: string, tail: string): string {
  const t = tail.trimEnd();
  return t ? `${message}\n--- runtime stderr (last lines) ---\n${t}` : `${message} (the runtime wrote nothing to stderr)`;
}
