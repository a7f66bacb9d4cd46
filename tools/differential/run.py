"""The differential run: Better Agent's own client against its own server and against ours.

    python tools/differential/run.py /path/to/better-agent-checkout [--work /tmp/ba-diff]
        [--report report.md] [--only reference|python] [--keep-records]

Outside CI, on purpose: it needs a checkout of better-agent/better-agent (its code is not ours
to copy, and CI cannot reach it) and npm. It installs esbuild and the reference's runtime
dependencies with npm into the work directory (never into this repository), bundles

* `reference_server.mjs` with the checkout's packages/core/src (the reference server: Better
  Agent's app and HTTP handler, in-memory storage, two agents on a scripted model), and
* `scenario.mjs` with the checkout's packages/client/src (`createClient`),

then runs the scenario against the reference server and against `python_server.py` (our
`wsgi_app` on SQLite with Python agents emitting the same events), and compares the two
records step by step. The reference decides what is right; each step is reported as matching,
differing as the issue asks (see EXPECTED), or differing. Ids and millisecond timestamps are
normalised (an id becomes `<id#N>` by order of first appearance, a timestamp `<ms>`), nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Pattern, Set, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

#: The scripted model of both servers: `echo` answers at once, `slow` one chunk every delayMs.
SCRIPT: Dict[str, Any] = {
    "agents": {
        "echo": {"chunks": ["Hello", ", ", "world"]},
        "slow": {"chunks": [f"w{i} " for i in range(20)], "delayMs": 150},
    }
}

#: Steps where Python answers differently from the reference on purpose, and why: what issue 21
#: asks for, or a choice listed in docs/server.md ("Where this server differs ...").
EXPECTED: Dict[str, str] = {
    "resume the non-streamed run": "docs/server.md: a JSON run also writes its stream (the reference "
                                   "writes none and answers an error frame)",
    "strict: the dropped run ended aborted": "docs/server.md: a WSGI app notices the client's "
                                             "disconnect at its next write, not at once",
    "bad: thread id with an encoded slash": "docs/server.md: path segments are percent-decoded",
    "bad: thread id with dots": "docs/server.md: path segments are percent-decoded",
    "bad: run id with an encoded slash": "docs/server.md: path segments are percent-decoded",
    "bad: malformed JSON": "the reference (better-call) answers 400 with a body that is not problem "
                           "details; issue 21 asks for problem details",
    "bad: wrong method": "the reference answers 404 with no body; issue 21 asks for 405 and problem details",
    "bad: wrong method on a thread": "as above: 405 with problem details",
    "bad: unknown route": "the reference answers 404 with no body; ours adds problem details",
    "bad: body of 2 MiB": "the reference has no body limit (201); issue 21 asks for a documented "
                          "limit (413 with problem details)",
}

ID_KEYS = {"id", "runId", "threadId", "messageId", "parentMessageId", "toolCallId", "x-run-id"}
MS_KEYS = {"timestamp", "createdAt", "updatedAt", "startedAt", "finishedAt", "abortRequestedAt"}
#: Hop-by-hop: the HTTP server's business, which a WSGI application may not set (PEP 3333).
IGNORED_HEADERS = {"connection"}
#: Ids the scenario chooses itself: kept as they are.
FIXED_IDS = {"", "client-chosen-thread", "no-such-run", "nope", "a%2Fb", "a/b", "..%2F..%2Fetc", "../../etc"}


# -- building ----------------------------------------------------------------------------------------

def npm_dependencies(checkout: Path) -> List[str]:
    """The reference's runtime dependencies (core's and shared's), as `name@range` for npm."""
    specs = ["esbuild"]
    for package in ("core", "shared"):
        meta = json.loads((checkout / "packages" / package / "package.json").read_text())
        for name, version in sorted((meta.get("dependencies") or {}).items()):
            if not version.startswith("workspace:"):
                specs.append(f"{name}@{version}")
    return specs


