"""Activation patching against TransformerLens 4.x's ``transformer_lens.patching`` on the same
weights, and the exact endpoints of normalised sweeps.

Models: the pythia-70m-shaped GPT-NeoX (parallel residual) and a tiny Llama with grouped-query
attention (4 query heads sharing 2 k/v heads), each saved with a tokenizer and booted into
TransformerLens' ``TransformerBridge`` offline (as in ``tests/test_peers.py``). Inputs: batch
2 x 6 tokens; the corrupted run differs from the clean one at positions 2 and 4.

Conventions of ``transformer_lens.patching`` (4.3), as read from its source:

* Every ``get_act_patch_*`` function takes ``(model, corrupted_tokens, clean_cache,
  patching_metric)``, runs the corrupted tokens with one clean activation patched in per
  index (denoising) and returns the RAW metric of each patched run: no normalisation. A
  plain-callable hookscope metric is also reported raw, so the values must agree.
  Noising is the same call with the roles swapped: clean tokens, corrupted cache.
* Axis orders: ``get_act_patch_resid_pre`` / ``_resid_mid`` / ``_attn_out`` / ``_mlp_out``
  -> [layer, pos]; ``get_act_patch_attn_head_out_all_pos`` (z, all positions) ->
  [layer, head]; ``get_act_patch_attn_head_out_by_pos`` -> [layer, pos, head] whereas
  hookscope's ``"head.*.*"`` with ``positions="each"`` is [layer, head, pos] (permuted here);
  ``get_act_patch_block_every`` -> [3, layer, pos] for (resid_pre, attn_out, mlp_out).
* It iterates one index per forward (batch 2); hookscope stacks patched runs along the batch,
  so the two differ by float rounding only (atol 1e-4 below).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

import hookscope as hs
from hookscope import interventions as iv

import builders

TL_ATOL = 1e-4
BATCH, POS = 2, 6
DIFF_POSITIONS = (2, 4)  # where corrupted differs from clean
MODELS = ["gpt_neox", "llama_gqa"]


# ---------------------------------------------------------------------------- fixtures


def _tokens(vocab: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, vocab, (BATCH, POS), generator=g)
    corrupted = clean.clone()
    for p in DIFF_POSITIONS:
        new = torch.randint(0, vocab, (BATCH,), generator=g)
        corrupted[:, p] = torch.where(new == clean[:, p], (new + 1) % vocab, new)
    assert (corrupted != clean).any(0).tolist() == [p in DIFF_POSITIONS for p in range(POS)]
    return clean, corrupted


class Setup:
    """One model in both libraries, the inputs and a plain logit-difference metric."""

    def __init__(self, name: str, path: Path):
        from transformer_lens.model_bridge import TransformerBridge

        self.name = name
        self.model = hs.HookedModel.from_pretrained(str(path))
        self.bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
        self.clean, self.corrupted = _tokens(self.model.cfg.d_vocab)
        with torch.no_grad():
            clean_logits = self.model(self.clean)[:, -1]
            corrupted_logits = self.model(self.corrupted)[:, -1]
        # answers that move the most between the runs, so m(clean) - m(corrupted) is large
        shift = (clean_logits - corrupted_logits).mean(0)
        self.a, self.b = int(shift.argmax()), int(shift.argmin())
        # per-row answers for the LongTensor form of logit_diff
        row_shift = clean_logits - corrupted_logits
        self.a_rows, self.b_rows = row_shift.argmax(-1), row_shift.argmin(-1)
        self._caches: dict[str, object] = {}

    def metric(self, logits: Tensor) -> Tensor:
        """Plain callable: mean logit[a] - mean logit[b] at the last position."""
        return logits[:, -1, self.a].mean() - logits[:, -1, self.b].mean()

    def row_metric(self, logits: Tensor) -> Tensor:
        rows = torch.arange(logits.shape[0])
        return (logits[rows, -1, self.a_rows] - logits[rows, -1, self.b_rows]).mean()

    def tl_cache(self, which: str):
        if which not in self._caches:
            tokens = self.clean if which == "clean" else self.corrupted
            with torch.no_grad():
                _, self._caches[which] = self.bridge.run_with_cache(tokens)
        return self._caches[which]

    def tl(self, fn_name: str, direction: str = "denoise") -> Tensor:
        from transformer_lens import patching

        fn = getattr(patching, fn_name)
        if direction == "denoise":
            base, cache = self.corrupted, self.tl_cache("clean")
        else:
            base, cache = self.clean, self.tl_cache("corrupted")
        with torch.no_grad():
            return fn(self.bridge, base, cache, self.metric)

    def ours(self, sites, positions, metric=None, direction="denoise", clean=None, corrupted=None):
        return iv.activation_patching(
            self.model,
            clean=self.clean if clean is None else clean,
            corrupted=self.corrupted if corrupted is None else corrupted,
            metric=self.metric if metric is None else metric,
            sites=sites,
            positions=positions,
            direction=direction,
        )

    def m(self, tokens: Tensor, metric=None) -> float:
        with torch.no_grad():
            return float((metric or self.metric)(self.model(tokens)))


_SETUPS: dict[str, Setup] = {}


def _setup(name: str, request, tmp_path_factory) -> Setup:
    """One Setup per model for the whole module (shared by ``setup`` and ``llama``)."""
    pytest.importorskip("transformer_lens")
    if name not in _SETUPS:
        if name == "gpt_neox":
            path = request.getfixturevalue("pythia_dir")
        else:
            path = tmp_path_factory.mktemp(name)
            builders.tiny_llama_gqa().save_pretrained(path)
            builders.make_tokenizer().save_pretrained(path)
        _SETUPS[name] = Setup(name, path)
    return _SETUPS[name]


@pytest.fixture(scope="module", params=MODELS)
def setup(request, tmp_path_factory) -> Setup:
    return _setup(request.param, request, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(request, tmp_path_factory) -> Setup:
    """The tiny GQA Llama alone: sweeps that would cost hundreds of TL forwards on pythia."""
    return _setup("llama_gqa", request, tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    _SETUPS.clear()


def close(actual: Tensor, expected: Tensor, what: str, atol: float = TL_ATOL) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def _addresses(res) -> list[str]:
    return [str(hs.parse(str(a))) for a in res.addresses]


def _varies(t: Tensor, what: str) -> None:
    """The sweep is not degenerate: some patch moves the metric (so equality means something)."""
    assert float(t.max() - t.min()) > 1e-3, f"{what}: every patch gives the same value {t}"


# ---------------------------------------------------------------------------- equality with TL


def test_resid_pre_each_position_matches_tl(setup):
    theirs = setup.tl("get_act_patch_resid_pre")
    res = setup.ours("resid_pre.*", "each")
    n = setup.model.n_layers
    assert tuple(theirs.shape) == (n, POS)
    close(res.scores, theirs, f"{setup.name} resid_pre.* each vs get_act_patch_resid_pre")
    _varies(theirs, "get_act_patch_resid_pre")
    assert _addresses(res) == [f"resid_pre.{layer}" for layer in range(n)]
    assert list(res.positions) == list(range(POS))
    # causal model: before the first corrupted position nothing differs, at every layer
    unpatched = setup.m(setup.corrupted)
    close(res.scores[:, : DIFF_POSITIONS[0]], torch.full((n, DIFF_POSITIONS[0]), unpatched), "pre")


def test_head_z_all_positions_matches_tl(setup):
    theirs = setup.tl("get_act_patch_attn_head_out_all_pos")
    res = setup.ours("head.*.*", "all")
    n, h = setup.model.n_layers, setup.model.cfg.n_heads
    assert tuple(theirs.shape) == (n, h)
    close(res.scores, theirs, f"{setup.name} head.*.* all vs get_act_patch_attn_head_out_all_pos")
    _varies(theirs, "get_act_patch_attn_head_out_all_pos")
    assert res.positions is None
    assert _addresses(res) == [f"head.{layer}.{head}" for layer in range(n) for head in range(h)]
    # top(k): the k best (address, None, score), best first
    top = res.top(3)
    best = res.scores.flatten().double().sort(descending=True).values[:3]
    assert [p for _, p, _ in top] == [None] * 3
    close(torch.tensor([s for _, _, s in top]), best, "top(3) scores")
    flat_best = int(res.scores.flatten().argmax())
    assert str(hs.parse(str(top[0][0]))) == f"head.{flat_best // h}.{flat_best % h}"


def test_head_z_by_position_matches_tl(llama):
    """TL orders [layer, pos, head]; hookscope's "head.*.*" x "each" is [layer, head, pos]."""
    theirs = llama.tl("get_act_patch_attn_head_out_by_pos")
    n, h = llama.model.n_layers, llama.model.cfg.n_heads
    assert tuple(theirs.shape) == (n, POS, h)
    res = llama.ours("head.*.*", "each")
    close(
        res.scores, theirs.permute(0, 2, 1), "head.*.* each vs get_act_patch_attn_head_out_by_pos"
    )
    _varies(theirs, "get_act_patch_attn_head_out_by_pos")


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunked_sweeps_match_tl(llama, chunk_size):
    """Stacking fewer patched runs per forward (5 divides neither the 48 nor the 12 jobs, so the
    last chunk is partial; 1 is TL's one run per forward) changes nothing."""
    for fn, sites, positions in [
        ("get_act_patch_attn_head_out_by_pos", "head.*.*", "each"),
        ("get_act_patch_resid_pre", "resid_pre.*", "each"),
    ]:
        theirs = llama.tl(fn)
        if theirs.ndim == 3:
            theirs = theirs.permute(0, 2, 1)
        res = iv.activation_patching(
            llama.model,
            clean=llama.clean,
            corrupted=llama.corrupted,
            metric=llama.metric,
            sites=sites,
            positions=positions,
            chunk_size=chunk_size,
        )
        close(res.scores, theirs, f"{sites} {positions} chunk_size={chunk_size} vs {fn}")


