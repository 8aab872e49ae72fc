"""Every wrong input gets a HookscopeError that names the valid choices, before any forward.

One table: each case is a call with one mistake in it, the HookscopeError subclass it must
raise and a regex its message must match (the regex names the valid choices, not only the
mistake). A forward pre-hook on every model counts forwards: a case must raise before any
forward runs, except the few marked ``forward=True`` whose mistake only shows in the
forward's own values (a hook's return value, a metric's or backward's result).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import hookscope as hs
from hookscope import interventions as iv

import builders

G = torch.Generator().manual_seed(0)
TOK = torch.randint(1, 400, (2, 10), generator=G)  # ids the test tokenizer can decode
CORR = TOK.clone()
CORR[:, 3] = (TOK[:, 3] + 7) % 400
IMG = torch.randn(2, 1, 8, 8, generator=G)
LD = iv.logit_diff(5, 9)


def _one(act, address):
    return None


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Any], Any]
    error: type
    message: str
    forward: bool = False  # the mistake shows only in a forward's own values


def case(id, call, error, message, forward=False):
    return pytest.param(Case(id, call, error, message, forward), id=id)


# ---------------------------------------------------------------- addresses and selections
NAMES = [
    ("resid_post.2", hs.AddressRangeError, r"2 layers \(0-1\)"),
    ("head.0.4", hs.AddressRangeError, r"layer 0 has 4 heads \(0-3\)"),
    ("head.0.4.q", hs.AddressRangeError, r"4 heads \(0-3\)"),
    ("neuron.1.128", hs.AddressRangeError, r"128 neurons \(0-127\)"),
    ("neuron.0.500.pre", hs.AddressRangeError, r"128 neurons \(0-127\)"),
    ("head.*.2-9", hs.AddressRangeError, r"valid heads are 0-3"),
    ("resid_post.0-5", hs.AddressRangeError, r"valid layers are 0-1"),
    ("resid_mid.0", hs.SiteUnavailableError, r"available here: .*resid_pre\.L"),
    ("module:gpt_neox.layers.7", hs.SiteUnavailableError, r"Did you mean 'gpt_neox.layers.1'"),
    ("module:nothing.here", hs.SiteUnavailableError, r"does not exist in GPTNeoXForCausalLM"),
    ("resid_pots.0", hs.AddressParseError, r"Did you mean 'resid_post'"),
    ("head.0.1.patern", hs.AddressParseError, r"valid sites: z, q, k, v, pattern, result"),
    ("neuron.0.5.mid", hs.AddressParseError, r"valid sites: post, pre"),
    ("resid_post", hs.AddressParseError, r"needs a layer index, e.g. 'resid_post.0'"),
    ("resid_post.x", hs.AddressParseError, r"non-negative integer, '\*' or a range like '0-5'"),
    (
        "",
        hs.AddressParseError,
        r"valid forms: embed, final_norm \(or ln_final\), logits, resid_pre.L",
    ),
    ("head.0.1.2.3", hs.AddressParseError, r"valid sites: z, q, k, v, pattern, result"),
    ("blocks.9.hook_resid_post", hs.AddressRangeError, r"2 layers \(0-1\)"),
    (42, hs.AddressParseError, r"expected an address, a selection string or a list of them"),
    (3.5, hs.AddressParseError, r"expected an address, a selection string or a list of them"),
    ([42], hs.AddressParseError, r"must be a string, an Address or a Selection, got int"),
    (["resid_post.0", None], hs.AddressParseError, r"a string, an Address or a Selection"),
]

CASES = [
    case(f"names={n!r}", lambda m, n=n: m.neox.run_with_cache(TOK, names=n), err, msg)
    for n, err, msg in NAMES
]
CASES += [
    case(f"hook at {n!r}", lambda m, n=n: m.neox.run_with_hooks(TOK, hooks=[(n, _one)]), err, msg)
    for n, err, msg in NAMES[:10]
]
CASES += [
    case("gpt2 resid_post.2", lambda m: m.gpt2.run_with_cache(TOK, "resid_post.2"),
         hs.AddressRangeError, r"2 layers \(0-1\)"),
    case("llama head.0.4.k", lambda m: m.llama.run_with_cache(TOK, "head.0.4.k"),
         hs.AddressRangeError, r"4 heads \(0-3\)"),
    case("cnn head.0.1", lambda m: m.cnn.run_with_cache(IMG, "head.0.1"),
         hs.SiteUnavailableError, r"does not exist on this cnn model; available here: .*neuron"),
    case("cnn neuron.0.9", lambda m: m.cnn.run_with_cache(IMG, "neuron.0.9"),
         hs.AddressRangeError, r"4 neurons \(0-3\)"),
    case("cnn resid_post.5", lambda m: m.cnn.run_with_cache(IMG, "resid_post.5"),
         hs.AddressRangeError, r"layers \(0-"),
    case("mlp embed", lambda m: m.mlp.run_with_cache(IMG, "embed"),
         hs.SiteUnavailableError, r"embed does not exist on this mlp model; available here"),
    case("mlp neuron.1.16", lambda m: m.mlp.run_with_cache(IMG, "neuron.1.16"),
         hs.AddressRangeError, r"16 neurons \(0-15\)"),
    case("vit head.2.0", lambda m: m.vit.run_with_cache(IMG, "head.2.0"),
         hs.AddressRangeError, r"2 layers \(0-1\)"),
    case("vit head.0.4", lambda m: m.vit.run_with_cache(IMG, "head.0.4"),
         hs.AddressRangeError, r"4 heads \(0-3\)"),
    case("addresses(kind='heads')", lambda m: m.neox.addresses("heads"),
         hs.AddressError, r"choose one of .*head.*Did you mean 'head'"),
    case("resolve('head.9.*')", lambda m: m.neox.resolve("head.9.*"),
         hs.AddressRangeError, r"valid layers are 0-1"),
]  # fmt: skip

# ---------------------------------------------------------------- the cache
CASES += [
    case("cache[uncached]", lambda m: m.cache["resid_post.1"], hs.CacheKeyError,
         r"resid_post.1 was not cached; cached: resid_post.0, head.1"),
    case("cache[selection]", lambda m: m.cache["head.1.*"], hs.CacheKeyError,
         r"is a selection, not one address; use cache.select"),
    case("cache[head.1.9]", lambda m: m.cache["head.1.9"], hs.CacheKeyError,
         r"index 9 out of range, layer has 4 \(0-3\)"),
    case("cache[typo]", lambda m: m.cache["resid_pots.0"], hs.CacheKeyError,
         r"Did you mean 'resid_post'"),
    case("cache[42]", lambda m: m.cache[42], hs.CacheKeyError,
         r"an address must be a string, an Address or a Selection, got int"),
    case("cache.stack(resid_pre)", lambda m: m.cache.stack("resid_pre"), hs.CacheKeyError,
         r"cached kinds are resid_post, z"),
    case("cache.stack(layers=[5])", lambda m: m.cache.stack("resid_post", layers=[5]),
         hs.CacheKeyError, r"cached layers: \[0\]"),
    case("cache.grad without backward", lambda m: m.cache.grad("resid_post.0"),
         hs.CacheKeyError, r"pass backward=metric"),
    case("cache.to(dtype='fp16')", lambda m: m.cache.to(dtype="fp16"), hs.InputError,
         r"choose one of float32, float16, bfloat16, float64.*Did you mean 'float16'"),
    case("cache.to(dtype='int8')", lambda m: m.cache.to(dtype="int8"), hs.InputError,
         r"choose one of float32, float16, bfloat16, float64"),
    case("cache.to(dtype=torch.long)", lambda m: m.cache.to(dtype=torch.long), hs.InputError,
         r"not a floating dtype; choose one of float32, float16, bfloat16, float64"),
    case("cache.to(device='gpu')", lambda m: m.cache.to(device="gpu"), hs.InputError,
         r"devices here: cpu.*Did you mean 'cuda'"),
    case("cache.to(device=1.5)", lambda m: m.cache.to(device=1.5), hs.InputError,
         r"string or torch.device.*devices here: cpu"),
    case("cache.to(device='tpu')", lambda m: m.cache.to(device="tpu"), hs.InputError,
         r"devices here: cpu"),
]  # fmt: skip
CASES += [
    case("cache.to(device='cuda:99')", lambda m: m.cache.to(device="cuda:99"), hs.InputError,
         r"'cuda:99' is not available here.*devices here: cpu"),
    case("run_with_cache(device='cuda:99')",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", device="cuda:99"),
         hs.InputError, r"'cuda:99' is not available here.*devices here: cpu"),
]  # fmt: skip
if not torch.cuda.is_available():
    CASES += [
        case("cache.to(device='cuda')", lambda m: m.cache.to(device="cuda"), hs.InputError,
             r"not available here.*devices here: cpu"),
        case("run_with_cache(device='cuda')",
             lambda m: m.neox.run_with_cache(TOK, "resid_post.0", device="cuda"),
             hs.InputError, r"not available here.*devices here: cpu"),
        case("run_with_cache(device='cuda:1')",
             lambda m: m.neox.run_with_cache(TOK, "resid_post.0", device="cuda:1"),
             hs.InputError, r"not available here.*devices here: cpu"),
    ]  # fmt: skip

# ---------------------------------------------------------------- model inputs and arguments
INPUTS = [
    ("float ids", torch.zeros(1, 5), r"integer tensor \(torch.long\), got dtype torch.float32"),
    ("bool ids", torch.ones(1, 5, dtype=torch.bool), r"integer tensor \(torch.long\)"),
    ("complex ids", torch.ones(1, 5, dtype=torch.complex64), r"integer tensor \(torch.long\)"),
    ("3-D ids", torch.zeros(1, 2, 5, dtype=torch.long), r"must be \[batch, pos\] or \[pos\]"),
    ("id 500", torch.tensor([[1, 2, 500]]), r"must lie in 0-499 \(vocabulary size 500\)"),
    ("id -1", torch.tensor([[-1, 2]]), r"must lie in 0-499"),
    ("0 positions", torch.zeros(1, 0, dtype=torch.long), r"every row needs at least one token"),
    ("0 rows", torch.zeros(0, 5, dtype=torch.long), r"0 rows; pass at least one"),
    ("0-d tensor", torch.tensor(3), r"\[batch, pos\] or \[pos\]"),
    ("float", 3.5, r"must be a tensor, a string or a list of strings"),
    ("None", None, r"must be a tensor, a string or a list of strings"),
    ("ragged lists", [[1, 2], [3]], r"must be a tensor, a string or a list of strings"),
    ("empty list", [], r"must be a tensor, a string or a list of strings"),
    ("set", {1, 2}, r"must be a tensor, a string or a list of strings"),
    ("dict without input_ids", {"attention_mask": torch.ones(1, 3)}, r"needs 'input_ids'"),
    ("dict with short mask", {"input_ids": TOK, "attention_mask": torch.ones(2, 9)},
     r"attention_mask has shape \(2, 9\) but input_ids has shape \(2, 10\)"),
    ("dict with 1-D mask", {"input_ids": TOK, "attention_mask": torch.ones(10)},
     r"attention_mask has shape \(10,\) but input_ids has shape \(2, 10\)"),
    ("dict with unknown key", {"input_ids": TOK, "pixel_values": IMG},
     r"takes no keyword 'pixel_values'; its keywords: .*attention_mask"),
    ("empty text", "", r"gives no tokens"),
    ("an empty text row", ["When Mary", ""], r"row 1\) gives no tokens"),
    ("text list with None", ["a", None], r"must be a tensor, a string or a list of strings"),
]  # fmt: skip
CASES += [
    case(f"neox({name})", lambda m, x=x: m.neox(x), hs.InputError, msg) for name, x, msg in INPUTS
]
CASES += [
    case(f"run_with_cache({name})", lambda m, x=x: m.neox.run_with_cache(x), hs.InputError, msg)
    for name, x, msg in INPUTS[:8]
]
CASES += [
    case("text without tokenizer", lambda m: m.bare("When Mary"), hs.InputError,
         r"no tokenizer; pass token ids"),
    case("65 positions on gpt2", lambda m: m.gpt2(torch.zeros(1, 65, dtype=torch.long)),
         hs.InputError, r"exceed this gpt2 model's 64 learned position embeddings; pass at most 64"),
    case("mask keyword of another shape",
         lambda m: m.neox(TOK, attention_mask=torch.ones(2, 9)), hs.InputError,
         r"attention_mask has shape \(2, 9\) but input_ids has shape \(2, 10\)"),
    case("mask keyword not a tensor", lambda m: m.neox(TOK, attention_mask="all"),
         hs.InputError, r"attention_mask must be a tensor shaped like input_ids \(2, 10\)"),
    case("token_type_ids of another shape",
         lambda m: m.gpt2(TOK, token_type_ids=torch.zeros(2, 3, dtype=torch.long)),
         hs.InputError, r"token_type_ids has shape \(2, 3\) but input_ids has shape \(2, 10\)"),
    case("unknown keyword", lambda m: m.neox(TOK, foo=1), hs.InputError,
         r"takes no keyword 'foo'; its keywords: .*attention_mask.*use_cache"),
    case("misspelt keyword", lambda m: m.neox(TOK, attention_mask=None, use_cach=False),
         hs.InputError, r"takes no keyword 'use_cach'.*Did you mean 'use_cache'"),
    case("unknown keyword on gpt2", lambda m: m.gpt2(TOK, output_attentionz=True),
         hs.InputError, r"Did you mean 'output_attentions'"),
    case("unknown keyword on llama", lambda m: m.llama(TOK, temperature=0.7), hs.InputError,
         r"takes no keyword 'temperature'; its keywords: .*position_ids"),
    case("unknown keyword in run_with_cache",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", foo=1), hs.InputError,
         r"takes no keyword 'foo'; its keywords"),
    case("unknown keyword in run_with_hooks",
         lambda m: m.neox.run_with_hooks(TOK, hooks=[], foo=1), hs.InputError,
         r"takes no keyword 'foo'; its keywords"),
    case("input_ids twice", lambda m: m.neox(TOK, input_ids=TOK), hs.InputError,
         r"input_ids is given twice"),
    case("keyword to a vit", lambda m: m.vit(IMG, attention_mask=torch.ones(2, 17)),
         hs.InputError, r"ViT.forward takes no keyword arguments; got 'attention_mask'"),
    case("keyword to a cnn", lambda m: m.cnn(IMG, labels=torch.zeros(2)), hs.InputError,
         r"Sequential.forward takes no keyword arguments"),
    case("run_with_cache(dtype='float')",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", dtype="float"), hs.InputError,
         r"choose one of float32, float16, bfloat16, float64.*Did you mean 'float32'"),
    case("run_with_cache(dtype=torch.int32)",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", dtype=torch.int32),
         hs.InputError, r"choose one of float32, float16, bfloat16, float64"),
    case("run_with_cache(device='gpu')",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", device="gpu"), hs.InputError,
         r"devices here: cpu.*Did you mean 'cuda'"),
    case("run_with_cache(device=[0])",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", device=[0]), hs.InputError,
         r"string or torch.device.*devices here: cpu"),
    case("backward=True", lambda m: m.neox.run_with_cache(TOK, "resid_post.0", backward=True),
         hs.InputError, r"backward must be a callable output -> scalar tensor"),
    case("backward of two arguments",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", backward=lambda a, b: a),
         hs.InputError, r"backward must be a callable output -> scalar tensor"),
    case("backward returns logits",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", backward=lambda out: out),
         hs.InputError, r"backward must return a scalar tensor, got \(2, 10, 500\)", True),
    case("backward returns a float",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", backward=lambda out: 1.0),
         hs.InputError, r"backward must return a scalar tensor, got float", True),
    case("to_tokens(123)", lambda m: m.neox.to_tokens(123), hs.InputError,
         r"text input must be a string or a non-empty list of strings, got int"),
    case("to_tokens(ids)", lambda m: m.neox.to_tokens([1, 2]), hs.InputError,
         r"must be a string or a non-empty list of strings.*token ids go to the model"),
    case("to_tokens(None)", lambda m: m.neox.to_tokens(None), hs.InputError,
         r"must be a string or a non-empty list of strings"),
    case("to_tokens([])", lambda m: m.neox.to_tokens([]), hs.InputError,
         r"must be a string or a non-empty list of strings"),
    case("to_tokens without tokenizer", lambda m: m.bare.to_tokens("a"), hs.InputError,
         r"no tokenizer; pass token ids"),
    case("to_string(3-D)", lambda m: m.neox.to_string(torch.zeros(1, 2, 3, dtype=torch.long)),
         hs.InputError, r"token ids: an integer tensor or list of ints, \[pos\] or \[batch, pos\]"),
    case("to_string(float)", lambda m: m.neox.to_string(torch.zeros(3)), hs.InputError,
         r"\[pos\] or \[batch, pos\]; got dtype torch.float32"),
    case("to_string(text)", lambda m: m.neox.to_string("When"), hs.InputError,
         r"\[pos\] or \[batch, pos\]; got a string"),
    case("to_string(-1)", lambda m: m.neox.to_string([-1, 2]), hs.InputError,
         r"\[pos\] or \[batch, pos\]; got a negative id -1"),
    case("to_string(object)", lambda m: m.neox.to_string(object()), hs.InputError,
         r"\[pos\] or \[batch, pos\]; got object"),
    case("to_str_tokens(batch)", lambda m: m.neox.to_str_tokens(TOK), hs.InputError,
         r"one sequence \(a text, ids \[pos\] or \[1, pos\]\).*use to_string"),
    case("to_str_tokens(float)", lambda m: m.neox.to_str_tokens(torch.zeros(3)),
         hs.InputError, r"\[pos\] or \[batch, pos\]"),
]  # fmt: skip

# ---------------------------------------------------------------- vision inputs
CASES += [
    case("cnn 3 channels", lambda m: m.cnn(torch.zeros(2, 3, 8, 8)), hs.InputError,
         r"cnn expects input \[batch, 1, ...\] with 4 dimensions, got shape \(2, 3, 8, 8\)"),
    case("cnn int images", lambda m: m.cnn(torch.zeros(2, 1, 8, 8, dtype=torch.long)),
         hs.InputError, r"input must be a float tensor, got torch.int64"),
    case("cnn uint8 images", lambda m: m.cnn(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)),
         hs.InputError, r"input must be a float tensor, got torch.uint8"),
    case("cnn 0 images", lambda m: m.cnn(torch.zeros(0, 1, 8, 8)), hs.InputError,
         r"0 rows; pass at least one"),
    case("cnn 3-D image", lambda m: m.cnn(torch.zeros(1, 8, 8)), hs.InputError,
         r"cnn expects input \[batch, 1, ...\] with 4 dimensions"),
    case("cnn text", lambda m: m.cnn("a cat"), hs.InputError, r"no tokenizer; pass token ids"),
    case("mlp 7x7", lambda m: m.mlp(torch.zeros(2, 1, 7, 7)), hs.InputError,
         r"mlp expects \[batch, 64\] input \(after flattening\), got shape \(2, 1, 7, 7\)"),
    case("mlp 0 rows", lambda m: m.mlp(torch.zeros(0, 64)), hs.InputError, r"0 rows"),
    case("vit 6x6", lambda m: m.vit(torch.zeros(2, 1, 6, 6)), hs.InputError,
         r"vit expects a float image tensor \[batch, 1, 8, 8\], got shape \(2, 1, 6, 6\)"),
    case("vit int images", lambda m: m.vit(torch.zeros(2, 1, 8, 8, dtype=torch.long)),
         hs.InputError, r"vit expects a float image tensor \[batch, 1, 8, 8\]"),
    case("vit token ids", lambda m: m.vit(TOK), hs.InputError,
         r"vit expects a float image tensor \[batch, 1, 8, 8\]"),
    case("vit 0 images", lambda m: m.vit(torch.zeros(0, 1, 8, 8)), hs.InputError, r"0 rows"),
]  # fmt: skip

# ---------------------------------------------------------------- hooks
CASES += [
    case("hooks=5", lambda m: m.neox.run_with_hooks(TOK, hooks=5), hs.InputError,
         r"hooks must be a list of \(address, fn\) pairs, got int"),
    case("hooks=None", lambda m: m.neox.run_with_hooks(TOK, hooks=None), hs.InputError,
         r"hooks must be a list of \(address, fn\) pairs, got NoneType"),
    case("hooks=a string", lambda m: m.neox.run_with_hooks(TOK, hooks="resid_post.0"),
         hs.InputError, r"hooks must be a list of \(address, fn\) pairs, got str"),
    case("hooks=a function", lambda m: m.neox.run_with_hooks(TOK, hooks=_one), hs.InputError,
         r"hooks must be a list of \(address, fn\) pairs, got function"),
    case("hook without fn", lambda m: m.neox.run_with_hooks(TOK, hooks=["resid_post.0"]),
         hs.InputError, r"each hook must be an \(address, fn\) pair: an address"),
    case("hook pair swapped", lambda m: m.neox.run_with_hooks(TOK, hooks=[(_one, "resid_post.0")]),
         hs.InputError, r"an address or selection first, then a callable fn\(activation, address\)"),
    case("hook fn not callable", lambda m: m.neox.run_with_hooks(TOK, hooks=[("resid_post.0", 3)]),
         hs.InputError, r"each hook must be an \(address, fn\) pair"),
    case("hook triple", lambda m: m.neox.run_with_hooks(TOK, hooks=[("resid_post.0", _one, 1)]),
         hs.InputError, r"each hook must be an \(address, fn\) pair"),
    case("hook of one argument",
         lambda m: m.neox.run_with_hooks(TOK, hooks=[("resid_post.0", lambda act: act)]),
         hs.InputError, r"<lambda>\(act\), but hooks are called as fn\(activation, address\)"),
    case("hook of three arguments",
         lambda m: m.neox.run_with_hooks(TOK, hooks=[("resid_post.0", lambda a, b, c: a)]),
         hs.InputError, r"hooks are called as fn\(activation, address\)"),
    case("hook with a required keyword",
         lambda m: m.neox.run_with_hooks(TOK, hooks=[("resid_post.0", lambda a, b, *, c: a)]),
         hs.InputError, r"hooks are called as fn\(activation, address\)"),
    case("dict of one-argument hooks",
         lambda m: m.neox.run_with_hooks(TOK, hooks={"resid_post.0": lambda act: act}),
         hs.InputError, r"hooks are called as fn\(activation, address\)"),
    case("one-argument hook in run_with_cache",
         lambda m: m.neox.run_with_cache(TOK, "resid_post.0", hooks=[("head.0", lambda a: a)]),
         hs.InputError, r"hooks are called as fn\(activation, address\)"),
    case("one-argument hook in model.hooks",
         lambda m: m.neox.hooks([("resid_post.0", lambda a: a)]).__enter__(),
         hs.InputError, r"hooks are called as fn\(activation, address\)"),
    case("hook on a vision site that is missing",
         lambda m: m.cnn.run_with_hooks(IMG, hooks=[("head.0.0", _one)]),
         hs.SiteUnavailableError, r"available here"),
    case("hook returns an int",
         lambda m: m.neox.run_with_hooks(TOK, hooks=[("resid_post.0", lambda a, _: 0)]),
         hs.HookError, r"returned int; return a tensor of shape \(2, 10, 64\)", True),
    case("hook returns another shape",
         lambda m: m.neox.run_with_hooks(TOK, hooks=[("resid_post.0", lambda a, _: a[0])]),
         hs.HookError, r"returned shape \(10, 64\) but the activation has shape \(2, 10, 64\)",
         True),
    case("hook returns complex",
         lambda m: m.neox.run_with_hooks(
             TOK, hooks=[("resid_post.0", lambda a, _: a.to(torch.complex64))]),
         hs.HookError, r"complex tensor .*would drop the imaginary part: return a real tensor",
         True),
    case("hook returns a meta tensor",
         lambda m: m.neox.run_with_hooks(
             TOK, hooks=[("head.0.1", lambda a, _: torch.empty_like(a, device="meta"))]),
         hs.HookError, r"meta tensor \(a shape without data\); return a tensor with values", True),
    case("hook returns a mask",
         lambda m: m.neox.run_with_hooks(TOK, hooks=[("neuron.0.3", lambda a, _: a > 0)]),
         hs.HookError, r"torch.bool tensor for a torch.float32 activation; return floating", True),
    case("hook returns indices",
         lambda m: m.cnn.run_with_hooks(IMG, hooks=[("neuron.0", lambda a, _: a.long())]),
         hs.HookError, r"torch.int64 tensor for a torch.float32 activation; return floating", True),
    case("hook returns a list",
         lambda m: m.neox.run_with_hooks(TOK, hooks=[("resid_post.0", lambda a, _: [a])]),
         hs.HookError, r"returned list; return a tensor of shape", True),
]  # fmt: skip

# ---------------------------------------------------------------- metrics on their own
CASES += [
    case("logit_diff(1.5, 2)", lambda m: iv.logit_diff(1.5, 2), hs.InputError,
         r"correct must be a token id \(int\), a token string"),
    case("logit_diff(float tensor)", lambda m: iv.logit_diff(torch.tensor([1.0, 2.0]), 2),
         hs.InputError, r"correct must be a token id \(int\), a token string.*torch.float32"),
    case("logit_diff(2-D ids)", lambda m: iv.logit_diff([[1, 2]], 3), hs.InputError,
         r"correct must be a token id .* one per row; got shape \(1, 2\)"),
    case("logit_diff(-1, 2)", lambda m: iv.logit_diff(-1, 2), hs.InputError,
         r"correct token ids must be >= 0; got -1"),
    case("logit_diff(None, 2)", lambda m: iv.logit_diff(None, 2), hs.InputError,
         r"correct must be a token id \(int\)"),
    case("logit_diff(True, 2)", lambda m: iv.logit_diff(True, 2), hs.InputError,
         r"correct must be a token id \(int\)"),
    case("logit_diff([], 2)", lambda m: iv.logit_diff([], 2), hs.InputError,
         r"correct is empty; it must be a token id"),
    case("logit_diff(1, {})", lambda m: iv.logit_diff(1, {"a": 1}), hs.InputError,
         r"incorrect must be a token id \(int\)"),
    case("logit_diff(mixed list)", lambda m: iv.logit_diff(["a", 1], 2), hs.InputError,
         r"correct must be a token id \(int\), a token string"),
    case("logit_diff(position=1.5)", lambda m: iv.logit_diff(1, 2, position=1.5), hs.InputError,
         r"position must be an int .*one position per row, or None"),
    case("logit_diff(position=[1.5, 2.0])", lambda m: iv.logit_diff(1, 2, position=[1.5, 2.0]),
         hs.InputError, r"position must be an int .*torch.float32 \(positions are never rounded\)"),
    case("logit_diff(float position tensor)",
         lambda m: iv.logit_diff(1, 2, position=torch.tensor([1.5, 2.5])), hs.InputError,
         r"positions are never rounded"),
    case("logit_diff(position='last')", lambda m: iv.logit_diff(1, 2, position="last"),
         hs.InputError, r"position must be an int .*or None"),
    case("logit_diff(position=True)", lambda m: iv.logit_diff(1, 2, position=True),
         hs.InputError, r"position must be an int"),
    case("logit_diff(2-D position)", lambda m: iv.logit_diff(1, 2, position=[[1, 2]]),
         hs.InputError, r"one position per row"),
    case("logit(2.0)", lambda m: iv.logit(2.0), hs.InputError, r"token must be a token id \(int\)"),
    case("prob(object())", lambda m: iv.prob(object()), hs.InputError,
         r"token must be a token id \(int\)"),
    case("prob(position=0.5)", lambda m: iv.prob(1, position=0.5), hs.InputError,
         r"position must be an int"),
    case("loss(text)", lambda m: iv.loss("When Mary"), hs.InputError,
         r"token ids \[batch, pos\].*got text; tokenize it first: model.to_tokens"),
    case("loss(float tokens)", lambda m: iv.loss(torch.zeros(2, 5)), hs.InputError,
         r"token ids \[batch, pos\].*got shape \(2, 5\) torch.float32"),
    case("loss(1-D tokens)", lambda m: iv.loss(TOK[0]), hs.InputError,
         r"token ids \[batch, pos\].*got shape \(10,\)"),
    case("loss(1 position)", lambda m: iv.loss(TOK[:, :1]), hs.InputError,
         r"at least 2 positions"),
    case("loss(positions=[1.5])", lambda m: iv.loss(TOK, positions=[1.5]), hs.InputError,
         r"loss positions must be an int"),
    case("loss(positions=[])", lambda m: iv.loss(TOK, positions=[]), hs.InputError,
         r"non-empty list of ints \(the predicting positions 0..pos-2\)"),
    case("loss(None)", lambda m: iv.loss(None), hs.InputError, r"token ids \[batch, pos\]"),
    case("text metric not bound", lambda m: iv.logit_diff(" Mary", " John")(m.logits),
         hs.InputError, r"' Mary' is text; .*metric.bind\(model\).*or pass token ids"),
    case("text metric bound to a model without tokenizer",
         lambda m: iv.logit_diff(" Mary", " John").bind(m.bare), hs.InputError,
         r"correct ' Mary' is text, but this model has no tokenizer; pass token ids"),
    case("text metric of two tokens", lambda m: iv.logit(" Maryzz").bind(m.neox),
         hs.InputError, r"' Maryzz' is 3 tokens .*must be exactly one token"),
    case("per-row text metric of two tokens",
         lambda m: iv.logit_diff([" Mary", " Maryzz"], " John").bind(m.neox), hs.InputError,
         r"' Maryzz' is 3 tokens .*exactly one token"),
    case("metric id past the vocabulary", lambda m: iv.logit_diff(999, 1)(m.logits),
         hs.InputError, r"correct token id 999 out of range; valid ids are 0..499"),
    case("metric position past the input", lambda m: iv.logit(1, position=50)(m.logits),
         hs.InputError, r"position 50 out of range for 10 positions \(valid: 0..9, or -10..-1"),
    case("metric position before the input", lambda m: iv.logit(1, position=-11)(m.logits),
         hs.InputError, r"position -11 out of range for 10 positions"),
    case("metric per-row positions out of range",
         lambda m: iv.logit(1, position=[3, 12])(m.logits), hs.InputError,
         r"positions \[12\] of rows \[1\] out of range for 10 positions"),
    case("metric per-row positions for another batch",
         lambda m: iv.logit(1, position=[3, 4, 5])(m.logits), hs.InputError,
         r"position must be an int or one per row \(2\), got shape \(3,\)"),
    case("metric per-row ids for another batch",
         lambda m: iv.logit_diff([1, 2, 3], 4)(m.logits), hs.InputError,
         r"3 correct token ids for a batch of 2; give one id for every row or one per row"),
    case("position=None on language logits", lambda m: iv.logit(1, position=None)(m.logits),
         hs.InputError, r"position=None needs \[batch, classes\] output.*pass the position"),
    case("position on class logits", lambda m: iv.logit(1)(torch.zeros(2, 10)),
         hs.InputError, r"pass position=None for \[batch, classes\] outputs"),
    case("class id past the classes", lambda m: iv.logit(10, position=None)(torch.zeros(2, 10)),
         hs.InputError, r"token id 10 out of range; valid ids are 0..9 \(the output has 10 classes"),
    case("loss on logits of other inputs", lambda m: iv.loss(TOK[:, :5])(m.logits),
         hs.InputError, r"loss: output \(2, 10, 500\) does not match tokens \(2, 5\); pass"),
    case("loss positions past the input", lambda m: iv.loss(TOK, positions=[9])(m.logits),
         hs.InputError, r"loss positions \[9\] out of range: 10 tokens give 9 predicting"),
]  # fmt: skip


# ---------------------------------------------------------------- sweeps
def sweep(name, **kwargs):
    """One sweep call on the language model with a mistake in ``kwargs``."""

    def call(m):
        args = dict(kwargs)
        target = getattr(m, args.pop("model_name", "neox"))
        if name in ("activation_patching", "attribution_patching", "localize_circuit"):
            base = dict(clean=TOK, corrupted=CORR, metric=LD, sites="head.*.*", progress=False)
            return getattr(iv, name)(target, **{**base, **args})
        if name == "ablate":
            base = dict(inputs=TOK, sites="head.*.*", metric=LD, progress=False)
            return iv.ablate(target, **{**base, **args})
        base = dict(inputs=TOK, sites="head.*.*", metric=LD, method="zero")
        return iv.knockout(target, **{**base, **args})

    return call


SWEEPS = ["activation_patching", "attribution_patching", "ablate", "knockout", "localize_circuit"]
SWEEP_MISTAKES = [
    ("id past the vocabulary", dict(metric=iv.logit_diff(9999, 5)),
     r"correct token id 9999 out of range; valid ids are 0..499"),
    ("position past the input", dict(metric=iv.logit_diff(1, 5, position=50)),
     r"position 50 out of range for 10 positions \(valid: 0..9"),
    ("per-row ids for another batch", dict(metric=iv.logit_diff([1, 2, 3], 5)),
     r"3 correct token ids for a batch of 2"),
    ("metric=None", dict(metric=None), r"logit_diff.*callable"),
    ("metric='logit_diff'", dict(metric="logit_diff"), r"logit_diff.*callable"),
    ("metric=iv.logit (uncalled)", dict(metric=iv.logit),
     r"metric is the function iv.logit itself; call it to build the metric: iv.logit\(token\)"),
    ("metric of two arguments", dict(metric=lambda logits, other: logits.sum()),
     r"cannot be called as metric\(output\); it must be a Metric"),
    ("text metric of three tokens", dict(metric=iv.logit_diff(" Maryzz", " John")),
     r"' Maryzz' is 3 tokens .*exactly one token"),
    ("sites out of range", dict(sites="head.0.7"), r"layer 0 has 4 heads \(0-3\)"),
    ("sites missing here", dict(sites="resid_mid.*"), r"available here: .*resid_pre\.L"),
]  # fmt: skip
for sweep_name in SWEEPS:
    for label, kwargs, message in SWEEP_MISTAKES:
        if sweep_name == "ablate" and label == "metric=None":
            continue  # ablate without a metric returns the ablated output
        error = hs.AddressError if "sites" in kwargs else hs.InputError
        CASES.append(case(f"{sweep_name}: {label}", sweep(sweep_name, **kwargs), error, message))
CASES += [
    case("patching: loss of other tokens",
         sweep("activation_patching", metric=iv.loss(TOK[:, :5])), hs.InputError,
         r"loss: output \(2, 10, 500\) does not match tokens \(2, 5\)"),
    case("patching: direction", sweep("activation_patching", direction="denoising"),
         hs.InputError, r"direction must be one of denoise, noise"),
    case("patching: shapes differ", sweep("activation_patching", corrupted=CORR[:, :4]),
         hs.InputError, r"must have the same shape, got \(2, 10\) and \(2, 4\)"),
    # (the sweep's own position range is checked against the activations, after the baseline)
    case("patching: positions past the input", sweep("activation_patching", positions=[10]),
         hs.InputError, r"positions \[10\] out of range for inputs of 10 positions", True),
    case("patching: position 1.5", sweep("activation_patching", positions=[1.5]),
         hs.InputError, r"positions must be 'all', 'each' or a list of ints"),
    case("patching: positions='every'", sweep("activation_patching", positions="every"),
         hs.InputError, r"positions must be 'all', 'each' or a list of ints"),
    case("patching: float clean ids", sweep("activation_patching", clean=TOK.float()),
         hs.InputError, r"integer tensor \(torch.long\)"),
    case("patching: ids past the vocabulary", sweep("activation_patching", clean=TOK + 500),
         hs.InputError, r"must lie in 0-499"),
    case("attribution: metric per-row positions",
         sweep("attribution_patching", metric=iv.logit(1, position=[1, 2, 3])), hs.InputError,
         r"one per row \(2\)"),
    case("ablate: method", sweep("ablate", method="mean_ablation"), hs.InputError,
         r"one of zero, mean, resample"),
    case("ablate: empty inputs", sweep("ablate", inputs=TOK[:0]), hs.InputError, r"0 rows"),
    case("knockout: method", sweep("knockout", method="shuffle"), hs.InputError,
         r"one of zero, mean, resample, corrupted"),
    case("localize: method", sweep("localize_circuit", method="gradient"), hs.InputError,
         r"method must be one of attribution, exact"),
    case("localize: criterion", sweep("localize_circuit", criterion="sufficiency"),
         hs.InputError, r"criterion must be one of patch, faithfulness"),
    case("localize: threshold", sweep("localize_circuit", threshold=1.5), hs.InputError,
         r"threshold must be in \(0, 1\]"),
    case("patching: metric returns a vector",
         sweep("activation_patching", metric=lambda out: out[:, -1, 5]), hs.InputError,
         r"metric must return a scalar tensor", True),
    case("patching: metric equal on clean and corrupted",
         sweep("activation_patching", corrupted=TOK), hs.InputError,
         r"the metric is equal on clean and corrupted runs", True),
    case("cnn patching: metric reads a position",
         sweep("activation_patching", model_name="cnn", clean=IMG, corrupted=IMG + 1,
               metric=iv.logit(0), sites="neuron.0.*"), hs.InputError,
         r"output must be \[batch, pos, vocab\] to read position -1, got shape \(2, 10\); pass "
         r"position=None"),
    case("cnn patching: class past the classes",
         sweep("activation_patching", model_name="cnn", clean=IMG, corrupted=IMG + 1,
               metric=iv.logit(10, position=None), sites="neuron.0.*"), hs.InputError,
         r"token id 10 out of range; valid ids are 0..9 \(the output has 10 classes\)"),
    case("mlp attribution: class past the classes",
         sweep("attribution_patching", model_name="mlp", clean=IMG, corrupted=IMG + 1,
               metric=iv.prob([3, 12], position=None), sites="neuron.0.*"), hs.InputError,
         r"token id 12 out of range; valid ids are 0..9"),
    case("vit ablate: metric reads a position",
         sweep("ablate", model_name="vit", inputs=IMG, metric=iv.logit(0), sites="head.0.*"),
         hs.InputError, r"pass position=None for \[batch, classes\] outputs"),
    case("vit patching: images of the wrong size",
         sweep("activation_patching", model_name="vit", clean=torch.zeros(2, 1, 6, 6),
               corrupted=torch.zeros(2, 1, 6, 6), metric=iv.logit(0, position=None),
               sites="head.0.*"), hs.InputError,
         r"vit expects a float image tensor \[batch, 1, 8, 8\]"),
    case("mlp patching: positions='each'",
         sweep("activation_patching", model_name="mlp", clean=IMG, corrupted=IMG + 1,
               metric=iv.logit(0, position=None), sites="neuron.0.*", positions="each"),
         hs.InputError, r"no position axis; use positions='all'"),
    case("bare patching: text metric", sweep("activation_patching", model_name="bare",
         metric=iv.logit_diff(" Mary", " John")), hs.InputError,
         r"' Mary' is text, but this model has no tokenizer; pass token ids"),
]  # fmt: skip


@pytest.fixture(scope="module")
def models():
    tok = builders.make_tokenizer()
    neox = hs.HookedModel.wrap(builders.tiny_neox(), tokenizer=tok)
    _, cache = neox.run_with_cache(TOK, names=["resid_post.0", "head.1"])
    return SimpleNamespace(
        neox=neox,
        bare=hs.HookedModel.wrap(builders.tiny_neox()),
        gpt2=hs.HookedModel.wrap(builders.tiny_gpt2()),
        llama=hs.HookedModel.wrap(builders.tiny_llama_gqa()),
        cnn=hs.HookedModel.wrap(builders.tiny_cnn()),
        mlp=hs.HookedModel.wrap(builders.tiny_mlp()),
        vit=hs.HookedModel.wrap(builders.tiny_vit()),
        cache=cache,
        logits=neox(TOK),
    )


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_table_has_enough_cases():
    assert len(CASES) >= 150


@pytest.mark.parametrize("case", CASES)
def test_wrong_input(models, case: Case):
    wrapped = [v for v in vars(models).values() if isinstance(v, hs.HookedModel)]
    forwards = []
    before = [_hooks(w.model) for w in wrapped]
    handles = [
        w.model.register_forward_pre_hook(lambda module, args: forwards.append(module))
        for w in wrapped
    ]
    try:
        with pytest.raises(case.error, match=case.message) as info:
            case.call(models)
    finally:
        for handle in handles:
            handle.remove()
    assert isinstance(info.value, hs.HookscopeError)
    if not case.forward:
        assert forwards == [], "a forward ran before the mistake was reported"
    assert [_hooks(w.model) for w in wrapped] == before  # nothing left behind
