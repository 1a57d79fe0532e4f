// Image content parts for vision models: from a file path (the runtime reads the file itself) or
// from bytes in memory (raw MessagePack bin over msgpack framing, a data: URL over ndjson and lsp).

import { isAbsolute, resolve } from "node:path";
import type { Framing, ImageBytesPart, ImageUrlPart, TextPart } from "./protocol.js";

export type ImageDetail = "auto" | "low" | "high";

/** An image part for a file on the runtime's machine; the path is made absolute here. */
export function imageFromPath(path: string, detail?: ImageDetail): ImageUrlPart {
  const url = isAbsolute(path) ? path : resolve(path);
  return { type: "image_url", image_url: detail ? { url, detail } : { url } };
}

/** The image type of encoded bytes, from their first bytes (undefined when unknown). */
export function sniffImageMime(data: Uint8Array): string | undefined {
  const starts = (...sig: number[]) => sig.every((b, i) => data[i] === b);
  if (starts(0x89, 0x50, 0x4e, 0x47)) return "image/png";
  if (starts(0xff, 0xd8, 0xff)) return "image/jpeg";
  if (starts(0x47, 0x49, 0x46, 0x38)) return "image/gif";
  if (starts(0x42, 0x4d)) return "image/bmp";
  if (starts(0x52, 0x49, 0x46, 0x46) && data[8] === 0x57 && data[9] === 0x45 && data[10] === 0x42 && data[11] === 0x50) return "image/webp";
  if (starts(0x49, 0x49, 0x2a, 0x00) || starts(0x4d, 0x4d, 0x00, 0x2a)) return "image/tiff";
  return undefined;
}

/** A data: URL for encoded image bytes. */
export function imageDataUrl(data: Uint8Array, mime?: string): string {
  const type = mime ?? sniffImageMime(data) ?? "application/octet-stream";
  return `data:${type};base64,${Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("base64")}`;
}

/**
 * An image part for encoded bytes (a Buffer or Uint8Array of a PNG, JPEG, WebP, GIF, BMP or TIFF
 * file). Over msgpack framing the bytes go as they are; JSON framings get a data: URL (a third larger).
 */
export function imageFromBytes(data: Uint8Array, framing: Framing, options: { mime?: string; detail?: ImageDetail } = {}): ImageBytesPart | ImageUrlPart {
  if (framing === "msgpack") {
    const bytes = Buffer.isBuffer(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : data;
    const part: ImageBytesPart = { type: "image", data: bytes };
    const mime = options.mime ?? sniffImageMime(data);
    if (mime) part.mime = mime;
    return part;
  }
  const url = imageDataUrl(data, options.mime);
  return { type: "image_url", image_url: options.detail ? { url, detail: options.detail } : { url } };
}

/** A text part. */
export function textPart(text: string): TextPart {
  return { type: "text", text };
}
