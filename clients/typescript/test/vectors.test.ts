// Replays every protocol/vectors/*.json through the client's transport, in every framing it allows.

import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { Sidecar, type Framing } from "mlx-sidecar";
import { FRAMINGS, REPO_DIR, tinyModel } from "./helpers.js";
import { match, matchMultiset } from "./matcher.js";

interface Step {
  send?: unknown;
  send_raw?: string;
  expect?: unknown;
  expect_batch?: unknown[];
  chunks?: boolean;
  progress?: boolean;
}

interface Vector {
  name: string;
  description: string;
  needs_model?: boolean;
  framings?: Framing[];
  steps: Step[];
}

type Msg = Record<string, any>;

const VECTOR_DIR = join(REPO_DIR, "protocol", "vectors");
const STEP_TIMEOUT_MS = 30_000;

const vectors: Array<{ file: string; vector: Vector }> = readdirSync(VECTOR_DIR)
  .filter((f) => f.endsWith(".json"))
  .sort()
  .map((file) => ({ file, vector: JSON.parse(readFileSync(join(VECTOR_DIR, file), "utf8")) as Vector }));

/** Collects what the runtime sends and hands out messages in arrival order. */
class Inbox {
  private messages: unknown[] = [];
  private waiter: (() => void) | undefined;

  push = (m: unknown): void => {
    this.messages.push(m);
    this.waiter?.();
  };

  /** Waits for the first message for which `isAnswer` holds; returns it and the messages before it. */
  async until(isAnswer: (m: unknown) => boolean, what: string): Promise<{ answer: unknown; before: unknown[] }> {
    const deadline = Date.now() + STEP_TIMEOUT_MS;
    for (;;) {
      const i = this.messages.findIndex(isAnswer);
      if (i >= 0) {
        const before = this.messages.slice(0, i);
        const answer = this.messages[i];
        this.messages = this.messages.slice(i + 1);
        return { answer, before };
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no ${what} within ${STEP_TIMEOUT_MS} ms; got ${JSON.stringify(this.messages).slice(0, 500)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.waiter = undefined;
    }
  }
}

const isNotification = (m: unknown): boolean => typeof m === "object" && m !== null && !Array.isArray(m) && "method" in m && !("id" in m);

function substitute(value: unknown, model: string): unknown {
  if (typeof value === "string") return value.split("${MODEL}").join(model);
  if (Array.isArray(value)) return value.map((v) => substitute(v, model));
  if (value && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, substitute(v, model)]));
  return value;
}

function checkChunks(step: Step, id: unknown, answer: Msg, before: unknown[], where: string): void {
  const chunks = before.filter((m) => isNotification(m) && (m as Msg).method === "generate/chunk" && (m as Msg).params?.id === id).map((m) => (m as Msg).params);
  if (!step.chunks) {
    assert.equal(chunks.length, 0, `${where}: no generate/chunk may arrive, got ${chunks.length}`);
    return;
  }
  assert.ok(chunks.length > 0, `${where}: expected generate/chunk notifications before the answer`);
  chunks.forEach((c, i) => assert.equal(c.index, i, `${where}: chunk ${i} has index ${c.index}`));
  const final = answer.result ?? answer.error?.data ?? {};
  assert.equal(chunks.map((c) => c.text).join(""), final.text, `${where}: chunk texts must join to the final text`);
  const tokens = chunks.reduce((n, c) => n + c.token_ids.length, 0);
  assert.equal(tokens, final.usage?.completion_tokens, `${where}: chunk token_ids must count usage.completion_tokens`);
}

function checkProgress(id: unknown, before: unknown[], where: string): void {
  const values = before.filter((m) => isNotification(m) && (m as Msg).method === "$/progress" && (m as Msg).params?.token === id).map((m) => (m as Msg).params.value);
  assert.ok(values.length > 0, `${where}: expected $/progress for token ${JSON.stringify(id)}`);
  assert.equal(values[0].kind, "begin", `${where}: progress must start with kind begin`);
  assert.equal(values[values.length - 1].kind, "end", `${where}: progress must end with kind end`);
}

async function replay(vector: Vector, framing: Framing): Promise<void> {
  const sidecar = await Sidecar.start({ framing });
  const inbox = new Inbox();
  const untap = sidecar.transport.tap(inbox.push);
  const model = vector.needs_model ? tinyModel() : "";
  try {
    for (const [n, step] of vector.steps.entries()) {
      const where = `${vector.name} [${framing}] step ${n}`;
      if (step.send_raw !== undefined) {
        sidecar.transport.writeRaw(step.send_raw);
        const { answer } = await inbox.until((m) => !isNotification(m), `answer to raw step ${n}`);
        assert.equal(match(step.expect, answer), null, `${where}: ${match(step.expect, answer)}`);
        continue;
      }
      const message = substitute(step.send, model);
      sidecar.transport.send(message);
      if (Array.isArray(message)) {
        const { answer } = await inbox.until((m) => Array.isArray(m), `batch answer to step ${n}`);
        const patterns = step.expect_batch ?? (step.expect as unknown[]);
        const problem = step.expect_batch ? matchMultiset(patterns, answer) : match(patterns, answer);
        assert.equal(problem, null, `${where}: ${problem}`);
        continue;
      }
      if (step.expect === undefined) continue; // a notification: nothing comes back
      const id = (message as Msg).id;
      const { answer, before } = await inbox.until(
        (m) => typeof m === "object" && m !== null && !Array.isArray(m) && !("method" in m) && (m as Msg).id === id,
        `answer to id ${JSON.stringify(id)}`,
      );
      assert.equal(match(step.expect, answer), null, `${where}: ${match(step.expect, answer)}`);
      checkChunks(step, id, answer as Msg, before, where);
      if (step.progress) checkProgress(id, before, where);
    }
  } finally {
    untap();
    await sidecar.close();
  }
}

describe("protocol/vectors", () => {
  test("the vectors directory has vectors", () => assert.ok(vectors.length >= 1));
  for (const { file, vector } of vectors) {
    const framings = vector.framings ?? FRAMINGS;
    for (const framing of FRAMINGS) {
      const skip = framings.includes(framing) ? false : `${file} is limited to ${framings.join(", ")}`;
      test(`${file} in ${framing}`, { skip, timeout: 60_000 }, () => replay(vector, framing));
    }
  }
});
