#!/usr/bin/env node
// Generates src/protocol.ts from ../../protocol (protocol.json + schemas/*.json).
// Usage: node scripts/gen-types.mjs [--check]   (--check: exit 1 if src/protocol.ts is stale)
// It understands only the JSON Schema keywords the protocol uses and throws on any other one,
// so a schema change it cannot express fails loudly instead of producing a loose type.

import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const PROTOCOL_DIR = resolve(here, "../../../protocol");
const OUT = resolve(here, "../src/protocol.ts");

// Keywords that only constrain values (checked by the runtime); they do not change the TS type.
const VALUE_ONLY = new Set([
  "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
  "minItems", "maxItems", "pattern", "propertyNames", "default", "format",
]);
const META = new Set(["$schema", "$id", "title", "description"]);

const readJson = (p) => JSON.parse(readFileSync(join(PROTOCOL_DIR, p), "utf8"));

// "model/load" + "Params" -> "ModelLoadParams"; "$/cancelRequest" -> "CancelRequest".
function pascal(name) {
  return name
    .split(/[^A-Za-z0-9]+/)
    .filter(Boolean)
    .map((w) => w[0].toUpperCase() + w.slice(1))
    .join("");
}

function refName(ref, where) {
  const m = /^(?:common\.json)?#\/\$defs\/([A-Za-z0-9_]+)$/.exec(ref);
  if (!m) throw new Error(`${where}: unsupported $ref ${ref}`);
  return m[1];
}

function doc(text, indent) {
  if (!text) return "";
  const lines = String(text).split("\n");
  if (lines.length === 1) return `${indent}/** ${lines[0]} */\n`;
  return `${indent}/**\n${lines.map((l) => `${indent} * ${l}`).join("\n")}\n${indent} */\n`;
}

function literal(v) {
  return JSON.stringify(v);
}

function checkKeywords(schema, allowed, where) {
  for (const k of Object.keys(schema)) {
    if (!allowed.has(k) && !VALUE_ONLY.has(k) && !META.has(k)) {
      throw new Error(`${where}: JSON Schema keyword "${k}" is not supported by gen-types.mjs; teach it or simplify the schema`);
    }
  }
}

// The TypeScript type of a schema, as a string; `indent` is the current indentation.
function typeOf(schema, where, indent) {
  if (schema === true || (typeof schema === "object" && Object.keys(schema).every((k) => META.has(k)))) return "unknown";
  if (schema.$ref) {
    checkKeywords(schema, new Set(["$ref"]), where);
    return refName(schema.$ref, where);
  }
  if ("const" in schema) {
    checkKeywords(schema, new Set(["const"]), where);
    return literal(schema.const);
  }
  if (schema.enum) {
    checkKeywords(schema, new Set(["enum"]), where);
    return schema.enum.map(literal).join(" | ");
  }
  if ((schema.anyOf || schema.oneOf) && schema.type === undefined) {
    const key = schema.anyOf ? "anyOf" : "oneOf";
    checkKeywords(schema, new Set([key]), where);
    return schema[key].map((s, i) => wrap(typeOf(s, `${where}/${key}/${i}`, indent))).join(" | ");
  }
  const types = Array.isArray(schema.type) ? schema.type : [schema.type];
  if (types.length > 1) {
    checkKeywords(schema, new Set(["type"]), where);
    return types.map((t) => typeOf({ type: t }, where, indent)).join(" | ");
  }
  switch (types[0]) {
    case "string":
      checkKeywords(schema, new Set(["type"]), where);
      return "string";
    case "integer":
    case "number":
      checkKeywords(schema, new Set(["type"]), where);
      return "number";
    case "boolean":
      checkKeywords(schema, new Set(["type"]), where);
      return "boolean";
    case "null":
      checkKeywords(schema, new Set(["type"]), where);
      return "null";
    case "array":
      checkKeywords(schema, new Set(["type", "items"]), where);
      return `${wrap(schema.items ? typeOf(schema.items, `${where}/items`, indent) : "unknown")}[]`;
    case "object":
      return objectType(schema, where, indent);
    default:
      throw new Error(`${where}: unsupported type ${JSON.stringify(schema.type)}`);
  }
}

function wrap(t) {
  return /[|&]/.test(t) && !t.startsWith("{") ? `(${t})` : t;
}

// An object schema. `anyOf: [{required:[a]},{required:[b]}]` with `dependentSchemas` that forbid
// both becomes "exactly one of a, b": Base & ({a: A; b?: never} | {b: B; a?: never}).
function objectType(schema, where, indent) {
  checkKeywords(schema, new Set(["type", "properties", "required", "additionalProperties", "anyOf", "dependentSchemas"]), where);
  const props = schema.properties ?? {};
  const required = new Set(schema.required ?? []);
  const oneOfKeys = exactlyOneOf(schema, where);
  const inner = indent + "  ";
  const member = (name, req) => {
    const p = props[name];
    const description = typeof p === "object" ? p.description : undefined;
    return `${doc(description, inner)}${inner}${propName(name)}${req ? "" : "?"}: ${typeOf(p, `${where}/properties/${name}`, inner)};\n`;
  };
  let body = "";
  for (const name of Object.keys(props)) {
    if (oneOfKeys.includes(name)) continue;
    body += member(name, required.has(name));
  }
  const ap = schema.additionalProperties;
  if (ap === undefined || ap === true) body += `${inner}[key: string]: unknown;\n`;
  else if (typeof ap === "object") body += `${inner}[key: string]: ${typeOf(ap, `${where}/additionalProperties`, inner)};\n`;
  // A closed object without members: Record<string, never> rejects stray members ({} would not).
  const base = body ? `{\n${body}${indent}}` : "Record<string, never>";
  if (!oneOfKeys.length) return base;
  const alts = oneOfKeys.map((key) => {
    const others = oneOfKeys.filter((k) => k !== key).map((k) => `${inner}${propName(k)}?: never;\n`).join("");
    return `{\n${member(key, true)}${others}${indent}}`;
  });
  return `${base} & (${alts.join(" | ")})`;
}

