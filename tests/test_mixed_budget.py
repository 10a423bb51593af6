"""The mixed-precision allocator (convert/budget.py) on synthetic sensitivity tables with known optima."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from qgguf.convert.budget import (Option, Recipe, TensorOptions, _dp, _pareto, allocate, load_recipe, parse_size,
                                  recipe_metadata)
from qgguf.errors import InputFileError, OptionError


def table(rng, n_tensors: int, n_opts: int, scale: int = 1, convex: bool = False) -> list[TensorOptions]:
    """Random tensors: more bytes -> less error (not always convex), sizes multiples of ``scale``."""
    out = []
    for t in range(n_tensors):
        sizes = np.sort(rng.choice(np.arange(1, 40), size=n_opts, replace=False)) * scale
        sens = rng.uniform(0.1, 10.0)
        if convex:
            errs = sens * np.exp(-0.3 * sizes / scale)
        else:
            errs = np.sort(rng.uniform(0, sens, size=n_opts))[::-1]
        out.append(TensorOptions(f"t{t}", [Option(f"T{j}", int(s), float(e)) for j, (s, e) in enumerate(zip(sizes, errs))]))
    return out


def brute(tables, budget):
    best = None
    for combo in itertools.product(*[t.options for t in tables]):
        nb = sum(o.nbytes for o in combo)
        if nb > budget:
            continue
        err = sum(o.error for o in combo)
        if best is None or err < best[0] - 1e-12:
            best = (err, nb)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    tabs = table(rng, n_tensors=5, n_opts=4)
    lo = sum(min(o.nbytes for o in t.options) for t in tabs)
    hi = sum(max(o.nbytes for o in t.options) for t in tabs)
    for budget in np.linspace(lo, hi, 7).astype(int):
        a = allocate(tabs, int(budget))
        want = brute(tabs, int(budget))
        assert a.nbytes <= budget
        assert a.error == pytest.approx(want[0], rel=1e-12, abs=1e-12), (budget, a.how)
        # the choice is what it says
        chosen = {t.name: next(o for o in t.options if o.type == a.choice[t.name]) for t in tabs}
        assert sum(o.nbytes for o in chosen.values()) == a.nbytes
        assert sum(o.error for o in chosen.values()) == pytest.approx(a.error)


def test_large_sizes_near_optimal_and_never_over():
    """Sizes too large for 1-byte units: the answer fits and is within the rounding of the exact optimum."""
    rng = np.random.default_rng(7)
    tabs = table(rng, n_tensors=6, n_opts=4, scale=1_000_003)
    lo = sum(min(o.nbytes for o in t.options) for t in tabs)
    hi = sum(max(o.nbytes for o in t.options) for t in tabs)
    for budget in np.linspace(lo, hi, 9).astype(int)[1:-1]:
        a = allocate(tabs, int(budget))
        assert a.nbytes <= budget
        want = brute(tabs, int(budget))[0]
        # the exact optimum of a budget smaller by the DP's rounding (6 tensors x one unit) is never beaten by much
        assert want - 1e-9 <= a.error <= brute(tabs, int(budget) - 6 * (-(-(hi - lo) // 65536)))[0] + 1e-9


def test_monotone_in_budget():
    rng = np.random.default_rng(3)
    tabs = table(rng, n_tensors=40, n_opts=6)
    lo = sum(min(o.nbytes for o in t.options) for t in tabs)
    hi = sum(max(o.nbytes for o in t.options) for t in tabs)
    errs = [allocate(tabs, b).error for b in list(range(lo, hi, 7)) + [hi]]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    assert errs[-1] == pytest.approx(sum(min(o.error for o in t.options) for t in tabs))


def test_big_table_uses_budget_and_beats_uniform():
    """200 tensors x 8 types with byte sizes like SmolLM2's: never over, spends nearly all, beats any uniform."""
    rng = np.random.default_rng(11)
    bpw = [2.625, 3.4375, 4.5, 5.0, 5.5, 6.0, 6.5625, 8.5]
    tabs = []
    for t in range(200):
        n = int(rng.choice([110592, 331776, 884736]))
        s = rng.lognormal(0, 1.5)
        tabs.append(TensorOptions(f"t{t}", [Option(f"B{b}", int(n * b / 8), float(s * 2.0 ** (-1.9 * b))) for b in bpw]))
    for b_uniform in (3.4375, 4.5, 5.5):
        budget = sum(int(o.nbytes) for t in tabs for o in t.options if o.type == f"B{b_uniform}")
        a = allocate(tabs, budget)
        uni = sum(o.error for t in tabs for o in t.options if o.type == f"B{b_uniform}")
        assert a.nbytes <= budget
        assert budget - a.nbytes < 110592 * 0.5   # less than the smallest possible step is left
        assert a.error < 0.8 * uni


