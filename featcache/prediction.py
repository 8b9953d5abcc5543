"""Deployable heads: save, load and apply a trained head or probe to a feature file.

A saved head is two files in its run directory: ``head.safetensors`` (weights and the feature
standardisation, tensors only) and ``head.json`` (spec, classes, the feature file's fingerprint,
positive class, decision threshold, recipe). Neither can execute code when read, so a run
directory someone shared is safe to ``featcache predict``. Run directories of featcache 0.1
(``best.pt``) are read with ``torch.load(weights_only=True)``, which refuses pickled code.

The probabilities a run directory's metrics were computed from come from ``split_proba``, the
same function ``predict`` applies, so a run's test metrics equal what its predictions CSV gives.
"""
from __future__ import annotations

import csv
import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from featcache.cached_splits import epoch_batches
from featcache.heads import HeadSpec, build_head, uses_tokens
from featcache.metrics import (DEFAULT_THRESHOLD_RULE, decide, threshold_provenance, tuned_on_validation,
                               untuned_reasons)
from featcache.names import IMPORTED_MODEL
from featcache.runs import check_output_file, read_json, write_json
from featcache.store import FeatureStore, FeatureStoreError, config_differences, read_rows

HEAD_FORMAT = "featcache-head-2"
PREDICT_BATCH = 1024  # rows per forward in split_proba and predict (same batches -> same floats)


# ----------------------------------------------------------------------------------------------
# probabilities
# ----------------------------------------------------------------------------------------------

def batch_proba(model: nn.Module, batches: Iterable[torch.Tensor], multilabel: bool, num_classes: int) -> np.ndarray:
    """Softmax (single-label) or per-label sigmoid probabilities of standardised input batches."""
    model.eval()
    out = []
    with torch.inference_mode():
        for x in batches:
            logits = model(x)
            out.append((logits.sigmoid() if multilabel else logits.softmax(dim=1)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, num_classes))


