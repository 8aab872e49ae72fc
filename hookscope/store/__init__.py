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

Data-parallel extraction and several machines
---------------------------------------------

``torchrun --nproc_per_node N -m hookscope store extract ...`` (or ``store.extract`` in a
script started by torchrun, with the process group initialised) splits the dataset's
batches, counted from its first row, into ``WORLD_SIZE`` contiguous blocks: global rank
``r`` extracts block ``r`` into its own ``rankRRR-*`` files, and rank 0 writes
``columns.arrow`` and, after a barrier, the manifest, which lists the shards in rank order.
The entry is therefore the same, row for row and bit for bit, whatever the number of
processes (on the same hardware and dtype: a GPU run is not bitwise equal to a CPU run).
The command line uses nccl where CUDA is available (rank ``LOCAL_RANK`` on GPU
``LOCAL_RANK``) and gloo otherwise. A resume needs the same number of processes (another
number is a StoreError before any forward); each rank resumes at its own first missing
shard.

Several machines run the same command with torchrun's multi-node rendezvous, e.g. on each
of 2 nodes::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \
        --rdzv-endpoint head-node:29500 --rdzv-id acts1 \
        -m hookscope store extract --model M --data D --sites ... --out /data/acts

Ranks are global (``RANK = node_rank * nproc_per_node + LOCAL_RANK``, as torchrun assigns
them), so the nodes together cover the dataset once. Every node must see the same dataset
(the same files, or a task-data name that builds the same rows) and the same model weights:
every rank computes the entry key from them, and a node that sees other data writes another
entry. Then either

* ``--out`` is on a filesystem all nodes share: rank 0 writes the manifest and the entry is
  complete when the command exits; or
* each node writes its own local ``--out``: every node exits 0 after saying its ranks are
  done (the entry has no manifest yet); copy the node folders to one machine and run
  ``hookscope store merge OUT node0/acts node1/acts ...`` (:mod:`hookscope.store.merge`),
  which checks that the ranks are disjoint, complete and agree, hard-links or copies the
  files into ``OUT`` and writes the manifest as rank 0 would have.

Merge records, in addition to the layout above: each ``rankRRR.json`` holds ``key``,
``key_fields`` and ``columns`` (what the manifest needs, so a node folder without rank 0
can still be merged), and a merged manifest holds ``merged_from``, the input folders.
"""

from hookscope.errors import StoreError
from hookscope.store.stats import RunningMoments
from hookscope.store.store import FORMAT_VERSION, ActivationStore
from hookscope.store.stored import StoredActivations

__all__ = ["ActivationStore", "StoredActivations", "RunningMoments", "StoreError", "FORMAT_VERSION"]
