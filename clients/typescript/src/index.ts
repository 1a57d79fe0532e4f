// mlx-sidecar's TypeScript client: spawn the runtime, call it over JSON-RPC, stream generations.

export { Sidecar } from "./sidecar.js";
export type { SidecarOptions, RestartOptions, SidecarEvents, ExitEvent, RestartEvent, GenerateOptions, RequestArgs } from "./sidecar.js";
export { GenerateStream } from "./generate.js";
export type { GenerateChunk } from "./generate.js";
export type { CallOptions } from "./connection.js";
export type { Transport, MessageListener } from "./transport.js";
export { RpcError, ProcessExitError, StartError, AbortError, StreamStalledError, TimeoutError, ClosedError } from "./errors.js";
export type { ExitInfo } from "./errors.js";
export { defaultCommand } from "./process.js";
export { generateJson, jsonSchemaFormat, IncompleteJsonError } from "./json.js";
export type { GenerateJsonOptions, JsonGenerateParams, JsonResult, JsonSchema } from "./json.js";
export { imageFromPath, imageFromBytes, imageDataUrl, sniffImageMime, textPart } from "./images.js";
export type { ImageDetail } from "./images.js";
export * from "./protocol.js";
