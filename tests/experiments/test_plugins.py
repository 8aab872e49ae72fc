"""A broken action plug-in (an entry point whose import fails) is left out of the listing with
a warning naming it, does not stop the built-in actions or other plug-ins, and raises its own
error, with its name, only when asked for."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from hookscope import actions
from hookscope.errors import ExperimentError


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Three installed plug-ins: one whose module is missing, one whose import raises, one
    that works."""
    (tmp_path / "raising_plugin.py").write_text("raise RuntimeError('no GPU driver')\n")
    (tmp_path / "good_plugin.py").write_text(
        textwrap.dedent('''
        from hookscope.actions import Action, ActionResult, Params

        class Echo(Action):
            """Echoes a number."""
            class Params(Params):
                value: int = 1
            def prepare(self, context):
                return context
            def run(self, prepared):
                return ActionResult(metrics={})
            def summarize(self, result):
                return {"question": "", "metrics": {}, "tables": [], "figures": [], "notes": []}
        ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    points = {
        "missing_module": EntryPoint("missing_module", "no_such_module:Thing", "hookscope.actions"),
        "raising": EntryPoint("raising", "raising_plugin:Thing", "hookscope.actions"),
        "echo_plugin": EntryPoint("echo_plugin", "good_plugin:Echo", "hookscope.actions"),
    }
    monkeypatch.setattr(actions, "_plugin_points", lambda: dict(points))
    yield points
    for name in points:  # the plug-ins leave the registry (built-ins loaded meanwhile stay)
        actions._REGISTRY.pop(name, None)
    for name in ("raising_plugin", "good_plugin"):
        sys.modules.pop(name, None)


def test_broken_plugins_are_left_out_with_a_warning(plugins):
    with pytest.warns(UserWarning) as caught:
        listed = actions.available()
    messages = " | ".join(str(w.message) for w in caught)
    assert (
        "'missing_module' (no_such_module:Thing) cannot be imported: ModuleNotFoundError"
        in messages
    )
    assert (
        "'raising' (raising_plugin:Thing) cannot be imported: RuntimeError: no GPU driver"
        in messages
    )
    assert "missing_module" not in listed and "raising" not in listed
    assert "echo_plugin" in listed and "feature_detection" in listed
    assert actions.get("feature_detection").name == "feature_detection"
    assert actions.get("echo_plugin").name == "echo_plugin"


def test_asking_for_a_broken_plugin_raises_its_error(plugins):
    with pytest.raises(ExperimentError, match="'raising' .* RuntimeError: no GPU driver"):
        actions.get("raising")
    with pytest.raises(ExperimentError, match="'missing_module' .* ModuleNotFoundError"):
        actions.get("missing_module")
    # an unknown name lists every action, the broken plug-ins included (they are installed)
    with pytest.raises(ExperimentError, match="action.name: 'echo_plugn' is not one of") as err:
        actions.get("echo_plugn")
    assert "echo_plugin" in str(err.value) and "raising" in str(err.value)


def test_parameter_types_read_as_choices():
    """`hookscope actions` shows a Literal's choices and an optional type as ``X | None``."""
    types = {p["name"]: p["type"] for p in actions.describe("feature_detection")}
    assert types["probe"] == "'logistic' | 'ridge'"
    assert types["metric"] == "'accuracy' | 'f1' | 'auroc' | 'r2' | None"
    assert types["label"] == "str | None"
    assert types["seeds"] == "int"