def standardize(x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """(x - mean) / std as the head's float32 input, computed in the input's precision.

    Why: this is what the probe's scaler does (scikit-learn's StandardScaler.transform keeps
    float32 input in float32 and float64 in float64), so an exported probe gives the probe's own
    numbers; a float64 input with a large common offset (+1000 on a spread of 0.01) centred in
    float32 would move its probabilities by up to 5e-2. A probe's statistics are therefore saved
    in float64; a trained head's are float32, and so are feature files."""
    if mean is None:
        return x
    if x.dtype == torch.float64:
        return ((x - mean.double()) / std.double()).float()
    return (x - mean.float()) / std.float()


def split_proba(model: nn.Module, cached: Any, split: Any, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Probabilities of one of a CachedSplits' splits, in row order, batched as predict batches
    (training ranks its epochs with the same function, in batches of at least PREDICT_BATCH)."""
    batches = (x for x, _ in epoch_batches(cached, split, batch_size, torch.Generator(), 0, False, None))
    return batch_proba(model, batches, cached.multilabel, len(cached.classes))


# ----------------------------------------------------------------------------------------------
# saving and loading
# ----------------------------------------------------------------------------------------------

def head_payload(model: nn.Module, spec: HeadSpec, *, classes: list[str], fingerprint: str, model_name: str | None,
                 features: str, mean: torch.Tensor | None, std: torch.Tensor | None,
                 threshold: float | list[float] | None, threshold_rule: str | None, positive: int | None,
                 multilabel: bool, source: str, recipe: dict[str, Any],
                 threshold_untuned: Mapping[str, str] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) that save_head writes and load_head reads back. `threshold_untuned`: the
    classes / labels whose threshold rule fell back to 0.5, and why."""
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if mean is not None:  # float64 statistics (a probe's scaler) stay float64: see standardize
        cast = (lambda t: t.double()) if mean.dtype == torch.float64 else (lambda t: t.float())
        tensors["standardize.mean"] = cast(mean.detach()).cpu().contiguous()
        tensors["standardize.std"] = cast(std.detach()).cpu().contiguous()
    meta = {"format": HEAD_FORMAT, "spec": spec.as_dict(), "classes": list(classes), "fingerprint": fingerprint,
            "model": model_name, "features": features, "multilabel": multilabel, "source": source,
            "positive_class": None if positive is None else classes[positive],
            "threshold": threshold, "threshold_rule": threshold_rule, "threshold_untuned": list(threshold_untuned or {}),
            "threshold_untuned_why": dict(threshold_untuned) if isinstance(threshold_untuned, Mapping) else {},
            "recipe": recipe}
    return tensors, meta


def save_head(run_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write head.safetensors and head.json (the weights' sha256 recorded in the JSON)."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = run_dir / "head.safetensors"
    save_file(tensors, str(weights))
    write_json(run_dir / "head.json", {**meta, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()})
    return weights


@dataclass
class SavedHead:
    """A head read back from a run directory, ready to predict."""

    model: nn.Module
    spec: HeadSpec
    meta: dict[str, Any]
    mean: torch.Tensor | None
    std: torch.Tensor | None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def positive(self) -> int | None:
        name = self.meta.get("positive_class")
        return None if name is None else self.classes.index(name)


def load_head(run_dir: str | os.PathLike) -> SavedHead:
    """Read a saved head without executing anything: safetensors + JSON, or a legacy best.pt through
    torch's weights-only unpickler (which refuses any object that could run code)."""
    path = Path(run_dir)
    if path.is_dir() and (path / "head.safetensors").is_file():
        if not (path / "metrics.json").is_file():
            raise ValueError(f"{path} has a head but no metrics.json: it is not a finished run (interrupted, or written "
                             f"by hand); re-run the command that wrote it.")
        return _load_safetensors(path)
    legacy = path / "best.pt" if path.is_dir() else path
    if legacy.is_file() and legacy.suffix == ".pt":
        return _load_legacy(legacy)
    raise FileNotFoundError(f"{path} holds no saved head (head.safetensors + head.json); expected a run "
                            f"directory written by `featcache train|sweep|probe --out RUN`.")


def _load_safetensors(run_dir: Path) -> SavedHead:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path = run_dir / "head.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir} has head.safetensors but no head.json; the run directory is incomplete: "
                                f"re-run the command that wrote it.")
    meta = read_json(meta_path)
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{meta_path} is format {meta.get('format')!r}; this featcache reads {HEAD_FORMAT!r}.")
    missing = [k for k in ("spec", "classes", "fingerprint", "features") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {', '.join(missing)}; it was not written by featcache (or was edited): "
                         f"re-run the command that wrote the run.")
    weights = run_dir / "head.safetensors"
    recorded = meta.get("weights_sha256")
    if recorded and hashlib.sha256(weights.read_bytes()).hexdigest() != recorded:
        raise ValueError(f"{weights} is not the file {meta_path} was written with (its sha256 differs from the "
                         f"recorded weights_sha256): the run directory mixes two runs; re-run the command that wrote it.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights} is not a readable safetensors file ({exc}).") from exc
    state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    return _build(meta, state, tensors.get("standardize.mean"), tensors.get("standardize.std"), run_dir)


def _load_legacy(path: Path) -> SavedHead:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as exc:
        raise ValueError(f"refused to load {path}: it is not a plain tensor checkpoint (loading it would run "
                         f"code from the file: {str(exc).splitlines()[0][:160]}). Retrain the head, or load it "
                         f"yourself only if you trust its author.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "featcache-head-1":
        raise ValueError(f"{path} is not a featcache head checkpoint.")
    cfg = ckpt.get("train_config") or {}
    meta = {"spec": ckpt["spec"], "classes": ckpt["classes"], "fingerprint": ckpt["fingerprint"],
            "model": ckpt.get("model"), "features": "tokens" if uses_tokens(ckpt["spec"]["kind"]) else cfg.get("features", "cls"),
            "multilabel": None, "positive_class": None, "threshold": None, "threshold_rule": None, "recipe": cfg}
    return _build(meta, ckpt["state_dict"], ckpt.get("feature_mean"), ckpt.get("feature_std"), path)


def _build(meta: dict[str, Any], state: dict[str, torch.Tensor], mean: torch.Tensor | None,
           std: torch.Tensor | None, where: Path) -> SavedHead:
    try:
        spec = HeadSpec(**meta["spec"])
    except TypeError as exc:
        raise ValueError(f"the head spec in {where} is not one featcache writes ({exc}).") from None
    model = build_head(spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"the weights in {where} do not fit a {spec.kind} head of its own spec ({exc}).") from exc
    if len(meta["classes"]) != spec.num_classes:
        raise ValueError(f"the head in {where} scores {spec.num_classes} classes but names {len(meta['classes'])} "
                         f"({', '.join(map(str, meta['classes']))}); the run directory is damaged.")
    standardized = bool((meta.get("recipe") or {}).get("standardize")) or meta.get("source") == "probe"
    if (mean is None) != (std is None) or (mean is None and standardized):
        raise ValueError(f"the head in {where} was trained on standardised features but its standardisation "
                         f"(mean and std) is missing; the run directory is damaged.")
    if mean is not None:
        width = spec.in_dim
        if tuple(mean.shape) != (width,) or tuple(std.shape) != (width,):
            raise ValueError(f"the standardisation in {where} has shapes {tuple(mean.shape)} / {tuple(std.shape)}; the "
                             f"head reads {width} features per {'token' if uses_tokens(spec.kind) else 'row'}.")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"the standardisation in {where} holds a non-finite mean or a std that is not positive; "
                             f"the run directory is damaged.")
    return SavedHead(model.eval(), spec, meta, mean, std)


# ----------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------

@dataclass
class Predictions:
    """A saved head's output on one split of a feature file."""

    paths: list[str]
    labels: np.ndarray
    proba: np.ndarray                   # (N, C) probabilities (multi-label: per label)
    classes: list[str]
    multilabel: bool
    positive: int | None                # binary: index of the positive class
    threshold: float | list[float] | None
    threshold_source: str               # "saved (youden, chosen on val)", "--threshold", "default 0.5"
    head: str = ""                      # one line naming the head that predicted (describe_head)
    notes: list[str] = field(default_factory=list)  # e.g. the file's classes matched to the head's by name

    def decisions(self) -> np.ndarray:
        """Predicted class index per row (multi-label: (N, C) 0/1), by the documented tie rule."""
        return decide(self.proba, threshold=self.threshold, positive=self.positive, multilabel=self.multilabel)


def _training_differences(run_dir: str | os.PathLike, fingerprint: str, config: dict[str, Any]) -> str:
    """'; they differ in: ...' against the feature file the head was trained on, when the run's
    config.json names it and it is still there unchanged; '' otherwise."""
    try:
        trained_on = read_json(Path(run_dir) / "config.json").get("features_file")
        if not trained_on:
            return ""
        with FeatureStore(trained_on) as original:
            if original.fingerprint != fingerprint:
                return ""
            return config_differences(original.config, config)
    except (OSError, ValueError, KeyError):
        return ""


def predict(run_dir: str | os.PathLike, features_file: str | os.PathLike, split: str | None = None,
            threshold: float | None = None, positive_class: str | None = None) -> Predictions:
    """Probabilities and decisions of a saved head (or probe) on a split, refusing features of
    another backbone or preprocessing. The saved threshold applies unless `threshold` is given."""
    head = load_head(run_dir)
    meta = head.meta
    with FeatureStore(features_file) as store:
        if store.fingerprint != meta["fingerprint"]:
            raise ValueError(f"the head in {run_dir} was trained on features of {meta.get('model')!r} (fingerprint "
                             f"{meta['fingerprint'][:12]}), but {Path(features_file).name} holds features of "
                             f"{store.config.get('model')!r} (fingerprint {store.fingerprint[:12]})"
                             f"{_training_differences(run_dir, meta['fingerprint'], store.config)}. Predict on a "
                             f"file extracted with the same model and extraction settings (including --tokens "
                             f"and --dtype: every fingerprinted setting).")
        fallback = None
        if split is None:  # test, or the one split an external site's file has (often "all"), never train
            only = store.splits[0] if len(store.splits) == 1 else None
            split = only if "test" not in store.splits and only not in (None, "train", "training") else "test"
            fallback = split if split != "test" else None
        if split not in store.splits:
            raise ValueError(f"{Path(features_file).name} has no split {split!r}; it has {', '.join(store.splits)} "
                             f"(pass --split).")
        view = store[split]
        rows = view.valid_index()
        left_out = view.n - len(rows)
        # the head decides sigmoid-per-label or softmax (a featcache 0.1 checkpoint did not say: the file)
        multilabel = view.multilabel if meta.get("multilabel") is None else bool(meta["multilabel"])
        file_labels = _labels_of_kind(view.labels[rows], view.multilabel, multilabel, head.classes,
                                      Path(features_file).name, split)

        _check_head_inputs(view, meta["features"], uses_tokens(head.spec.kind), run_dir, Path(features_file).name)

        def batches() -> Iterable[torch.Tensor]:
            for i in range(0, len(rows), PREDICT_BATCH):
                r = rows[i:i + PREDICT_BATCH]
                if uses_tokens(head.spec.kind):
                    x = torch.from_numpy(read_rows(view.tokens, r).astype(np.float32))
                else:
                    x = torch.from_numpy(view.features(meta["features"], r))
                yield standardize(x, head.mean, head.std)

        if file_labels is None:
            labels, notes = labels_for_head(view.labels[rows], store.classes, head.classes, multilabel,
                                            Path(features_file).name)
        else:
            labels, notes = file_labels, []
        if fallback:
            notes = notes + [f"{Path(features_file).name} has no split 'test': predicted its only split, {fallback!r}."]
        if store.config.get("model") == IMPORTED_MODEL and store.config.get("tokens") == "imported":
            notes = notes + [f"{Path(features_file).name} and the head's training file were imported under the model "
                             f"name {IMPORTED_MODEL!r} (import's default), so their fingerprint cannot tell two "
                             f"backbones apart: make sure both hold features of the same model (import with --model "
                             f"NAME to have it checked)."]
        if left_out:  # rows whose image could not be read (or not yet extracted) have no features
            notes = notes + [f"{left_out} of the {view.n} rows of split {split!r} have no features (unreadable "
                             f"images are listed by `featcache info`) and are not in the predictions."]
        proba = batch_proba(head.model, batches(), multilabel, head.spec.num_classes)
        paths = view.paths
    positive, t, source = _decision_rule(head, multilabel, threshold, positive_class)
    return Predictions([paths[i] for i in rows], labels, proba, head.classes, multilabel, positive, t, source,
                       describe_head(head), notes)


def _check_head_inputs(view: Any, features: str, needs_tokens: bool, run_dir: str | os.PathLike,
                       file_name: str) -> None:
    """Refuse, before any batch is read, a file that lacks what the head reads (a token head on a
    file without --tokens full, a pooled head on an import of cls only): the fingerprint pins the
    backbone, and a hand-made or imported file can still lack a part."""
    if needs_tokens:
        if view.tokens is None:
            raise ValueError(f"the head in {run_dir} reads token sequences, but split {view.name!r} of {file_name} "
                             f"stores no tokens; predict on a file extracted with --tokens full.")
        return
    try:
        view.features(features, np.zeros(0, dtype=np.int64))
    except FeatureStoreError as exc:
        found = str(exc).split(";")[0]
        raise ValueError(f"the head in {run_dir} reads {features!r} features, but in {file_name} {found}. Predict on "
                         f"a file that stores {features!r} (the one the head was trained on, or one extracted "
                         f"the same way).") from None


def _labels_of_kind(labels: np.ndarray, file_multilabel: bool, head_multilabel: bool, head_classes: Sequence[str],
                    file_name: str, split: str) -> np.ndarray | None:
    """None when the file's labels are of the head's kind (matched by name next); (N, C) -1 for an
    unlabelled file read by a multi-label head (written blank, never as 'no finding'); else refused:
    a multi-label head's per-label scores and a single-label head's one class per row cannot be
    compared, and guessing would write plausible numbers of the wrong kind."""
    if file_multilabel == head_multilabel:
        return None
    if head_multilabel and not np.any(labels >= 0):
        return np.full((len(labels), len(head_classes)), -1, dtype=np.int64)
    if head_multilabel:
        raise ValueError(f"the head is multi-label (it scores {', '.join(head_classes)} each on its own), but split "
                         f"{split!r} of {file_name} holds one class per row; predict on a multi-label file (or an "
                         f"unlabelled one) of the same backbone.")
    raise ValueError(f"the head predicts one class per row ({', '.join(head_classes)}), but split {split!r} of "
                     f"{file_name} is multi-label (0/1 per label); predict on a single-label file (or an unlabelled "
                     f"one) of the same backbone.")


def labels_for_head(labels: np.ndarray, file_classes: Sequence[str], head_classes: Sequence[str],
                    multilabel: bool, file_name: str) -> tuple[np.ndarray, list[str]]:
    """A file's labels as indices into the head's classes, matched by name, and notes on what could
    not be matched.

    Why: the fingerprint pins the backbone and preprocessing, not the class list, and an external
    test set of the same backbone often lists its classes in another order or lacks some: its
    label 0 need not be the head's class 0. Single-label rows of a class the head does not know are
    written unlabelled (-1). Multi-label files must have the head's labels (in any order)."""
    file_classes, head_classes = list(file_classes), list(head_classes)
    if file_classes == head_classes or (labels.ndim == 1 and not np.any(labels >= 0)):
        return labels, []  # the same classes, or an unlabelled file: nothing to match
    if multilabel:
        missing = [c for c in head_classes if c not in file_classes]
        if missing:
            raise ValueError(f"{file_name} lacks the labels {', '.join(missing)} of this head (its labels: "
                             f"{', '.join(file_classes)}); predict needs every label the head scores.")
        extra = [c for c in file_classes if c not in head_classes]
        notes = [f"{file_name}'s labels are matched to the head's by name"
                 + (f"; its labels {', '.join(extra)} are not scored by the head and are left out" if extra else "")
                 + "."]
        return labels[:, [file_classes.index(c) for c in head_classes]], notes
    to_head = np.array([head_classes.index(c) if c in head_classes else -1 for c in file_classes] + [-1])
    mapped = np.where(labels >= 0, to_head[labels], -1)  # -1 (unlabelled) indexes the trailing -1
    unknown = [c for i, c in enumerate(file_classes) if to_head[i] < 0 and np.any(labels == i)]
    notes = [f"{file_name} lists its classes as {', '.join(file_classes)}, the head as {', '.join(head_classes)}: "
             f"labels are matched by name"
             + (f"; rows of {', '.join(unknown)} (not a class of the head) are written without a label" if unknown
                else "") + "."]
    return mapped, notes


def _decision_rule(head: SavedHead, multilabel: bool, threshold: float | None,
                   positive_class: str | None) -> tuple[int | None, float | list[float] | None, str]:
    """(positive index, threshold, where the threshold came from) for predict."""
    classes = head.classes
    if multilabel or len(classes) != 2:
        if positive_class is not None:
            kind = "is multi-label" if multilabel else f"has {len(classes)} classes"
            raise ValueError(f"--positive-class applies to binary heads; this head {kind} and reports a probability "
                             f"per class.")
        if threshold is not None and not multilabel:
            raise ValueError(f"--threshold applies to binary and multi-label heads; this head has {len(classes)} "
                             f"classes and predicts by argmax.")
        if threshold is not None:
            return None, float(threshold), "--threshold"
        saved = head.meta.get("threshold")
        return None, saved, saved_threshold_source(head.meta) if saved is not None else "default 0.5"
    saved_pos = head.positive if head.positive is not None else 1
    positive = saved_pos
    if positive_class is not None:
        if positive_class not in classes:
            raise ValueError(f"--positive-class {positive_class!r} is not a class of this head ({', '.join(classes)}).")
        positive = classes.index(positive_class)
    if threshold is not None:
        return positive, float(threshold), "--threshold"
    saved = head.meta.get("threshold")
    if saved is not None and positive == saved_pos:
        return positive, float(saved), saved_threshold_source(head.meta)
    if saved is not None:  # a threshold on P(saved class) means nothing for another positive class
        return positive, 0.5, (f"default 0.5; the saved threshold {float(saved):.4g} is on P({classes[saved_pos]}) "
                               f"and does not apply to positive class {classes[positive]} (pass --threshold)")
    return positive, 0.5, "default 0.5"


def saved_untuned(meta: dict[str, Any]) -> dict[str, str]:
    """A saved head's classes / labels whose threshold rule fell back to 0.5 -> why ("" for heads
    saved before the reason was recorded)."""
    return untuned_reasons(meta.get("threshold_untuned"), meta.get("threshold_untuned_why"))


def saved_threshold_source(meta: dict[str, Any]) -> str:
    """Where a head's saved threshold came from, as predict reports it, in the words train and the
    report use (metrics.threshold_provenance), then the saved values of a multi-label head."""
    rule, values = meta.get("threshold_rule"), meta.get("threshold")
    how = threshold_provenance(rule, values, saved_untuned(meta))
    if not tuned_on_validation(rule):
        how = f"{rule or DEFAULT_THRESHOLD_RULE}, {how}"
    shown = ", ".join(f"{v:.4g}" for v in values) if isinstance(values, list) else None
    return f"saved ({how}" + (f": {shown})" if shown else ")")


def exact_text(value: float) -> str:
    """A probability as the shortest text that reads back as exactly the same number: every figure
    recomputed from the CSV (AUROC, sensitivity at the saved threshold) is then the run's own (8
    decimals merged tiny probabilities into ties and printed a row at the threshold below it)."""
    return repr(float(value))


def write_predictions_csv(pred: Predictions, out: str | os.PathLike) -> Path | None:
    """image_path, probability (= P(positive class), binary) or prob_<class>, label, prediction;
    out '-' is standard output (returns None)."""
    if str(out) == "-":
        import sys

        _write_prediction_rows(pred, sys.stdout)
        sys.stdout.flush()
        return None
    out = check_output_file(out, "predictions CSV")
    if out.is_symlink():  # write through the link, as a plain open() would: the link stays a link
        out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # written aside: a kill never leaves half a CSV
    with tmp.open("w", newline="") as fh:
        _write_prediction_rows(pred, fh)
    os.replace(tmp, out)
    return out


def _write_prediction_rows(pred: Predictions, fh: Any) -> None:
    classes, proba, decided = pred.classes, pred.proba, pred.decisions()
    w = csv.writer(fh)
    if pred.multilabel:
        w.writerow(["image_path"] + [f"prob_{c}" for c in classes] + [f"label_{c}" for c in classes]
                   + [f"pred_{c}" for c in classes])
        for p, pr, lab, d in zip(pred.paths, proba, pred.labels, decided):
            w.writerow([p, *map(exact_text, pr), *("" if v < 0 else int(v) for v in lab), *map(int, d)])
    elif len(classes) == 2:
        w.writerow(["image_path", "probability", "label", "prediction"])
        for p, pr, lab, d in zip(pred.paths, proba, pred.labels, decided):
            w.writerow([p, exact_text(pr[pred.positive]), classes[lab] if lab >= 0 else "", classes[d]])
    else:
        w.writerow(["image_path"] + [f"prob_{c}" for c in classes] + ["label", "prediction"])
        for p, pr, lab, d in zip(pred.paths, proba, pred.labels, decided):
            w.writerow([p, *map(exact_text, pr), classes[lab] if lab >= 0 else "", classes[d]])


def probe_head_payload(probe: Any, *, classes: list[str], fingerprint: str, model_name: str | None, features: str,
                       threshold: float | list[float] | None, threshold_rule: str | None, positive: int | None,
                       recipe: dict[str, Any],
                       threshold_untuned: Mapping[str, str] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A fitted LogisticProbe as a featcache linear head: the scaler becomes the standardisation and
    the logistic regression(s) one (C, D) weight matrix, so predict treats probes and heads alike.

    Binary sklearn models score one logit z for the second fitted class: the head's logits are
    (0, z), whose softmax is exactly (1 - sigmoid(z), sigmoid(z)). Classes absent from training get
    a -1e4 bias (probability 0), as the probe's expanded probabilities give them."""
    weight, bias = probe.linear_weights(len(classes))
    spec = HeadSpec("linear", weight.shape[1], weight.shape[0])
    model = build_head(spec)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight))
        model.bias.copy_(torch.from_numpy(bias))
    mean = torch.from_numpy(np.asarray(probe.scaler_.mean_, dtype=np.float64))
    std = torch.from_numpy(np.asarray(probe.scaler_.scale_, dtype=np.float64))
    return head_payload(model, spec, classes=classes, fingerprint=fingerprint, model_name=model_name,
                        features=features, mean=mean, std=std, threshold=threshold, threshold_rule=threshold_rule,
                        positive=positive, multilabel=probe.multilabel_, source="probe", recipe=recipe,
                        threshold_untuned=threshold_untuned)


def array_proba(head_tensors: tuple[dict[str, torch.Tensor], dict[str, Any]], x: np.ndarray) -> np.ndarray:
    """Probabilities of an in-memory head payload on raw (unstandardised) features, batched as predict."""
    tensors, meta = head_tensors
    spec = HeadSpec(**meta["spec"])
    model = build_head(spec)
    model.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    mean, std = tensors.get("standardize.mean"), tensors.get("standardize.std")

    dtype = np.float64 if np.asarray(x).dtype == np.float64 else np.float32

    def batches() -> Iterable[torch.Tensor]:
        for i in range(0, len(x), PREDICT_BATCH):
            yield standardize(torch.from_numpy(np.ascontiguousarray(x[i:i + PREDICT_BATCH], dtype=dtype)), mean, std)

    return batch_proba(model, batches(), bool(meta["multilabel"]), spec.num_classes)


def describe_head(head: SavedHead) -> str:
    """One line naming a saved head, for the predict summary."""
    m = head.meta
    made = "a logistic probe" if m.get("source") == "probe" else "trained"  # head.json source: train | probe
    return (f"head: {head.spec.kind} ({made}) on {m.get('features')} of {m.get('model')} "
            f"({len(head.classes)} classes" + (f", positive class {m['positive_class']}" if m.get("positive_class") else "")
            + ")")

