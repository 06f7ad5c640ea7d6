// The real @anthropic-ai/sdk through Candela (anthropic-direct): a JSON call, a streamed call,
// a denied model. Run by tests/fakes/node/__init__.py: run_node; prints one JSON line per call.
import Anthropic from "@anthropic-ai/sdk";

const { CANDELA_URL, CANDELA_KEY, MODEL, DENIED_MODEL } = process.env;
// no CANDELA_URL: the SDK's own base URL (under `candela run`, intercepted unchanged)
const base = CANDELA_URL ? { baseURL: `${CANDELA_URL}/proxy/anthropic-direct` } : {};
const client = new Anthropic({ ...base, apiKey: CANDELA_KEY, maxRetries: 0 });
const messages = [{ role: "user", content: "hi" }];
const out = (line) => console.log(JSON.stringify(line));

const { data, response } = await client.messages.create({ model: MODEL, max_tokens: 16, messages }).withResponse();
out({
  call: "json",
  text: data.content[0].text,
  usage: [data.usage.input_tokens, data.usage.output_tokens],
  span: response.headers.get("x-candela-span-id"),
});

const stream = client.messages.stream({ model: MODEL, max_tokens: 16, messages });
const events = [];
stream.on("streamEvent", (event) => events.push(event.type));
const final = await stream.finalMessage();
out({ call: "stream", text: final.content[0].text, usage: [final.usage.input_tokens, final.usage.output_tokens], events });

try {
  await client.messages.create({ model: DENIED_MODEL, max_tokens: 16, messages });
  out({ call: "denied", status: 200 });
} catch (e) {
  out({ call: "denied", status: e.status, error: e.error?.error, api_error: e instanceof Anthropic.APIError });
}
