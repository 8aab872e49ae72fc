"""Task data as ``datasets.Dataset`` objects with documented schemas.

* :func:`digits` - scikit-learn's 8x8 digits with a fixed stratified train/test split.
* :func:`induction` - random token prefixes repeated in context (varying length).
* :func:`ioi` / :func:`ioi_tokens` - indirect-object-identification clean/corrupted pairs.
* :func:`agreement` - subject-verb number agreement sentences for probing.
* :func:`factual_recall` - curated prompt/answer facts for real language models.

Each module's docstring lists its columns.
"""

from hookscope.data.agreement import agreement
from hookscope.data.digits import digits, digits_tensors
from hookscope.data.factual import factual_recall
from hookscope.data.induction import induction, induction_tensors
from hookscope.data.ioi import IOITokens, ioi, ioi_tokens, single_token_names

__all__ = [
    "digits",
    "digits_tensors",
    "induction",
    "induction_tensors",
    "ioi",
    "ioi_tokens",
    "IOITokens",
    "single_token_names",
    "agreement",
    "factual_recall",
]
