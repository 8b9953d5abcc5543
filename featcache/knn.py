"""k-NN evaluation of frozen features: DINO's weighted vote, every k and temperature in one pass.

As in DINO's eval_knn.py: features are L2-normalised, cosine similarities come from a chunked
matrix product, one top-max(k) search serves every k and temperature, and each neighbour votes
for its class with weight exp(sim / T). T = 0.07 is DINO's default: it turns cosine gaps of a few
hundredths into clear vote margins without letting the nearest neighbour decide alone.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch

from featcache.names import KNN_BACKENDS
from featcache.metrics import _auroc, _balanced_accuracy, _topk_accuracy, classification_metrics, decide
from featcache.store import check_finite

DEFAULT_KS = (10, 20, 100, 200)
BACKENDS = KNN_BACKENDS
TIE_MARGIN = 16  # extra neighbours searched so that ties at the k-th similarity are settled by row index


def nearest_neighbours(train_x: np.ndarray, test_x: np.ndarray, k: int, backend: str = "auto",
                       chunk_size: int = 1024, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices (N_test, k) of the k nearest training rows, best first;
    equal similarities in training-row order.

    Why the tie rule: torch.topk and faiss order tied rows differently, and differently for
    different k, so exact duplicates (the same image twice, with different labels) would make the
    k = 1 result depend on the backend and on which other k were asked for. A few more rows than
    k are searched, sorted by (-similarity, row), and cut at k; when a tie reaches the end of
    that window the search widens until it does not."""
    n_train = len(train_x)
    out_sims = np.empty((len(test_x), k), dtype=np.float32)
    out_idx = np.empty((len(test_x), k), dtype=np.int64)
    rows, margin = np.arange(len(test_x)), TIE_MARGIN
    while rows.size:  # only the rows whose tie reaches the window's end are searched again, wider
        want = min(n_train, k + margin)
        sims, idx = _search(train_x, test_x[rows], want, backend, chunk_size, device)
        order = np.lexsort((idx, -sims.astype(np.float64)), axis=1)
        sims, idx = np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)
        open_tie = sims[:, k - 1] == sims[:, want - 1] if want < n_train else np.zeros(len(rows), bool)
        out_sims[rows[~open_tie]], out_idx[rows[~open_tie]] = sims[~open_tie, :k], idx[~open_tie, :k]
        rows, margin = rows[open_tie], margin * 4
    return out_sims, out_idx


def _search(train_x: np.ndarray, test_x: np.ndarray, k: int, backend: str, chunk_size: int,
            device: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The backend's exact top-k by cosine similarity (its own order among ties)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if backend == "auto":
        backend = "faiss" if dev.type == "cpu" and _has_faiss() else "torch"
    train = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_x, np.float32)), dim=1)
    test = torch.nn.functional.normalize(torch.as_tensor(np.asarray(test_x, np.float32)), dim=1)
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(train.shape[1])
        index.add(train.numpy())
        sims, idx = index.search(test.numpy(), k)
        return sims, idx.astype(np.int64)
    train = train.to(dev)
    sims, idx = [], []
    for start in range(0, test.shape[0], chunk_size):  # bounded memory: chunk x N_train similarities
        s, i = (test[start:start + chunk_size].to(dev) @ train.T).topk(k, dim=1)
        sims.append(s.cpu())
        idx.append(i.cpu())
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def _has_faiss() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def vote(sims: np.ndarray, neighbour_labels: np.ndarray, k: int, temperature: float, num_classes: int,
         weighting: str = "distance") -> np.ndarray:
    """Class scores (N, C) from the first k neighbours, normalised to sum to one per row.

    Weights are exp((sim - max sim) / T): shifting by each row's largest similarity cancels in the
    normalisation but keeps exp finite at any T (exp(1 / 0.001) overflows float32 and even float64).
    neighbour_labels is (N, kmax) class indices, or (N, kmax, C) 0/1 rows for multi-label data
    (scores are then the similarity-weighted share of positive neighbours per label).
    """
    s = torch.as_tensor(np.asarray(sims[:, :k]), dtype=torch.float64)
    if weighting == "distance":
        w = torch.exp((s - s.max(dim=1, keepdim=True).values) / temperature)
    else:
        w = torch.ones_like(s)
    # shares divide votes by a total made of the same sums, so a unanimous row scores exactly 1 (and
    # unanimous rows tie exactly in AUROC), whatever order the backend summed the weights in
    if neighbour_labels.ndim == 3:
        y = torch.as_tensor(neighbour_labels[:, :k], dtype=torch.float64)
        votes = torch.einsum("nk,nkc->nc", w, y)
        return (votes / (votes + torch.einsum("nk,nkc->nc", w, 1 - y))).numpy()
    votes = torch.zeros(len(sims), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, torch.as_tensor(neighbour_labels[:, :k], dtype=torch.int64), w)
    return (votes / votes.sum(dim=1, keepdim=True)).numpy()


