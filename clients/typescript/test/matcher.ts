// The conformance pattern matcher, exactly as protocol/vectors/README.md defines it.
// match() returns null on success, else the JSON Pointer and reason of the first mismatch.

const TYPE_CHECKS: Record<string, (v: unknown) => boolean> = {
  $any: () => true,
  $string: (v) => typeof v === "string",
  $number: (v) => typeof v === "number",
  $integer: (v) => typeof v === "number" && Number.isInteger(v),
  $boolean: (v) => typeof v === "boolean",
  $object: (v) => typeof v === "object" && v !== null && !Array.isArray(v),
  $array: (v) => Array.isArray(v),
  $null: (v) => v === null,
};

export function match(pattern: unknown, value: unknown, path = ""): string | null {
  if (typeof pattern === "string" && pattern in TYPE_CHECKS) {
    return TYPE_CHECKS[pattern]!(value) ? null : `${path || "/"}: expected ${pattern}, got ${JSON.stringify(value)}`;
  }
  if (Array.isArray(pattern)) {
    if (!Array.isArray(value)) return `${path || "/"}: expected an array, got ${JSON.stringify(value)}`;
    if (value.length !== pattern.length) return `${path || "/"}: expected ${pattern.length} elements, got ${value.length}`;
    for (let i = 0; i < pattern.length; i++) {
      const m = match(pattern[i], value[i], `${path}/${i}`);
      if (m) return m;
    }
    return null;
  }
  if (typeof pattern === "object" && pattern !== null) {
    if (typeof value !== "object" || value === null || Array.isArray(value)) return `${path || "/"}: expected an object, got ${JSON.stringify(value)}`;
    const obj = value as Record<string, unknown>;
    for (const [key, p] of Object.entries(pattern)) {
      const at = `${path}/${key.replace(/~/g, "~0").replace(/\//g, "~1")}`;
      if (p === "$absent") {
        if (Object.hasOwn(obj, key)) return `${at}: expected no member, got ${JSON.stringify(obj[key])}`;
        continue;
      }
      if (!Object.hasOwn(obj, key)) return `${at}: missing`;
      const m = match(p, obj[key], at);
      if (m) return m;
    }
    return null;
  }
  // Scalars: strict equality; numbers by value (1 equals 1.0 — in JS they are the same number).
  return pattern === value ? null : `${path || "/"}: expected ${JSON.stringify(pattern)}, got ${JSON.stringify(value)}`;
}

/** Matches an array against patterns as a multiset: each pattern takes a distinct element. */
export function matchMultiset(patterns: unknown[], values: unknown): string | null {
  if (!Array.isArray(values)) return `expected a batch array, got ${JSON.stringify(values)}`;
  if (values.length !== patterns.length) return `expected ${patterns.length} answers, got ${values.length}`;
  // Backtracking assignment; batches are tiny.
  const used = new Array<boolean>(values.length).fill(false);
  const assign = (i: number): boolean => {
    if (i === patterns.length) return true;
    for (let j = 0; j < values.length; j++) {
      if (!used[j] && match(patterns[i], values[j]) === null) {
        used[j] = true;
        if (assign(i + 1)) return true;
        used[j] = false;
      }
    }
    return false;
  };
  return assign(0) ? null : `no one-to-one match of ${JSON.stringify(patterns)} in ${JSON.stringify(values)}`;
}
