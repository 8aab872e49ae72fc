"""The address grammar: round trips, selections, TransformerLens aliases, ordering, errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hookscope as hs
from hookscope.addresses import HEAD_SITES, NEURON_SITES, RESID_SITES, Selection


class Dims:
    n_layers = 6

    def n_heads(self, layer, site):
        return 8

    def n_neurons(self, layer, site):
        return 2048


idx = st.integers(min_value=0, max_value=10_000)
addresses = st.one_of(
    st.just(hs.Embed()),
    st.just(hs.Logits()),
    st.builds(hs.Residual, idx, st.sampled_from(RESID_SITES)),
    st.builds(hs.AttnOut, idx),
    st.builds(hs.MLPOut, idx),
    st.builds(hs.AttentionHead, idx, st.one_of(st.none(), idx), st.sampled_from(HEAD_SITES)),
    st.builds(hs.MLPNeuron, idx, st.one_of(st.none(), idx), st.sampled_from(NEURON_SITES)),
    st.builds(
        hs.Module, st.from_regex(r"[a-z_][a-z0-9_]{0,6}(\.[a-z0-9_]{1,4}){0,3}", fullmatch=True)
    ),
)


@given(addresses)
def test_round_trip(address):
    assert hs.parse(str(address)) == address
    assert hash(hs.parse(str(address))) == hash(address)


@given(st.text(max_size=30))
@settings(max_examples=400)
def test_any_string_parses_or_raises_hookscope_error(text):
    try:
        result = hs.parse(text)
    except hs.HookscopeError:
        return
    assert isinstance(result, (hs.Address, Selection))
    assert hs.parse(str(result)) == result


@given(st.text(alphabet="headresiuonpstmlgk_.*-0123456789:qvz", max_size=24))
@settings(max_examples=400)
def test_grammar_like_strings_parse_or_raise(text):
    test_any_string_parses_or_raises_hookscope_error.hypothesis.inner_test(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("embed", hs.Embed()),
        ("logits", hs.Logits()),
        ("resid_pre.3", hs.Residual(3, "pre")),
        ("resid_mid.0", hs.Residual(0, "mid")),
        ("resid_post.11", hs.Residual(11)),
        ("attn_out.2", hs.AttnOut(2)),
        ("mlp_out.2", hs.MLPOut(2)),
        ("head.3.5", hs.AttentionHead(3, 5)),
        ("head.3.5.z", hs.AttentionHead(3, 5, "z")),
        ("head.3.5.pattern", hs.AttentionHead(3, 5, "pattern")),
        ("head.3", hs.AttentionHead(3)),
        ("head.3.q", hs.AttentionHead(3, None, "q")),
        ("neuron.2.187", hs.MLPNeuron(2, 187)),
        ("neuron.2.187.pre", hs.MLPNeuron(2, 187, "pre")),
        ("neuron.2", hs.MLPNeuron(2)),
        ("module:gpt_neox.layers.3.mlp", hs.Module("gpt_neox.layers.3.mlp")),
        # TransformerLens hook names
        ("blocks.3.hook_resid_post", hs.Residual(3, "post")),
        ("blocks.0.hook_resid_pre", hs.Residual(0, "pre")),
        ("blocks.1.hook_resid_mid", hs.Residual(1, "mid")),
        ("blocks.3.attn.hook_z", hs.AttentionHead(3)),
        ("blocks.3.attn.hook_pattern", hs.AttentionHead(3, None, "pattern")),
        ("blocks.3.attn.hook_q", hs.AttentionHead(3, None, "q")),
        ("blocks.3.mlp.hook_post", hs.MLPNeuron(3)),
        ("blocks.3.mlp.hook_pre", hs.MLPNeuron(3, None, "pre")),
        ("blocks.4.hook_attn_out", hs.AttnOut(4)),
        ("hook_embed", hs.Embed()),
    ],
)
def test_parse_known_strings(text, expected):
    assert hs.parse(text) == expected


def test_canonical_string_drops_default_site():
    assert str(hs.AttentionHead(3, 5, "z")) == "head.3.5"
    assert str(hs.MLPNeuron(2, 187, "post")) == "neuron.2.187"
    assert str(hs.parse("head.3.5.z")) == "head.3.5"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("resid_post.0-5", [hs.Residual(i) for i in range(6)]),
        ("resid_pre.*", [hs.Residual(i, "pre") for i in range(6)]),
        ("head.3.*", [hs.AttentionHead(3, h) for h in range(8)]),
        (
            "head.1-2.0-1.pattern",
            [hs.AttentionHead(l, h, "pattern") for l in (1, 2) for h in (0, 1)],
        ),
        ("head.*", [hs.AttentionHead(layer) for layer in range(6)]),
        (
            "blocks.*.attn.hook_pattern",
            [hs.AttentionHead(layer, None, "pattern") for layer in range(6)],
        ),
        ("neuron.2.10-12.pre", [hs.MLPNeuron(2, i, "pre") for i in (10, 11, 12)]),
    ],
)
def test_selections_expand(text, expected):
    sel = hs.parse(text)
    assert isinstance(sel, Selection)
    assert sel.expand(Dims()) == expected
    assert hs.parse(str(sel)) == sel


def test_wildcard_sizes():
    assert len(hs.parse("head.*.*").expand(Dims())) == 6 * 8
    assert len(hs.parse("neuron.*.*").expand(Dims())) == 6 * 2048


def test_selection_out_of_range():
    with pytest.raises(hs.AddressRangeError, match="layer 7 out of range: valid layers are 0-5"):
        hs.parse("resid_post.0-7").expand(Dims())


def test_order_follows_the_forward_pass():
    shuffled = [
        hs.Logits(),
        hs.Residual(1, "post"),
        hs.MLPNeuron(0, 3),
        hs.Residual(0, "pre"),
        hs.AttentionHead(0, 1, "pattern"),
        hs.Embed(),
        hs.Residual(0, "mid"),
        hs.AttnOut(0),
        hs.MLPOut(0),
        hs.Residual(0, "post"),
        hs.AttentionHead(0, 0, "q"),
    ]
    assert sorted(shuffled) == [
        hs.Embed(),
        hs.Residual(0, "pre"),
        hs.AttentionHead(0, 0, "q"),
        hs.AttentionHead(0, 1, "pattern"),
        hs.AttnOut(0),
        hs.Residual(0, "mid"),
        hs.MLPNeuron(0, 3),
        hs.MLPOut(0),
        hs.Residual(0, "post"),
        hs.Residual(1, "post"),
        hs.Logits(),
    ]


def test_addresses_are_frozen_and_hashable():
    a = hs.AttentionHead(3, 5)
    with pytest.raises(AttributeError):
        a.layer = 4  # type: ignore[misc]
    assert len({a, hs.AttentionHead(3, 5), hs.parse("head.3.5")}) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("resid_psot.3", "Did you mean 'resid_post'"),
        ("head.3.5.patern", "Did you mean 'pattern'"),
        ("neuron.2.3.mid", "valid sites: post, pre"),
        ("head", "needs a layer index"),
        ("resid_post.x", "must be a non-negative integer, '\\*' or a range"),
        ("resid_post.5-2", "empty range"),
        ("resid_post.3.1", "takes only a layer index"),
        ("head.1.2.q.extra", "trailing parts"),
        ("blocks.3.attn.hook_zz", "has no hookscope equivalent"),
        ("module:", "dotted submodule name"),
        ("", "unknown address"),
        ("resid_post.-1", "must be a non-negative integer"),
    ],
)
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(
        hs.AddressParseError if not text.startswith("module") else hs.AddressError, match=message
    ):
        hs.parse(text)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: hs.Residual(-1), "layer must be >= 0"),
        (lambda: hs.Residual(1.5), "layer must be a non-negative int"),
        (lambda: hs.Residual(True), "layer must be a non-negative int"),
        (lambda: hs.Residual(1, "middle"), "valid sites: pre, mid, post"),
        (lambda: hs.AttentionHead(1, 2, "scores"), "valid sites: z, q, k, v, pattern, result"),
        (lambda: hs.MLPNeuron(1, -3), "neuron must be >= 0"),
    ],
)
def test_constructor_errors(make, message):
    with pytest.raises(hs.AddressError, match=message):
        make()


def test_parse_rejects_non_strings():
    with pytest.raises(hs.AddressParseError, match="must be a string"):
        hs.parse(3)  # type: ignore[arg-type]


def test_the_address_modules_import_in_one_direction():
    """kinds (the slot-kind table) imports nothing of hookscope; core imports only kinds;
    grammar imports core; no import cycle."""
    import ast
    from pathlib import Path

    import hookscope.addresses as package

    folder = Path(package.__file__).parent

    def imports(name: str) -> set:
        tree = ast.parse((folder / name).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert not any(m.startswith("hookscope") for m in imports("kinds.py"))
    ours = {m for m in imports("core.py") if m.startswith("hookscope.addresses")}
    assert ours == {"hookscope.addresses.kinds"}
    grammar = {
        node.module
        for node in ast.walk(ast.parse((folder / "grammar.py").read_text()))
        if isinstance(node, ast.ImportFrom)
    }
    assert "hookscope.addresses.core" in grammar