def knn_eval(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             ks: Sequence[int] = DEFAULT_KS, temperature: float | Sequence[float] = 0.07, *,
             weighting: str = "distance", num_classes: int | None = None, backend: str = "auto",
             chunk_size: int = 1024, device: str | None = None, return_proba: bool = False,
             positive: int | None = None) -> dict:
    """k-NN accuracy of frozen features (pinned API): {k: {"top1", "top5", "balanced_accuracy", ...}}.

    One temperature gives {k: metrics}; several give {T: {k: metrics}}. Fractions in [0, 1].
    top5 is None with five classes or fewer (not applicable, never a trivial 100 %). A k larger
    than the training set is capped with a warning; "k_used" says what was used. Binary data also
    gets AUROC; multi-label data (train_y of shape (N, C)) gets macro/micro AUROC and AUPRC.
    With return_proba, each k's metrics carry the class scores under "proba". Decisions follow
    metrics.decide (binary: P(positive) >= 0.5, `positive` defaulting to class 1; multiclass:
    argmax, lowest index on ties); top-5 counts a row when its class got a (nonzero) vote and ranks
    among the five highest-voted classes (ties ordered as scikit-learn's top_k_accuracy_score), so
    at k = 1 top-5 is top-1, as in DINO's top-min(5, k). Neighbours with equal similarity are taken
    in training-row order (nearest_neighbours).
    """

    if weighting not in ("distance", "uniform"):
        raise ValueError(f"weighting must be 'distance' or 'uniform'; got {weighting!r}.")
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"expected one label per row: {len(train_x)} train rows with {len(train_y)} labels, "
                         f"{len(test_x)} test rows with {len(test_y)} labels.")
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError("k-NN needs at least one labelled training row and one evaluation row.")
    ks = sorted({int(k) for k in np.atleast_1d(ks)})
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be positive integers; got {ks}.")
    scalar_t = np.ndim(temperature) == 0
    temps = [float(temperature)] if scalar_t else [float(t) for t in temperature]
    if not temps or min(temps) <= 0 or not all(np.isfinite(temps)):
        raise ValueError(f"the temperature T must be a positive number (DINO uses 0.07); got {temperature!r}.")
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"expected (rows, dim) features of one width; got train {train_x.shape}, test {test_x.shape}.")
    check_finite(train_x, "the neighbours' features")
    check_finite(test_x, "the evaluated features")
    multilabel = train_y.ndim == 2
    if not multilabel:
        top = int(num_classes) if num_classes is not None else None
        for name, y in (("train_y", train_y), ("test_y", test_y)):
            bad = (y < 0) | (y >= top) if top is not None else y < 0
            if np.any(bad):
                raise ValueError(f"{name} holds {int(y[bad][0])}: labels must be class indices 0..C-1 "
                                 f"(num_classes {top if top is not None else 'from the labels'}); drop unlabelled "
                                 f"(-1) rows before k-NN.")
    zero = int((np.abs(test_x).max(axis=1) == 0).sum()) if len(test_x) else 0
    if zero:
        warnings.warn(f"{zero} evaluated row(s) have all-zero features: cosine similarity 0 to every training row, "
                      f"so their neighbours are the first training rows in file order; check how those features "
                      f"were made.", stacklevel=2)
    zero_train = int((np.abs(train_x).max(axis=1) == 0).sum()) if len(train_x) else 0
    if zero_train:
        warnings.warn(f"{zero_train} neighbour row(s) have all-zero features: cosine similarity 0 to every evaluated "
                      f"row, so they are among the nearest neighbours of any row whose other similarities are "
                      f"negative, and vote; check how those features were made.", stacklevel=2)
    n_train = len(train_y)
    if ks[-1] > n_train:
        warnings.warn(f"k = {', '.join(str(k) for k in ks if k > n_train)} exceeds the {n_train} training rows; "
                      f"capped at {n_train}.", stacklevel=2)
    c = train_y.shape[1] if multilabel else int(num_classes or max(train_y.max(), test_y.max()) + 1)
    kmax = min(ks[-1], n_train)
    sims, idx = nearest_neighbours(train_x, test_x, kmax, backend, chunk_size, device)
    labels = train_y[idx]
    results: dict[float, dict[int, dict[str, Any]]] = {}
    for t in temps:
        per_k = {}
        for k in ks:
            used = min(k, n_train)
            proba = vote(sims, labels, used, t, c, weighting)
            if multilabel:
                full = classification_metrics(test_y, proba)
                row = {key: full[key] for key in ("auroc", "micro_auroc", "auprc", "micro_auprc", "subset_accuracy")}
            else:
                pred = decide(proba, positive=positive)
                row = {"top1": float(np.mean(pred == test_y)),
                       "top5": _topk_accuracy(test_y, proba, 5) if c > 5 else None,
                       "balanced_accuracy": _balanced_accuracy(test_y, pred)}
                if c == 2:
                    row["auroc"] = _auroc(test_y, proba, positive)[0]
            row.update({"k_used": used, "temperature": t, "weighting": weighting, "n_eval": int(len(test_y))})
            if return_proba:
                row["proba"] = proba
            per_k[k] = row
        results[t] = per_k
    return results[temps[0]] if scalar_t else results
