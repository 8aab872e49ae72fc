"""Steering generation: add a direction to the residual stream while the model generates.

The shipped zoo model ``tiny-induction`` (a 2-layer GPT-NeoX trained to continue repeated
random token sequences; it has no tokenizer, so prompts are token ids) reads
``[bos] A A[:3]`` and continues A by induction. The steering vector is the difference of
mean ``resid_post.0`` between a prompt built from another sequence B and one built from A;
adding it during generation (key/value cache on, hooks removed afterwards) pulls the model
off its copy of A. A second run adds it only at generated positions, found through the
hook's ``context``.

    python examples/steering.py        # offline, a few seconds
"""

from __future__ import annotations

import torch

import hookscope as hs
from hookscope.generation import GenerationContext

LAYER = 0
SCALE = 2.0
N_NEW = 7


def main() -> None:
    model = hs.zoo.load("tiny-induction")
    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    a, b = (torch.randperm(vocab - 1, generator=g)[:10] + 1 for _ in range(2))  # no bos, no repeats
    bos = torch.tensor([0])
    prompt = torch.cat([bos, a, a[:3]])[None]  # [1, 14]; induction continues with a[3:]
    expected = a[3 : 3 + N_NEW]

    site = f"resid_post.{LAYER}"
    _, cache_a = model.run_with_cache(torch.cat([bos, a, a])[None], names=site)
    _, cache_b = model.run_with_cache(torch.cat([bos, b, b])[None], names=site)
    steer = cache_b[site][0].mean(0) - cache_a[site][0].mean(0)  # [d_model]

    def everywhere(act: torch.Tensor, address: object) -> torch.Tensor:
        return act + SCALE * steer

    def generated_only(
        act: torch.Tensor, address: object, context: GenerationContext
    ) -> torch.Tensor:
        new = (context.positions >= context.prompt_length)[None, :, None]
        return act + SCALE * steer * new

    runs = {
        "no steering": model.generate(prompt, max_new_tokens=N_NEW),
        f"steer {site} everywhere": model.generate(
            prompt, max_new_tokens=N_NEW, hooks=[(site, everywhere)]
        ),
        f"steer {site} on new tokens": model.generate(
            prompt, max_new_tokens=N_NEW, hooks=[(site, generated_only)]
        ),
    }
    print(f"A        {a.tolist()}")
    print(f"B        {b.tolist()}")
    print(f"prompt   {prompt[0].tolist()}  (copying A continues {expected.tolist()})")
    print(f"steering vector: mean {site} over B minus over A, |v| = {steer.norm():.2f}, x{SCALE}")
    for name, out in runs.items():
        new = out[0, prompt.shape[1] :]
        copied = int((new == expected[: len(new)]).sum())
        print(f"{name:<32} {new.tolist()}  copies A at {copied}/{len(new)} positions")


if __name__ == "__main__":
    main()
