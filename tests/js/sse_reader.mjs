// A reader of Better Agent's SSE wire for Node (20+: built-in fetch and web streams, no packages),
// written from the framing rules of Better Agent's client (packages/client/src/core/sse.ts), so that
// tests/test_server_js.py can check what that client would make of our server's bytes:
//
// * the body is UTF-8, decoded across chunk boundaries; lines end at "\n", one "\r" before it is
//   dropped;
// * "event:", "id:" and "data:" lines set the frame's event name, id (a number; anything else
//   clears it) and data (each data line, trimmed, appended with a "\n"); every other line,
//   comments (":" heartbeats) included, is ignored;
// * a blank line ends a frame: a frame with no data is dropped; otherwise its final "\n" is cut,
//   an `error` frame is a failure (its data, problem details, ends the stream), and any other
//   frame's data is one JSON event, given `seq` = the frame's id when it has one;
// * the end of the body ends the stream: a last frame without its blank line still counts, a
//   last line without its "\n" does not.
//
// The page of tests/test_server_js.py imports `createFrameReader` from this file in Chromium.
//
// Usage: node sse_reader.mjs '<request JSON>' where the request is
//   {url, method?, headers?, body?, dropAfter?, timeoutMs?}
// Prints one JSON line per item: {"status", "headers"} first, then {"event"} per event or
// {"error"} for an error frame, or {"body"} for a response that is not an event stream, and
// last {"end": "closed" | "dropped" | "error" | "timeout"}.

const print = (item) => process.stdout.write(`${JSON.stringify(item)}\n`);

export function createFrameReader() {
    let buffer = "";
    let frame = { data: "" };
    const decoder = new TextDecoder();

    const dispatch = () => {
        const done = frame;
        frame = { data: "" };
        if (done.data.length === 0) {
            return null;
        }
        const data = done.data.endsWith("\n") ? done.data.slice(0, -1) : done.data;
        if (done.event === "error") {
            let problem;
            try {
                problem = JSON.parse(data);
            } catch {
                problem = { detail: data.trim() || "Stream failed." };
            }
            return { error: problem };
        }
        const event = JSON.parse(data);
        if (done.id !== undefined && event && typeof event === "object") {
            return { event: { ...event, seq: done.id } };
        }
        return { event };
    };

    const line = (text) => {
        if (text === "") {
            return dispatch();
        }
        const field = (name) => (text.startsWith(`${name}:`) ? text.slice(name.length + 1).trim() : null);
        const event = field("event");
        const id = field("id");
        const data = field("data");
        if (event !== null) {
            frame.event = event;
        } else if (id !== null) {
            const number = Number(id);
            frame.id = Number.isFinite(number) ? number : undefined;
        } else if (data !== null) {
            frame.data += `${data}\n`;
        }
        return null;
    };

    return {
        // Feeds bytes; returns the items (events or one error) the completed frames give.
        push(bytes) {
            buffer += decoder.decode(bytes, { stream: true });
            const items = [];
            for (let newline = buffer.indexOf("\n"); newline >= 0; newline = buffer.indexOf("\n")) {
                const text = buffer.slice(0, newline).replace(/\r$/, "");
                buffer = buffer.slice(newline + 1);
                const item = line(text);
                if (item) {
                    items.push(item);
                }
            }
            return items;
        },
        // The end of the body ends the frame being read; a last line without its "\n" is not a
        // line, and is dropped (as the client drops it).
        end() {
            buffer = "";
            const last = dispatch();
            return last ? [last] : [];
        },
    };
}

async function main(request) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort("timeout"), request.timeoutMs ?? 60000);
    let count = 0;
    let ended = false;
    const end = (how) => {
        ended = true;
        print({ end: how });
    };
    try {
        const response = await fetch(request.url, {
            method: request.method ?? "GET",
            headers: request.headers ?? {},
            body: request.body === undefined ? undefined : request.body,
            signal: controller.signal,
        });
        print({ status: response.status, headers: Object.fromEntries(response.headers) });
        if (!(response.headers.get("content-type") ?? "").includes("text/event-stream")) {
            print({ body: await response.text() });
            end("closed");
            return;
        }
        const reader = createFrameReader();
        for await (const chunk of response.body) {
            for (const item of reader.push(chunk)) {
                print(item);
                if (item.error) {
                    end("error");
                    controller.abort("error frame");
                    return;
                }
                count += 1;
                if (request.dropAfter !== undefined && count >= request.dropAfter) {
                    end("dropped");
                    controller.abort("drop");
                    return;
                }
            }
        }
        for (const item of reader.end()) {
            print(item);
            if (item.error) {
                end("error");
                return;
            }
        }
        end("closed");
    } catch (error) {
        if (!ended) {
            print({ end: controller.signal.reason === "timeout" ? "timeout" : "error", message: String(error) });
        }
    } finally {
        clearTimeout(timer);
    }
}

// Run as a script by Node; imported (by Node or by a browser page) it only exports createFrameReader.
const isMain =
    typeof process !== "undefined" &&
    process.argv?.[1] !== undefined &&
    import.meta.url === new URL(`file://${process.argv[1]}`).href;
if (isMain) {
    main(JSON.parse(process.argv[2])).then(() => process.exit(0));
}
