// Image parts against the real runtime and a tiny random qwen2_vl (mlx-vlm): a file path, a
// Buffer and a Uint8Array give the same greedy text in every framing (bytes travel as MessagePack
// bin over msgpack, as a data URL otherwise).

import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { after, before, describe, test } from "node:test";
import { deflateSync } from "node:zlib";
import { FRAMINGS, imageFromBytes, imageFromPath, Sidecar, sniffImageMime, textPart } from "mlx-sidecar";
import { PACKAGE_DIR, python } from "./helpers.js";

/** A small RGB PNG with a gradient, encoded here (no image library needed). */
function png(width: number, height: number): Buffer {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf: Buffer) => {
    let c = 0xffffffff;
    for (const b of buf) c = (crcTable[(c ^ b) & 0xff] as number) ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (kind: string, body: Buffer) => {
    const head = Buffer.alloc(4);
    head.writeUInt32BE(body.length);
    const tail = Buffer.alloc(4);
    tail.writeUInt32BE(crc(Buffer.concat([Buffer.from(kind, "latin1"), body])));
    return Buffer.concat([head, Buffer.from(kind, "latin1"), body, tail]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const rows = Buffer.alloc(height * (1 + width * 3));
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const at = y * (1 + width * 3) + 1 + x * 3;
      rows[at] = (x * 3) & 0xff;
      rows[at + 1] = 60;
      rows[at + 2] = (y * 5) & 0xff;
    }
  }
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk("IHDR", ihdr), chunk("IDAT", deflateSync(rows)), chunk("IEND", Buffer.alloc(0))]);
}

describe("images", { timeout: 180_000 }, () => {
  let dir: string;
  let vlm: string;
  let file: string;
  const data = png(80, 50);
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "mlx-sidecar-ts-vlm-"));
    vlm = join(dir, "vlm");
    execFileSync(python(), ["-m", "mlx_sidecar.testing", "make-model", "--vision", vlm], { stdio: ["ignore", "ignore", "pipe"] });
    file = join(dir, "picture.png");
    writeFileSync(file, data);
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test("parts are built for each framing", () => {
    assert.equal(sniffImageMime(data), "image/png");
    assert.deepEqual(imageFromBytes(data, "msgpack"), { type: "image", data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength), mime: "image/png" });
    const url = imageFromBytes(data, "ndjson");
    assert.equal(url.type, "image_url");
    assert.ok(url.type === "image_url" && url.image_url.url.startsWith("data:image/png;base64,"));
    const rel = imageFromPath("pictures/a.png", "low");
    assert.ok(rel.image_url.url.startsWith("/") && rel.image_url.detail === "low");
  });

  test("examples/chat --image asks a vision model about a picture, in every framing", async () => {
    const script = join(PACKAGE_DIR, "build", "examples", "chat.js");
    const answers = [];
    for (const framing of FRAMINGS) {
      const { stdout, stderr } = await promisify(execFile)(process.execPath, [script, "--model", vlm, "--image", file, "--framing", framing, "--max-tokens", "6", "What is this?"], { cwd: PACKAGE_DIR });
      assert.match(stderr, /\[6 tokens, \d+ tokens\/s, finish: length\]/);
      answers.push(stdout);
    }
    assert.equal(new Set(answers).size, 1, JSON.stringify(answers));
  });

  test("a path, a Buffer and a Uint8Array give the same greedy text in every framing", async () => {
    const texts: string[] = [];
    for (const framing of FRAMINGS) {
      const sidecar = await Sidecar.start({ framing });
      try {
        const info = await sidecar.request("model/load", { model: vlm, id: "v" });
        assert.equal(info.kind, "vision");
        assert.ok(info.vision?.image_token);
        const sources = [imageFromPath(file), imageFromBytes(data, framing), imageFromBytes(new Uint8Array(data), framing)];
        for (const image of sources) {
          const stream = sidecar.generate({ model: "v", max_tokens: 10, temperature: 0, messages: [{ role: "user", content: [image, textPart("What is this?")] }] });
          let streamed = "";
          for await (const chunk of stream) streamed += chunk.text;
          const result = await stream.result;
          assert.equal(result.text, streamed);
          assert.equal(result.images?.length, 1);
          const [size] = result.images ?? [];
          assert.equal(size?.source_width, 80);
          assert.equal(size?.source_height, 50);
          texts.push(result.text);
        }
      } finally {
        await sidecar.close();
      }
    }
    assert.equal(new Set(texts).size, 1, JSON.stringify(texts));
  });
});
