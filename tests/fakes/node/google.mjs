// The real @google/genai through Candela (the google route, API-key client): a JSON call, a
// streamed call, a denied model. Run by tests/fakes/node/__init__.py: run_node; one JSON line per call.
import { ApiError, GoogleGenAI } from "@google/genai";

const { CANDELA_URL, CANDELA_KEY, MODEL, DENIED_MODEL } = process.env;
// no CANDELA_URL: the SDK's own base URL (under `candela run`, intercepted unchanged)
const http = CANDELA_URL ? { httpOptions: { baseUrl: `${CANDELA_URL}/proxy/google` } } : {};
const ai = new GoogleGenAI({ apiKey: CANDELA_KEY, ...http });
const out = (line) => console.log(JSON.stringify(line));

const r = await ai.models.generateContent({ model: MODEL, contents: "hi" });
out({
  call: "json",
  text: r.text,
  usage: [r.usageMetadata.promptTokenCount, r.usageMetadata.candidatesTokenCount],
  span: r.sdkHttpResponse?.headers?.["x-candela-span-id"] ?? null,
});

let text = "";
let chunks = 0;
for await (const chunk of await ai.models.generateContentStream({ model: MODEL, contents: "hi" })) {
  chunks += 1;
  text += chunk.text ?? "";
}
out({ call: "stream", text, chunks });

try {
  await ai.models.generateContent({ model: DENIED_MODEL, contents: "hi" });
  out({ call: "denied", status: 200 });
} catch (e) {
  // the SDK's ApiError carries the status; its message is the JSON body Candela answered
  let error = null;
  try { error = JSON.parse(e.message).error; } catch { error = e.message; }
  out({ call: "denied", status: e.status, error, api_error: e instanceof ApiError });
}
