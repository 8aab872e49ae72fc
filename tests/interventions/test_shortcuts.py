"""Every speed shortcut of the patching sweeps is on where its architecture allows it.

A shortcut that silently turns off (as the skip-earlier-positions one did when transformers
renamed the forward's ``past_key_values`` keyword to ``cache``) leaves results right and
sweeps slow, so nothing else would notice. Each architecture states which shortcuts it must
get, and why the others cannot apply; the test fails when one of them is off.
"""

from __future__ import annotations

import pytest
import torch

import hookscope as hs
import hookscope.interventions as iv
from hookscope.interventions._onednn import onednn_linear
from hookscope.interventions.patching import Patcher

import builders

ALL = {"replay", "readout", "prefix", "linear_tail", "read_position", "onednn"}

# architecture -> (builder, the shortcuts it cannot have, and why)
CASES = {
    "neox_parallel": (builders.tiny_neox, {}),
    "neox_sequential": (
        lambda: builders.tiny_neox(parallel=False),
        {"linear_tail": "the MLP reads the attention output: a head's patch is not linear"},
    ),
    "gpt2": (
        builders.tiny_gpt2,
        {"linear_tail": "sequential block"},  # (oneDNN: its lm_head only; the blocks are Conv1D)
    ),
    "llama_gqa": (builders.tiny_llama_gqa, {"linear_tail": "sequential block"}),
    "gemma3": (builders.tiny_gemma3, {"linear_tail": "sequential block"}),
    "gemma3_softcap": (
        lambda: builders.tiny_gemma3(softcap=30.0),
        {
            "linear_tail": "sequential block",
            "readout": "the logits are soft-capped after the unembedding",
            "prefix": "needs the readout (the metric reads the recorded unembedding input)",
        },
    ),
    "bert": (
        builders.tiny_bert,
        {
            "linear_tail": "sequential block",
            "prefix": "bidirectional: every position sees the patched one",
        },
    ),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_every_shortcut_is_on_where_it_applies(arch):
    build, off = CASES[arch]
    model = hs.HookedModel.wrap(build())
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(10, 290, (2, 7), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 3:] = torch.randint(10, 290, (2, 4), generator=gen)
    patcher = Patcher(
        model, clean, corrupted, iv.logit_diff(5, 9), "head.*.*", "denoise", None, False
    )
    expected = ALL - set(off)
    if onednn_linear() is None:  # this build or CPU has no usable oneDNN kernel
        expected.discard("onednn")
    assert patcher.engine.shortcuts() == expected, {
        "missing": expected - patcher.engine.shortcuts(),
        "why off": off,
    }


def test_shortcut_results_equal_plain_forwards():
    """With every shortcut on (GPT-NeoX), each score equals a plain patched forward."""
    model = hs.HookedModel.wrap(builders.tiny_neox())
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(5, 400, (1, 7), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 4:] = torch.randint(5, 400, (1, 3), generator=gen)
    metric = iv.logit_diff(5, 9)
    res = iv.activation_patching(model, clean, corrupted, metric, "head.1.*", progress=False)
    _, clean_cache = model.run_with_cache(clean, names="head.1")
    with torch.no_grad():
        m_clean, m_corr = float(metric(model(clean))), float(metric(model(corrupted)))
    for h in range(4):

        def patch(act, address, h=h):
            return clean_cache[f"head.1.{h}"]

        with torch.no_grad():
            patched = float(metric(model.run_with_hooks(corrupted, hooks=[(f"head.1.{h}", patch)])))
        expected = (patched - m_corr) / (m_clean - m_corr)
        assert abs(float(res.scores[h]) - expected) < 1e-4
