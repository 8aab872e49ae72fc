"""NaN metrics and inputs, and bad arguments (issue 11 §5).

A hand-built network makes the metric NaN exactly where expected:
``Linear(2, 2) = identity -> ReLU -> Linear(2, 1)`` with ``out = h0 - 3 h1 + 1`` and the
metric ``log(out)``. Clean input (4, 1): out 2, metric log 2. Corrupted (0, 0): out 1,
metric 0. Denoising ``neuron.0.0`` gives h = (4, 0), out 5, metric log 5; denoising
``neuron.0.1`` gives h = (0, 1), out -2, metric NaN. An input (0, 2) has out -5: a NaN
baseline.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope import interventions as iv
from hookscope.data.digits import digits_tensors
from hookscope.interventions.result import PatchingResult, rank

CLEAN = torch.tensor([[4.0, 1.0]])
CORRUPTED = torch.tensor([[0.0, 0.0]])
NAN_INPUT = torch.tensor([[0.0, 2.0]])  # out -5: log is NaN
SITES = "neuron.0.*"


def log_out(out: torch.Tensor) -> torch.Tensor:
    return torch.log(out[:, 0]).mean()


def log_net() -> hs.HookedModel:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -3.0]]))
        net[2].bias.fill_(1.0)
    return hs.HookedModel.wrap(net.eval())


class Forwards:
    """Counts forwards of a model's root module (a plain torch pre-hook, removed on exit)."""

    def __init__(self, model: hs.HookedModel):
        self.model, self.count = model, 0

    def __enter__(self):
        self.handle = self.model.model.register_forward_pre_hook(self._seen)
        return self

    def _seen(self, module, args):
        self.count += 1

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------- top() and NaN scores


def test_rank_puts_nan_after_every_number():
    nan, inf = math.nan, math.inf
    assert rank(torch.tensor([nan, -inf, 1.0, nan, 2.0, inf])) == [5, 4, 2, 1, 0, 3]
    assert rank(torch.tensor([nan, nan])) == [0, 1]
    assert rank(torch.tensor([1.0, 3.0, 1.0])) == [1, 0, 2]  # ties in index order


def test_a_nan_job_is_ranked_last_in_both_directions():
    model = log_net()
    res = iv.activation_patching(model, CLEAN, CORRUPTED, log_out, sites=SITES, progress=False)
    assert res.flat[0] == pytest.approx(math.log(5)) and math.isnan(res.flat[1])
    assert [str(a) for a, _, _ in res.top()] == ["neuron.0.0", "neuron.0.1"]
    assert [str(a) for a, _, _ in res.top(1)] == ["neuron.0.0"]
    assert "1 of 2 jobs scored NaN (ranked last)" in repr(res)
    # noising: patching neuron.0.0 from the corrupted run gives h = (0, 1): NaN
    res = iv.activation_patching(
        model, CLEAN, CORRUPTED, log_out, sites=SITES, direction="noise", progress=False
    )
    assert math.isnan(res.flat[0]) and res.flat[1] == pytest.approx(math.log(5))
    assert [str(a) for a, _, _ in res.top()] == ["neuron.0.1", "neuron.0.0"]
    # a hand-built result: NaN effects never outrank numbers, whatever their sign
    flat = torch.tensor([math.nan, -3.0, 0.5], dtype=torch.float64)
    addresses = model.resolve(["neuron.0.0", "neuron.0.1", "resid_pre.0"])
    built = PatchingResult(flat.clone(), ("site",), [(a, None) for a in addresses], flat)
    assert [str(a) for a, _, _ in built.top()] == ["resid_pre.0", "neuron.0.1", "neuron.0.0"]


