"""featcache's vocabulary: every name a user types or reads, in one place.

Feature kinds, head names, selection metrics, balance modes, token modes, storage dtypes, k-NN
backends and the metrics with confidence intervals are defined here once; the library checks
against these tuples and the command line offers them as choices. The module imports nothing,
so `featcache --help` lists the choices without loading torch.
"""
from __future__ import annotations

# what a vector head, k-NN or probe reads: datasets of a split, concatenated with "+"
FEATURE_KINDS = ("cls", "pooled", "cls+pooled")
# heads of heads.HEADS (linear/mlp read feature kinds, mixer/attn read full tokens)
HEAD_NAMES = ("linear", "mlp", "mixer", "attn")
# TrainConfig settings only some head kinds read (the others record them without effect)
HEAD_ONLY_SETTINGS = {"hidden": ("mlp",), "dropout": ("mlp", "attn")}
# one number to select epochs, configurations and C by (higher is better; loss is negated)
SELECTION_METRICS = ("accuracy", "balanced_accuracy", "auroc", "loss")
# how a head meets imbalanced classes: weighted loss, class-balanced batches, nothing
BALANCE = ("weights", "sampler", "none")
OPTIMIZERS = ("adamw", "adam")
# how stored tokens reach --num-tokens (tokens.py)
TOKEN_MODES = ("resize", "grid", "native")
# the default validation split, and the other names a folder or a Hugging Face dataset gives it
VAL_SPLIT = "val"
VAL_ALIASES = ("validation", "valid", "dev")
# class names that mark a row unlabelled wherever labels are read as text (manifest cells, Hugging
# Face string columns, imported names), as -1 does for class indices ("nan": numpy's text of a NaN
# in an array of names)
UNLABELLED_NAMES = ("", "-1", "nan", "NaN")
# the model name `featcache import` records without --model: it fingerprints no backbone
IMPORTED_MODEL = "imported"
# the first 8 bytes of every HDF5 file: a feature file given where a CSV or JSON goes
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# storage dtype of features
DTYPES = ("float16", "float32")
# hex digits kept per row of the sha256 of its input bytes (a feature file's `content`; 128 bits)
CONTENT_CHARS = 32
# k-NN search backends
KNN_BACKENDS = ("auto", "torch", "faiss")
# test metrics that get bootstrap confidence intervals when they are defined
CI_METRICS = ("top1", "balanced_accuracy", "macro_f1", "auroc", "sensitivity", "specificity")
# metrics printed in the command line's tables (metrics.json has every one)
SHOWN_METRICS = ("top1", "top5", "balanced_accuracy", "macro_f1", "auroc", "auprc", "sensitivity", "specificity",
                 "ece")
