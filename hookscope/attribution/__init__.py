"""Attribution: which inputs, pixels, patches or tokens a model's output depends on.

* :func:`saliency`, :func:`integrated_gradients` (:mod:`.gradients`) and :func:`grad_cam`
  (:mod:`.grad_cam`) - gradient methods at the input or any hookscope address
  (:mod:`._where`), on any wrapped model; each module states its conventions, and the tests
  compare each with captum.
* :func:`attention_rollout`, :func:`attention_flow` - how attention mixes tokens across
  layers (Abnar & Zuidema 2020) (:mod:`.attention`).
* :func:`compare` - one method on two checkpoints and the difference, with a figure.
* :func:`plot` - overlays on the images; token inputs render as coloured text
  (``.text()``, ``.html()``).

``at.grad_cam`` is the function; the module is ``hookscope.attribution.grad_cam`` (import
from it by name: ``from hookscope.attribution.grad_cam import NORMALIZATIONS``).

>>> from hookscope import attribution as at
>>> cam = at.grad_cam(cnn, X[:16], target=y[:16], site="neuron.1")   # doctest: +SKIP
>>> at.plot(cam, X[:16])                                              # doctest: +SKIP
"""

from hookscope.attribution.attention import (
    HEAD_FUSIONS,
    Rollout,
    attention_flow,
    attention_rollout,
    flow_from_patterns,
    rollout_from_patterns,
)
from hookscope.attribution.compare import COMPARABLE, Comparison, compare
from hookscope.attribution.grad_cam import NORMALIZATIONS, grad_cam
from hookscope.attribution.gradients import (
    METHODS,
    integrated_gradients,
    quadrature,
    saliency,
)
from hookscope.attribution.result import Attributions, plot

__all__ = [
    "HEAD_FUSIONS",
    "Rollout",
    "attention_flow",
    "attention_rollout",
    "flow_from_patterns",
    "rollout_from_patterns",
    "Attributions",
    "COMPARABLE",
    "Comparison",
    "compare",
    "METHODS",
    "NORMALIZATIONS",
    "grad_cam",
    "integrated_gradients",
    "plot",
    "quadrature",
    "saliency",
]
