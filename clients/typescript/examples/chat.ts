// Streams a chat answer to stdout.
//   npm run example:chat -- --model DIR_OR_ALIAS "prompt" [--max-tokens N] [--temperature T] [--framing ndjson|lsp|msgpack]
// Ctrl-C cancels the generation and prints what was made so far.

import { parseArgs } from "node:util";
import { AbortError, Sidecar, type Framing } from "mlx-sidecar";

const USAGE = 'usage: npm run example:chat -- --model DIR_OR_ALIAS "prompt" [--max-tokens N] [--temperature T] [--framing ndjson|lsp|msgpack]';

const { values, positionals } = parseArgs({
  options: {
    model: { type: "string" },
    "max-tokens": { type: "string", default: "256" },
    temperature: { type: "string", default: "0" }, // greedy: the model's most likely answer
    framing: { type: "string", default: "ndjson" },
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
  const stream = sidecar.generate(
    {
      model: model.id,
      messages: [{ role: "user", content: prompt }],
      max_tokens: Number(values["max-tokens"]),
      temperature: Number(values.temperature),
    },
    { signal: controller.signal },
  );
  for await (const chunk of stream) process.stdout.write(chunk.text);
  const { usage, timings, finish_reason } = await stream.result;
  process.stdout.write("\n");
  console.error(`[${usage.completion_tokens} tokens, ${timings.generation_tps.toFixed(0)} tokens/s, finish: ${finish_reason}]`);
} catch (e) {
  if (e instanceof AbortError) console.error(`\n[cancelled after ${e.usage?.completion_tokens ?? "?"} tokens]`);
  else {
    console.error(`error: ${(e as Error).message}`);
    process.exitCode = 1;
  }
} finally {
  await sidecar.close();
}
