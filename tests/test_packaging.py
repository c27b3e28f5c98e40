"""Packaging: the backend name resolves through the entry point, only `lemo_compile` is installed at
the top level (passes/ and kernels/ install as lemo_compile.passes / lemo_compile.kernels), and the
`lemo` script runs."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_isolated(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """A fresh interpreter with neither the repository nor the current directory on sys.path (-I):
    modules come from the installed distribution only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_backend_name_resolves_through_the_entry_point(tmp_path):
    p = run_isolated("""
        import sys
        import torch
        assert "lemo_compile" not in sys.modules, "importing torch must not import lemo_compile"
        net = torch.nn.Linear(4, 4)
        compiled = torch.compile(net, backend="lemo", options={"inner": "eager"})
        x = torch.randn(2, 4)
        torch.testing.assert_close(compiled(x), net(x))
        assert "lemo_compile" in sys.modules, "the entry point loaded the backend"
        from lemo_compile.backend import records
        assert len(records()) == 1 and records()[0].left_alone
        print("OK")
    """, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.strip().endswith("OK")


def test_entry_point_declared():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    lemo = [ep for ep in eps if ep.name == "lemo"]
    assert len(lemo) == 1 and lemo[0].value == "lemo_compile.backend:lemo_backend"
    scripts = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "lemo"]
    assert len(scripts) == 1 and scripts[0].value == "lemo_compile.cli:main"


def test_only_lemo_compile_is_a_top_level_module(tmp_path):
    # In a fresh interpreter outside the checkout: run from the repository root, `python -m pytest`
    # puts the root on sys.path, where the egg-info and the passes/ folder would answer instead.
    p = run_isolated("""
        import importlib.metadata, importlib.util, json
        dist = importlib.metadata.distribution("lemo-compile")
        out = {"top_level": dist.read_text("top_level.txt"),
               "files": [str(f) for f in dist.files or []]}
        for name in ("passes", "kernels"):
            spec = importlib.util.find_spec(name)
            out[name] = None if spec is None else (spec.origin or list(spec.submodule_search_locations or []))
        import lemo_compile.passes, lemo_compile.kernels
        out["lemo_compile.passes"] = lemo_compile.passes.__file__
        out["lemo_compile.kernels"] = lemo_compile.kernels.__file__
        print(json.dumps(out))
    """, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    found = json.loads(p.stdout.strip().splitlines()[-1])
    if found["top_level"] is not None:
        assert found["top_level"].split() == ["lemo_compile"]
    for f in found["files"]:  # an editable install lists its finder and .pth, a wheel its modules
        assert Path(f).parts[0] not in ("passes", "kernels"), f
    for name in ("passes", "kernels"):
        # None, or somebody else's package (e.g. Hugging Face `kernels`), never our folder
        where = found[name]
        assert where is None or str(REPO) not in str(where), f"top-level {name!r} resolves to {where}"
    assert Path(found["lemo_compile.passes"]).parent.name == "passes"
    assert Path(found["lemo_compile.kernels"]).parent.name == "kernels"


def test_wheel_holds_only_lemo_compile(tmp_path):
    """Build the wheel (no dependencies, no isolation: setuptools is already installed) and list it."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info behind in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("lemo_compile", "passes", "kernels"):
        shutil.copytree(REPO / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        if (REPO / f).exists():
            shutil.copy(REPO / f, src / f)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("lemo_compile\n")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.skip(f"could not build a wheel here: {p.stderr[-500:]}")
    (wheel,) = (tmp_path / "dist").glob("lemo_compile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"lemo_compile", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for sub in ("passes", "kernels", "testing"):
        assert f"lemo_compile/{sub}/__init__.py" in names
    assert "lemo_compile/cli.py" in names


def test_lemo_help_runs(tmp_path):
    script = Path(sys.executable).parent / "lemo"
    cmds = [[sys.executable, "-m", "lemo_compile.cli", "--help"]]
    if script.exists():
        cmds.append([str(script), "--help"])
    for cmd in cmds:
        p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "explain" in p.stdout and "demo" in p.stdout
    for sub in ("explain", "demo"):
        p = subprocess.run([sys.executable, "-m", "lemo_compile.cli", sub, "--help"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "--seq" in p.stdout, p.stderr[-2000:]
