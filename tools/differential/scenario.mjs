// One scenario, driven through Better Agent's own client (`createClient`, bundled by run.py from a
// checkout's packages/client/src), against a base URL. Every HTTP exchange is recorded (method,
// path, status, chosen headers, JSON body or SSE frames as sent) next to what the client itself
// returned or threw, step by step, into a JSON file that run.py compares with another server's.
//
//   node scenario.bundle.mjs --base=http://127.0.0.1:PORT --out=record.json --script='{...}'
//
// The server must serve two apps: <base>/api (abortOnDisconnect false) and <base>/strict (true),
// with the agents of the script (`echo`: quick, `slow`: chunks `delayMs` apart), and auth from
// `authorization: Bearer <subject>`.
import { writeFileSync } from "node:fs";
import { createClient } from "@better-agent/client";

const args = new Map(
    process.argv.slice(2).map((arg) => {
        const [key, ...rest] = arg.replace(/^--/, "").split("=");
        return [key, rest.join("=")];
    }),
);
const base = args.get("base");
const out = args.get("out");
const script = JSON.parse(args.get("script") ?? "{}");
const slowChunks = script.agents.slow.chunks.length;

const RESPONSE_HEADERS = [
    "content-type",
    "cache-control",
    "x-accel-buffering",
    "x-run-id",
    "connection",
    "allow",
];
const REQUEST_HEADERS = ["accept", "content-type", "last-event-id"];

const steps = [];
let current;

function parseFrames(raw) {
    // The wire as sent, one entry per blank-line-terminated block; a trailing partial block is kept.
    const frames = [];
    const blocks = raw.split(/\r?\n\r?\n/);
    const tail = blocks.pop();
    for (const block of blocks) {
        const frame = {};
        for (const line of block.split(/\r?\n/)) {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let value = colon < 0 ? "" : line.slice(colon + 1);
            if (value.startsWith(" ")) {
                value = value.slice(1);
            }
            if (field === "") {
                frame.comment = value;
            } else if (field === "data") {
                frame.data = frame.data === undefined ? value : `${frame.data}\n${value}`;
            } else {
                frame[field] = value;
            }
        }
        if (frame.data !== undefined) {
            try {
                frame.data = JSON.parse(frame.data);
            } catch {}
        }
        frames.push(frame);
    }
    if (tail) {
        frames.push({ partial: tail });
    }
    return frames;
}

async function readAll(stream, exchange) {
    const reader = stream.getReader();
    const decoder = new TextDecoder();
    let raw = "";
    try {
        for (;;) {
            const { done, value } = await reader.read();
            if (done) {
                exchange.end = "closed by server";
                break;
            }
            raw += decoder.decode(value, { stream: true });
        }
    } catch {
        exchange.end = "dropped by client";
    }
    return raw;
}

async function recordingFetch(input, init = {}) {
    const url = new URL(typeof input === "string" ? input : input.url);
    const requestHeaders = new Headers(init.headers);
    const exchange = {
        method: init.method ?? "GET",
        path: url.pathname + url.search,
        request: Object.fromEntries(
            REQUEST_HEADERS.filter((h) => requestHeaders.has(h)).map((h) => [h, requestHeaders.get(h)]),
        ),
    };
    if (typeof init.body === "string") {
        try {
            exchange.requestBody = JSON.parse(init.body);
        } catch {
            exchange.requestBody = init.body;
        }
    }
    current.exchanges.push(exchange);
    let response;
    try {
        response = await fetch(input, init);
    } catch (error) {
        exchange.fetchError = String(error?.name ?? error);
        throw error;
    }
    exchange.status = response.status;
    exchange.headers = Object.fromEntries(
        RESPONSE_HEADERS.filter((h) => response.headers.has(h)).map((h) => [h, response.headers.get(h)]),
    );
    if (!response.body) {
        exchange.body = null;
        return response;
    }
    const [mine, theirs] = response.body.tee();
    const isSse = (response.headers.get("content-type") ?? "").includes("text/event-stream");
    current.pending.push(
        readAll(mine, exchange).then((raw) => {
            if (isSse) {
                exchange.frames = parseFrames(raw);
            } else if (raw === "") {
                exchange.body = "";
            } else {
                try {
                    exchange.body = JSON.parse(raw);
                } catch {
                    exchange.body = { text: raw };
                }
            }
        }),
    );
    return new Response(theirs, {
        status: response.status,
        statusText: response.statusText,
        headers: response.headers,
    });
}

