// better-agent-peewee inspector: the live timeline of a run. Hand-written, no library.
// It reads the run's events from the mounted HTTP route (GET /api/runs/:id/stream, Server-Sent
// Events) after the last seq the page shows, and appends each as a row. Text goes in through
// textContent only: a stored string never becomes markup.
"use strict";
(function () {
  const list = document.getElementById("timeline");
  const status = document.getElementById("live-status");
  if (!list || !status || list.dataset.live !== "1") return;
  let last = Number(list.dataset.lastSeq || "0");
  const start = list.dataset.startMs ? Number(list.dataset.startMs) : null;

  function duration(ms) {
    if (ms < 1000) return Math.round(ms) + " ms";
    const s = ms / 1000;
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + Math.floor(s % 60) + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  function span(cls, text) {
    const el = document.createElement("span");
    el.className = cls;
    el.textContent = text;
    return el;
  }

  function append(event) {
    const li = document.createElement("li");
    li.className = "event new";
    li.dataset.seq = String(event.seq);
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    // An event without a timestamp of its own is placed at its arrival (within a second of its append).
    const stamp = typeof event.timestamp === "number" ? event.timestamp : Date.now();
    const at = start !== null ? "+" + duration(Math.max(stamp - start, 0)) : "";
    summary.append(span("seq", String(event.seq)), " ", span("type", String(event.type || "?")), " ",
                   span("offset", at));
    const pre = document.createElement("pre");
    pre.className = "json";
    const shown = Object.assign({}, event);
    delete shown.seq;
    pre.textContent = JSON.stringify(shown, null, 2);
    details.append(summary, pre);
    li.append(details);
    list.append(li);
    last = event.seq;
  }

  function handle(frame) {
    let name = "message";
    const data = [];
    for (const line of frame.split("\n")) {
      if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      else if (line.startsWith("event:")) name = line.slice(6).trim();
    }
    if (!data.length) return;
    const value = JSON.parse(data.join("\n"));
    if (name === "error") {
      status.textContent = "stopped: " + (value.detail || value.title || "error");
      return;
    }
    if (typeof value.seq === "number" && value.seq > last) append(value);
  }

  async function follow() {
    status.textContent = "following…";
    const response = await fetch(list.dataset.stream, {
      headers: { "Accept": "text/event-stream", "Last-Event-ID": String(last) },
      credentials: "same-origin",
    });
    if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
    status.textContent = "live";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        handle(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
    if (!status.textContent.startsWith("stopped")) status.textContent = "ended (reload for the final record)";
  }

  follow().catch(function (error) {
    status.textContent = "not live: " + error.message;
  });
})();
