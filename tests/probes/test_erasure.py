"""hookscope.probes.erasure: LEACE, INLP, the Eraser as a hook, and the amnesic check.

References: EleutherAI's ``concept_erasure`` (the LEACE authors' package; shrinkage and the
trace constraint off, which the paper's closed form does not have), the closed form
``I - S (S^T Sigma^-1 S)^-1 S^T Sigma^-1`` of LEACE's linear part for a full-rank covariance,
scikit-learn's LogisticRegression as a fresh probe, Hugging Face's own forward with a plain
torch hook, and the layer-norm identity that makes a planted erasure fix a logit difference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from concept_erasure import LeaceEraser as RefEraser
from concept_erasure import LeaceFitter as RefFitter
from sklearn.linear_model import LogisticRegression

import hookscope as hs
from hookscope.errors import AddressError, ProbeError
from hookscope.probes.erasure import AmnesicResult, Eraser, LeaceFitter, amnesic, erase

import builders

F64 = torch.float64


def classes_data(n: int, d: int, k: int, seed: int, shift: float = 1.5):
    """Gaussian classes with random means and one correlated (random mixing) covariance,
    offset from the origin; labels uniform in 0..k-1."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    mix = mix + 0.3 * torch.eye(d, dtype=F64)
    means = shift * torch.randn(k, d, generator=g, dtype=F64)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=F64) @ mix + means[y] + 3.0
    return x, y


def reference(x: torch.Tensor, z: torch.Tensor) -> RefEraser:
    """concept_erasure's LEACE in float64 with the paper's plain covariance estimate."""
    fitter = RefFitter(
        x.shape[1], z.shape[1], dtype=F64, shrinkage=False, constrain_cov_trace=False, svd_tol=1e-8
    )
    return fitter.update(x, z).eraser


def chance_band(n: int, p: float = 0.5) -> float:
    """Four binomial standard errors of an accuracy over ``n`` rows at rate ``p``."""
    return 4 * math.sqrt(p * (1 - p) / n)


def sklearn_accuracy(x_train, y_train, x_test, y_test) -> float:
    clf = LogisticRegression(max_iter=2000).fit(x_train.numpy(), np.asarray(y_train))
    return float(clf.score(x_test.numpy(), np.asarray(y_test)))


# --------------------------------------------------------------------------- LEACE


@pytest.mark.parametrize("k", [2, 3])
def test_leace_equals_concept_erasure(k):
    x, y = classes_data(1500, 16, k, seed=k)
    ours = erase(x, y, method="leace")
    ref = reference(x, torch.nn.functional.one_hot(y, k).to(F64))  # all k one-hot columns
    assert ours.method == "leace" and ours.rank == k - 1
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.projection, ref.P, atol=1e-8, rtol=0)
    torch.testing.assert_close(ours.bias, x.mean(0), atol=1e-12, rtol=0)
    # string labels give the same eraser as their integer codes
    names = np.array(["cat", "dog", "eel"])[y.numpy()]
    torch.testing.assert_close(erase(x.numpy(), names)(x), ref(x), atol=1e-6, rtol=0)


def test_leace_continuous_target_equals_concept_erasure():
    x, _ = classes_data(1000, 10, 2, seed=11)
    g = torch.Generator().manual_seed(3)
    target = x @ torch.randn(10, generator=g, dtype=F64) + torch.randn(1000, generator=g, dtype=F64)
    ours = erase(x, target)
    assert ours.rank == 1
    torch.testing.assert_close(ours(x), reference(x, target[:, None])(x), atol=1e-6, rtol=0)
    erased = ours(x)
    cov = (erased - erased.mean(0)).T @ (target - target.mean()) / len(target)
    assert cov.abs().max() < 1e-9 * target.std() * erased.std(0).max()


def test_streaming_fitter_and_merge_equal_one_fit():
    x, y = classes_data(1200, 12, 3, seed=5)
    x = x + 1e4  # a large common offset: the pairwise update keeps its precision
    ref = reference(x, torch.nn.functional.one_hot(y, 3).to(F64))
    left = LeaceFitter(12, 3)
    for part in range(3):  # integer class indices, one-hot encoded with all 3 columns
        rows = slice(part * 200, (part + 1) * 200)
        left.update(x[rows], y[rows])
    right = LeaceFitter(12, 3).update(x[600:], torch.nn.functional.one_hot(y[600:], 3).float())
    merged = left.merge(right)
    assert merged.n == 1200 and merged.eraser.rank == 2
    torch.testing.assert_close(merged.eraser(x), ref(x), atol=1e-6, rtol=0)
    # leading axes of x and z are flattened together
    batched = LeaceFitter(12, 3).update(x.reshape(30, 40, 12), y.reshape(30, 40))
    torch.testing.assert_close(batched.eraser(x), ref(x), atol=1e-6, rtol=0)


