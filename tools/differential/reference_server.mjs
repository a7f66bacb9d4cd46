// The TypeScript reference server for the differential run: Better Agent's own app and handler
// (`betterAgent`, `createBetterAgentHandler` via `app.handler`), in-memory storage and memory, two
// agents on a scripted model, served by node:http on 127.0.0.1. run.py bundles this file with a
// checkout's packages/core/src (esbuild alias `@better-agent/core`); nothing of that checkout is
// kept in our repository.
//
// Two apps share one port: `/api` (abortOnDisconnect: false, so a dropped stream can be resumed)
// and `/strict` (the default: a dropped stream aborts its run). Auth: `authorization: Bearer <subject>`
// gives {subject}; any other header value, or none, gives no auth context.
import http from "node:http";
import { betterAgent, createInMemoryStorage, createMemory, defineAgent } from "@better-agent/core";

const args = new Map(
    process.argv.slice(2).map((arg) => {
        const [key, ...rest] = arg.replace(/^--/, "").split("=");
        return [key, rest.join("=")];
    }),
);
const port = Number(args.get("port") ?? "0");
// The scripted replies, shared with python_server.py through scenario.json.
const script = JSON.parse(args.get("script") ?? "{}");

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function scriptedModel(reply) {
    // One step: TEXT_MESSAGE_START, one CONTENT per chunk (`delayMs` apart), END; the final result
    // is the assistant message. An abort stops the chunks (the runtime then ends the run ABORTED).
    const messageFor = (ctx) => ctx.generateId("message", { role: "assistant" });
    const usage = { inputTokens: 3, outputTokens: reply.chunks.length, totalTokens: 3 + reply.chunks.length };
    return {
        providerId: "scripted",
        modelId: "scripted-1",
        capabilities: { output: { supportedMimeTypes: ["text/plain"] } },
        async generate(_options, ctx) {
            const text = reply.chunks.join("");
            return {
                messages: [{ id: messageFor(ctx), role: "assistant", content: text }],
                finishReason: "stop",
                usage,
            };
        },
        async stream(_options, ctx) {
            const messageId = messageFor(ctx);
            let sent = "";
            async function* events() {
                yield { type: "TEXT_MESSAGE_START", timestamp: Date.now(), messageId, role: "assistant" };
                for (const chunk of reply.chunks) {
                    if (reply.delayMs) {
                        await sleep(reply.delayMs);
                    }
                    if (ctx.signal?.aborted) {
                        return;
                    }
                    sent += chunk;
                    yield { type: "TEXT_MESSAGE_CONTENT", timestamp: Date.now(), messageId, delta: chunk };
                }
                yield { type: "TEXT_MESSAGE_END", timestamp: Date.now(), messageId };
            }
            let finish;
            const final = new Promise((resolve) => {
                finish = resolve;
            });
            const iterable = (async function* () {
                try {
                    yield* events();
                } finally {
                    finish({
                        messages: [{ id: messageId, role: "assistant", content: sent }],
                        finishReason: "stop",
                        usage,
                    });
                }
            })();
            return { events: iterable, final };
        },
    };
}

function makeApp(abortOnDisconnect) {
    const storage = createInMemoryStorage();
    const agents = Object.entries(script.agents ?? {}).map(([name, reply]) =>
        defineAgent({ name, model: scriptedModel(reply) }),
    );
    return betterAgent({
        agents,
        storage,
        memory: createMemory(),
        auth: async ({ request }) => {
            const match = /^Bearer ([A-Za-z0-9_-]+)$/.exec(request.headers.get("authorization") ?? "");
            return match ? { subject: match[1] } : null;
        },
        advanced: { stream: { abortOnDisconnect } },
        basePath: abortOnDisconnect ? "/strict" : "/api",
    });
}

const apps = [makeApp(false), makeApp(true)];
const handlerFor = (path) =>
    path.startsWith("/strict/") || path === "/strict" ? apps[1].handler : apps[0].handler;

async function readBody(req) {
    const chunks = [];
    for await (const chunk of req) {
        chunks.push(chunk);
    }
    return Buffer.concat(chunks);
}

const server = http.createServer(async (req, res) => {
    const controller = new AbortController();
    res.on("close", () => {
        if (!res.writableFinished) {
            controller.abort();
        }
    });
    try {
        const body = await readBody(req);
        const headers = new Headers();
        for (const [key, value] of Object.entries(req.headers)) {
            if (typeof value === "string") {
                headers.set(key, value);
            }
        }
        const hasBody = !["GET", "HEAD"].includes(req.method ?? "GET");
        const request = new Request(`http://127.0.0.1:${server.address().port}${req.url}`, {
            method: req.method,
            headers,
            body: hasBody ? body : undefined,
            duplex: "half",
            signal: controller.signal,
        });
        const response = await handlerFor(req.url ?? "/")(request);
        res.writeHead(response.status, Object.fromEntries(response.headers));
        if (response.body) {
            const reader = response.body.getReader();
            res.on("close", () => reader.cancel().catch(() => {}));
            for (;;) {
                const { done, value } = await reader.read();
                if (done) {
                    break;
                }
                res.write(value);
            }
        }
        res.end();
    } catch (error) {
        if (!res.headersSent) {
            res.writeHead(599, { "content-type": "text/plain" });
        }
        res.end(`adapter error: ${error}`);
    }
});

server.listen(port, "127.0.0.1", () => {
    // run.py waits for this line to learn the port.
    console.log(`listening http://127.0.0.1:${server.address().port}`);
});
for (const signal of ["SIGTERM", "SIGINT"]) {
    process.on(signal, () => process.exit(0));
}