def test_budget_too_small_and_bad_tables():
    tabs = [TensorOptions("a", [Option("X", 10, 1.0)])]
    with pytest.raises(OptionError, match="below the smallest"):
        allocate(tabs, 9)
    with pytest.raises(OptionError, match="no candidate"):
        allocate([TensorOptions("a", [])], 9)
    with pytest.raises(OptionError, match="twice"):
        allocate(tabs + tabs, 100)


def test_pareto_and_dp_exact_small():
    f = _pareto([Option("a", 10, 5.0), Option("b", 12, 6.0), Option("c", 12, 4.0), Option("d", 20, 4.0)])
    assert [o.type for o in f] == ["a", "c"]
    fr = [[Option("a", 0, 3.5), Option("b", 5, 1.0)], [Option("c", 0, 2.0), Option("d", 4, 0.0)]]
    assert _dp(fr, 5) == [1, 0]
    assert _dp(fr, 4) == [0, 1]
    assert _dp(fr, 9) == [1, 1]


@pytest.mark.parametrize("text,want", [("60MB", 60_000_000), ("57.8MiB", int(57.8 * 2**20)), ("60606752", 60606752),
                                       ("1.5 GB", 1_500_000_000), ("100k", 100_000)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "MB", "-3MB", "12XB", "0"])
def test_parse_size_bad(bad):
    with pytest.raises(OptionError):
        parse_size(bad)


def test_recipe_roundtrip(tmp_path):
    r = Recipe({"blk.0.attn_q.weight": "Q5_0", "token_embd.weight": "Q8_0"}, target={"file_bytes": 123},
               predicted_kld=0.1, tensor_kld={"blk.0.attn_q.weight": 0.06, "token_embd.weight": 0.04})
    p = tmp_path / "r.json"
    r.save(p)
    back = load_recipe(p)
    assert back == r
    assert "Q5_0: 1" in back.summary()
    md = recipe_metadata(back)
    assert md["qgguf.recipe.tensors"].value == ["blk.0.attn_q.weight", "token_embd.weight"]
    ov = dict(back.overrides())
    assert ov[r"^blk\.0\.attn_q\.weight$"] == "Q5_0"
    (tmp_path / "bad.json").write_text(json.dumps({"types": []}))
    with pytest.raises(InputFileError, match="types"):
        load_recipe(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text("{not json")
    with pytest.raises(InputFileError, match="not a recipe"):
        load_recipe(tmp_path / "bad2.json")
    with pytest.raises(InputFileError, match="no such"):
        load_recipe(tmp_path / "missing.json")


def test_interpolated_propagation_factors():
    from qgguf.quantize.sensitivity import TensorSensitivity, _interpolate_alpha
    sens, keys_of = {}, {}
    for il in range(5):
        for k in ("attn_q", "ffn_down"):
            n = f"blk.{il}.{k}.weight"
            measured = il in (0, 4)
            sens[n] = TensorSensitivity(n, (8, 32), {"Q4_0": 144}, {"Q4_0": 1.0}, ref="Q4_0" if measured else "",
                                        alpha=(1.0 + il if k == "attn_q" else 10.0) if measured else 0.0)
            keys_of[n] = (il, k)
    _interpolate_alpha(sens, keys_of, [0, 4])
    assert [sens[f"blk.{i}.attn_q.weight"].alpha for i in range(5)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(sens[f"blk.{i}.ffn_down.weight"].alpha == 10.0 for i in range(5))
    assert sens["blk.2.attn_q.weight"].kld("Q4_0") == 3.0
