"""KL throughput: ``vi.kl_divergence`` against numpyro's own ``kl_divergence``, both under jit.

- 10^6 (quick and full) pairs of diagonal Normals (``Normal(loc, scale).to_event(1)``), dim 16:
  pairs/s, ratio, and achieved GB/s (4 float32 inputs read, 1 output written) next to a streaming
  reference that reads the same bytes and does one add per element (the bandwidth roof here).
- 10^4 pairs of full-rank ``MultivariateNormal`` (``scale_tril``), dim 32.

vi_engine registers its Gaussian pairs in numpyro's dispatch table, so after ``import vi_engine``
numpyro's ``kl_divergence`` would run vi_engine's code. numpyro's own functions are taken from a
snapshot of that table made when ``benchmarks`` was imported (before vi_engine); if vi_engine was
imported first the snapshot is checked and the case says the reference is unavailable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from benchmarks import NUMPYRO_KL_FUNCS
from benchmarks.timing import log, measure_many

NAME = "kl"


def _numpyro_pair(tp, tq):
    fn = NUMPYRO_KL_FUNCS.get((tp, tq))
    if fn is None or not getattr(fn, "__module__", "").startswith("numpyro"):
        return None
    return fn


def run(cfg, ctx) -> dict:
    import vi_engine as vi

    cfg, repeat = cfg["kl"], cfg["repeat"]
    repeat = cfg.get("repeat", repeat)
    rows, checks, data = [], [], {}
    key = jax.random.key(0)

    # --- diagonal Normal pairs -------------------------------------------------------------
    b, d = cfg["diag_pairs"], cfg["diag_dim"]
    log(f"kl: {b} diagonal Normal pairs, dim {d}")
    k1, k2, k3, k4, key = jax.random.split(key, 5)
    m1, m2 = jax.random.normal(k1, (b, d)), jax.random.normal(k2, (b, d))
    s1 = jnp.exp(0.3 * jax.random.normal(k3, (b, d)))
    s2 = jnp.exp(0.3 * jax.random.normal(k4, (b, d)))
    mk = lambda m, s: dist.Normal(m, s).to_event(1)
    f_vi = jax.jit(lambda a, bb, c, e: vi.kl_divergence(mk(a, bb), mk(c, e)))
    # numpyro's Independent pair dispatches to the Normal pair again, which (vi_engine imported)
    # is vi_engine's: so numpyro's own Normal pair, summed over the event dimension as its
    # Independent pair does.
    np_fn = _numpyro_pair(dist.Normal, dist.Normal)
    f_np = None if np_fn is None else jax.jit(
        lambda a, bb, c, e: jnp.sum(np_fn(dist.Normal(a, bb), dist.Normal(c, e)), -1))
    f_roof = jax.jit(lambda a, bb, c, e: jnp.sum(a + bb + c + e, -1))
    nbytes = 4 * b * d * 4 + b * 4
    diag = {"pairs": b, "dim": d, "bytes_moved": nbytes}
    fns = {name: f for name, f in (("vi_engine", f_vi), ("numpyro", f_np),
                                       ("streaming roof", f_roof)) if f is not None}
    st = measure_many({k: (lambda f=f: f(m1, s1, m2, s2)) for k, f in fns.items()},
                      repeat=repeat)
    for name in ("vi_engine", "numpyro", "streaming roof"):
        if name not in st:
            diag[name] = None
            continue
        m = st[name]
        diag[name] = {"median_s": m["median"], "pairs_per_s": b / m["median"],
                      "gb_per_s": nbytes / m["median"] / 1e9, "times_s": m["times"]}
    if diag["numpyro"] is not None:
        import numpy as np

        np.testing.assert_allclose(np.asarray(f_vi(m1, s1, m2, s2))[:100],
                                   np.asarray(f_np(m1, s1, m2, s2))[:100], rtol=1e-4, atol=1e-4)
    data["diag"] = diag

    # --- full-rank MVN pairs ---------------------------------------------------------------
    b, d = cfg["mvn_pairs"], cfg["mvn_dim"]
    log(f"kl: {b} MultivariateNormal pairs, dim {d}")
    k1, k2, k3, k4, key = jax.random.split(key, 5)

    def tril(k):
        a = 0.3 * jax.random.normal(k, (b, d, d)) / jnp.sqrt(d)
        return jnp.tril(a, -1) + jnp.eye(d) * jnp.exp(0.2 * jnp.diagonal(a, 0, -2, -1))[..., None]

    mu1, mu2 = jax.random.normal(k1, (b, d)), jax.random.normal(k2, (b, d))
    l1, l2 = tril(k3), tril(k4)
    mkm = lambda m, lo: dist.MultivariateNormal(m, scale_tril=lo)
    g_vi = jax.jit(lambda a, bb, c, e: vi.kl_divergence(mkm(a, bb), mkm(c, e)))
    np_fn = _numpyro_pair(dist.MultivariateNormal, dist.MultivariateNormal)
    g_np = None if np_fn is None else jax.jit(lambda a, bb, c, e: np_fn(mkm(a, bb), mkm(c, e)))
    mvn = {"pairs": b, "dim": d}
    fns = {name: f for name, f in (("vi_engine", g_vi), ("numpyro", g_np)) if f is not None}
    st = measure_many({k: (lambda f=f: f(mu1, l1, mu2, l2)) for k, f in fns.items()},
                      repeat=repeat)
    for name in ("vi_engine", "numpyro"):
        if name not in st:
            mvn[name] = None
            continue
        m = st[name]
        mvn[name] = {"median_s": m["median"], "pairs_per_s": b / m["median"],
                     "times_s": m["times"]}
    data["mvn"] = mvn

    for label, entry in (("diag Normal", diag), ("full-rank MVN", mvn)):
        v, n = entry["vi_engine"], entry["numpyro"]
        ratio = None if n is None else v["pairs_per_s"] / n["pairs_per_s"]
        entry["ratio_vs_numpyro"] = ratio
        extra = ""
        if "gb_per_s" in v:
            roof = entry["streaming roof"]["gb_per_s"]
            entry["fraction_of_streaming_roof"] = v["gb_per_s"] / roof
            extra = f"; {v['gb_per_s']:.1f} GB/s = {v['gb_per_s'] / roof:.0%} of streaming roof"
        rows.append([label, entry["pairs"], entry["dim"], "vi_engine", v["pairs_per_s"],
                     v.get("gb_per_s"), ratio])
        if n is not None:
            rows.append([label, entry["pairs"], entry["dim"], "numpyro", n["pairs_per_s"],
                         n.get("gb_per_s"), 1.0])
        if "streaming roof" in entry:
            r = entry["streaming roof"]
            rows.append([label, entry["pairs"], entry["dim"], "streaming roof (4 reads, sum)",
                         r["pairs_per_s"], r["gb_per_s"], None])
        checks.append({"name": f"KL {label} x{entry['pairs']} dim {entry['dim']}: vi_engine "
                               f"pairs/s vs numpyro{extra}",
                       "value": ratio, "bar": ">= 1.0",
                       "pass": None if ratio is None else ratio >= 1.0})
    return {
        "name": NAME,
        "table": {
            "title": "KL throughput under jit (median)",
            "columns": ["pair", "pairs", "dim", "method", "pairs/s", "GB/s",
                        "vi_engine / numpyro"],
            "rows": rows,
        },
        "checks": checks,
        "data": data,
    }
