"""HookedModel.generate: transformers' generate with hookscope hooks, against independent references.

References: a step-by-step loop of ``run_with_hooks`` over the full sequence without a
key/value cache (argmax, or HF's sampling rule replayed under the same seed), transformers'
own ``generate`` on the bare model, and ``run_with_cache`` over the generated sequence.
"""

from __future__ import annotations

import pytest
import torch
from test_interrupts import Injector, Pristine
from transformers import LogitsProcessor, LogitsProcessorList

import hookscope as hs
from hookscope.generation import GenerationContext

import builders

BUILDERS = {
    "gpt2": builders.tiny_gpt2,
    "neox": builders.tiny_neox,
    "llama_gqa": builders.tiny_llama_gqa,
}
PAD = 1  # the pad token every test passes to generate and to its reference loop
N_NEW = 6


def _prompt(rows: int = 2, length: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request) -> hs.HookedModel:
    return hs.HookedModel.wrap(BUILDERS[request.param]())


def _steer(model: hs.HookedModel, scale: float = 6.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return scale * torch.randn(model.cfg.d_model, generator=g)


def _eos(model: hs.HookedModel) -> set[int]:
    eos = model.model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """transformers' documented positions for a left-padded batch (cumsum of the mask - 1)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def manual_loop(model, ids, hooks, n, pick, mask=None) -> torch.Tensor:
    """The reference: each step one full forward (no cache) through run_with_hooks, the next
    token picked from the last position; rows that emitted an end-of-sequence token get PAD
    and the loop ends when all have (transformers' stopping rule)."""
    eos = _eos(model)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    seq = ids
    for _ in range(n):
        if mask is None:
            logits = model.run_with_hooks(seq, hooks)
        else:
            inputs = {"input_ids": seq, "attention_mask": mask}
            logits = model.run_with_hooks(inputs, hooks, position_ids=_hf_positions(mask))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        nxt = pick(logits[:, -1].float())
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
        done |= torch.tensor([int(t) in eos for t in nxt])
        if bool(done.all()):
            break
    return seq


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def hf_sampling(temperature: float, top_k: int):
    """transformers' sampling step written out: temperature, top-k filter, softmax, multinomial."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scores = logits / temperature
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
        return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)

    return pick


# ---------------------------------------------------------------------------- greedy vs the loop
def test_steering_hook_greedy_matches_uncached_loop(model):
    ids, v = _prompt(), _steer(model)
    layer = model.n_layers - 1

    def steer(act, address):
        return act + v

    hooks = [(f"resid_post.{layer}", steer)]
    out = model.generate(ids, max_new_tokens=N_NEW, hooks=hooks, pad_token_id=PAD)
    assert out.dtype == torch.long and out.shape == (2, 4 + N_NEW)
    assert torch.equal(out, manual_loop(model, ids, hooks, N_NEW, greedy))
    plain = model.generate(ids, max_new_tokens=N_NEW, pad_token_id=PAD)
    assert torch.equal(plain, manual_loop(model, ids, [], N_NEW, greedy))
    assert not torch.equal(out, plain)  # the steering changed the continuation


def test_position_hook_with_context_matches_uncached_loop(model):
    """Zero the residual stream after layer 0 at absolute position 5 only (a generated
    token): with the cache the hook finds column 5 through context.positions; the reference
    hook sees the full sequence and zeroes column 5."""
    ids = _prompt()
    seen: list[list[int]] = []

    def at_five(act, address, context):
        seen.append(context.positions.tolist())
        hit = context.positions == 5
        if not bool(hit.any()):
            return None
        act = act.clone()
        act[:, hit] = 0
        return act

    def at_column_five(act, address):
        if act.shape[1] <= 5:
            return None
        act = act.clone()
        act[:, 5] = 0
        return act

    head = "head.0.1"
    out = model.generate(
        ids,
        max_new_tokens=N_NEW,
        hooks=[("resid_post.0", at_five), (head, at_five)],
        pad_token_id=PAD,
    )
    ref = manual_loop(
        model, ids, [("resid_post.0", at_column_five), (head, at_column_five)], N_NEW, greedy
    )
    assert torch.equal(out, ref)
    assert seen[0] == [0, 1, 2, 3] and seen[2] == [4] and seen[4] == [5]
    plain = model.generate(ids, max_new_tokens=N_NEW, pad_token_id=PAD)
    assert torch.equal(out[:, :6], plain[:, :6])  # nothing before position 5 changes
    assert not torch.equal(out, plain)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_left_padded_batch_matches_uncached_loop(arch):
    """Texts of different lengths: generate left-pads; the reference runs the left-padded
    batch with its mask and transformers' position ids. One hook zeroes column width + 1 (a
    generated token, found through context.positions), one each row's own position 2
    (context.row_positions: column 2 + that row's padding)."""
    model = hs.HookedModel.wrap(BUILDERS[arch](), builders.make_tokenizer())
    texts = ["When Mary and John went to the store,", "The quick brown fox"]
    rows = [model.tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    n_pad = torch.tensor([width - len(r) for r in rows])
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    contexts: list[GenerationContext] = []

    def zero_column(act, address, context):
        contexts.append(context)
        return act.masked_fill((context.positions == width + 1)[None, :, None], 0)

    def zero_row_position(act, address, context):
        return act.masked_fill((context.row_positions == 2)[:, :, None], 0)

    def zero_column_ref(act, address):
        return act.masked_fill((torch.arange(act.shape[1]) == width + 1)[None, :, None], 0)

    def zero_row_position_ref(act, address):
        cols = torch.arange(act.shape[1])[None, :]
        return act.masked_fill((cols == 2 + n_pad[:, None])[:, :, None], 0)

    seen: list[torch.Tensor] = []
    hooks = [
        ("resid_post.0", zero_column),
        ("resid_post.0", zero_row_position),
        ("resid_post.1", lambda act, address: seen.append(act.clone())),
    ]
    got = model.generate(
        texts, max_new_tokens=N_NEW, hooks=hooks, output="inputs", pad_token_id=PAD
    )
    ref_hooks = [("resid_post.0", zero_column_ref), ("resid_post.0", zero_row_position_ref)]
    ref = manual_loop(model, ids, ref_hooks, N_NEW, greedy, mask)
    assert torch.equal(got["input_ids"], ref)
    assert torch.equal(got["input_ids"][:, :width], ids)
    plain = model.generate(texts, max_new_tokens=N_NEW, pad_token_id=PAD)
    assert (plain != ref).any(1).all()  # the hooks changed every row's continuation
    assert torch.equal(contexts[0].pad, n_pad)
    assert torch.equal(contexts[0].row_positions, torch.arange(width)[None] - n_pad[:, None])
    assert contexts[1].positions.tolist() == [width] and contexts[1].step == 1
    full_mask = torch.cat([mask, torch.ones(2, ref.shape[1] - width, dtype=torch.long)], 1)
    assert torch.equal(got["attention_mask"], full_mask)
    assert torch.equal(got["position_ids"], _hf_positions(full_mask))
    # output="inputs" makes run_with_cache see what generation saw (on every real token)
    _, cache = model.run_with_cache(got, names="resid_post.1", hooks=ref_hooks)
    during = torch.cat(seen, 1)
    full = cache["resid_post.1"][:, : during.shape[1]]
    for r in range(2):
        torch.testing.assert_close(during[r, n_pad[r] :], full[r, n_pad[r] :], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- sampling
SAMPLING = dict(do_sample=True, top_k=20, temperature=0.8)


def test_sampling_with_identity_hooks_equals_transformers_generate(model):
    ids = _prompt(seed=3)

    def nothing(act, address, context):
        return None

    def same(act, address):
        return act

    hooks = [("resid_post.*", nothing), ("head.0.*", same), ("logits", nothing)]
    torch.manual_seed(11)
    out = model.generate(ids, max_new_tokens=N_NEW, hooks=hooks, pad_token_id=PAD, **SAMPLING)
    torch.manual_seed(11)
    ref = model.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=N_NEW,
        pad_token_id=PAD,
        **SAMPLING,
    )
    assert torch.equal(out, ref)


def test_sampling_with_steering_matches_replayed_sampling_loop(model):
    ids, v = _prompt(seed=4), _steer(model)
    hooks = [("resid_post.0", lambda act, address: act + v)]
    torch.manual_seed(5)
    out = model.generate(ids, max_new_tokens=N_NEW, hooks=hooks, pad_token_id=PAD, **SAMPLING)
    torch.manual_seed(5)
    ref = manual_loop(model, ids, hooks, N_NEW, hf_sampling(0.8, 20))
    assert torch.equal(out, ref)
    torch.manual_seed(5)
    plain = model.generate(ids, max_new_tokens=N_NEW, pad_token_id=PAD, **SAMPLING)
    assert not torch.equal(out, plain)


# ---------------------------------------------------------------------------- what a hook sees
def test_hook_sees_new_positions_each_step_and_values_of_a_full_forward(model):
    """Per step: shape [batch, new positions, ...] and the right context; the values equal a
    full forward (run_with_cache over the generated ids) at those positions."""
    ids = _prompt(rows=2, length=5, seed=6)
    seen: dict[str, list] = {}

    def record(act, address, context):
        seen.setdefault(str(address), []).append((act.clone(), context))

    names = ["resid_post.1", "head.1.2", "head.0.3.k", "head.1.0.pattern", "logits"]
    out = model.generate(ids, max_new_tokens=4, hooks=[(n, record) for n in names])
    _, cache = model.run_with_cache(out, names=names)
    total = out.shape[1]
    for name in names:
        steps = seen[name]
        assert len(steps) == 4
        for k, (act, ctx) in enumerate(steps):
            new = 5 if k == 0 else 1
            start = 0 if k == 0 else 4 + k
            assert ctx.step == k and ctx.prompt_length == 5 and ctx.is_prompt == (k == 0)
            assert ctx.positions.tolist() == list(range(start, start + new))
            assert act.shape[:2] == (2, new), (name, k, act.shape)
            if name.endswith("pattern"):
                assert act.shape[2] == start + new  # every key so far
                full = cache[name][:, start : start + new, : start + new]
            else:
                full = cache[name][:, start : start + new]
            torch.testing.assert_close(act, full, atol=1e-4, rtol=1e-4)
        assert steps[-1][1].positions.tolist() == [total - 2]  # the last token is not fed back


def test_use_cache_off_hook_sees_full_sequence_with_right_positions():
    model = hs.HookedModel.wrap(builders.tiny_gpt2())
    ids = _prompt(rows=1, length=3)
    seen = []

    def record(act, address, context):
        seen.append((act.shape[1], context.positions.tolist(), context.step))

    cached = model.generate(ids, max_new_tokens=3)
    out = model.generate(ids, max_new_tokens=3, hooks=[("embed", record)], use_cache=False)
    assert torch.equal(out, cached)
    assert seen == [(3, [0, 1, 2], 0), (4, [0, 1, 2, 3], 1), (5, [0, 1, 2, 3, 4], 2)]


def test_context_parameter_forms():
    """The context reaches a third positional parameter or one named ``context``; a hook
    with an optional third parameter of another name is called as fn(act, address)."""
    model = hs.HookedModel.wrap(builders.tiny_neox())
    got: dict[str, list] = {"positional": [], "keyword": [], "kwonly": [], "plain": []}

    def keyword(act, address, context=None):
        got["keyword"].append(context)

    def kwonly(act, address, *, context):
        got["kwonly"].append(context)

    def plain(act, address, scale=2.0):
        got["plain"].append(scale)

    hooks = [
        ("resid_pre.0", lambda act, address, c: got["positional"].append(c)),
        ("resid_pre.1", keyword),
        ("resid_post.1", kwonly),
        ("resid_post.0", plain),
    ]
    model.generate(_prompt(rows=1), max_new_tokens=2, hooks=hooks)
    for name in ("positional", "keyword", "kwonly"):
        assert [c.step for c in got[name]] == [0, 1], name
    assert got["plain"] == [2.0, 2.0]
    with pytest.raises(hs.InputError, match="passed only by model.generate"):
        model.run_with_hooks(_prompt(rows=1), hooks=[("resid_pre.0", lambda a, n, c: None)])


# ---------------------------------------------------------------------------- outputs
def test_outputs_text_ids_and_run_with_cache_on_generated_ids():
    model = hs.HookedModel.wrap(builders.tiny_gpt2(), builders.make_tokenizer())
    prompt = "When Mary and John went"
    out = model.generate(prompt, max_new_tokens=5)
    n = model.to_tokens(prompt).shape[1]
    assert out.shape == (1, n + 5) and torch.equal(out[:, :n], model.to_tokens(prompt))
    logits, cache = model.run_with_cache(out)  # one call away
    assert cache["resid_post.1"].shape == (1, n + 5, 64)
    assert torch.equal(logits[:, n - 1 : -1].argmax(-1), out[:, n:])  # greedy = argmax
    text = model.generate(prompt, max_new_tokens=5, output="text")
    assert text == model.to_string(out)[0] and text.startswith(prompt)
    texts = model.generate([prompt, "The quick brown fox jumps"], max_new_tokens=3, output="text")
    assert (
        isinstance(texts, list)
        and texts[0] == model.to_string(model.generate(prompt, max_new_tokens=3))[0]
    )
    assert texts[1].startswith("The quick brown fox jumps")
    ids_1d = model.generate(out[0, :n], max_new_tokens=5)
    assert torch.equal(ids_1d, out)


def test_dict_prompt_right_padded_is_left_aligned():
    model = hs.HookedModel.wrap(builders.tiny_llama_gqa())
    ids = _prompt(rows=2, length=5, seed=9)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    left = {
        "input_ids": torch.cat([torch.full((1, 2), PAD), ids[1:, :3]], 1),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1]]),
    }
    a = model.generate(right, max_new_tokens=4, pad_token_id=PAD)
    b = model.generate(left, max_new_tokens=4, pad_token_id=PAD)
    assert torch.equal(a[1], b[0])
    assert torch.equal(a[0], model.generate(ids[:1], max_new_tokens=4, pad_token_id=PAD)[0])


