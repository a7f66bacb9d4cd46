"""The package ships like its peers: `python -m build` makes an sdist and a wheel from the
declared build system (pyproject.toml), and both install into a clean virtual environment
with ``py.typed`` inside and the one version of ``better_agent_peewee.__version__``.

Offline, as CI needs it: the build runs without isolation (setuptools, wheel and build come
from the test extra) and the installs take no dependencies from anywhere (the venv sees the
system's site-packages for peewee, and the package itself only from what was built).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

import better_agent_peewee

ROOT = Path(__file__).resolve().parent.parent
#: The inspector's assets, as the wheel and the sdist must carry them.
ASSETS = {f"better_agent_peewee/inspector/assets/{p.name}"
          for p in (ROOT / "better_agent_peewee" / "inspector" / "assets").iterdir()
          if p.suffix in (".css", ".js")}
#: What a checkout holds that the build reads (the tests, docs and benchmarks are not shipped).
SOURCES = ("better_agent_peewee", "pyproject.toml", "setup.cfg", "setup.py", "README.md")

#: Run inside the venv: where the package was imported from, and what it says about itself.
PROBE = """
import importlib.metadata, json, pathlib, better_agent_peewee as bap
here = pathlib.Path(bap.__file__).parent
print(json.dumps({"file": str(here), "typed": (here / "py.typed").is_file(), "version": bap.__version__,
                  "metadata": importlib.metadata.version("better-agent-peewee"),
                  "follower": hasattr(bap, "Follower"),
                  "assets": sorted(__import__("better_agent_peewee.inspector", fromlist=["ASSETS"]).ASSETS)}))
"""


def _run(args: List[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL", "PIP_FIND_LINKS")}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The sdist and the wheel, built from a copy of the checkout (the build writes build/ and
    *.egg-info beside the sources; the checkout stays as it is)."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    # The default build makes the sdist, then the wheel from the unpacked sdist: a file the
    # sdist leaves out fails the wheel.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(base / "dist"), str(source)], base)
    sdists = list((base / "dist").glob("*.tar.gz"))
    wheels = list((base / "dist").glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted((base / "dist").iterdir())
    return {"base": base, "sdist": sdists[0], "wheel": wheels[0]}


def test_the_version_is_written_once() -> None:
    """setup.cfg reads the version from the package; nothing else spells it."""
    setup_cfg = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    assert "version = attr: better_agent_peewee.__version__" in setup_cfg
    version = better_agent_peewee.__version__
    files = [ROOT / name for name in ("setup.cfg", "setup.py", "pyproject.toml")]
    files += (ROOT / "better_agent_peewee").rglob("*.py")
    spelt = [str(p.relative_to(ROOT)) for p in files
             if any(f in p.read_text(encoding="utf-8") for f in (f'"{version}"', f"= {version}"))]
    assert spelt == ["better_agent_peewee/__init__.py"], spelt


def test_the_build_system_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "[build-system]" in text and 'build-backend = "setuptools.build_meta"' in text


def test_the_sdist_and_the_wheel_carry_the_package_and_py_typed(built: Dict[str, Path]) -> None:
    version = better_agent_peewee.__version__
    assert built["wheel"].name == f"better_agent_peewee-{version}-py3-none-any.whl"
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"better_agent_peewee-{version}.dist-info/METADATA").decode()
    assert "better_agent_peewee/py.typed" in names and "better_agent_peewee/__init__.py" in names
    # The inspector's assets ship inside (it serves them from the installed package alone).
    assert set(ASSETS) <= names, sorted(n for n in names if "inspector" in n)
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "better_agent_peewee").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel (a subpackage not found?): {modules - names}"
    assert f"\nVersion: {version}\n" in metadata and "Requires-Dist: peewee" in metadata
    with tarfile.open(built["sdist"]) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"pyproject.toml", "setup.cfg", "setup.py", "README.md", "better_agent_peewee/py.typed"} <= members
    assert set(ASSETS) <= members


@pytest.mark.parametrize("artifact", ["wheel", "sdist"])
def test_each_artifact_installs_in_a_clean_venv(built: Dict[str, Path], artifact: str) -> None:
    """Installed from the artifact alone (no index, no dependencies fetched), the package imports
    from the venv, not from the checkout, with its py.typed, version and console script."""
    target = built["base"] / f"venv-{artifact}"
    # The system's site-packages give peewee (and setuptools to build the sdist); the package
    # itself comes only from the artifact (--ignore-installed: not the checkout's own install).
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(target)
    python = str(target / "bin" / "python")
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed",
          "--no-build-isolation", str(built[artifact])], built["base"])
    found = json.loads(_run([python, "-c", PROBE], built["base"]).strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(target), found
    assert found == {"file": found["file"], "typed": True, "version": better_agent_peewee.__version__,
                     "metadata": better_agent_peewee.__version__, "follower": True,
                     "assets": ["inspector.css", "inspector.js"]}
    out = _run([str(target / "bin" / "better-agent-peewee"), "--version"], built["base"])
    assert better_agent_peewee.__version__ in out