function clientFor(subject, app = "api") {
    return createClient({
        baseURL: `${base}/${app}`,
        fetch: recordingFetch,
        headers: subject ? { authorization: `Bearer ${subject}` } : {},
    });
}

function errorView(error) {
    return {
        error: {
            name: error?.name,
            message: error?.message,
            status: error?.status,
            code: error?.code,
        },
    };
}

async function step(name, body) {
    current = { name, exchanges: [], pending: [] };
    const started = Date.now();
    try {
        current.client = { value: await body() };
    } catch (error) {
        current.client = errorView(error);
    }
    await Promise.race([
        Promise.all(current.pending),
        new Promise((resolve) => setTimeout(resolve, 15000)),
    ]);
    const { pending: _pending, ...record } = current;
    record.ms = Date.now() - started;
    steps.push(record);
    process.stderr.write(`${name}: ${JSON.stringify(record.client).slice(0, 160)}\n`);
}

async function collect(iterable, { signal, stopAfter, onEvent } = {}) {
    // The events the client yields; `stopAfter` events, then the connection is dropped.
    const events = [];
    try {
        for await (const event of iterable) {
            events.push(event);
            await onEvent?.(event, events);
            if (stopAfter !== undefined && events.length >= stopAfter) {
                signal?.controller.abort();
            }
        }
        return { events, end: "complete" };
    } catch (error) {
        return { events, end: signal?.controller.signal.aborted ? "dropped" : errorView(error) };
    }
}