def test_localize_refuses_nan_scores():
    model = log_net()
    with pytest.raises(
        hs.InputError, match=r"screening score is NaN for 1 of 2 components \(neuron\.0\.1\)"
    ):
        iv.localize_circuit(
            model, CLEAN, CORRUPTED, log_out, sites=SITES, method="exact", progress=False
        )
    # the attribution screen is finite (the gradient at the corrupted run); the exact
    # confirmation of neuron.0.1 is NaN
    with pytest.raises(hs.InputError, match=r"exact \(confirmed\) score is NaN .*neuron\.0\.1"):
        iv.localize_circuit(model, CLEAN, CORRUPTED, log_out, sites=SITES, progress=False)


# ---------------------------------------------------------------- NaN baselines


@pytest.mark.parametrize(
    ("clean", "corrupted", "which"),
    [(NAN_INPUT, CORRUPTED, "clean"), (CLEAN, NAN_INPUT, "corrupted")],
)
def test_a_nan_baseline_is_refused_before_the_sweep(clean, corrupted, which):
    model = log_net()
    message = rf"metric is nan on the {which} baseline run.*the metric or the {which} inputs"
    with Forwards(model) as seen, pytest.raises(hs.InputError, match=message):
        iv.activation_patching(model, clean, corrupted, log_out, sites=SITES, progress=False)
    assert seen.count == 1  # the one baseline forward of both batches, no patched run
    with pytest.raises(hs.InputError, match=message):
        iv.attribution_patching(model, clean, corrupted, log_out, sites=SITES, progress=False)
    for method in ("exact", "attribution"):
        with Forwards(model) as seen, pytest.raises(hs.InputError, match=message):
            iv.localize_circuit(
                model, clean, corrupted, log_out, sites=SITES, method=method, progress=False
            )
        assert seen.count == 1


def test_nan_metric_without_ablation_or_with_everything_ablated():
    model = log_net()
    with Forwards(model) as seen, pytest.raises(hs.InputError, match="nan on the unablated"):
        iv.ablate(model, NAN_INPUT, SITES, metric=log_out, progress=False)
    assert seen.count == 1
    with pytest.raises(hs.InputError, match="nan on the unablated"):
        iv.knockout(model, NAN_INPUT, SITES, log_out, method="zero")
    # every site mean-ablated to the reference (0, 2): out -5, faithfulness undefined
    with pytest.raises(hs.InputError, match="nan on the all-ablated baseline run"):
        iv.knockout(model, CLEAN, SITES, log_out, keep=["neuron.0.0"], reference=NAN_INPUT)
    # finite baselines: zero-ablating neuron.0.0 gives h = (0, 1), out -2 (NaN, ranked
    # last); neuron.0.1 gives h = (4, 0), out 5
    res = iv.ablate(model, CLEAN, SITES, metric=log_out, progress=False)
    assert math.isnan(res.flat[0]) and res.flat[1] == pytest.approx(math.log(5))
    assert [str(a) for a, _, _ in res.top()] == ["neuron.0.1", "neuron.0.0"]


# ---------------------------------------------------------------- NaN / Inf inputs


@pytest.fixture(scope="module")
def mlp():
    return hs.zoo.load("digits-mlp")


@pytest.fixture(scope="module")
def images():
    x, y = digits_tensors("test")
    return x[:6], x[6:12], y[:6], y[6:12]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_images_are_refused_before_any_forward(mlp, images, bad):
    clean, corrupted, y_clean, y_corrupted = images
    metric = iv.logit_diff(y_clean, y_corrupted, position=None)
    broken = clean.clone()
    broken[3, 0, 2, 5] = bad
    kind = "NaN" if math.isnan(bad) else "Inf"
    calls = [
        (lambda: iv.activation_patching(mlp, broken, corrupted, metric, "neuron.*.*"),
         f"the clean inputs hold {kind} \\(1 value, rows 3\\)"),
        (lambda: iv.activation_patching(mlp, clean, broken, metric, "neuron.*.*"),
         f"the corrupted inputs hold {kind}"),
        (lambda: iv.attribution_patching(mlp, broken, corrupted, metric, "neuron.*.*"),
         f"the clean inputs hold {kind}"),
        (lambda: iv.localize_circuit(mlp, clean, broken, metric, "neuron.*.*"),
         f"the corrupted inputs hold {kind}"),
        (lambda: iv.ablate(mlp, broken, "neuron.*.*", metric=metric),
         f"the inputs hold {kind}"),
        (lambda: iv.ablate(mlp, clean, "neuron.*.*", "mean", reference=broken, metric=metric),
         f"the reference inputs hold {kind}"),
        (lambda: iv.knockout(mlp, broken, "neuron.*.*", metric, method="zero"),
         f"the inputs hold {kind}"),
    ]  # fmt: skip
    for call, message in calls:
        with Forwards(mlp) as seen, pytest.raises(hs.InputError, match=message):
            call()
        assert seen.count == 0, message


