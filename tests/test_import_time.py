"""``import hookscope`` stays light: torch and transformers load when a name needs them.

Each check runs in a fresh interpreter and looks at ``sys.modules``; none measures time
(wall-clock assertions fail on a busy machine and pass on a broken one).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "numpy", "pandas", "matplotlib", "scipy", "datasets")


def fresh(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter (hookscope from this checkout)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_hookscope_loads_no_torch_until_a_name_needs_it():
    done = fresh(f"""
        import sys
        import hookscope as hs
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        assert not heavy, heavy
        # the light public names are there already, the heavy ones listed but not loaded
        assert hs.parse("head.3.5") == hs.AttentionHead(3, 5)
        assert issubclass(hs.AddressError, hs.HookscopeError)
        assert {{"HookedModel", "ActivationCache", "ViT", "model", "actions"}} <= set(dir(hs))
        assert "torch" not in sys.modules
        model_cls = hs.HookedModel
        assert "torch" in sys.modules and model_cls.__module__ == "hookscope.model"
        from hookscope import ActivationCache, HookedModel, ViT
        import torch
        assert HookedModel is model_cls and issubclass(ViT, torch.nn.Module)
        assert ActivationCache.__module__ == "hookscope.cache"
        assert hs.model.HookedModel is HookedModel and hs.cache.ActivationCache is ActivationCache
    """)
    assert done.returncode == 0, done.stderr


def test_every_public_name_resolves():
    done = fresh("""
        import hookscope as hs
        missing = [n for n in hs.__all__ if n not in dir(hs)]
        assert not missing, missing
        for name in hs.__all__:
            getattr(hs, name)
        ns = {}
        exec("from hookscope import *", ns)
        assert set(hs.__all__) <= set(ns)
        try:
            hs.no_such_thing
        except AttributeError as err:
            assert "no_such_thing" in str(err)
        else:
            raise SystemExit("no AttributeError")
    """)
    assert done.returncode == 0, done.stderr


def test_the_light_modules_and_the_command_line_import_no_torch():
    """The modules a rerun of a finished experiment and ``hookscope --help`` need."""
    done = fresh("""
        import sys
        import hookscope.addresses, hookscope.errors, hookscope.cli, hookscope.experiments
        from hookscope.cli import build_parser
        build_parser()
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not heavy, heavy
    """)
    assert done.returncode == 0, done.stderr
