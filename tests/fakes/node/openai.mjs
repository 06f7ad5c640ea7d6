// The real openai Node SDK through Candela: a JSON call, a streamed call, a denied model.
// Run by tests/fakes/node/__init__.py: run_node (stdin, cwd .node-sdk); prints one JSON line per call.
import OpenAI from "openai";

const { CANDELA_URL, CANDELA_KEY, MODEL, DENIED_MODEL } = process.env;
// no CANDELA_URL: the SDK's own base URL (under `candela run`, intercepted unchanged)
const base = CANDELA_URL ? { baseURL: `${CANDELA_URL}/proxy/openai/v1` } : {};
const client = new OpenAI({ ...base, apiKey: CANDELA_KEY, maxRetries: 0 });
const messages = [{ role: "user", content: "hi" }];
const out = (line) => console.log(JSON.stringify(line));

const { data, response } = await client.chat.completions.create({ model: MODEL, messages }).withResponse();
out({
  call: "json",
  text: data.choices[0].message.content,
  usage: [data.usage.prompt_tokens, data.usage.completion_tokens],
  span: response.headers.get("x-candela-span-id"),
});

const stream = await client.chat.completions.create({ model: MODEL, messages, stream: true });
let text = "";
let chunks = 0;
let usageChunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.usage) usageChunks += 1;
  text += chunk.choices[0]?.delta?.content ?? "";
}
out({ call: "stream", text, chunks, usage_chunks: usageChunks });

try {
  await client.chat.completions.create({ model: DENIED_MODEL, messages });
  out({ call: "denied", status: 200 });
} catch (e) {
  out({ call: "denied", status: e.status, error: e.error, api_error: e instanceof OpenAI.APIError });
}