# ---------------------------------------------------------------- bad arguments


def _calls(mlp, images):
    clean, corrupted, y_clean, y_corrupted = images
    metric = iv.logit_diff(y_clean, y_corrupted, position=None)

    def patch(**kw):
        return iv.activation_patching(mlp, clean, corrupted, metric, progress=False, **kw)

    def attribute(**kw):
        return iv.attribution_patching(mlp, clean, corrupted, metric, progress=False, **kw)

    def localize(**kw):
        kw = {"sites": "neuron.0.*", "progress": False, **kw}
        return iv.localize_circuit(mlp, clean, corrupted, metric, **kw)

    def ablate(**kw):
        kw = {"sites": "neuron.0.*", "metric": metric, "progress": False, **kw}
        return iv.ablate(mlp, clean, **kw)

    def knockout(**kw):
        return iv.knockout(mlp, clean, **{"sites": "neuron.0.*", "metric": metric, **kw})

    return {
        "patch": patch,
        "attribute": attribute,
        "localize": localize,
        "ablate": ablate,
        "knockout": knockout,
    }


X_REF = digits_tensors("test")[0][20:30]
SITE_FORMS = r"sites must be an address \('head\.1\.3'.*a selection \('head\.\*\.\*'"
BAD_ARGUMENTS = [
    ("localize", dict(candidates=2.5), r"candidates must be an int >= 1, got 2\.5"),
    ("localize", dict(candidates=-3), r"candidates must be an int >= 1, got -3"),
    ("localize", dict(candidates=True), r"candidates must be an int >= 1, got True"),
    ("localize", dict(candidates="5"), r"candidates must be an int >= 1, got '5'"),
    ("localize", dict(threshold="0.8"), r"threshold must be a number in \(0, 1\], got str"),
    ("localize", dict(threshold=0.0), r"threshold must be in \(0, 1\], got 0\.0"),
    ("localize", dict(method="exakt"), r"method must be one of attribution, exact, got 'exakt'\. Did you mean 'exact'\?"),
    ("localize", dict(criterion="both"), "criterion must be one of patch, faithfulness"),
    ("localize", dict(ablation="shuffle"), "ablation must be one of zero, mean, resample, corrupted"),
    ("localize", dict(reference="corrupted"), r"reference must be inputs .*not the string 'corrupted'"),
    ("localize", dict(direction="backward"), "direction must be one of denoise, noise"),
    ("localize", dict(sites=7), SITE_FORMS),
    ("localize", dict(positions="eachh"), r"positions must be 'all', 'each' or a list of ints.*Did you mean 'each'"),
    ("patch", dict(sites=3), SITE_FORMS + r".*got int 3"),
    ("patch", dict(sites=None), SITE_FORMS + r".*got NoneType"),
    ("patch", dict(sites=[]), r"sites \[\] selects no address"),
    ("patch", dict(sites=["neuron.0.1", 4]), SITE_FORMS + r".*the list holds int 4"),
    ("patch", dict(sites={"neuron.0.1": 1}), SITE_FORMS),
    ("patch", dict(direction="up"), "direction must be one of denoise, noise, got 'up'"),
    ("patch", dict(positions=3), r"positions must be 'all', 'each' or a list of ints, got 3"),
    ("patch", dict(positions=[0, 1.5]), r"positions must be 'all', 'each' or a list of ints"),
    ("patch", dict(positions="each"), "mlp activations have no position axis"),
    ("patch", dict(chunk_size=-1), "chunk_size must be an int >= 1"),
    ("attribute", dict(sites=5), SITE_FORMS),
    ("attribute", dict(direction="sideways"), "direction must be one of denoise, noise"),
    ("attribute", dict(positions=[1]), "mlp activations have no position axis"),
    ("ablate", dict(method="avg"), "method must be one of zero, mean, resample, got 'avg'"),
    ("ablate", dict(method="resample", reference="x", n_draws=2), r"not the string 'x'"),
    ("ablate", dict(sites=2.0), SITE_FORMS),
    ("ablate", dict(seed="a"), "seed must be an int, got str 'a'"),
    ("ablate", dict(n_draws=-2), "n_draws must be an int >= 1, got -2"),
    ("ablate", dict(method="resample", reference=X_REF, n_draws=1.5), "n_draws must be an int >= 1"),
    ("knockout", dict(method="zero", n_draws=0), "n_draws must be an int >= 1, got 0"),
    ("ablate", dict(chunk_size=0), "chunk_size must be an int >= 1"),
    ("knockout", dict(method="shuffle"), "method must be one of zero, mean, resample, corrupted"),
    ("knockout", dict(method="corrupted", reference="clean"), r"not the string 'clean'"),
    ("knockout", dict(sites=(1, 2)), SITE_FORMS),
]  # fmt: skip