def test_leace_guards_the_concept_and_is_least_squares_optimal():
    x, y = classes_data(6000, 16, 3, seed=2)
    x_train, y_train, x_test, y_test = x[:4000], y[:4000], x[4000:], y[4000:]
    eraser = erase(x_train, y_train)
    erased = eraser(x_train)
    # zero cross-covariance with the one-hot concept == equal class-conditional means
    spread = erased.std(0).max()
    for c in range(3):
        assert (erased[y_train == c].mean(0) - erased.mean(0)).abs().max() < 1e-10 * spread
    # a fresh probe: near-perfect before, at chance (majority rate) after, on held-out rows
    before = sklearn_accuracy(x_train, y_train, x_test, y_test)
    after = sklearn_accuracy(erased, y_train, eraser(x_test), y_test)
    majority = float(np.bincount(y_test.numpy()).max() / len(y_test))
    assert before > 0.97
    assert abs(after - majority) < chance_band(len(y_test), majority), (before, after, majority)

    # closed form of the linear part for full-rank Sigma: P = I - S (S' Si S)^-1 S' Si
    xc = x_train - x_train.mean(0)
    zc = torch.nn.functional.one_hot(y_train, 3)[:, 1:].to(F64)
    zc = zc - zc.mean(0)
    sigma, s = xc.T @ xc / len(xc), xc.T @ zc / len(xc)
    si = torch.linalg.inv(sigma)
    eye = torch.eye(16, dtype=F64)
    closed = eye - s @ torch.linalg.solve(s.T @ si @ s, s.T @ si)
    torch.testing.assert_close(eraser.projection, closed, atol=1e-9, rtol=0)

    # Theorem 4.3: among linear erasers with P S = 0 (every P = I - S (B'S)^-1 B'), LEACE's
    # mean squared edit ||(I - P)(x - mean)||_M^2 is the smallest, for every PSD M at once.
    g = torch.Generator().manual_seed(9)
    edits = eraser(x_train) - x_train
    norms = [eye]
    for _ in range(3):
        a = torch.randn(16, 16, generator=g, dtype=F64)
        norms.append(a @ a.T)
    candidates = [eye - s @ torch.linalg.solve(s.T @ s, s.T)]  # the orthogonal projection
    for _ in range(25):
        b = torch.randn(16, 2, generator=g, dtype=F64)
        candidates.append(eye - s @ torch.linalg.solve(b.T @ s, b.T))
    for p in candidates:
        assert (p @ s).abs().max() < 1e-8 * s.abs().max()  # a valid eraser
        other = xc @ (eye - p).T
        for m in norms:
            ours = ((edits @ m) * edits).sum(1).mean()
            theirs = ((other @ m) * other).sum(1).mean()
            assert ours <= theirs * (1 + 1e-9), (ours, theirs)
    orth = xc @ (eye - candidates[0]).T
    ours, theirs = float(edits.square().sum(1).mean()), float(orth.square().sum(1).mean())
    assert ours < 0.97 * theirs, (ours, theirs)  # strictly better here (about 9 %)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_eraser_keeps_shape_dtype_device(dtype):
    x, y = classes_data(800, 8, 2, seed=4)
    eraser = erase(x, y)
    ref = reference(x, y[:, None].to(F64))
    batch = x[:60].reshape(3, 20, 8)
    out = eraser(batch.to(dtype))
    assert out.dtype == dtype and out.shape == batch.shape and out.device == batch.device
    want = ref(batch.to(dtype).to(F64))  # the reference on the same rounded input
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-5, F64: 1e-10}[dtype]
    torch.testing.assert_close(out.to(F64), want, atol=tol * want.abs().max(), rtol=0)
    moved = eraser.to("cpu")
    assert moved.rank == eraser.rank and moved.left.device.type == "cpu"
    torch.testing.assert_close(moved(x), eraser(x))
    assert "leace" in repr(eraser) and "rank=1" in repr(eraser)


# --------------------------------------------------------------------------- INLP


