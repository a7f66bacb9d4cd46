"""Thread state across the two engines: Better Agent's own (TypeScript) and `storage.runs.track`.

    python tools/state_interop/run.py /tmp/ba            # a checkout of better-agent/better-agent

Outside CI (it needs the checkout, Node 20 and npm, as tools/differential does, whose build
directory it shares: ``--work``, default /tmp/ba-diff). Both directions of issue 20's
"a thread whose state one side wrote is the other's next input state":

1. a Python run writes the state (`track(state=...)`, `run.set_state`, `run.finish(state=...)`)
   into a SQLite file; the thread record read back from it seeds Better Agent's storage, and
   its engine's next run on the thread (``app.agent(name).run({threadId})``) must start from,
   and end with, that state;
2. Better Agent's engine runs with an input state on a new thread; the thread record it leaves
   is stored through this package, and a Python run on the thread must read it as `run.state`.

The rows themselves are the same on both sides (tests/test_state.py restates the kysely
adapter's reading of them); this checks the engines' behaviour around them. Exit 0 when both
hold.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from better_agent_peewee import create_tables, open_database, peewee_storage  # noqa: E402


def _differential() -> Any:
    """tools/differential/run.py, for its npm dependency list."""
    spec = importlib.util.spec_from_file_location("differential_run", HERE.parent / "differential" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bundle(checkout: Path, work: Path) -> Path:
    """engine_run.mjs bundled with the checkout's core (npm-installing esbuild and its deps once)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "node_modules" / ".bin" / "esbuild").exists():
        (work / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                        *_differential().npm_dependencies(checkout)], cwd=work, check=True, timeout=600)
    out = work / "engine_run.bundle.mjs"
    packages = checkout / "packages"
    core, shared = packages / "core" / "src" / "index.ts", packages / "shared" / "src"
    subprocess.run([str(work / "node_modules" / ".bin" / "esbuild"), str(HERE / "engine_run.mjs"), "--bundle",
                    "--platform=node", "--format=esm", "--target=node20", "--log-level=warning",
                    f"--outfile={out}", f"--alias:@better-agent/core={core}",
                    f"--alias:@better-agent/shared={shared}"],
                   cwd=work, env=dict(os.environ, NODE_PATH=str(work / "node_modules")), check=True,
                   timeout=300)
    return out


def engine_run(bundled: Path, work: Path, threads: List[Dict[str, Any]], thread_id: str,
               input_state: Optional[Any] = None) -> Dict[str, Any]:
    """One run of Better Agent's engine on `thread_id`, its storage seeded with `threads`."""
    seed: Dict[str, Any] = {"threads": threads, "threadId": thread_id}
    if input_state is not None:
        seed["inputState"] = input_state
    (work / "seed.json").write_text(json.dumps(seed))
    subprocess.run(["node", str(bundled), str(work / "seed.json"), str(work / "out.json")], check=True,
                   timeout=60)
    result: Dict[str, Any] = json.loads((work / "out.json").read_text())
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/state_interop/run.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of better-agent/better-agent")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ba-diff"), help="npm installs and bundles")
    args = parser.parse_args(argv)
    bundled = bundle(args.checkout, args.work)
    with tempfile.TemporaryDirectory() as folder:
        storage = peewee_storage(open_database(f"sqlite:///{folder}/state.db"))
        create_tables(storage.database)
        with storage.runs.track("py-1", "support", thread_id="t1", state={"step": 1}) as run:
            run.set_state({"step": 2, "cart": ["tea"]})
            run.finish({"finishReason": "stop"}, state={"step": 3, "cart": ["tea", "milk"]})
        out = engine_run(bundled, args.work, [storage.get("memoryThreads", "t1")], "t1")
        print(f"1. Better Agent's run on a thread Python wrote: result.state={out['resultState']}, "
              f"thread.state={out['thread'].get('state')}")
        first = out["resultState"] == out["thread"].get("state") == {"step": 3, "cart": ["tea", "milk"]}

        out = engine_run(bundled, args.work, [], "t2", input_state={"from": "typescript", "n": 7})
        storage.set("memoryThreads", "t2", out["thread"])
        with storage.runs.track("py-2", "support", thread_id="t2") as run:
            read = run.state
        print(f"2. Python's run on a thread Better Agent wrote: run.state={read}")
        second = read == {"from": "typescript", "n": 7}
    print("both hold" if first and second else "MISMATCH")
    return 0 if first and second else 1


if __name__ == "__main__":
    sys.exit(main())
