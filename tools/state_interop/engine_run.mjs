// Better Agent's own engine (a checkout's packages/core/src, bundled by run.py): one run of an agent on a
// thread seeded from a JSON file; writes the state it ended with and the thread it left.
import fs from "node:fs";
import { betterAgent, createInMemoryStorage, createMemory, defineAgent } from "@better-agent/core";

const [inFile, outFile] = process.argv.slice(2);
const seed = JSON.parse(fs.readFileSync(inFile, "utf8"));
const storage = createInMemoryStorage();
for (const thread of seed.threads) {
    await storage.set("memoryThreads", thread.id, thread);
}
const model = {
    providerId: "scripted",
    modelId: "scripted-1",
    capabilities: { output: { supportedMimeTypes: ["text/plain"] } },
    async generate(_options, ctx) {
        return {
            messages: [{ id: ctx.generateId("message", { role: "assistant" }), role: "assistant", content: "ok" }],
            finishReason: "stop",
            usage: { inputTokens: 1, outputTokens: 1, totalTokens: 2 },
        };
    },
};
const app = betterAgent({ agents: [defineAgent({ name: "support", model })], storage, memory: createMemory() });
const input = { threadId: seed.threadId, messages: [{ role: "user", content: "hi" }] };
if (seed.inputState !== undefined) {
    input.state = seed.inputState;
}
const result = await app.agent("support").run(input);
fs.writeFileSync(outFile, JSON.stringify({
    resultState: result.state ?? null,
    thread: await storage.get("memoryThreads", seed.threadId),
}));
