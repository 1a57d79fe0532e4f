// Structured output helpers: a generate held to a JSON Schema, resolved with the parsed value.

import type { GenerateOptions, Sidecar } from "./sidecar.js";
import type { GenerateParams, GenerateResult, ResponseFormat } from "./protocol.js";

/** GenerateParams without response_format (Omit that keeps the prompt | messages union). */
export type JsonGenerateParams = GenerateParams extends infer P ? (P extends unknown ? Omit<P, "response_format"> : never) : never;

/** A JSON Schema as a plain object (2020-12; see capabilities.structured_output for what is enforced). */
export type JsonSchema = { [key: string]: unknown };

/** The answer ended before its JSON was complete (max_tokens reached, or a stop string cut it). */
export class IncompleteJsonError extends Error {
  override name = "IncompleteJsonError";
  readonly result: GenerateResult;

  constructor(result: GenerateResult) {
    super(`the generated JSON is incomplete (finish_reason ${result.finish_reason} after ${result.usage.completion_tokens} tokens): ${JSON.stringify(result.text.slice(0, 80))}`);
    this.result = result;
  }
}

/** The response_format for a JSON Schema. */
export function jsonSchemaFormat(schema: JsonSchema, name = "response"): ResponseFormat {
  return { type: "json_schema", json_schema: { name, schema, strict: true } };
}

export interface GenerateJsonOptions extends GenerateOptions {
  /** The schema's name in the request (default "response"). */
  name?: string;
}

/** generateJson's answer: the parsed value and the whole result. */
export interface JsonResult<T> {
  value: T;
  result: GenerateResult;
}

/**
 * Generates JSON held to `schema` at every token (any JSON object when schema is omitted) and
 * resolves with the parsed value: `const { value } = await generateJson<Person>(sidecar, params, schema)`.
 * The runtime guarantees that a complete answer validates, so T is only as true as the schema
 * it is paired with. Rejects with IncompleteJsonError (holding the result) when the answer was
 * cut short, and with RpcError (-32602, data.path) when the schema cannot be enforced.
 */
export async function generateJson<T = unknown>(
  sidecar: Sidecar,
  params: JsonGenerateParams,
  schema?: JsonSchema,
  options: GenerateJsonOptions = {},
): Promise<JsonResult<T>> {
  const { name, ...generateOptions } = options;
  const response_format: ResponseFormat = schema ? jsonSchemaFormat(schema, name) : { type: "json_object" };
  const result = await sidecar.generate({ ...params, response_format } as GenerateParams, generateOptions).result;
  if (result.format_complete !== true || result.parsed === undefined || result.parsed === null) {
    throw new IncompleteJsonError(result);
  }
  return { value: result.parsed as T, result };
}