def test_progress_bar(capsys):
    model = hs.HookedModel.wrap(builders.tiny_gpt2())
    model.generate(_prompt(rows=1), max_new_tokens=3)
    assert "generate" not in capsys.readouterr().err  # short runs are quiet
    model.generate(_prompt(rows=1), max_new_tokens=3, progress=True)
    assert "generate" in capsys.readouterr().err


# ---------------------------------------------------------------------------- hygiene
class Boom(LogitsProcessor):
    def __init__(self, at: int, exc: type[BaseException]):
        self.at, self.exc, self.calls = at, exc, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.at:
            raise self.exc
        return scores


def _raise_at_step(exc: type[BaseException], step: int = 2):
    def hook(act, address, context):
        if context.step == step:
            raise exc("user bug") if exc is not KeyboardInterrupt else exc
        return act * 1.5

    return hook


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_model_is_pristine_after_generate_however_it_ends(arch):
    model = hs.HookedModel.wrap(BUILDERS[arch]())
    ids = _prompt(rows=2, length=4)
    pristine = Pristine(model, ids)
    ok = [("resid_post.0", lambda a, n: a * 1.1), ("head.1.0.pattern", lambda a, n, context: None)]
    model.generate(ids, max_new_tokens=3, hooks=ok)
    assert not pristine.problems()
    for exc in (ValueError, KeyboardInterrupt):
        with pytest.raises(exc):
            model.generate(ids, max_new_tokens=4, hooks=[*ok, ("head.0.1", _raise_at_step(exc))])
        assert not pristine.problems(), exc
        boom = Boom(2, exc)
        with pytest.raises(exc):
            model.generate(
                ids, max_new_tokens=4, hooks=ok, logits_processor=LogitsProcessorList([boom])
            )
        assert boom.calls == 2 and not pristine.problems(), exc
    with pytest.raises(hs.HookError, match="returned shape"):
        model.generate(ids, max_new_tokens=3, hooks=[("resid_post.1", lambda a, n: a[:, :1])])
    assert not pristine.problems()