function exactlyOneOf(schema, where) {
  if (!schema.anyOf && !schema.dependentSchemas) return [];
  const keys = (schema.anyOf ?? []).map((alt) => {
    if (Object.keys(alt).length !== 1 || !Array.isArray(alt.required) || alt.required.length !== 1) {
      throw new Error(`${where}/anyOf: only [{required:[a]}, {required:[b]}, ...] is supported`);
    }
    return alt.required[0];
  });
  // dependentSchemas ({a: {not: {required: [b]}}}) must make every pair of those keys exclusive.
  const exclusive = new Set();
  for (const [key, dep] of Object.entries(schema.dependentSchemas ?? {})) {
    const forbidden = dep?.not?.required;
    if (!keys.includes(key) || Object.keys(dep).length !== 1 || Object.keys(dep.not).length !== 1 || !Array.isArray(forbidden)) {
      throw new Error(`${where}/dependentSchemas/${key}: only {not: {required: [...]}} between anyOf keys is supported`);
    }
    for (const other of forbidden) exclusive.add([key, other].sort().join("\0"));
  }
  for (const a of keys) {
    for (const b of keys) {
      if (a < b && !exclusive.has(`${a}\0${b}`)) {
        throw new Error(`${where}: anyOf keys ${a} and ${b} may appear together; only "exactly one of" is supported`);
      }
    }
  }
  return keys;
}

function propName(name) {
  return /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(name) ? name : JSON.stringify(name);
}

function declare(name, schema, where) {
  const t = typeOf(schema, where, "");
  const head = doc(schema.description, "");
  const single = schema.type === "object" && !schema.anyOf && t.startsWith("{");
  return single && t !== "{}"
    ? `${head}export interface ${name} ${t}\n`
    : `${head}export type ${name} = ${t};\n`;
}

export function generate() {
  const protocol = readJson("protocol.json");
  const common = readJson("schemas/common.json");
  const out = [];
  out.push(
    "// Generated by scripts/gen-types.mjs from protocol/protocol.json and protocol/schemas/*.json.",
    "// Do not edit: run `npm run gen` after changing the protocol (a test fails while this file is stale).",
    "/* eslint-disable */",
    "",
    `export const PROTOCOL_VERSION = ${literal(protocol.protocol_version)};`,
    `export const FRAMINGS = [${protocol.framings.map(literal).join(", ")}] as const;`,
    "export type Framing = (typeof FRAMINGS)[number];",
    "",
    "/** JSON-RPC error codes by error type (protocol.json's errors). */",
    "export const ERROR_CODES = {",
    ...protocol.errors.map((e) => `  ${e.type}: ${e.code},`),
    "} as const;",
    "export type ErrorType = keyof typeof ERROR_CODES;",
    "",
  );
  for (const [name, schema] of Object.entries(common.$defs)) {
    out.push(declare(name, schema, `common.json#/$defs/${name}`));
  }
  const methods = [];
  for (const [method, entry] of Object.entries(protocol.methods)) {
    const names = {};
    for (const part of ["params", "result"]) {
      const schema = readJson(entry[part]);
      names[part] = pascal(method) + pascal(part);
      out.push(declare(names[part], schema, entry[part]));
    }
    methods.push(`  ${literal(method)}: { params: ${names.params}; result: ${names.result} };`);
  }
  const notifications = {};
  for (const group of ["client_notifications", "server_notifications"]) {
    notifications[group] = [];
    for (const [method, entry] of Object.entries(protocol[group])) {
      const name = pascal(method) + "Params";
      out.push(declare(name, readJson(entry.params), entry.params));
      notifications[group].push(`  ${literal(method)}: ${name};`);
    }
  }
  out.push(
    "/** The request methods, in protocol.json's order. */",
    `export const METHODS = [${Object.keys(protocol.methods).map(literal).join(", ")}] as const;`,
    "",
    "/** Every request method: its params and result. */",
    "export interface Methods {",
    ...methods,
    "}",
    "export type MethodName = (typeof METHODS)[number];",
    "",
    "/** Notifications the client sends, with their params. */",
    "export interface ClientNotifications {",
    ...notifications.client_notifications,
    "}",
    "",
    "/** Notifications the runtime sends, with their params. */",
    "export interface ServerNotifications {",
    ...notifications.server_notifications,
    "}",
    "",
  );
  return out.join("\n");
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const text = generate();
  if (process.argv.includes("--check")) {
    let current = "";
    try {
      current = readFileSync(OUT, "utf8");
    } catch {}
    if (current !== text) {
      console.error(`${OUT} is out of date with ${PROTOCOL_DIR}; run \`npm run gen\` and commit the result.`);
      process.exit(1);
    }
    console.error("src/protocol.ts matches protocol/");
  } else {
    writeFileSync(OUT, text);
    console.error(`wrote ${OUT}`);
  }
}