@pytest.mark.parametrize(
    "k, n_fit", [(2, 2000), (3, 1200)]
)  # fewer rows: multinomial fits are slower
def test_inlp_removes_the_concept_with_an_orthogonal_projection(k, n_fit):
    x, y = classes_data(n_fit + 1000, 10, k, seed=20 + k)
    x_fit, y_fit, x_test, y_test = x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:]
    eraser = erase(x_fit, y_fit, method="inlp", n_iter=20, tol=0.01)
    assert eraser.method == "inlp" and eraser.bias is None
    assert 1 <= eraser.rank < 10
    p, q = eraser.projection, eraser.right
    torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)  # idempotent
    torch.testing.assert_close(p, p.T, atol=1e-12, rtol=0)  # symmetric
    torch.testing.assert_close(q @ q.T, torch.eye(eraser.rank, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(eraser.left, q.T)
    assert int(torch.linalg.matrix_rank(torch.eye(10, dtype=F64) - p)) == eraser.rank
    torch.testing.assert_close(eraser(x), x @ p.T)  # linear: x - Q'Q x
    # the recorded probe accuracies: informative first, at chance (or out of iterations) last
    assert eraser.accuracies[0] > 0.9 and eraser.chance is not None
    assert eraser.accuracies[-1] <= eraser.chance + 0.01 or len(eraser.accuracies) == 20
    # a fresh scikit-learn probe on rows INLP never saw
    majority = float(np.bincount(y_test.numpy()).max() / len(y_test))
    before = sklearn_accuracy(x_fit, y_fit, x_test, y_test)
    after = sklearn_accuracy(eraser(x_fit), y_fit, eraser(x_test), y_test)
    assert before > 0.95
    assert abs(after - majority) < chance_band(len(y_test), majority), (before, after, majority)


# --------------------------------------------------------------------------- the hook


def count_hooks(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


A, B = 17, 301  # the two tokens of the amnesic test's logit difference


@pytest.fixture(scope="module")
def neox():
    """A tiny GPT-NeoX with a random final layer norm (weight and bias), unembedding rows of
    unit scale for tokens A and B (so their logit difference depends on the residual), and
    its tokens."""
    hf = builders.tiny_neox(seed=3)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        norm = hf.gpt_neox.final_layer_norm
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.1)
        unembed = hf.get_output_embeddings().weight
        unembed[[A, B]] = torch.randn(2, unembed.shape[1], generator=g)
    tokens = torch.randint(0, 500, (8, 16), generator=g)
    return hs.HookedModel.wrap(hf), hf, tokens


def replace_output(value: torch.Tensor, output):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def test_hook_equals_reference_eraser_in_a_plain_torch_hook(neox):
    model, hf, tokens = neox
    _, clean = model.run_with_cache(tokens, names=["resid_post.0"])
    acts = clean["resid_post.0"]  # [8, 16, 64]
    x = acts.reshape(-1, 64).to(F64)
    labels = (tokens % 2).reshape(-1)
    eraser = erase(x, labels)

    user = hf.gpt_neox.layers[1].register_forward_hook(lambda m, a, o: None)  # the user's own
    before = count_hooks(hf)
    logits, hooked = model.run_with_cache(
        tokens, names=["resid_post.0", "resid_post.1"], hooks=[("resid_post.0", eraser.hook)]
    )
    assert count_hooks(hf) == before  # exactly what hookscope added is gone, the user's stays
    user.remove()
    torch.testing.assert_close(hooked["resid_post.0"], eraser(acts))

    # reference: concept_erasure's eraser in a plain torch forward hook on the HF layer
    ref = reference(x, labels[:, None].to(F64))
    ref32 = RefEraser(ref.proj_left.float(), ref.proj_right.float(), ref.bias.float())

    def torch_hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        return replace_output(ref32(hidden), output)

    handle = hf.gpt_neox.layers[0].register_forward_hook(torch_hook)
    try:
        with torch.no_grad():
            want = hf(tokens).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        model.run_with_hooks(tokens, hooks=[("resid_post.0", eraser.hook)]),
        want,
        atol=1e-4,
        rtol=1e-4,
    )
    assert count_hooks(hf) == before - 1


# --------------------------------------------------------------------------- amnesic


def test_amnesic_planted_direction_beats_the_random_control(neox):
    model, hf, tokens = neox
    a, b = A, B
    norm = hf.gpt_neox.final_layer_norm
    w_u = hf.get_output_embeddings().weight.detach().to(F64)  # [vocab, d]
    dw = w_u[a] - w_u[b]
    v = norm.weight.detach().to(F64) * dw
    c = v - v.mean()  # layer norm: (x - mean(x)) . v == x . c, so removing c kills that term
    planted = Eraser.from_directions(c)

    def metric(logits):  # the size of the logit difference at the last position
        return (logits[:, -1, a] - logits[:, -1, b]).abs().mean()

    before = count_hooks(hf)
    result = amnesic(model, tokens, "resid_post.1", planted, metric, control_seed=4)
    assert count_hooks(hf) == before
    assert isinstance(result, AmnesicResult) and result.rank == 1 and result.site == "resid_post.1"

    with torch.no_grad():
        clean = float(metric(hf(tokens).logits))
    # erased: only the norm's bias term of the logit difference is left, at every position
    erased = abs(float(norm.bias.detach().to(F64) @ dw))
    assert result.clean == pytest.approx(clean, abs=1e-5)
    assert result.erased == pytest.approx(erased, abs=1e-4)
    assert abs(result.erased_effect) > 1.0, str(result)

    # control: an orthogonal projection of rank 1 about no bias, applied as a torch hook
    ctrl = result.control_eraser
    p = ctrl.projection
    torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)
    torch.testing.assert_close(p, p.T, atol=1e-12, rtol=0)
    assert ctrl.rank == 1 and ctrl.bias is None
    unit = ctrl.right[0].float()

    def torch_hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        return replace_output(hidden - (hidden @ unit)[..., None] * unit, output)

    handle = hf.gpt_neox.layers[1].register_forward_hook(torch_hook)
    try:
        with torch.no_grad():
            control = float(metric(hf(tokens).logits))
    finally:
        handle.remove()
    assert result.control == pytest.approx(control, abs=1e-5)
    assert abs(result.erased_effect) > 5 * abs(result.control_effect), str(result)
    assert result.erased_effect == pytest.approx(result.erased - result.clean)

    # the control is seeded: the same seed draws the same direction, another seed another
    again = amnesic(model, tokens, "resid_post.1", planted, metric, control_seed=4)
    assert again.control == result.control
    other = Eraser.random(64, 1, seed=5)
    assert abs(float(other.right[0] @ ctrl.right[0])) < 0.99

    frame = result.to_pandas()
    assert list(frame["condition"]) == ["clean", "erased", "control"]
    assert frame["metric"].tolist() == [result.clean, result.erased, result.control]
    assert frame["change"].tolist()[1:] == [result.erased_effect, result.control_effect]
    text = str(result)
    assert "resid_post.1" in text and "seed 4" in text and f"{result.erased:+.6g}" in text


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, match",
    [
        ("lengths", "99 labels but X has 100 rows"),
        ("one_class", "single class"),
        ("nan", r"NaN or infinite values in 1 rows \(first: \[7\]\)"),
        ("method", "unknown erasure method 'lace'.*leace, inlp.*Did you mean 'leace'"),
        ("option", "unknown option.*'n_iters'.*Did you mean 'n_iter'"),
        ("float_inlp", "INLP erases classes"),
        ("shape", r"\[rows, features\]"),
        ("float_shape", r"float target must be \[n\] or \[n, k\]"),
    ],
)
def test_bad_fit_inputs(case, match):
    x, y = classes_data(100, 6, 2, seed=0)
    args, kwargs = (x, y), {}
    if case == "lengths":
        args = (x, y[:-1])
    elif case == "one_class":
        args = (x, torch.zeros(100, dtype=torch.long))
    elif case == "nan":
        x = x.clone()
        x[7, 2] = float("nan")
        args = (x, y)
    elif case == "method":
        kwargs = {"method": "lace"}
    elif case == "option":
        kwargs = {"method": "inlp", "n_iters": 3}
    elif case == "float_inlp":
        args, kwargs = (x, torch.randn(100)), {"method": "inlp"}
    elif case == "shape":
        args = (x[None], y)
    elif case == "float_shape":
        args = (x, torch.randn(99))
    with pytest.raises(ProbeError, match=match):
        erase(*args, **kwargs)


