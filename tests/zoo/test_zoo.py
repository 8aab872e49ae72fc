"""The zoo: catalogue, the pythia hub path offline, packaged models (optional), errors."""

import shutil

import pytest
import torch

import hookscope as hs
from hookscope import zoo
from hookscope.zoo import packaged


def _hf_cache_with(folder, repo_id, root):
    """Lay ``folder`` out as the Hugging Face hub cache would hold ``repo_id`` at main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo_id.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)
    return root


def test_pythia_loads_through_the_hub_cache_path(pythia_dir, pythia_hf, tmp_path):
    cache = _hf_cache_with(pythia_dir, "EleutherAI/pythia-70m", tmp_path / "hub")
    model = zoo.load("pythia-70m", cache_dir=str(cache))
    assert model.adapter.name == "gpt_neox" and model.tokenizer is not None
    toks = torch.tensor([[5, 17, 301, 2, 9]])
    with torch.no_grad():
        assert torch.equal(model(toks), pythia_hf(toks).logits)


def test_missing_hub_offline_is_a_clear_error(tmp_path):
    with pytest.raises(
        hs.ModelLoadError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    ) as err:
        zoo.load("pythia-160m", cache_dir=str(tmp_path))
    assert "huggingface-cli download EleutherAI/pythia-160m" in str(err.value)


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(
        hs.ModelLoadError, match=r"the hub is not reachable: 127.0.0.1:9 unreachable"
    ):
        zoo.load("pythia-70m", revision="step1000", cache_dir=str(tmp_path))


def test_catalogue_lists_every_kind():
    cat = zoo.available()
    names = cat.names()
    for name in (
        "tiny-induction",
        "digits-mlp",
        "digits-cnn",
        "digits-vit",
        "smollm2-135m",
        "gemma3-270m",
        "minilm",
        "pythia-70m",
    ):
        assert name in names
    text = repr(cat)
    assert "pythia-70m" in text and "tiny-induction" in text and "[ready]" in text
    df = cat.to_pandas()
    assert set(df.kind) == {"hub", "package", "shipped"}
    assert df.set_index("name").loc["tiny-induction", "ready"]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: zoo.load("pythia-71m"),
            hs.InputError,
            "unknown zoo model 'pythia-71m'.*Did you mean 'pythia-70m'",
        ),
        (
            lambda: zoo.load("smollm2-135m", checkpoint=3),
            hs.InputError,
            "checkpoint= is for shipped models",
        ),
        (
            lambda: zoo.load("digits-mlp", revision="step1"),
            hs.InputError,
            "revision= is for hub models",
        ),
        (lambda: zoo.install("pythia-70m"), hs.InputError, "only packaged models need installing"),
    ],
)
def test_zoo_argument_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_uninstalled_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(packaged, "installed", lambda name: False)
    with pytest.raises(
        hs.ModelLoadError,
        match=r"smollm2-135m is not installed here .*python -m hookscope.zoo install smollm2-135m",
    ):
        zoo.load("smollm2-135m")


def test_cli_list_and_bad_install(capsys):
    from hookscope.zoo.__main__ import main

    assert main(["list"]) == 0
    assert "digits-cnn" in capsys.readouterr().out
    assert main(["install", "tiny-induction"]) == 2
    assert "only packaged models need installing" in capsys.readouterr().err


# ---------------------------------------------------------------------------- real weights


def _need(name):
    if not packaged.installed(name):
        pytest.skip(
            f"{name} is not installed (run `make models` or `python -m hookscope.zoo install {name}`)"
        )


PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.mark.optional_model
def test_smollm2_real_weights_do_ioi():
    _need("smollm2-135m")
    model = zoo.load("smollm2-135m")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads) == (30, 9, 3)
    logits = model(PROMPT)[0, -1]
    mary, john = model.to_tokens(" Mary")[0, -1], model.to_tokens(" John")[0, -1]
    assert logits.argmax() == mary
    assert logits[mary] - logits[john] > 4  # measured 6.1


@pytest.mark.optional_model
def test_smollm2_conversion_matches_direct_gguf_load():
    _need("smollm2-135m")
    from transformers import AutoModelForCausalLM

    folder, gguf_file = packaged.PACKAGED["smollm2-135m"].locate(packaged.cache_dir())
    direct = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, dtype=torch.float32
    ).eval()
    model = zoo.load("smollm2-135m")
    toks = model.to_tokens(PROMPT)
    with torch.no_grad():
        assert torch.equal(model(toks), direct(toks, use_cache=False).logits)


@pytest.mark.optional_model
def test_gemma3_real_weights():
    _need("gemma3-270m")
    model = zoo.load("gemma3-270m")
    assert model.adapter.name == "gemma3" and model.cfg.n_layers == 18
    logits, cache = model.run_with_cache(PROMPT, names=["head.0.pattern", "resid_mid.5"])
    mary, john = model.to_tokens(" Mary")[0, -1], model.to_tokens(" John")[0, -1]
    assert logits[0, -1, mary] > logits[0, -1, john]
    torch.testing.assert_close(cache["head.0.pattern"].sum(-1), torch.ones(1, 4, logits.shape[1]))


@pytest.mark.optional_model
def test_minilm_embeddings():
    _need("minilm")
    from transformers import AutoModel

    model = zoo.load("minilm")
    assert model.adapter.name == "bert" and "logits" not in {str(a) for a in model.addresses()}
    direct = AutoModel.from_pretrained(str(packaged.prepared_folder("minilm"))).eval()
    enc = model.tokenizer(
        [
            "A man is playing a guitar.",
            "Someone plays the guitar.",
            "Stock markets fell sharply today.",
        ],
        return_tensors="pt",
        padding=True,
    )
    _, cache = model.run_with_cache(dict(enc), names="resid_post.5")
    with torch.no_grad():
        assert torch.equal(cache["resid_post.5"], direct(**enc).last_hidden_state)
    mask = enc["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((cache["resid_post.5"] * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3  # paraphrases close, unrelated far


@pytest.mark.optional_model
def test_smollm2_ioi_logit_difference_on_generated_prompts():
    _need("smollm2-135m")
    from hookscope.data.ioi import ioi, ioi_tokens

    model = zoo.load("smollm2-135m")
    pairs = ioi(model.tokenizer, n=64, seed=1)
    t = ioi_tokens(pairs, model.tokenizer)
    rows = torch.arange(len(pairs))
    with torch.no_grad():
        logits = model(t.clean_tokens, attention_mask=t.attention_mask)[rows, t.end_pos]
    diff = logits[rows, t.correct] - logits[rows, t.incorrect]
    assert (diff > 2).float().mean() >= 0.8, diff