def test_block_every_matches_tl(llama):
    """get_act_patch_block_every = stack of resid_pre, attn_out, mlp_out sweeps by position."""
    theirs = llama.tl("get_act_patch_block_every")
    assert tuple(theirs.shape) == (3, llama.model.n_layers, POS)
    for i, site in enumerate(["resid_pre", "attn_out", "mlp_out"]):
        res = llama.ours(f"{site}.*", "each")
        close(res.scores, theirs[i], f"{site}.* each vs get_act_patch_block_every[{i}]")
        _varies(theirs[i], f"get_act_patch_block_every[{i}]")


def test_resid_mid_matches_tl(llama):
    theirs = llama.tl("get_act_patch_resid_mid")
    res = llama.ours("resid_mid.*", "each")
    close(res.scores, theirs, "resid_mid.* each vs get_act_patch_resid_mid")
    _varies(theirs, "get_act_patch_resid_mid")


def test_noising_matches_tl_with_roles_swapped(llama):
    """direction="noise": clean run, corrupted activations patched in = TL called on the clean
    tokens with the corrupted cache."""
    theirs = llama.tl("get_act_patch_resid_pre", direction="noise")
    res = llama.ours("resid_pre.*", "each", direction="noise")
    close(res.scores, theirs, "noise resid_pre.* each vs TL(clean tokens, corrupted cache)")
    _varies(theirs, "noising get_act_patch_resid_pre")
    theirs = llama.tl("get_act_patch_attn_head_out_all_pos", direction="noise")
    res = llama.ours("head.*.*", "all", direction="noise")
    close(res.scores, theirs, "noise head.*.* all vs TL(clean tokens, corrupted cache)")


