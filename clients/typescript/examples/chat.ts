// Streams a chat answer to stdout.
//   npm run example:chat -- --model DIR_OR_ALIAS "prompt" [--max-tokens N] [--temperature T] [--framing ndjson|lsp|msgpack]
//                           [--tools [--tool-choice auto|required|none|NAME] [--max-rounds N]] [--image FILE ...]
// --image (repeatable) asks a vision model about pictures: each file's bytes go with the question
// (raw MessagePack bytes with --framing msgpack, a data URL otherwise).
// Ctrl-C cancels the generation and prints what was made so far.
// With --tools the model may call one local function, get_time (the time in a time zone): a small
// agent loop runs each call, sends the result back as a tool message and asks again, until the
// model answers without calling (call → result → answer). --tool-choice is the first round's;
// later rounds use auto and the last allowed round none, so the loop always ends with an answer.

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { AbortError, imageFromBytes, Sidecar, textPart, type Framing, type GenerateParams, type Message, type Tool, type ToolCall } from "mlx-sidecar";

const USAGE = 'usage: npm run example:chat -- --model DIR_OR_ALIAS "prompt" [--max-tokens N] [--temperature T] [--framing ndjson|lsp|msgpack] [--tools [--tool-choice C] [--max-rounds N]] [--image FILE ...]';

const GET_TIME: Tool = {
  type: "function",
  function: {
    name: "get_time",
    description: "The current date and time in a time zone.",
    parameters: {
      type: "object",
      properties: { timezone: { enum: ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"] } },
      required: ["timezone"],
      additionalProperties: false,
    },
  },
};

// Runs one call of the local function; its result goes back to the model as JSON text.
function runTool(call: ToolCall): string {
  if (call.function.name !== "get_time") return JSON.stringify({ error: `no such function: ${call.function.name}` });
  try {
    const { timezone } = JSON.parse(call.function.arguments) as { timezone: string };
    const time = new Date().toLocaleString("sv-SE", { timeZone: timezone, hour12: false });
    return JSON.stringify({ timezone, time });
  } catch (e) {
    return JSON.stringify({ error: (e as Error).message });
  }
}

function toolChoiceFor(first: string, round: number, rounds: number): GenerateParams["tool_choice"] {
  const choice = round >= rounds ? "none" : round === 1 ? first : "auto";
  return choice === "auto" || choice === "none" || choice === "required" ? choice : { type: "function", function: { name: choice } };
}

const { values, positionals } = parseArgs({
  options: {
    model: { type: "string" },
    "max-tokens": { type: "string", default: "256" },
    temperature: { type: "string", default: "0" }, // greedy: the model's most likely answer
    framing: { type: "string", default: "ndjson" },
    tools: { type: "boolean", default: false },
    "tool-choice": { type: "string", default: "auto" },
    "max-rounds": { type: "string", default: "3" },
    image: { type: "string", multiple: true, default: [] },
  },
  allowPositionals: true,
});
const prompt = positionals.join(" ");
if (!values.model || !prompt) {
  console.error(USAGE);
  process.exit(2);
}

const sidecar = await Sidecar.start({ framing: values.framing as Framing });
const controller = new AbortController();
process.once("SIGINT", () => controller.abort());
sidecar.on("progress", ({ value }) => {
  if (value.kind === "begin") process.stderr.write(`${value.title ?? "working"}...\n`);
});

try {
  const model = await sidecar.request("model/load", { model: values.model });
  const images = (values.image ?? []).map((file) => imageFromBytes(readFileSync(file), sidecar.framing));
  const messages: Message[] = [{ role: "user", content: images.length ? [...images, textPart(prompt)] : prompt }];
  const params: GenerateParams = {
    model: model.id,
    messages,
    max_tokens: Number(values["max-tokens"]),
    temperature: Number(values.temperature),
  };
  if (values.tools) params.tools = [GET_TIME];
  for (let round = 1; ; round++) {
    if (values.tools) params.tool_choice = toolChoiceFor(values["tool-choice"]!, round, Number(values["max-rounds"]));
    const stream = sidecar.generate(params, { signal: controller.signal });
    for await (const chunk of stream) process.stdout.write(chunk.text);
    const result = await stream.result;
    if (!result.tool_calls?.length) {
      const { usage, timings, finish_reason } = result;
      process.stdout.write("\n");
      console.error(`[${usage.completion_tokens} tokens, ${timings.generation_tps.toFixed(0)} tokens/s, finish: ${finish_reason}]`);
      break;
    }
    // The agent loop: the assistant's calls, one tool message per call, then ask again.
    messages.push({ role: "assistant", content: result.text, tool_calls: result.tool_calls });
    for (const call of result.tool_calls) {
      const out = runTool(call);
      console.error(`[tool ${call.function.name}(${call.function.arguments}) -> ${out}]`);
      messages.push({ role: "tool", tool_call_id: call.id, content: out });
    }
  }
} catch (e) {
  if (e instanceof AbortError) console.error(`\n[cancelled after ${e.usage?.completion_tokens ?? "?"} tokens]`);
  else {
    console.error(`error: ${(e as Error).message}`);
    process.exitCode = 1;
  }
} finally {
  await sidecar.close();
}
