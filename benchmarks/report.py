"""Writing results: terminal table, JSON, markdown report, PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x == 0:
            return "0"
        if abs(x) >= 1e5 or abs(x) < 1e-3:
            return f"{x:.3g}"
        return f"{x:.4g}"
    return str(x)


def _check_status(c):
    return "info" if c.get("pass") is None else ("PASS" if c["pass"] else "FAIL")


def text_table(title: str, columns: list[str], rows: list[list]) -> str:
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [title, line, "-" * len(line)]
    for r in cells:
        out.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    return "\n".join(out)


def terminal(results: dict) -> str:
    parts = []
    for case in results["cases"]:
        if "error" in case:
            parts.append(f"{case['name']}: ERROR\n{case['error'].splitlines()[-1]}")
            continue
        t = case["table"]
        parts.append(text_table(f"== {case['name']}: {t['title']}", t["columns"], t["rows"]))
    checks = [c for case in results["cases"] for c in case.get("checks", [])]
    if checks:
        rows = [[_check_status(c), c["name"], c["value"], c["bar"]] for c in checks]
        parts.append(text_table("== acceptance numbers", ["", "check", "value", "bar"], rows))
    return "\n\n".join(parts)


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become the strings "inf"/"-inf"/"nan"; tuples become lists;
    a ``reached`` level that was never reached is the string "never reached"."""
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if k == "reached" and isinstance(v, dict):
                out[k] = {kk: ("never reached" if vv is None else _clean(vv))
                          for kk, vv in v.items()}
            else:
                out[str(k)] = _clean(v)
        return out
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if hasattr(x, "item") and getattr(x, "shape", None) == ():
        return _clean(x.item())
    return x


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_clean(results), f, indent=1, allow_nan=False)


def _md_table(columns, rows):
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(v).replace("|", "/") for v in r) + " |")
    return "\n".join(out)


def write_markdown(results: dict, path: str, plots: list[str]) -> None:
    m = results["machine"]
    lines = [
        f"# vi_engine benchmarks — {results['timestamp']} ({results['mode']})",
        "",
        f"- machine: {m['platform']}; {m['cpu']}; {m['cpu_count']} CPUs "
        f"({m['affinity']} usable); {m['memory_gb']} GiB; load average at start "
        f"{m['loadavg_at_start']}, at end {results.get('loadavg_at_end')}",
        f"- code: git {m.get('git_commit')}; jax backend: {m['jax_backend']} "
        f"{m['jax_devices']}; x64={m['x64']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- BlackJAX: {results['blackjax'] or 'not installed (its rows are skipped)'}",
        f"- command: `{results['command']}`; wall time {fmt(results['wall_seconds'])} s",
        "- Every ratio is measured within this run: warm-up, repeats, median. The machine may "
        "be shared (see load average): absolute times are noisy, ratios less so.",
        "",
    ]
    checks = [c for case in results["cases"] for c in case.get("checks", [])]
    if checks:
        lines += ["## Acceptance numbers", "",
                  _md_table(["", "check", "value", "bar"],
                            [[_check_status(c), c["name"], c["value"], c["bar"]]
                             for c in checks]), ""]
    for case in results["cases"]:
        lines.append(f"## {case['name']}")
        lines.append("")
        if "error" in case:
            lines += ["```", case["error"], "```", ""]
            continue
        t = case["table"]
        lines += [t["title"], "", _md_table(t["columns"], t["rows"]), ""]
        doc = case.get("doc")
        if doc:
            lines += ["<details><summary>method notes</summary>", "", doc, "", "</details>",
                      ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict, prefix: str) -> list[str]:
    """PNG plots next to the JSON; returns their paths."""
    paths = []
    by_name = {c["name"]: c for c in results["cases"] if "error" not in c}
    for name, fn in (("accuracy", _plot_accuracy), ("throughput", _plot_throughput),
                     ("fit_many", _plot_fit_many)):
        if name in by_name:
            path = f"{prefix}_{name}.png"
            if fn(by_name[name]["data"], path):
                paths.append(path)
    return paths


def _plot_accuracy(data, path) -> bool:
    entries = [e for e in data["problems"] if len({r["method"] for r in e["runs"]}) > 1]
    if not entries:
        entries = data["problems"][:1]
    if not entries:
        return False
    plt = _plt()
    fams = sorted({r["family"] for e in entries for r in e["runs"]} - {"pathfinder"})
    if not fams:
        fams = ["pathfinder"]
    fig, axes = plt.subplots(len(entries), len(fams), figsize=(4.2 * len(fams),
                             3.3 * len(entries)), squeeze=False)
    for i, e in enumerate(entries):
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            floor = None
            if fam != "pathfinder" and not any(r["family"] == fam for r in e["runs"]):
                ax.axis("off")
                continue
            for r in e["runs"]:
                # Pathfinder's q is a full-covariance Gaussian: drawn on every panel as a star.
                if r["family"] not in (fam, "pathfinder"):
                    continue
                c = r["curve"]
                secs = c.get("seconds_steady") or c["seconds"]
                kl = [max(k, 1e-6) if k == k else 1e6 for k in c["kl"]]
                label = r["method"]
                if r["method"].startswith("blackjax.") and "optimizer" in r["settings"]:
                    label += f" n={r['settings']['num_samples']} {r['settings']['optimizer']}"
                style = "*" if len(kl) == 1 else "-"
                lw = 2.5 if r["method"] == "vi_engine" else 1.2
                ax.plot(secs, kl, style, label=label, lw=lw, ms=9)
                if r["family"] == fam:
                    floor = r.get("floor")
            if floor:
                ax.axhline(floor, color="k", ls=":", lw=1, label="family optimum")
            ax.axhline(1e-3, color="grey", ls="--", lw=0.8)
            ax.axvline(e["exact_seconds_steady"] or 1e-4, color="grey", ls="-.", lw=0.8,
                       label="exact posterior (steady)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{e['problem']} — {fam}", fontsize=9)
            ax.set_xlabel("steady-state wall time (s; compile excluded, see table)",
                          fontsize=8)
            ax.set_ylabel("KL(q‖p*)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return True


def _plot_throughput(data, path) -> bool:
    sizes = data["sizes"]
    if not sizes:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(sizes[0]["methods"])
    ns = [s["n"] for s in sizes]
    for name in names:
        axes[0].plot(ns, [s["methods"][name]["steps_per_s"] for s in sizes], "-o", label=name)
        axes[1].plot(ns, [s["methods"][name]["elbo_evals_per_s"] for s in sizes], "-o",
                     label=name)
    for ax, lab in zip(axes, ("optimization steps / s", "1-draw ELBO evaluations / s"),
                       strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (logistic regression)")
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return True


def _plot_fit_many(data, path) -> bool:
    batches = data["batches"]
    if not batches:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    bs = [b["B"] for b in batches]
    names = [k for k, v in batches[0].items() if isinstance(v, dict)]
    for name in names:
        axes[0].plot(bs, [b[name]["first_s"] for b in batches], "-o", label=name)
        axes[1].plot(bs, [b[name]["problems_per_s"] for b in batches], "-o", label=name)
    axes[0].set_ylabel("wall time incl. compile (s)")
    axes[1].set_ylabel("problems / s (steady)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("B (problems)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return True
