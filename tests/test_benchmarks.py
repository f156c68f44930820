"""Smoke test of the benchmark suite: ``python -m benchmarks --tiny`` produces well-formed results.

Nothing is timed or compared here (speed is measured in ``benchmarks/``, never asserted in tests);
the suite runs in a subprocess so its import order (numpyro's KL table is snapshotted before
vi_engine is imported) and its jax settings stay its own.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEVER = "never reached"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    return proc, out


def _numbers_ok(x, path="$"):
    """Every number finite; the only strings standing for numbers are 'never reached'/'inf'."""
    if isinstance(x, dict):
        for k, v in x.items():
            _numbers_ok(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _numbers_ok(v, f"{path}[{i}]")
    elif isinstance(x, float):
        assert math.isfinite(x), f"non-finite number at {path}"


def test_exit_code_and_table(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("accuracy", "throughput", "fit_many", "kl", "posteriordb",
                 "acceptance numbers"):
        assert f"== {name}" in proc.stdout
    assert "[bench" in proc.stderr  # progress lines


def test_json_well_formed(tiny_run):
    _, out = tiny_run
    files = glob.glob(str(out / "*.json"))
    assert len(files) == 1
    with open(files[0]) as f:
        res = json.load(f)  # strict JSON: allow_nan=False when written
    for key in ("timestamp", "mode", "machine", "settings", "cases", "wall_seconds"):
        assert key in res
    assert res["mode"] == "tiny"
    m = res["machine"]
    for key in ("platform", "cpu_count", "jax_backend", "versions"):
        assert key in m
    assert m["versions"]["jax"] and m["versions"]["numpyro"]
    names = [c["name"] for c in res["cases"]]
    assert names == ["accuracy", "throughput", "fit_many", "kl", "flows", "posteriordb"]
    for case in res["cases"]:
        assert "error" not in case, case.get("error")
        t = case["table"]
        assert t["rows"] and all(len(r) == len(t["columns"]) for r in t["rows"])
        for c in case["checks"]:
            assert {"name", "value", "bar", "pass"} <= set(c)
        _numbers_ok(case["data"], case["name"])

    acc = res["cases"][0]["data"]["problems"]
    assert acc and all(p["runs"] for p in acc)
    for p in acc:
        for r in p["runs"]:
            assert isinstance(r["kl_final"], float) or r["kl_final"] == "inf"
            for level in r["reached"].values():
                assert level == NEVER or (
                    isinstance(level["seconds_cold"], float) and level["seconds_cold"] >= 0
                )
            assert len(r["curve"]["seconds"]) == len(r["curve"]["kl"]) >= 1
    thr = res["cases"][1]["data"]["sizes"][0]["methods"]
    assert {"vi_engine", "hand-written scan", "numpyro SVI scan"} <= set(thr)
    assert all(v["steps_per_s"] > 0 and v["elbo_evals_per_s"] > 0 for v in thr.values())
    kl = res["cases"][3]["data"]
    assert kl["diag"]["vi_engine"]["pairs_per_s"] > 0 and kl["mvn"]["vi_engine"]["pairs_per_s"] > 0
    pdb = res["cases"][5]["data"]
    if "skipped" not in pdb:  # the reference lies outside a clean clone
        ark = pdb["posteriors"]["arK-arK"]
        assert set(ark) == {"vi_engine", "vi_engine plain", "vi_engine laplace", "numpyro"}
        assert all(e["compare"]["max_abs_z"] >= 0 and e["seconds"] > 0 for e in ark.values())


def test_markdown_and_plots(tiny_run):
    _, out = tiny_run
    md = glob.glob(str(out / "*.md"))
    assert len(md) == 1
    text = open(md[0]).read()
    assert "## accuracy" in text and "| problem |" in text
    pngs = glob.glob(str(out / "*.png"))
    assert pngs
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.basename(p) in text


def test_only_and_bad_name():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown case" in proc.stderr


@pytest.mark.parametrize("args", [["vi_engine", "fullrank"],
                                  ["jax", "fullrank", "0.05", "1200", "jit"],
                                  ["jax", "fullrank", "0.05", "1200", "fast"],
                                  ["jax", "fullrank", "0.05", "1200", "fast", "numpyro"]])
def test_whole_process_script(args):
    """The whole-process runs of the suite (off in --tiny): vi_engine with its defaults, and the
    hand-written floor reference with the settings the suite uses, both reach KL <= 1e-3."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "_process.py"), "500", "20", *args],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["lib"] == args[0] and (res["n"], res["d"]) == (500, 20)
    assert 0 < res["import_seconds"] < res["seconds"]
    assert 0 <= res["kl"] <= 1e-3, res
    # vi_engine's posteriors are numpyro distributions; the floor imports numpyro only if asked.
    assert res["numpyro_imported"] == (args[0] == "vi_engine" or "numpyro" in args)
