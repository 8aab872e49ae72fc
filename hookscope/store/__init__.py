"""Activation store: extract once, read many times.

>>> store = hs.ActivationStore("acts/")
>>> acts = store.extract(model, ds, sites=["resid_post.*"], positions="last", dtype="float16")
>>> acts["resid_post.3"]                    # [rows, d_model] over a memory map
>>> acts.stats("resid_post.3").covariance()  # accumulated while extracting, float64
>>> for batch in acts.loader(["resid_post.3", "label"], batch_size=4096, shuffle=True): ...

Disk format, version 1 (everything here opens without hookscope: JSON, Arrow IPC streams,
safetensors; nothing is pickled)::

    acts/
      hookscope-store.json              {"format": "hookscope-store", "version": 1}
      entries/<key[:20]>/
        manifest.json                   written last, atomically, by rank 0: the key and its
                                        fields (model weights sha256, adapter, sites, positions,
                                        dataset fingerprint and split, tokenizer, template,
                                        max_length, dtype, format version), versions of
                                        hookscope/torch/transformers/pyarrow/datasets, shapes,
                                        and every shard's file, rank, examples, rows, bytes, sha256
        rank000-shard000000.arrow       Arrow IPC stream, one record batch: a fixed_size_list
                                        column per site (float32/float16; bfloat16 as uint16 bits,
                                        field metadata hookscope.dtype / hookscope.shape) and int64
                                        __example / __position / __token index columns
        rank000-shard000000.arrow.stats.safetensors   the shard's streaming statistics per site
        columns.arrow                   the dataset's own columns (labels, ids), one row per example
        rank000.json                    the rank's plan and finished shards (for resuming)
        rank000.tokens.arrow            the rank's token ids and positions (resuming never re-tokenises)

``datasets.Dataset.from_file(shard)`` opens a shard directly. The key is the sha256 of the
canonical JSON of the key fields (:mod:`hookscope.store.keys`); see
:mod:`hookscope.store.extract` for crash safety and :mod:`hookscope.store.positions` for
position policies.
"""

from hookscope.errors import StoreError
from hookscope.store.stats import RunningMoments
from hookscope.store.store import FORMAT_VERSION, ActivationStore
from hookscope.store.stored import StoredActivations

__all__ = ["ActivationStore", "StoredActivations", "RunningMoments", "StoreError", "FORMAT_VERSION"]