def test_bad_widths_and_arguments(neox):
    model, hf, tokens = neox
    x, y = classes_data(200, 10, 2, seed=1)
    eraser = erase(x, y)
    with pytest.raises(ProbeError, match=r"d=10.*shape \(4, 7\)"):
        eraser(torch.randn(4, 7))
    with pytest.raises(ProbeError, match="floating"):
        eraser(torch.ones(4, 10, dtype=torch.long))
    before = count_hooks(hf)
    with pytest.raises(ProbeError, match=r"d=10.*resid_post\.0.*last dim 64"):
        model.run_with_hooks(tokens, hooks=[("resid_post.0", eraser.hook)])
    assert count_hooks(hf) == before
    calls = []

    def metric(logits):
        calls.append(1)
        return logits[:, -1, 0].mean()

    with pytest.raises(AddressError):
        amnesic(
            model, tokens, "resid_post.9", erase(torch.randn(50, 64), torch.arange(50) % 2), metric
        )
    assert not calls  # refused before any forward
    wide = erase(torch.randn(200, 64, dtype=F64), torch.arange(200) % 2)
    with pytest.raises(ProbeError, match="one number"):
        amnesic(model, tokens, "resid_post.0", wide, lambda logits: logits[:, -1, 0])
    with pytest.raises(ProbeError, match="LeaceFitter with d=10"):
        LeaceFitter(10, 2).merge(LeaceFitter(11, 2))
    with pytest.raises(ProbeError, match="at least 2 rows"):
        LeaceFitter(10, 2).eraser
    with pytest.raises(ProbeError, match=r"0\.\.1"):
        LeaceFitter(10, 2).update(x, torch.full((200,), 2))