# ---------------------------------------------------------------------------- exact endpoints


def test_structured_metric_endpoints(setup):
    """Normalised logit_diff: resid_pre.L at every position is the whole input of block L, so
    patching it makes the patched run the clean (denoise) / corrupted (noise) run."""
    metric = iv.logit_diff(setup.a, setup.b, position=-1)
    gap = setup.m(setup.clean) - setup.m(setup.corrupted)
    assert gap > 1e-2, f"clean and corrupted barely differ ({gap}); pick other answers"
    n = setup.model.n_layers

    res = setup.ours("resid_pre.0", "all", metric=metric)
    close(torch.as_tensor(res.scores).reshape(()), torch.tensor(1.0), "denoise resid_pre.0", 1e-5)
    res = setup.ours("resid_pre.*", "all", metric=metric)
    assert tuple(res.scores.shape) == (n,)
    close(res.scores, torch.ones(n), "denoise resid_pre.* all positions", 1e-5)
    res = setup.ours("resid_pre.*", "all", metric=metric, direction="noise")
    close(res.scores, torch.zeros(n), "noise resid_pre.* all positions", 1e-5)

    # a position where clean and corrupted tokens agree: resid_pre.0 there is the same vector
    res = setup.ours("resid_pre.0", "each", metric=metric)
    scores = torch.as_tensor(res.scores).reshape(POS)
    same = [p for p in range(POS) if p not in DIFF_POSITIONS]
    close(scores[same], torch.zeros(len(same)), "denoise resid_pre.0 at equal tokens", 1e-5)
    assert scores[list(DIFF_POSITIONS)].abs().max() > 1e-3  # the differing tokens do matter
    res = setup.ours("resid_pre.0", "each", metric=metric, direction="noise")
    scores = torch.as_tensor(res.scores).reshape(POS)
    close(scores[same], torch.ones(len(same)), "noise resid_pre.0 at equal tokens", 1e-5)

    # a list of positions sweeps those positions, in the given order
    res = setup.ours("resid_pre.0", [4, 0], metric=metric)
    assert list(res.positions) == [4, 0]
    got = torch.as_tensor(res.scores).reshape(2)
    close(got[1:], torch.zeros(1), "denoise resid_pre.0 at position 0", 1e-5)
    close(got[:1], torch.tensor([_plain_norm(setup, 4)]), "denoise resid_pre.0 at position 4", 1e-3)