@pytest.mark.parametrize(("call", "kwargs", "message"), BAD_ARGUMENTS)
def test_bad_arguments_name_the_choices_before_any_forward(mlp, images, call, kwargs, message):
    with Forwards(mlp) as seen, pytest.raises(hs.InputError, match=message):
        _calls(mlp, images)[call](**kwargs)
    assert seen.count == 0


def test_a_model_that_is_not_wrapped_is_refused(images):
    clean, corrupted, y_clean, y_corrupted = images
    metric = iv.logit_diff(y_clean, y_corrupted, position=None)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    for call in (
        lambda: iv.activation_patching(net, clean, corrupted, metric),
        lambda: iv.attribution_patching(net, clean, corrupted, metric),
        lambda: iv.localize_circuit(net, clean, corrupted, metric),
        lambda: iv.ablate(net, clean, "neuron.0.*"),
        lambda: iv.knockout(net, clean, "neuron.0.*", metric),
    ):
        with pytest.raises(hs.InputError, match="model must be a hookscope HookedModel"):
            call()


def test_language_model_positions_and_addresses_are_checked_before_any_forward():
    """Token inputs: sweep positions are checked against the token width before any
    forward; a malformed or missing address raises its AddressError (naming the valid
    forms) before any forward too."""
    import builders

    model = hs.HookedModel.wrap(builders.tiny_neox())
    tokens = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupted = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(1))
    metric = iv.logit_diff(5, 9)
    cases = [
        (dict(positions=[2, 6]), hs.InputError, r"positions \[6\] out of range for inputs of 6"),
        (dict(positions=[-7]), hs.InputError, r"positions \[-7\] out of range"),
        (dict(sites="head.*.9"), hs.AddressRangeError, "head 9 out of range"),
        (dict(sites="heads.*"), hs.AddressParseError, "valid forms"),
    ]
    for kwargs, error, message in cases:
        for call in (iv.activation_patching, iv.attribution_patching, iv.localize_circuit):
            kw = {"sites": "head.*.*", "progress": False, **kwargs}
            with Forwards(model) as seen, pytest.raises(error, match=message):
                call(model, tokens, corrupted, metric, **kw)
            assert seen.count == 0, (call.__name__, kwargs)
