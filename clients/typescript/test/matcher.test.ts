// The vector matcher must reject what the README says it rejects (else the vector replay proves nothing).

import assert from "node:assert/strict";
import { test } from "node:test";
import { match, matchMultiset } from "./matcher.js";

test("type patterns", () => {
  assert.equal(match("$any", null), null);
  assert.equal(match("$string", "x"), null);
  assert.notEqual(match("$string", 1), null);
  assert.equal(match("$integer", 3), null);
  assert.equal(match("$integer", 3.0), null);
  assert.notEqual(match("$integer", 3.5), null);
  assert.equal(match("$number", 3.5), null);
  assert.equal(match("$boolean", false), null);
  assert.equal(match("$object", {}), null);
  assert.notEqual(match("$object", []), null);
  assert.notEqual(match("$object", null), null);
  assert.equal(match("$array", []), null);
  assert.equal(match("$null", null), null);
  assert.notEqual(match("$null", undefined), null);
});

test("objects allow extra members; $absent forbids one", () => {
  assert.equal(match({ a: 1 }, { a: 1, b: 2 }), null);
  assert.notEqual(match({ a: 1, c: "$any" }, { a: 1 }), null);
  assert.equal(match({ a: "$absent" }, { b: 1 }), null);
  assert.match(match({ x: { a: "$absent" } }, { x: { a: 1 } }) ?? "", /^\/x\/a/);
});

test("arrays need the same length; scalars must be equal", () => {
  assert.equal(match([1, "$string"], [1, "x"]), null);
  assert.notEqual(match([1], [1, 2]), null);
  assert.notEqual(match(1, "1"), null);
  assert.equal(match(1, 1.0), null);
  assert.notEqual(match("length", "stop"), null);
});

test("batches match as multisets", () => {
  assert.equal(matchMultiset([{ id: 1 }, { id: 2 }], [{ id: 2 }, { id: 1 }]), null);
  assert.notEqual(matchMultiset([{ id: 1 }, { id: 1 }], [{ id: 1 }, { id: 2 }]), null);
  assert.notEqual(matchMultiset([{ id: 1 }], [{ id: 1 }, { id: 2 }]), null);
});
