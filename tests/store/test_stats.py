"""hookscope.store.stats against numpy float64 on the materialised data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hookscope.errors import AnalysisError, InputError
from hookscope.store import stats
from hookscope.store.stats import (
    COVARIANCE_MAX_DIM,
    RunningMoments,
    for_dim,
    load,
    merge_all,
    save,
)

RTOL = 1e-12
SIZES = [0, 1, 37, 3, 100, 0, 1, 59]  # uneven chunks, including empty and single rows
DIM = 7


def _chunks(seed: int = 0, dim: int = DIM, sizes=SIZES, loc: float = 0.5):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim))  # correlated features
    return [loc + rng.standard_normal((n, dim)) @ mix for n in sizes]


def _accumulate(chunks, covariance: bool = True) -> RunningMoments:
    m = RunningMoments(chunks[0].shape[1], covariance=covariance)
    for c in chunks:
        m.add(torch.from_numpy(c))
    return m


def _per_chunk(chunks, covariance: bool = True) -> list[RunningMoments]:
    out = []
    for c in chunks:
        m = RunningMoments(c.shape[1], covariance=covariance)
        m.add(torch.from_numpy(c))
        out.append(m)
    return out


def _close(actual, expected, rtol: float = RTOL) -> None:
    actual = actual.numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _check_against_numpy(m: RunningMoments, x: np.ndarray, rtol: float = RTOL) -> None:
    assert m.n == x.shape[0]
    assert m.mean.dtype == torch.float64
    _close(m.mean, x.mean(axis=0), rtol)
    _close(m.covariance(), np.cov(x, rowvar=False), rtol)
    _close(m.covariance(ddof=0), np.cov(x, rowvar=False, ddof=0), rtol)
    _close(m.variance(), np.var(x, axis=0, ddof=1), rtol)
    _close(m.variance(ddof=0), np.var(x, axis=0), rtol)
    _close(m.second_moment(), x.T @ x / x.shape[0], rtol)
    norms = np.linalg.norm(x, axis=1)
    got = m.norms()
    assert set(got) == {"mean", "std", "min", "max"}
    _close(got["mean"], norms.mean(), rtol)
    _close(got["std"], norms.std(), 1e-10)  # ddof=0; a std goes through a sqrt
    assert got["min"] == pytest.approx(norms.min(), rel=RTOL)
    assert got["max"] == pytest.approx(norms.max(), rel=RTOL)


def test_sequential_adds_match_numpy():
    chunks = _chunks()
    _check_against_numpy(_accumulate(chunks), np.concatenate(chunks))


def test_merge_orders_and_trees_match_numpy():
    chunks = _chunks(seed=1)
    x = np.concatenate(chunks)
    rng = np.random.default_rng(2)
    orders = [list(range(len(chunks))), list(reversed(range(len(chunks))))]
    orders += [list(rng.permutation(len(chunks))) for _ in range(3)]
    results = []
    for order in orders:
        parts = _per_chunk([chunks[i] for i in order])
        seq = RunningMoments(DIM)
        for p in parts:
            assert seq.merge(p) is seq
        results += [seq, merge_all(parts)]
        # an uneven hand-made tree: ((a b) (c (d e))) ((f g) h)
        a, b, c, d, e, f, g, h = (p.copy() for p in parts)
        left = a.merge(b).merge(c.merge(d.merge(e)))
        results.append(left.merge(f.merge(g).merge(h)))
    for m in results:
        _check_against_numpy(m, x)
    for m in results[1:]:  # order-independent up to rounding
        _close(m.covariance(), results[0].covariance().numpy())


def test_merge_all_leaves_inputs_unchanged_and_merges_with_empty():
    chunks = _chunks(seed=3)
    parts = _per_chunk(chunks)
    before = [p.state_dict() for p in parts]
    merge_all(parts)
    for p, s in zip(parts, before):
        for k, t in p.state_dict().items():
            assert torch.equal(t, s[k])
    single = _accumulate(chunks[2:3])
    _check_against_numpy(RunningMoments(DIM).merge(single), chunks[2])  # empty <- full
    _check_against_numpy(single.copy().merge(RunningMoments(DIM)), chunks[2])  # full <- empty
    with pytest.raises(InputError, match="at least one"):
        merge_all([])


def test_merge_with_itself_doubles_the_data():
    x = _chunks(seed=4, sizes=[20])[0]
    m = _accumulate([x])
    m.merge(m)
    _check_against_numpy(m, np.concatenate([x, x]))


def test_large_mean_keeps_precision_where_the_naive_formula_does_not():
    rng = np.random.default_rng(5)
    x = 1e4 + rng.standard_normal((10_000, 8))  # mean 1e4, std 1
    m = RunningMoments(8)
    for c in np.array_split(x, 7):
        m.add(torch.from_numpy(c))
    reference = np.cov(x, rowvar=False)  # two-pass numpy float64
    scale = np.abs(reference).max()
    chan_err = np.abs(m.covariance().numpy() - reference).max() / scale
    n = x.shape[0]
    naive = (x.T @ x / n - np.outer(x.mean(0), x.mean(0))) * n / (n - 1)  # E[xx] - mean^2
    naive_err = np.abs(naive - reference).max() / scale
    assert chan_err < 1e-9
    assert naive_err > 1e-9 and naive_err > 100 * chan_err
    _close(m.mean, x.mean(axis=0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_upcast(dtype):
    chunks = [torch.from_numpy(c).to(dtype) for c in _chunks(seed=6)]
    m = RunningMoments(DIM)
    for c in chunks:
        m.add(c)
    x = torch.cat(chunks).to(torch.float64).numpy()  # the exact values the accumulator saw
    _check_against_numpy(m, x)


def test_diagonal_path():
    chunks = _chunks(seed=7)
    x = np.concatenate(chunks)
    m = merge_all(_per_chunk(chunks, covariance=False))
    _close(m.mean, x.mean(axis=0))
    _close(m.variance(), np.var(x, axis=0, ddof=1))
    _close(m.variance(ddof=0), np.var(x, axis=0))
    _close(m.second_moment(), (x * x).mean(axis=0))
    _close(m.norms()["mean"], np.linalg.norm(x, axis=1).mean())
    state = m.state_dict()
    assert "var_sum" in state and "m2" not in state and state["var_sum"].shape == (DIM,)
    with pytest.raises(InputError, match=r"covariance=False.*variance\(\)"):
        m.covariance()


def test_mismatched_merge_raises_with_both_layouts():
    with pytest.raises(InputError, match=r"dim=3.*dim=4"):
        RunningMoments(3).merge(RunningMoments(4))
    with pytest.raises(InputError, match=r"covariance=True.*covariance=False"):
        RunningMoments(3).merge(RunningMoments(3, covariance=False))


def test_one_row_and_empty():
    """Decision: n <= ddof raises AnalysisError (no NaN); ddof=0 of one row is zero."""
    row = np.array([[3.0, 4.0]])
    m = _accumulate([row])
    with pytest.raises(AnalysisError, match=r"ddof=1 needs more than 1 rows, got n=1.*ddof=0"):
        m.covariance()
    with pytest.raises(AnalysisError, match="ddof=1"):
        m.variance()
    assert torch.equal(m.covariance(ddof=0), torch.zeros(2, 2, dtype=torch.float64))
    assert m.norms() == {"mean": 5.0, "std": 0.0, "min": 5.0, "max": 5.0}

    empty = RunningMoments(2)
    empty.add(torch.zeros(0, 2))
    assert empty.n == 0
    for call in (empty.covariance, empty.variance, empty.second_moment, empty.norms):
        with pytest.raises(AnalysisError, match="n=0"):
            call()
    assert empty.to_dict() == {"n": 0, "dim": 2, "covariance": True, "norm": None}


def test_to_dict_and_repr():
    m = _accumulate(_chunks(seed=8))
    d = m.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["n"] == m.n and d["dim"] == DIM and d["norm"] == m.norms()
    r = repr(m)
    assert r.startswith("RunningMoments(") and f"dim={DIM}" in r and f"n={m.n}" in r


def test_for_dim_threshold():
    assert COVARIANCE_MAX_DIM == 4096
    assert for_dim(4096).has_covariance
    assert not for_dim(4097).has_covariance
    assert for_dim(8).dim == 8


def test_state_dict_round_trip_is_plain_and_independent():
    m = _accumulate(_chunks(seed=9))
    state = m.state_dict()
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in state.values())
    assert set(state) == {"n", "mean", "m2", "norm_sum", "norm_m2", "norm_min", "norm_max"}
    back = RunningMoments.from_state_dict(state)
    state["mean"].add_(1.0)  # mutating the dict must not touch either accumulator
    for k, t in back.state_dict().items():
        assert torch.equal(t, m.state_dict()[k])
    with pytest.raises(InputError, match="missing"):
        RunningMoments.from_state_dict({k: v for k, v in state.items() if k != "norm_sum"})


def test_save_load_round_trip_is_bitwise(tmp_path):
    chunks = _chunks(seed=10)
    moments = {
        "resid_post.3": _accumulate(chunks),
        "mlp_out.0": _accumulate(chunks, covariance=False),
        "blocks/with/slash": RunningMoments(DIM),  # empty; site names may contain '/'
    }
    path = tmp_path / "shard.stats.safetensors"
    save(moments, path)
    assert sorted(os.listdir(tmp_path)) == ["shard.stats.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors reader opens it
        assert "resid_post.3/mean" in f.keys()
        assert f.metadata() == {"format": stats.FORMAT_NAME, "version": stats.FORMAT_VERSION}
    back = load(path)
    assert set(back) == set(moments)
    for site, m in moments.items():
        a, b = m.state_dict(), back[site].state_dict()
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (site, k)
    _check_against_numpy(back["resid_post.3"], np.concatenate(chunks))


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    save({"a": _accumulate(_chunks(seed=11))}, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stats, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save({"b": RunningMoments(2)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(InputError, match="not a hookscope stats file"):
        load(path)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(5), r"shape \[5\].*reshape"),
        (torch.zeros(2, 3, DIM), "reshape"),
        (torch.zeros(4, DIM + 1), rf"\[n, {DIM}\]"),
        (torch.tensor([[float("nan")] * DIM]), "non-finite"),
        (torch.zeros(2, DIM, dtype=torch.complex64), "real"),
        (np.zeros((2, DIM)), "torch.Tensor"),
    ],
)
def test_bad_batches_raise(bad, match):
    m = RunningMoments(DIM)
    with pytest.raises(InputError, match=match):
        m.add(bad)
    assert m.n == 0


def test_bad_dim():
    for dim in (0, -1, 2.0, True):
        with pytest.raises(InputError, match="positive int"):
            RunningMoments(dim)