def build(checkout: Path, work: Path) -> None:
    """npm-installs esbuild and the dependencies into `work`, then bundles both entry points."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "node_modules" / ".bin" / "esbuild").exists():
        (work / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                        *npm_dependencies(checkout)], cwd=work, check=True, timeout=600)
    packages = checkout / "packages"
    aliases = {
        "@better-agent/core": packages / "core" / "src" / "index.ts",
        "@better-agent/shared": packages / "shared" / "src",
        "@better-agent/client": packages / "client" / "src" / "create-client.ts",
    }
    env = dict(os.environ, NODE_PATH=str(work / "node_modules"))
    for entry in ("reference_server", "scenario"):
        subprocess.run([str(work / "node_modules" / ".bin" / "esbuild"), str(HERE / f"{entry}.mjs"),
                        "--bundle", "--platform=node", "--format=esm", "--target=node20",
                        "--log-level=warning", f"--outfile={work / (entry + '.bundle.mjs')}",
                        *(f"--alias:{name}={path}" for name, path in aliases.items())],
                       cwd=work, env=env, check=True, timeout=300)


# -- serving and recording ---------------------------------------------------------------------------

class Server:
    """A server process printing `listening <url>` on its first line; stopped on exit."""

    def __init__(self, argv: List[str], cwd: Path, log: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the process exits (EOF) if it cannot start
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"{argv[:2]} did not start (see {log}): {line!r}")
        self.url = line.split()[1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def record(work: Path, base: str, out: Path) -> Dict[str, Any]:
    """Runs the scenario bundle against `base` and returns its record."""
    subprocess.run(["node", str(work / "scenario.bundle.mjs"), f"--base={base}", f"--out={out}",
                    f"--script={json.dumps(SCRIPT)}"], cwd=work, check=True, timeout=600)
    data: Dict[str, Any] = json.loads(out.read_text())
    return data


def run_side(side: str, work: Path, db_dir: Path, package_root: Path = REPO) -> Dict[str, Any]:
    """Starts one side's server, runs the scenario against it, stops it."""
    if side == "reference":
        argv = ["node", str(work / "reference_server.bundle.mjs"), "--port=0",
                f"--script={json.dumps(SCRIPT)}"]
        env = None
    else:
        argv = [sys.executable, str(HERE / "python_server.py"), "--port=0",
                f"--script={json.dumps(SCRIPT)}", f"--database={db_dir / 'differential.sqlite'}"]
        env = dict(os.environ, PYTHONPATH=str(package_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = Server(argv, work, work / f"{side}.log", env)
    try:
        return record(work, server.url, work / f"{side}.json")
    finally:
        server.stop()


# -- normalising and comparing -----------------------------------------------------------------------

def _walk(value: Any, key: Optional[str] = None) -> Iterator[Tuple[Optional[str], Any]]:
    yield key, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)


def id_shape(value: str) -> str:
    """`thread_<uuid>`-style shape of an id, for the one-line id format summary."""
    shape = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>", value)
    shape = re.sub(r"[0-9a-f]{16,}", "<hex>", shape)
    return re.sub(r"\d{6,}", "<n>", shape)


def normalise(recorded: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """The steps with ids replaced by `<id#N>` and timestamps by `<ms>`.

    An id is a string under an id key (`id`, `runId`, ...) anywhere in the record; it is then
    also replaced where it occurs inside a longer string (a path, a problem's detail). Ids are
    numbered by first appearance within each step, so that one extra id in one step does not
    shift the names of every later one.
    """
    shapes: Dict[str, int] = {}
    ids = set()
    for key, value in _walk(recorded["steps"]):
        # An SSE frame's `id:` is a sequence number (all digits), not an id to rename.
        if key in ID_KEYS and isinstance(value, str) and value not in FIXED_IDS and not value.isdigit():
            if value not in ids:
                shapes[id_shape(value)] = shapes.get(id_shape(value), 0) + 1
            ids.add(value)
    # Inside longer strings only ids long enough not to occur by chance.
    long_ids = sorted((v for v in ids if len(v) >= 8), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(v) for v in long_ids)) if long_ids else None
    return [_normalise_step(step, ids, pattern) for step in recorded["steps"]], shapes


def _normalise_step(step: Dict[str, Any], ids: Set[str], pattern: Optional[Pattern[str]]) -> Dict[str, Any]:
    order: Dict[str, str] = {}

    def name(value: str) -> str:
        return order.setdefault(value, f"<id#{len(order) + 1}>")

    def fix(value: Any, key: Optional[str] = None) -> Any:
        if isinstance(value, dict):
            return {k: (v if k == "name" else fix(v, k)) for k, v in value.items()
                    if k != "ms" and not (key == "headers" and k in IGNORED_HEADERS)}
        if isinstance(value, list):
            return [fix(v, key) for v in value]
        if key in MS_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            return "<ms>" if 1e12 < value < 1e14 else f"<not ms: {value}>"
        if isinstance(value, str) and value in ids:
            return name(value)
        if isinstance(value, str) and pattern is not None:
            return pattern.sub(lambda m: name(m.group(0)), value)
        return value

    fixed: Dict[str, Any] = fix(step)
    return fixed


def diff(ref: Any, got: Any, path: str = "") -> List[str]:
    """Where `got` differs from `ref`, one line per difference (lists: each index, then length)."""
    if isinstance(ref, dict) and isinstance(got, dict):
        out: List[str] = []
        for key in ref:
            if key not in got:
                out.append(f"{path}.{key}: missing (reference: {short(ref[key])})")
            else:
                out += diff(ref[key], got[key], f"{path}.{key}")
        out += [f"{path}.{key}: extra {short(got[key])}" for key in got if key not in ref]
        return out
    if isinstance(ref, list) and isinstance(got, list):
        out = []
        for index, (r, g) in enumerate(zip(ref, got)):
            out += diff(r, g, f"{path}[{index}]")
        if len(ref) != len(got):
            first = (got if len(got) > len(ref) else ref)[min(len(ref), len(got))]
            out.append(f"{path}: {len(got)} items, reference {len(ref)} (first odd one: {short(first)})")
        return out
    if ref != got or type(ref) is not type(got):
        return [f"{path}: {short(got)} (reference: {short(ref)})"]
    return []


def short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def compare(ref: Dict[str, Any], got: Dict[str, Any]) -> Tuple[str, int]:
    """A markdown report of the comparison, and how many steps differ unexpectedly."""
    ref_steps, ref_shapes = normalise(ref)
    got_steps, got_shapes = normalise(got)
    by_name = {step["name"]: step for step in got_steps}
    lines = ["| step | result |", "|---|---|"]
    details: List[str] = []
    unexpected = 0
    for step in ref_steps:
        name = step["name"]
        other = by_name.get(name)
        problems = ["step missing"] if other is None else diff(step, other)
        if not problems:
            lines.append(f"| {name} | match |")
            continue
        if name in EXPECTED:
            lines.append(f"| {name} | differs on purpose: {EXPECTED[name]} |")
        else:
            unexpected += 1
            lines.append(f"| {name} | **differs** ({len(problems)}) |")
        details.append(f"\n### {name}\n")
        details += [f"- `{p}`" for p in problems[:40]]
        if len(problems) > 40:
            details.append(f"- ... {len(problems) - 40} more")
    head = [f"# Differential run: {len(ref_steps)} steps, {unexpected} differ unexpectedly\n",
            f"Id shapes, reference: {ref_shapes}", f"Id shapes, Python: {got_shapes}\n"]
    return "\n".join(head + lines + ["\n## Differences"] + details) + "\n", unexpected


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of better-agent/better-agent")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ba-diff",
                        help="npm installs, bundles, logs and records go here (default: %(default)s)")
    parser.add_argument("--report", type=Path, help="write the markdown report here too")
    parser.add_argument("--only", choices=["reference", "python"], help="record one side only")
    parser.add_argument("--no-build", action="store_true", help="reuse the bundles in --work")
    parser.add_argument("--package-root", type=Path, default=REPO,
                        help="import better_agent_peewee from this checkout (default: this one)")
    args = parser.parse_args(argv)
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on PATH")
    if not (args.checkout / "packages" / "core" / "src" / "app" / "handler.ts").exists():
        parser.error(f"{args.checkout} is not a better-agent checkout (no packages/core/src/app/handler.ts)")
    if not args.no_build:
        build(args.checkout.resolve(), args.work)
    records: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as db_dir:
        for side in ("reference", "python"):
            if args.only in (None, side):
                started = time.monotonic()
                records[side] = run_side(side, args.work, Path(db_dir), args.package_root.resolve())
                print(f"{side}: {len(records[side]['steps'])} steps in {time.monotonic() - started:.1f} s",
                      file=sys.stderr)
    if len(records) < 2:
        return 0
    report, unexpected = compare(records["reference"], records["python"])
    print(report)
    if args.report:
        args.report.write_text(report)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
