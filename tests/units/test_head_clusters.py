"""hookscope.units.head_clusters against scipy and planted clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hookscope.units import cluster_heads, cluster_patterns


def _planted_patterns(types: int, per: int, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bases = [torch.eye(n), torch.zeros(n, n), torch.full((n, n), 1 / n)][:types]
    bases[1][:, 0] = 1.0 if types > 1 else 0.0
    out = [b + 0.02 * torch.rand(n, n, generator=g) for b in bases for _ in range(per)]
    truth = [t for t in range(types) for _ in range(per)]
    return torch.stack(out), np.array(truth)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(((a[:, None] == a[None]) == (b[:, None] == b[None])).all())


@pytest.mark.parametrize("method", ["kmeans", "hierarchical"])
@pytest.mark.parametrize("types", [2, 3])
def test_planted_clusters_recovered_with_auto_k(method, types):
    patterns, truth = _planted_patterns(types, 4)
    res = cluster_patterns(patterns, "auto", method)
    assert res.k == types
    assert _same_partition(res.labels.numpy(), truth)
    assert res.scores[types] == max(res.scores.values())


def test_hierarchical_equals_scipy_and_dendrogram_draws_it():
    from scipy.cluster.hierarchy import dendrogram, fcluster, linkage

    patterns, _ = _planted_patterns(3, 3, seed=1)
    names = [f"h{i}" for i in range(9)]
    res = cluster_patterns(patterns, 3, "hierarchical", names=names, linkage="average")
    x = patterns.double().reshape(9, -1).numpy()
    Z = linkage(x, "average")
    assert np.allclose(res.linkage, Z)
    assert _same_partition(res.labels.numpy(), fcluster(Z, 3, "maxclust"))
    fig = res.plot()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == dendrogram(
        Z, labels=names, no_plot=True
    )["ivl"]
    heights = sorted(seg[:, 1].max() for c in ax.collections for seg in c.get_segments())
    assert np.allclose(heights, np.sort(Z[:, 2]))


def test_cluster_heads_uses_the_mean_patterns(vit, digits, stats):
    from scipy.cluster.hierarchy import linkage

    res = cluster_heads(vit, digits[0], k=2, method="hierarchical", progress=False)
    x = stats.mean_patterns.reshape(8, -1).numpy()
    assert np.allclose(res.linkage, linkage(x, "ward"), atol=1e-8)
    assert res.names[:2] == ["head.0.0", "head.0.1"]
    same = cluster_heads(stats, None, k=2, method="hierarchical")
    assert torch.equal(same.labels, res.labels)
    assert list(res.to_pandas()["cluster"]) == res.labels.tolist()
    assert "HeadClusters(8 heads, hierarchical, k=2" in repr(res)


def test_degenerate_patterns_and_arguments_raise(stats, digits):
    from hookscope.errors import InputError

    same = torch.full((5, 4, 4), 0.25)
    with pytest.raises(InputError, match="every head has the same mean pattern"):
        cluster_patterns(same, "auto")
    patterns, _ = _planted_patterns(2, 3)
    bad = patterns.clone()
    bad[1, 0, 0] = float("inf")
    with pytest.raises(InputError, match="infinite"):
        cluster_patterns(bad)
    bad = patterns.clone()
    bad[2] = float("nan")
    with pytest.raises(InputError, match=r"heads \[2\] have no finite"):
        cluster_patterns(bad)
    with pytest.raises(InputError, match=r"names must be unique; repeated: \['a'\]"):
        cluster_patterns(patterns, names=["a", "a", "b", "c", "d", "e"])
    with pytest.raises(InputError, match="layers selects the layers head_stats runs"):
        cluster_heads(stats, digits[0], layers=[0])
    # numpy integers are accepted for k and seed and give the int result
    a = cluster_patterns(patterns, np.int64(2), seed=np.int32(0))
    b = cluster_patterns(patterns, 2, seed=0)
    assert torch.equal(a.labels, b.labels) and a.k == 2