def test_interrupt_at_sampled_lines_of_generate_leaves_model_pristine():
    """As tests/test_interrupts.py does for the other calls: SIGINT at 12 points spread over
    the lines hookscope (and torch's hook code) runs during one generate call."""
    model = hs.HookedModel.wrap(builders.tiny_neox())
    ids = _prompt(rows=2, length=4)
    pristine = Pristine(model, ids)
    hooks = [
        ("resid_post.0", lambda a, n, context: a + 0.5),
        ("head.1.2.pattern", lambda a, n: None),
    ]

    def call():
        model.generate(ids, max_new_tokens=3, hooks=hooks)

    call()
    counter = Injector()
    assert not counter.run(call)
    n = counter.lines
    for k in sorted({1 + (n - 1) * i // 11 for i in range(12)}):
        interrupted = Injector(k).run(call)
        assert not pristine.problems(), f"interrupt at line {k}/{n}"
        assert interrupted, f"the interrupt at line {k}/{n} was swallowed"


# ---------------------------------------------------------------------------- errors
def _counted():
    hf = builders.tiny_neox()
    calls = [0]
    hf.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return hs.HookedModel.wrap(hf), calls


TOK = _prompt(rows=1)
BAD = [
    ("max_new_tokens missing", dict(), hs.InputError, r"needs max_new_tokens"),
    ("max_new_tokens zero", dict(max_new_tokens=0), hs.InputError, r"positive int, got 0"),
    ("max_new_tokens negative", dict(max_new_tokens=-3), hs.InputError, r"positive int, got -3"),
    ("max_new_tokens float", dict(max_new_tokens=2.5), hs.InputError, r"got float 2.5"),
    ("max_new_tokens bool", dict(max_new_tokens=True), hs.InputError, r"got bool True"),
    ("max_new_tokens str", dict(max_new_tokens="3"), hs.InputError, r"got str '3'"),
    (
        "output unknown",
        dict(max_new_tokens=2, output="txt"),
        hs.InputError,
        r"unknown output 'txt'; choose one of ids, text, inputs. Did you mean 'text'\?",
    ),
    (
        "hooks a string",
        dict(max_new_tokens=2, hooks="resid_post.0"),
        hs.InputError,
        r"hooks must be a list of \(address, fn\) pairs",
    ),
    (
        "hook of one argument",
        dict(max_new_tokens=2, hooks=[("resid_post.0", lambda a: a)]),
        hs.InputError,
        r"called as fn\(activation, address\) or fn\(activation, address, context\)",
    ),
    (
        "hook of four arguments",
        dict(max_new_tokens=2, hooks=[("resid_post.0", lambda a, b, c, d: a)]),
        hs.InputError,
        r"or fn\(activation, address, context\)",
    ),
    (
        "hook not callable",
        dict(max_new_tokens=2, hooks=[("resid_post.0", 3)]),
        hs.InputError,
        r"each hook must be an \(address, fn\) pair",
    ),
    (
        "hook on a missing layer",
        dict(max_new_tokens=2, hooks=[("resid_post.7", lambda a, n: a)]),
        hs.AddressRangeError,
        r"7",
    ),
    (
        "attention_mask keyword",
        dict(max_new_tokens=2, attention_mask=torch.ones(1, 4)),
        hs.InputError,
        r"generate sets attention_mask itself; pass a dict",
    ),
    ("max_length", dict(max_length=9), hs.InputError, r"needs max_new_tokens"),
    (
        "max_length with max_new_tokens",
        dict(max_new_tokens=2, max_length=9),
        hs.InputError,
        r"sets max_length itself; use max_new_tokens",
    ),
    (
        "return_dict_in_generate",
        dict(max_new_tokens=2, return_dict_in_generate=True),
        hs.InputError,
        r"generate returns token ids",
    ),
]


@pytest.mark.parametrize("kwargs, exc, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise_before_any_forward(kwargs, exc, message):
    model, calls = _counted()
    with pytest.raises(exc, match=message):
        model.generate(TOK, **kwargs)
    assert calls[0] == 0


BAD_INPUTS = [
    ("text without tokenizer", "hello", r"no tokenizer; pass token ids"),
    ("empty list", [], r"model input must be a tensor"),
    ("float ids", torch.rand(1, 4), r"token ids must be an integer tensor"),
    (
        "dict with extra key",
        {"input_ids": TOK, "labels": TOK},
        r"may hold input_ids, attention_mask",
    ),
    (
        "mask with a gap",
        {"input_ids": TOK, "attention_mask": torch.tensor([[1, 0, 1, 1]])},
        r"row 0 has padding between tokens",
    ),
    (
        "mask all padding",
        {"input_ids": TOK, "attention_mask": torch.zeros(1, 4, dtype=torch.long)},
        r"row 0 is all padding",
    ),
    (
        "mask of other shape",
        {"input_ids": TOK, "attention_mask": torch.ones(1, 3)},
        r"attention_mask has shape \(1, 3\) but input_ids has shape \(1, 4\)",
    ),
    ("id out of the vocabulary", torch.tensor([[1, 2, 999]]), r"999"),
]


@pytest.mark.parametrize(
    "inputs, message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_prompts_raise_before_any_forward(inputs, message):
    model, calls = _counted()
    with pytest.raises(hs.InputError, match=message):
        model.generate(inputs, max_new_tokens=2)
    assert calls[0] == 0


def test_output_text_without_tokenizer_raises_before_any_forward():
    model, calls = _counted()
    with pytest.raises(hs.InputError, match=r"output='text' needs a tokenizer"):
        model.generate(TOK, max_new_tokens=2, output="text")
    assert calls[0] == 0


@pytest.mark.parametrize(
    "build, message",
    [
        (
            builders.tiny_bert,
            r"BertForMaskedLM cannot generate \(transformers gives it no generate",
        ),
        (
            builders.tiny_mlp,
            r"Sequential is not a transformers generative model \(not a Hugging Face",
        ),
        (builders.tiny_vit, r"ViT is not a transformers generative model"),
        (lambda: torch.nn.Linear(4, 4), r"Linear is not a transformers generative model"),
    ],
    ids=["bert", "mlp", "vit", "plain module"],
)
def test_non_causal_models_are_refused(build, message):
    model = hs.HookedModel.wrap(build())
    with pytest.raises(hs.InputError, match="generate needs a causal language model") as err:
        model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2)
    assert err.match(message)


def test_a_misspelt_generate_keyword_is_named_before_any_forward():
    model = hs.HookedModel.wrap(builders.tiny_gpt2(), builders.make_tokenizer())
    calls = []
    handle = model.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(
            hs.InputError, match="unknown keyword 'do_smaple'.*Did you mean 'do_sample'"
        ):
            model.generate("When Mary", max_new_tokens=3, do_smaple=True)
    finally:
        handle.remove()
    assert calls == []
