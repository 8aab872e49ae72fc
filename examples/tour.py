# %% [markdown]
# # A first hour with hookscope
#
# One research session as notebook cells (`# %%`; open it in VS Code/Jupyter as a notebook,
# or run it as a script):
#
# 1. the logit lens: where does the answer appear?
# 2. direct logit attribution by head: which heads write it?
# 3. the attention patterns of those heads;
# 4. activation patching to confirm them causally;
# 5. a steering vector added to the residual stream during generation.
#
#     python examples/tour.py                          # the shipped tiny-induction model (offline, ~10 s)
#     python examples/tour.py --model smollm2-135m     # IOI on SmolLM2-135M (after `make models`)
#
# On SmolLM2 the question is indirect-object identification: "When Mary and John went to the
# store, John gave a drink to" -> " Mary" rather than " John". On tiny-induction (2 layers,
# vocabulary 64, no tokenizer) it is induction: in a repeated random sequence, the token that
# followed the current token last time. Figures go to `--out` (default `results/tour`).

# %%
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import hookscope as hs
from hookscope import interventions as iv

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", default="tiny-induction", choices=["tiny-induction", "smollm2-135m"])
parser.add_argument("--out", default="results/tour")
args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

model = hs.zoo.load(args.model)
print(model)
ioi = model.tokenizer is not None

# %% [markdown]
# ## The prompt and its answer
# `correct` / `incorrect` are token ids; the logit difference between them is the quantity
# every step below explains.

# %%
if ioi:
    prompt = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    correct, incorrect = " Mary", " John"
    labels = model.to_str_tokens(prompt)
    task = iv.build_task("ioi", model, n=8)
else:
    # [bos] + 10 random tokens, repeated: at the last position the answer is the token that
    # followed the current one in the first copy
    task = iv.build_task("induction", model, n=8)
    prompt = task.clean[:1, :-1]
    correct = int(task.clean[0, -1])
    incorrect = int(prompt[0, -1])  # the current token itself: a plain "copy me" guess
    labels = [str(t) for t in prompt[0].tolist()]
logits, cache = model.run_with_cache(prompt)
c, i = (model.to_single_token(t) if isinstance(t, str) else t for t in (correct, incorrect))
print(f"logit difference {float(logits[0, -1, c] - logits[0, -1, i]):.2f}")

# %% [markdown]
# ## 1. Logit lens
# `hs.logit_lens` reads the stream after every layer through the model's own final norm and
# unembedding; the last row is the model's prediction.

# %%
lens = hs.logit_lens(model, prompt)
print(lens)
p_correct = lens.prob(correct)[:, 0, -1]
for label, p in zip(lens.labels, p_correct.tolist(), strict=True):
    print(f"  P(answer) after {label:<14} {p:.3f}")
lens.plot(positions=slice(-8, None)).savefig(out / "logit_lens.png", dpi=110)

# %% [markdown]
# ## 2. Direct logit attribution by head
# Each head's result through the final norm frozen at the real stream's scale, dotted with
# the answer direction `W_U[:, correct] - W_U[:, incorrect]`. Over every component these sum
# to the logit difference.

# %%
stack, heads = cache.stack_head_results(apply_ln=True, pos=-1, return_labels=True)
dla = cache.logit_attrs(stack, correct, incorrect, pos=-1)[:, 0]  # [n_layers * n_heads]
order = dla.abs().argsort(descending=True)
top_heads = [heads[i] for i in order[:3].tolist()]
print("top heads by |DLA|:", ", ".join(f"{heads[i]} {dla[i]:+.2f}" for i in order[:5].tolist()))
hs.plot.dla(dla, heads, top=12, title="direct logit attribution by head").savefig(
    out / "dla.png", dpi=110
)

# %% [markdown]
# ## 3. What those heads attend to

# %%
for name in top_heads:
    fig = hs.plot.attention(cache, name, tokens=labels)
    fig.savefig(out / f"attention_{name.replace('.', '_')}.png", dpi=110)
layer = int(top_heads[0].split(".")[1])
hs.plot.attention(cache, f"head.{layer}.*", tokens=labels).savefig(
    out / "attention_layer.png", dpi=90
)
hs.plot.attention_html(cache, top_heads[0], tokens=labels).save(out / "attention.html")
pattern = cache[f"{top_heads[0]}.pattern"][0, -1]
print(
    f"{top_heads[0]} at the last position attends most to position {int(pattern.argmax())} "
    f"({labels[int(pattern.argmax())]!r}, weight {float(pattern.max()):.2f})"
)

# %% [markdown]
# ## 4. Patching confirms it
# Patch each head's output from the clean run into the corrupted one (IOI: denoise, with the
# names swapped) or from corrupted into clean (induction: noise); the score is the share of
# the metric restored (or destroyed).

# %%
patching = iv.activation_patching(
    model, task.clean, task.corrupted, task.metric, sites="head.*.*", direction=task.direction
)
print(patching)
patching.plot().savefig(out / "patching.png", dpi=110)
print("patching's top heads:", ", ".join(str(address) for address, _, _ in patching.top(3)))

# %% [markdown]
# ## 5. A steering vector during generation
# The difference of the mean `resid_post` between two prompts, added at every position of
# every generation step (a hook sees each step's new positions).

# %%
mid = model.n_layers // 2
if ioi:
    a = model.run_with_cache("I love this. It is wonderful and", names=f"resid_post.{mid}")[1]
    b = model.run_with_cache("I hate this. It is terrible and", names=f"resid_post.{mid}")[1]
    start = "The weather today is"
else:
    a = model.run_with_cache(task.clean[:4], names=f"resid_post.{mid}")[1]
    b = model.run_with_cache(task.corrupted[:4], names=f"resid_post.{mid}")[1]
    start = task.clean[:1, :12]
vector = a[f"resid_post.{mid}"].mean((0, 1)) - b[f"resid_post.{mid}"].mean((0, 1))


def steer(act, address):
    return act + 4.0 * vector


plain = model.generate(start, max_new_tokens=12)
steered = model.generate(start, max_new_tokens=12, hooks=[(f"resid_post.{mid}", steer)])
show = model.to_string if ioi else (lambda t: t[0].tolist())
print("plain:  ", show(plain))
print("steered:", show(steered))
_, generated = model.run_with_cache(steered, names="resid_post.*")  # one call away
print(f"figures in {out}/")
