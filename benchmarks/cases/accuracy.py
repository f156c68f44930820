"""Accuracy against exact posteriors and time to accuracy.

For each exact problem and family: KL(q‖p*) reached, the gap log p(D) − ELBO, and KL(q‖p*) against
wall time, for vi_engine (defaults), NumPyro SVI (defaults and tuned), BlackJAX (a small grid of
settings; the best is named) and Pathfinder. The closed-form posterior's own time is the floor.

Levels: KL ≤ 1e-2 and ≤ 1e-3, or, for mean-field on a Gaussian posterior, the mean-field optimum
(variances 1/Λ_ii) + 1e-2 / + 1e-3. Time to a level is "compile included" (first run in this
process: tracing, compiling, running; KL evaluations excluded) and "steady" (the same run again).

vi_engine's curve: ``vi.fit`` with the default stopping rule and a step cap k follows the very
same trajectory as the uncapped default fit up to step k, so fitting with caps 100, 200, 400, ...
(each a complete call: init, loop, final ELBO) traces KL against time with no engine changes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np

from benchmarks import methods, problems
from benchmarks.config import THRESHOLDS
from benchmarks.gauss import gaussian_moments, kl_to_exact, meanfield_optimum
from benchmarks.timing import block, log, measure, now

NAME = "accuracy"


def _problem(name, cfg):
    if name == "linreg":
        return problems.linear_regression(**cfg["linreg"])
    if name == "gauss2d":
        return problems.correlated_gaussian(0.9)
    return problems.generated(name)


def _levels(floor):
    base = floor or 0.0
    return {k: base + v for k, v in THRESHOLDS.items()}


def _floor(problem, family):
    """KL of the best q in ``family`` when known in closed form, else None."""
    mom = gaussian_moments(problem.posterior)
    if mom is None:
        return None
    if family == "meanfield":
        return meanfield_optimum(*mom)[2]
    if family == "fullrank" or problem.dim == 1:
        return 0.0
    return None


def _engine(problem, family, cfg, levels):
    import vi_engine as vi

    key = jax.random.key(0)
    target = problem.target
    run = lambda **kw: vi.fit(target, family, key=key, progress=False, **kw)
    t0 = now()
    res = run()
    block(res.params)
    cold = now() - t0
    t0 = now()
    res = run()
    block(res.params)
    steady = now() - t0
    kl, kl_se = kl_to_exact(res.posterior, problem.posterior)
    elbo = float(res.elbo.mean)
    curve = []
    for k in cfg["engine_checkpoints"]:
        if k >= res.num_steps:
            break
        # Timed warm, as the full run's "steady": a cap that is not a whole number of the
        # stopping rule's windows (k=100) runs a step-masked variant, compiled on first use.
        block(run(num_steps=k).params)
        t0 = now()
        r = run(num_steps=k)
        block(r.params)
        curve.append((now() - t0, k, kl_to_exact(r.posterior, problem.posterior)[0]))
    curve.append((steady, int(res.num_steps), kl))
    # Each checkpoint is a separate call, so noise can make a longer run look faster: the
    # curve's clock is made monotone (a run to step k is charged at least a shorter run's time).
    mono = np.maximum.accumulate([c[0] for c in curve])
    curve = [(float(t), k, v) for t, (_, k, v) in zip(mono, curve, strict=True)]
    offset = max(cold - steady, 0.0)  # compile and first-call overhead
    out = {
        "method": "vi_engine",
        "family": family,
        "settings": {"call": f"vi.fit(target, {family!r}, key=key, progress=False)",
                     "defaults": "the family's defaults (optimizer, draws, STL ELBO, stopping "
                                 "rule); see vi_engine/fit.py at the recorded commit"},
        "grads_per_step": 1,
        "curve": {"seconds": [c[0] + offset for c in curve], "steps": [c[1] for c in curve],
                  "kl": [c[2] for c in curve], "seconds_steady": [c[0] for c in curve]},
        "kl_final": kl,
        "kl_stderr": kl_se,
        "kl_best": min(c[2] for c in curve),
        "steps_run": int(res.num_steps),
        "status": res.status,
        "seconds_total": cold,
        "seconds_steady_total": steady,
        "elbo": elbo,
        "elbo_stderr": float(res.elbo.stderr),
        "reached": {},
    }
    if problem.log_evidence is not None:
        out["gap_logZ_minus_elbo"] = problem.log_evidence - elbo
    if family == "meanfield":
        out["variances"] = np.diag(gaussian_moments(res.posterior)[1]).tolist()
    for label, level in levels.items():
        hit = next((c for c in curve if c[2] <= level), None)
        out["reached"][label] = None if hit is None else {
            "level": level, "seconds_cold": hit[0] + offset, "seconds_steady": hit[0],
            "steps": hit[1]}
    return out


def _baselines(problem, family, cfg, levels, bj_version):
    runs = []
    chunk, max_steps = cfg["chunk_steps"], cfg["max_steps"]
    variants = [False] + ([True] if cfg["numpyro_tuned"] else [])
    for tuned in variants:
        m = methods.numpyro_method(problem, family, chunk_steps=chunk, tuned=tuned,
                                   max_steps=max_steps)
        log(f"  {problem.name} {family}: {m.name}")
        runs.append(methods.run_trajectory(m, problem, max_steps=max_steps, targets=levels))
    if bj_version and family in ("meanfield", "fullrank"):
        for ns, lr in cfg["blackjax_grid"].get(family, []):
            m = methods.blackjax_method(problem, family, chunk_steps=chunk, lr=lr,
                                        num_samples=ns)
            log(f"  {problem.name} {family}: {m.name} num_samples={ns} lr={lr}")
            runs.append(methods.run_trajectory(m, problem, max_steps=max_steps, targets=levels))
    return runs


def _t(r, label, kind):
    hit = r["reached"].get(label)
    return None if hit is None else hit.get(f"seconds_{kind}")


def _tt(r, label, kind):
    return "never reached" if r["reached"].get(label) is None else _t(r, label, kind)


def run(cfg, ctx) -> dict:
    cfg = cfg["accuracy"]
    bj = ctx["blackjax"]
    out_problems, errors = [], []
    for pname in cfg["baseline_problems"] + cfg["engine_problems"]:
        try:
            out_problems.append(_one_problem(pname, cfg, bj))
        except Exception:  # noqa: BLE001  one failing problem must not sink the case
            import traceback

            log(f"accuracy: {pname} FAILED\n{traceback.format_exc()}")
            errors.append({"problem": pname, "error": traceback.format_exc()})
    if not out_problems:
        raise RuntimeError("accuracy: every problem failed: " + errors[0]["error"])
    return _summarize(out_problems, errors, cfg, ctx)


def _one_problem(pname, cfg, bj):
    with_baselines = pname in cfg["baseline_problems"]
    p = _problem(pname, cfg)
    log(f"accuracy: {p.name} (dim {p.dim}, {p.source})")
    steady_build = measure(p.rebuild, repeat=3, warmup=0)["median"] if p.rebuild else None
    mom = gaussian_moments(p.posterior)
    entry = {
        "problem": p.name, "dim": p.dim, "source": p.source, "settings": p.settings,
        "log_evidence": p.log_evidence, "gaussian_posterior": mom is not None,
        "exact_seconds_cold": p.build_seconds, "exact_seconds_steady": steady_build,
        "runs": [],
    }
    if mom is not None and p.dim > 1:
        _, var_mf, kl_mf = meanfield_optimum(*mom)
        entry["meanfield_optimum"] = {"variances": var_mf.tolist(), "kl": kl_mf}
    for fam in cfg["families"]:
        if (fam == "lowrank" and p.dim <= 2) or (fam != "meanfield" and p.dim == 1):
            continue  # low rank on <= 2 dims is full rank; in 1-D all Gaussian families agree
        floor = _floor(p, fam)
        levels = _levels(floor)
        log(f"  {p.name} {fam}: vi_engine")
        r = _engine(p, fam, cfg, levels)
        r["floor"] = floor
        entry["runs"].append(r)
        if with_baselines:
            for r in _baselines(p, fam, cfg, levels, bj):
                r["floor"] = floor
                entry["runs"].append(r)
    if with_baselines and bj:
        # Defaults (L-BFGS history 10). A history as long as the dimension (maxcor = 20 on
        # linreg d=20) was tried and gives the same KL: L-BFGS stops after a few iterations on
        # a quadratic, so the path's inverse-Hessian estimate, not the history, limits q.
        for maxcor in (10,):
            m = methods.pathfinder_method(p, maxcor=maxcor)
            log(f"  {p.name}: {m.name}")
            r = methods.run_trajectory(m, p, max_steps=0, targets=_levels(0.0))
            r["floor"] = 0.0 if mom is not None else None
            entry["runs"].append(r)
    return entry


def _summarize(out_problems, errors, cfg, ctx):
    checks, whole = _issue5_checks(out_problems, cfg, ctx)
    rows = []
    for e in out_problems:
        rows.append([e["problem"], "exact (closed form)", "-", 0.0, None, None,
                     e["exact_seconds_cold"], e["exact_seconds_steady"],
                     e["exact_seconds_cold"], e["exact_seconds_steady"], 0])
        for r in e["runs"]:
            name = r["method"]
            if r["method"].startswith("blackjax.") and "optimizer" in r["settings"]:
                name += f" n={r['settings']['num_samples']} {r['settings']['optimizer']}"
            floor = r.get("floor")
            rows.append([e["problem"], name, r["family"], r["kl_final"],
                         "unknown" if floor is None else floor, r.get("gap_logZ_minus_elbo"),
                         _tt(r, "1e-2", "cold"), _tt(r, "1e-2", "steady"),
                         _tt(r, "1e-3", "cold"), _tt(r, "1e-3", "steady"), r["steps_run"]])
    return {
        "name": NAME,
        "table": {
            "title": "Accuracy and time to accuracy (t in s; levels are "
                     "floor + 1e-2 / + 1e-3 where the family optimum is known)",
            "columns": ["problem", "method", "family", "KL(q|p*)", "floor", "logZ-ELBO",
                        "t<=1e-2 cold", "t<=1e-2 steady", "t<=1e-3 cold", "t<=1e-3 steady",
                        "steps"],
            "rows": rows,
        },
        "checks": checks,
        "data": {"problems": out_problems, "errors": errors, "whole_process": whole,
                 "settings": cfg},
    }


# --------------------------------------------------------------------------------------------
# Issue-5 acceptance numbers
# --------------------------------------------------------------------------------------------
def _find(entry, method, family):
    return [r for r in entry["runs"] if r["method"] == method and r["family"] == family]


def _issue5_checks(entries, cfg, ctx):
    checks, whole = [], {}
    lin = next((e for e in entries if e["problem"].startswith("linreg")), None)
    gau = next((e for e in entries if e["problem"].startswith("gauss2d")), None)
    if lin is not None:
        fr = _find(lin, "vi_engine", "fullrank")
        if fr:
            kl = fr[0]["kl_final"]
            checks.append({"name": f"{lin['problem']}: vi_engine full-rank defaults KL(q|p*)",
                           "value": kl, "bar": "<= 1e-3", "pass": kl <= 1e-3})
        mf = _find(lin, "vi_engine", "meanfield")
        if mf and lin.get("meanfield_optimum"):
            gap = mf[0]["kl_final"] - lin["meanfield_optimum"]["kl"]
            checks.append({"name": f"{lin['problem']}: vi_engine mean-field KL minus MF optimum",
                           "value": gap, "bar": "<= 0.01 nats", "pass": gap <= 0.01})
    if gau is not None and gau.get("meanfield_optimum"):
        mf = _find(gau, "vi_engine", "meanfield")
        if mf:
            want = np.asarray(gau["meanfield_optimum"]["variances"])
            got = np.asarray(mf[0]["variances"])
            rel = float(np.max(np.abs(got / want - 1)))
            checks.append({"name": f"{gau['problem']}: mean-field variances vs 1/Lambda_ii "
                                   f"(got {np.round(got, 4).tolist()}, "
                                   f"want {np.round(want, 4).tolist()})",
                           "value": rel, "bar": "max rel. error <= 0.05", "pass": rel <= 0.05})
    if lin is not None and cfg.get("whole_process"):
        whole = _whole_process(lin, cfg, ctx)
        eng = whole.get("vi_engine")
        bjr = whole.get("blackjax_best")
        if eng and bjr:
            e_t = eng["wall_seconds"] if eng["kl"] <= 1e-3 else math.inf
            b_t = bjr["wall_seconds"] if bjr["kl"] <= 1e-3 else math.inf
            ratio = e_t / b_t if math.isfinite(b_t) else (0.0 if math.isfinite(e_t) else math.nan)
            # Each round's own ratio too: the machine's load drifts between rounds, and how far
            # the rounds spread says how much one median can be trusted.
            rounds = "/".join(f"{a / b:.2f}" for a, b in zip(
                eng.get("wall_seconds_rounds", []), bjr.get("wall_seconds_rounds", []),
                strict=False))
            floor_txt = ""
            for name, how in (("handwritten_jax", "jax.jit"),
                              ("handwritten_jax_fast", "vi_engine's cheap XLA settings"),
                              ("handwritten_jax_fast_numpyro",
                               "cheap XLA settings, importing numpyro.distributions")):
                floor = whole.get(name)
                if floor and floor["kl"] <= 1e-3:
                    floor_txt += (f"; the hand-written JAX script (floor reference, {how}) "
                                  f"{floor['wall_seconds']:.2f}s = "
                                  f"{floor['wall_seconds'] / b_t:.2f}x BlackJAX")
            checks.append({"name": "linreg whole process (import+compile+fit; median of "
                                   f"{cfg.get('whole_process_rounds', 1)} interleaved rounds) "
                                   f"to KL<=1e-3: vi_engine {e_t:.2f}s vs BlackJAX best "
                                   f"({bjr['config']}) {b_t:.2f}s; per round {rounds}"
                                   f"{floor_txt}",
                           "value": ratio, "bar": "<= 0.5", "pass": bool(ratio <= 0.5)})
        for name, r in whole.items():
            if name.startswith("numpyro") and eng:
                checks.append({"name": f"linreg whole process: {name} reaches KL<=1e-3?",
                               "value": r["kl"], "bar": "vi_engine far ahead (info)",
                               "pass": None})
    return checks, whole


def _whole_process(lin, cfg, ctx):
    """Each method in a fresh interpreter: import, build the problem, compile, fit."""
    s = lin["settings"]
    jobs = {"vi_engine": ["vi_engine", "fullrank"]}
    # BlackJAX's best configuration: the full-rank grid run that reached KL <= 1e-3 soonest
    # (steady), with exactly the steps it needed. Full-rank only: a mean-field run's "1e-3"
    # level is its own optimum + 1e-3, far above KL = 1e-3 on this correlated posterior, so it
    # can never meet the bar (picked in --full mode, it made the check a vacuous pass).
    best = None
    grid = [r for r in lin["runs"] if r["method"] == "blackjax.fullrank_vi"]
    for r in grid:
        t = _t(r, "1e-3", "steady")
        if t is not None and (best is None or t < best[0]):
            best = (t, r)
    if best is None:  # none reached: take the lowest final KL, at its full step count
        cands = grid
        if cands:
            r = min(cands, key=lambda r: r["kl_final"])
            best = (None, r)
    if best is not None:
        r = best[1]
        steps = r["reached"]["1e-3"]["steps"] if r["reached"].get("1e-3") else r["steps_run"]
        jobs["blackjax_best"] = ["blackjax", r["family"], str(r["settings"]["num_samples"]),
                                 r["settings"]["optimizer"].split("(")[1].rstrip(")"), str(steps)]
    # The floor reference (see _process.py): a hand-written script of the same estimator, with
    # a step count and cosine schedule picked in hindsight (1,000 steps reached KL 4e-4 to 9e-4
    # over 3 seeds; 1,200 keeps a margin), jax and optax only.
    jobs["handwritten_jax"] = ["jax", "fullrank", "0.05", "1200", "jit"]
    jobs["handwritten_jax_fast"] = ["jax", "fullrank", "0.05", "1200", "fast"]
    # The same, plus the import an engine whose posteriors are numpyro distributions must pay
    # (numpyro and the scipy it pulls in, ~0.2 s): the floor for vi_engine's API.
    jobs["handwritten_jax_fast_numpyro"] = ["jax", "fullrank", "0.05", "1200", "fast", "numpyro"]
    if cfg.get("whole_process_numpyro"):
        jobs["numpyro_AutoMultivariateNormal"] = ["numpyro", "fullrank", "1", "0.01",
                                                  str(cfg["max_steps"])]
    # Interleaved rounds (A, B, A, B, ...): the machine's load hits both alike; medians kept.
    out, runs = {}, {}
    jobs = {k: v for k, v in jobs.items() if v[0] != "blackjax" or ctx["blackjax"]}
    for rnd in range(cfg.get("whole_process_rounds", 1)):
        for name, args in jobs.items():
            log(f"  whole process (round {rnd + 1}): {name} {' '.join(args[1:])}")
            script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_process.py")
            cmd = [sys.executable, script, str(s["n"]), str(s["d"]), *args]
            env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
            t0 = now()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            wall = now() - t0
            if proc.returncode != 0:
                out[name] = {"error": proc.stderr[-2000:], "wall_seconds": wall,
                             "kl": math.inf}
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["wall_seconds"] = wall
            runs.setdefault(name, []).append(res)
    for name, rs in runs.items():
        if name in out:
            continue
        res = dict(rs[0])
        for k in ("seconds", "import_seconds", "wall_seconds"):
            res[k] = float(np.median([r[k] for r in rs]))
            res[k + "_rounds"] = [r[k] for r in rs]
        res["args"] = jobs[name]
        if name == "blackjax_best":
            a = jobs[name]
            res["config"] = f"{a[1]}_vi n={a[2]} adam({a[3]}) {a[4]} steps"
        out[name] = res
    return out