function dropper() {
    const controller = new AbortController();
    return { controller, options: { signal: controller.signal } };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
    const alice = clientFor("alice");
    const bob = clientFor("bob");
    const anon = clientFor(null);
    const echo = alice.agent("echo");
    const slow = alice.agent("slow");
    const ids = {};

    await step("threads.create", async () => {
        const thread = await echo.memory.threads.create({ title: "First", metadata: { k: 1 } });
        ids.thread = thread.id;
        return thread;
    });
    await step("threads.create (empty body)", () => echo.memory.threads.create());
    await step("threads.list", () => echo.memory.threads.list());
    await step("threads.list limit=1", () => echo.memory.threads.list({ limit: 1 }));
    await step("threads.get", () => echo.memory.threads.get(ids.thread));
    await step("threads.update", () =>
        echo.memory.threads.update(ids.thread, { title: "Renamed", metadata: { k: 2 } }),
    );
    await step("run streamed on a thread", async () => {
        const result = await collect(
            echo.stream({ threadId: ids.thread, messages: [{ role: "user", content: "Hi" }] }),
        );
        ids.streamedRun = result.events[0]?.runId;
        return result;
    });
    await step("run streamed, no thread", () =>
        collect(echo.stream({ messages: [{ role: "user", content: "Hi" }] })),
    );
    await step("run streamed, new thread id from the client", async () => {
        ids.clientThread = "client-chosen-thread";
        return collect(
            echo.stream({ threadId: ids.clientThread, messages: [{ role: "user", content: "Yo" }] }),
        );
    });
    await step("run not streamed", async () => {
        const result = await echo.run({
            threadId: ids.thread,
            messages: [{ role: "user", content: "Again" }],
        });
        ids.jsonRun = result.runId;
        return result;
    });
    await step("run not streamed, no thread", () =>
        echo.run({ messages: [{ role: "user", content: "Hi" }] }),
    );
    await step("messages.list", () => echo.memory.messages.list(ids.thread));
    await step("messages.list limit=1", () => echo.memory.messages.list(ids.thread, { limit: 1 }));
    await step("messages.list beforeRunId", () =>
        echo.memory.messages.list(ids.thread, { beforeRunId: ids.jsonRun }),
    );
    await step("threads.get after runs", () => echo.memory.threads.get(ids.thread));
    await step("threads.runtime idle", () => echo.memory.threads.runtime(ids.thread));
    await step("resume a finished run from 0", () =>
        collect(alice.runs.resumeStream({ runId: ids.streamedRun })),
    );
    await step("resume a finished run after 3", () =>
        collect(alice.runs.resumeStream({ runId: ids.streamedRun, afterSequence: 3 })),
    );
    await step("resume a finished run, agent-scoped", () =>
        collect(echo.resumeStream({ runId: ids.streamedRun, afterSequence: 5 })),
    );
    await step("resume the non-streamed run", () =>
        collect(alice.runs.resumeStream({ runId: ids.jsonRun })),
    );

    // Resume after a dropped connection: no gap, no duplicate.
    let slowThread;
    await step("threads.create (slow)", async () => {
        slowThread = await slow.memory.threads.create({ title: "slow" });
        return slowThread;
    });
    const drop = dropper();
    await step("slow run, dropped after 4 events", async () => {
        const result = await collect(
            slow.stream(
                { threadId: slowThread.id, messages: [{ role: "user", content: "Go" }] },
                drop.options,
            ),
            { signal: drop, stopAfter: 4 },
        );
        ids.slowRun = result.events[0]?.runId;
        return result;
    });
    await step("threads.runtime while running", () => slow.memory.threads.runtime(slowThread.id));
    const drop2 = dropper();
    let resumed1;
    await step("agent-scoped resume after 4, dropped after 3 more", async () => {
        resumed1 = await collect(slow.resumeStream({ runId: ids.slowRun, afterSequence: 4 }, drop2.options), {
            signal: drop2,
            stopAfter: 3,
        });
        return resumed1;
    });
    let resumed2;
    await step("resume by run id after the last seen seq, to the end", async () => {
        const last = resumed1.events.at(-1)?.seq ?? 4;
        resumed2 = await collect(alice.runs.resumeStream({ runId: ids.slowRun, afterSequence: last }));
        return resumed2;
    });
    await step("no gap, no duplicate", async () => {
        const seqs = [1, 2, 3, 4, ...resumed1.events.map((e) => e.seq), ...resumed2.events.map((e) => e.seq)];
        const expected = Array.from({ length: seqs.length }, (_, i) => i + 1);
        return {
            contiguous: JSON.stringify(seqs) === JSON.stringify(expected),
            count: seqs.length,
            lastType: resumed2.events.at(-1)?.type,
        };
    });
    await step("agent-scoped resume without a run id (none running)", () =>
        collect(slow.resumeStream({})),
    );

    // Abort by agent and by run id, while streaming.
    for (const how of ["agent", "run id", "agent, no run id"]) {
        await step(`abort by ${how}`, async () => {
            let aborted;
            const result = await collect(slow.stream({ messages: [{ role: "user", content: "Go" }] }), {
                onEvent: async (event, events) => {
                    if (events.length === 3 && !aborted) {
                        const runId = events[0].runId;
                        aborted =
                            how === "agent"
                                ? slow.abort(runId)
                                : how === "run id"
                                  ? alice.runs.abort(runId)
                                  : slow.abort();
                        aborted = await aborted.then(
                            () => "ok",
                            (error) => errorView(error),
                        );
                    }
                },
            });
            return { aborted, ...result, tail: result.events.slice(-2) };
        });
    }
    await step("abort a finished run", () => alice.runs.abort(ids.streamedRun));
    await step("abort an unknown run", () => alice.runs.abort("no-such-run"));
    await step("agent abort without run id (none running)", () => slow.abort());

    // The strict app: a dropped stream aborts its run.
    const strict = clientFor("alice", "strict").agent("slow");
    const drop3 = dropper();
    let strictRun;
    await step("strict: slow run dropped after 3 events", async () => {
        const result = await collect(
            strict.stream({ messages: [{ role: "user", content: "Go" }] }, drop3.options),
            { signal: drop3, stopAfter: 3 },
        );
        strictRun = result.events[0]?.runId;
        return result;
    });
    await step("strict: the dropped run ended aborted", async () => {
        await sleep(300);
        const result = await collect(clientFor("alice", "strict").runs.resumeStream({ runId: strictRun }));
        return { count: result.events.length, tail: result.events.slice(-2), end: result.end };
    });

    // Another user's thread and runs: 404, as if they did not exist.
    const bobEcho = bob.agent("echo");
    await step("bob: threads.get of alice's thread", () => bobEcho.memory.threads.get(ids.thread));
    await step("bob: threads.update of alice's thread", () =>
        bobEcho.memory.threads.update(ids.thread, { title: "mine" }),
    );
    await step("bob: threads.delete of alice's thread", () => bobEcho.memory.threads.delete(ids.thread));
    await step("bob: messages.list of alice's thread", () => bobEcho.memory.messages.list(ids.thread));
    await step("bob: runtime of alice's thread", () => bobEcho.memory.threads.runtime(ids.thread));
    await step("bob: run on alice's thread", () =>
        collect(bobEcho.stream({ threadId: ids.thread, messages: [{ role: "user", content: "x" }] })),
    );
    await step("bob: threads.list", () => bobEcho.memory.threads.list());
    await step("bob: resume alice's run", () => collect(bob.runs.resumeStream({ runId: ids.streamedRun })));
    await step("bob: abort alice's run", () => bob.runs.abort(ids.streamedRun));
    await step("anonymous: threads.list", () => anon.agent("echo").memory.threads.list());
    await step("anonymous: run", () => anon.agent("echo").run({ messages: [{ role: "user", content: "x" }] }));
    await step("forged auth: threads.list", () =>
        createClient({ baseURL: `${base}/api`, fetch: recordingFetch, headers: { authorization: "Bearer a b" } })
            .agent("echo")
            .memory.threads.list(),
    );

    // Deletion.
    await step("threads.delete", () => echo.memory.threads.delete(ids.thread));
    await step("threads.get after delete", () => echo.memory.threads.get(ids.thread));
    await step("threads.delete again", () => echo.memory.threads.delete(ids.thread));
    await step("messages.list after delete", () => echo.memory.messages.list(ids.thread));

    // Bad input, through plain fetch (the client never sends these).
    const raw = (method, path, { body, headers = {} } = {}) =>
        recordingFetch(`${base}/api${path}`, {
            method,
            body,
            headers: { authorization: "Bearer alice", ...headers },
        }).then((response) => response.text().then(() => response.status));
    const json = { "content-type": "application/json" };
    await step("bad: malformed JSON", () => raw("POST", "/echo/run", { body: "{bad", headers: json }));
    await step("bad: JSON that is not an object", () => raw("POST", "/echo/run", { body: "[1]", headers: json }));
    await step("bad: threadId not a string", () =>
        raw("POST", "/echo/run", { body: '{"threadId": 5}', headers: json }),
    );
    await step("bad: unknown agent", () => raw("POST", "/nope/run", { body: "{}", headers: json }));
    await step("bad: unknown agent threads", () => raw("GET", "/nope/threads"));
    await step("bad: wrong method", () => raw("GET", "/echo/run"));
    await step("bad: wrong method on a thread", () => raw("PUT", `/echo/threads/${ids.clientThread}`));
    await step("bad: unknown route", () => raw("GET", "/echo/nothing/here"));
    await step("bad: non-numeric Last-Event-ID", () =>
        raw("GET", `/runs/${ids.slowRun}/stream`, { headers: { "last-event-id": "abc" } }),
    );
    await step("bad: negative Last-Event-ID", () =>
        raw("GET", `/runs/${ids.slowRun}/stream`, { headers: { "last-event-id": "-1" } }),
    );
    await step("bad: thread id with an encoded slash", () => raw("GET", "/echo/threads/a%2Fb"));
    await step("bad: thread id with dots", () => raw("GET", "/echo/threads/..%2F..%2Fetc"));
    await step("bad: run id with an encoded slash", () => raw("GET", "/runs/a%2Fb/stream"));
    await step("bad: body of 2 MiB", () =>
        raw("POST", "/echo/threads", {
            body: JSON.stringify({ title: "x".repeat(2 * 1024 * 1024) }),
            headers: json,
        }),
    );
    await step("bad: form body", () =>
        raw("POST", "/echo/threads", {
            body: "title=x",
            headers: { "content-type": "application/x-www-form-urlencoded" },
        }),
    );
    await step("bad: runtime of an unknown thread", () => raw("GET", "/echo/threads/nope/runtime"));
    await step("bad: messages of an unknown thread", () => raw("GET", "/echo/threads/nope/messages"));
    await step("bad: resume an unknown run", () => raw("GET", "/runs/no-such-run/stream"));

    writeFileSync(out, JSON.stringify({ base, slowChunks, steps }, null, 1));
}

main().then(
    () => process.exit(0),
    (error) => {
        console.error(error);
        process.exit(1);
    },
);