def _plain_norm(setup: Setup, pos: int) -> float:
    """(raw - m(corrupted)) / (m(clean) - m(corrupted)) of a one-position resid_pre.0 denoise,
    with the raw value from a hand-written hook (independent of activation_patching)."""
    _, cache = setup.model.run_with_cache(setup.clean, names=["resid_pre.0"])
    clean0 = cache["resid_pre.0"]

    def put(act, address):
        act = act.clone()
        act[:, pos] = clean0[:, pos]
        return act

    with torch.no_grad():
        raw = float(
            setup.metric(setup.model.run_with_hooks(setup.corrupted, hooks=[("resid_pre.0", put)]))
        )
    m_clean, m_corr = setup.m(setup.clean), setup.m(setup.corrupted)
    return (raw - m_corr) / (m_clean - m_corr)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_structured_metric_is_normalised_plain_metric(setup, direction):
    """The same sweep with logit_diff and with the equivalent plain callable: structured =
    (raw - m(corrupted)) / (m(clean) - m(corrupted)) in both directions."""
    raw = setup.ours("head.*.*", "all", direction=direction).scores.double()
    m_clean, m_corr = setup.m(setup.clean), setup.m(setup.corrupted)
    structured = setup.ours(
        "head.*.*", "all", metric=iv.logit_diff(setup.a, setup.b, position=-1), direction=direction
    ).scores
    close(structured, (raw - m_corr) / (m_clean - m_corr), f"{direction} normalisation", 1e-3)
    # per-row answers as LongTensors, and per-row positions as a LongTensor
    per_row = iv.logit_diff(setup.a_rows, setup.b_rows, position=torch.full((BATCH,), POS - 1))
    raw = setup.ours(
        "head.*.*", "all", metric=setup.row_metric, direction=direction
    ).scores.double()
    m_clean, m_corr = (
        setup.m(setup.clean, setup.row_metric),
        setup.m(setup.corrupted, setup.row_metric),
    )
    structured = setup.ours("head.*.*", "all", metric=per_row, direction=direction).scores
    close(
        structured, (raw - m_corr) / (m_clean - m_corr), f"{direction} per-row normalisation", 1e-3
    )


def test_self_patching_leaves_the_metric_unchanged(setup):
    """clean = corrupted: every patch writes the value already there, so a plain metric reads
    the unpatched value everywhere (a structured one would divide by zero)."""
    unpatched = setup.m(setup.corrupted)
    for sites, positions in [("resid_pre.*", "each"), ("head.*.*", "all")]:
        res = setup.ours(sites, positions, clean=setup.corrupted, corrupted=setup.corrupted)
        close(res.scores, torch.full(res.scores.shape, unpatched), f"self-patch {sites}", 1e-5)
