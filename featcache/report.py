"""Run directories -> one report.md + report.html, several runs side by side.

A run directory (written by `featcache train|sweep|knn|probe|compare --out RUN_DIR`) holds config.json
(what ran), metrics.json (what came out: {"kind", "val": {...}, "test": {...}, extras}) and
figures/*.png|svg. A report puts the runs' key numbers in one comparison table (so CLS-linear vs
mixer vs k-NN vs probe, or DINO vs ViT vs CNN on the same data, read in one glance), then one
section per run with its configuration, all its metrics and its figures (copied next to the
report, so the report directory can be zipped and sent as is).

Readers are tolerant: a missing key shows as n/a. Confidence intervals are read from the one
layout featcache.runs writes, ``metrics[split]["ci"][name] = [low, high]``.
"""
from __future__ import annotations

import html
import math
import numbers
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from featcache.metrics import threshold_provenance, untuned_reasons
from featcache.names import HEAD_ONLY_SETTINGS
from featcache.runs import Run, attribute_json, load_run

# metrics shown in the comparison table, in this order, when any run has them
KEY_METRICS = ("top1", "top5", "balanced_accuracy", "macro_f1", "auroc", "auprc", "sensitivity",
               "specificity", "mcc", "ece", "loss")
# config keys shown in the per-run configuration table first (the rest follow alphabetically)
CONFIG_FIRST = ("kind", "model", "features", "features_file", "head", "fingerprint")
MAX_TABLE_ROWS = 30  # long leaderboards / per-C tables are cut to this many rows in the report
# columns holding settings, shown exactly (lr 0.00125, not rounded to 0.0013 like a metric)
SETTING_COLUMNS = ("lr", "weight_decay", "C", "dropout", "temperature", "hidden", "k", "shots")
# top-level choices of a run shown under "Chosen" (probe's C, a head's kept epoch, ...)
CHOSEN_KEYS = ("best_C", "selection", "cv_folds", "best_epoch", "num_params", "val_source", "eval_split")


def _unique_names(runs: list[Run]) -> None:
    """Make display names unique: parent/name for clashes, then a numeric suffix."""
    seen: dict[str, int] = {}
    clashing = {r.name for r in runs if sum(o.name == r.name for o in runs) > 1}
    for run in runs:  # every run of a clashing name is renamed, not just the first
        if run.name in clashing:
            run.name = f"{run.path.resolve().parent.name}/{run.path.resolve().name}"
    for run in runs:
        count = seen.get(run.name, 0)
        seen[run.name] = count + 1
        if count:
            run.name = f"{run.name}-{count + 1}"


# ----------------------------------------------------------------------------------------------
# reading numbers
# ----------------------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, a dict)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def eval_split(run: Run) -> str | None:
    """The split whose numbers represent the run: test when present, else val."""
    for split in ("test", "val"):
        if isinstance(run.metrics.get(split), dict) and run.metrics[split]:
            return split
    return None


def metric_value(run: Run, split: str | None, name: str) -> tuple[float | None, tuple[float, float] | None]:
    """(point estimate, (low, high) or None) of one metric of one split; for a `train --repeats`
    run the median over its seeds (the first seed's numbers are one draw of several)."""
    if split is None:
        return None, None
    repeats = run.metrics.get("repeats")
    if isinstance(repeats, dict) and isinstance(repeats.get(split), dict):
        entry = repeats[split].get(name)
        return (_num(entry.get("median")) if isinstance(entry, dict) else None), None
    block = run.metrics.get(split) or {}
    value = _num(block.get(name))
    ci = None
    cand = (block.get("ci") or {}).get(name) if isinstance(block.get("ci"), dict) else None
    if isinstance(cand, (list, tuple)) and len(cand) == 2 and all(_num(c) is not None for c in cand):
        ci = (float(cand[0]), float(cand[1]))
    return value, ci


def fmt(value: float | None, ci: tuple[float, float] | None = None) -> str:
    """0.9123 [0.8871, 0.9350], or n/a."""
    if value is None:
        return "n/a"
    text = f"{value:.4f}"
    if ci is not None:
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text


def split_label(run: Run, split: str | None) -> str:
    """The evaluated split's real name (e.g. "holdout"), not just the metrics key."""
    if split is None:
        return "n/a"
    names = run.metrics.get("splits") if isinstance(run.metrics.get("splits"), dict) else {}
    real = names.get(split) or (run.metrics.get("eval_split") if run.kind == "knn" else None) \
        or run.config.get(f"{split}_split")
    return str(real) if real else split


def threshold_text(run: Run, block: dict[str, Any]) -> str:
    """0.0779 (youden, chosen on validation), 0.3 (given), in the words train and predict print
    (metrics.threshold_provenance); the bare number of an older run."""
    value = block.get("threshold")
    record = run.metrics.get("threshold")
    how = ""
    if isinstance(record, dict) and record.get("rule") and not isinstance(value, dict):
        untuned = untuned_reasons(record.get("untuned"), record.get("untuned_why"))
        how = f" ({threshold_provenance(record['rule'], record.get('value', value), untuned)})"
    if isinstance(value, list):  # multi-label: one threshold per finding, named
        entries = next((b.get("per_label") for b in (run.metrics.get("test"), run.metrics.get("val"))
                        if isinstance(b, dict) and isinstance(b.get("per_label"), list)), None) or []
        labels = [e.get("label") for e in entries if isinstance(e, dict)]
        return ", ".join(f"{labels[j] if j < len(labels) else j} {format_cell(v)}" for j, v in enumerate(value)) + how
    return format_cell(value) + how


def comparison_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: run, kind, model, features, split, positive class and
    threshold (binary runs), then the key metrics with their confidence intervals."""
    runs = [r for r in runs if r.kind != "compare"]  # several files per run: their own ranked tables say it
    splits = [eval_split(r) for r in runs]
    present = [m for m in KEY_METRICS
               if any(metric_value(r, s, m)[0] is not None for r, s in zip(runs, splits))]
    binary = any(r.positive_class for r in runs)
    header = ["run", "kind", "model", "features", "split"] + (["positive class", "threshold"] if binary else []) + present
    rows = []
    for run, split in zip(runs, splits):
        extra = []
        seeds = (run.metrics.get("repeats") or {}).get("seeds") if isinstance(run.metrics.get("repeats"), dict) else None
        if binary:
            block = run.metrics.get(split) or {} if split else {}
            per_seed = ((run.metrics["repeats"].get(split) or {}).get("threshold") if seeds and split else None)
            record = run.metrics.get("threshold")
            if isinstance(per_seed, dict) and isinstance(record, dict) and record.get("chosen_on") == "val":
                # each seed chose its own threshold: the metrics beside it are medians over those
                thr = f"{format_cell(per_seed.get('median'))} (median of the seeds' {record.get('rule')} thresholds)"
            else:
                thr = threshold_text(run, block)
            extra = [run.positive_class or "n/a", thr]
        where = split_label(run, split)
        if seeds:
            where += f" (median of {len(seeds)} seeds)"
        rows.append([run.name, run.kind, run.model, run.features, where, *extra,
                     *(fmt(*metric_value(run, split, m)) for m in present)])
    return header, rows


# descriptive columns of the comparison that, equal in every row, are said once above it instead
SHARED_COLUMNS = ("kind", "model", "features", "split", "positive class")


def shared_columns(header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]], str]:
    """The comparison without the descriptive columns every row (of two or more) agrees on, and
    one line saying them ("Every run: model dinov2-s, features cls, split test."), so the metrics
    fit the page."""
    same = [i for i, h in enumerate(header) if h in SHARED_COLUMNS and len(rows) > 1
            and len({r[i] for r in rows}) == 1]
    if not same:
        return header, rows, ""
    line = "Every run: " + ", ".join(f"{header[i]} {rows[0][i]}" for i in same) + "."
    keep = [i for i in range(len(header)) if i not in same]
    return [header[i] for i in keep], [[r[i] for i in keep] for r in rows], line


# characters of one HTML comparison table's row at the compact font (about 7.7 px each in the
# 1,170 px the page gives it): a wider table scrolled sideways and hid specificity, mcc and ece
HTML_TABLE_CHARS = 130


def _column_chars(header: str, cells: Sequence[str]) -> int:
    """The narrowest a compact column can be: its longest piece that never breaks (a number, an
    interval "[a, b]", a word; a title also breaks after its underscores), plus padding."""
    pieces = [p for text in cells for p in re.findall(r"\[[^\]]*\]|[^\s\[]+", str(text))]
    pieces += [p for part in str(header).split() for p in re.findall(r"[^_]+_?", part)]
    return max((len(p) for p in pieces), default=1) + 2


def column_groups(header: list[str], rows: list[list[str]],
                  budget: int = HTML_TABLE_CHARS) -> list[tuple[list[str], list[list[str]]]]:
    """The comparison as tables that each fit the page (at most `budget` characters wide), each
    after the first starting again with the run column (the Markdown keeps one table: it has no
    page width)."""
    widths = [_column_chars(h, [r[i] for r in rows]) for i, h in enumerate(header)]
    groups: list[list[int]] = [[0]]
    for i in range(1, len(header)):
        if sum(widths[j] for j in groups[-1]) + widths[i] > budget and len(groups[-1]) > 1:
            groups.append([0])
        groups[-1].append(i)
    return [([header[i] for i in g], [[r[i] for i in g] for r in rows]) for g in groups]


# counts of a metrics block, shown in its heading ("test: 120 rows, 3 classes"), not as metrics
SPLIT_COUNTS = ("n", "num_classes")


def _counts(block: dict[str, Any]) -> str:
    """': 120 rows, 3 classes' for a block that records its counts, else ''."""
    parts = []
    if isinstance(block.get("n"), numbers.Integral):
        parts.append(f"{block['n']} rows")
    if isinstance(block.get("num_classes"), numbers.Integral):
        parts.append(f"{block['num_classes']} classes")
    return ": " + ", ".join(parts) if parts else ""


def _scalar_metrics(block: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, formatted value with CI) for every number or word in one split's metrics."""
    out = []
    ci = block.get("ci") if isinstance(block.get("ci"), dict) else {}
    for key, value in block.items():
        if key in ("ci", "bootstrap") or key in SPLIT_COUNTS:
            continue
        if isinstance(value, str):
            out.append((key, value))
            continue
        if value is None:  # undefined here (the split's notes say why): shown, not dropped
            out.append((key, "n/a"))
            continue
        v = _num(value)
        if v is None:
            continue
        pair = ci.get(key)
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_num(p) is not None for p in pair):
            out.append((key, fmt(v, (float(pair[0]), float(pair[1])))))
        else:
            out.append((key, format_cell(value)))
    boot = block.get("bootstrap")
    if isinstance(boot, dict) and boot.get("n_boot"):
        valid = boot.get("n_valid") or {}
        fewest = f", at least {min(valid.values())} valid resamples per bootstrapped metric" if valid else ""
        how = boot.get("describe") or (f"{boot['n_boot']} percentile-bootstrap resamples"
                                       f"{' of whole groups' if boot.get('grouped') else ''} for every metric "
                                       f"(a run written before top-1, sensitivity and specificity got Wilson "
                                       f"intervals)")
        out.append(("intervals", how + fewest))
    return out


def _tables(run: Run) -> list[tuple[str, list[str], list[list[str]]]]:
    """Extra tables of a run: per-C scores (probe), leaderboards and other lists of records."""
    tables = []
    scores = run.metrics.get("scores")
    if isinstance(scores, dict) and scores:
        iters = run.metrics.get("n_iter") or {}
        converged = run.metrics.get("converged") or {}
        rows = [[f"{float(c):g}", fmt(_num(s)), str(iters.get(c, "n/a")),
                 {True: "yes", False: "NO"}.get(converged.get(c), "n/a")] for c, s in scores.items()
                if _num(c) is not None]
        tables.append((f"selection score per C ({run.metrics.get('selection', 'val')})",
                       ["C", run.metrics.get("metric", "accuracy"), "lbfgs iterations", "converged"], rows))
    skip: set[str] = set()
    if run.kind == "compare":  # ranked backbones and paired differences, each value with its CI
        tables += compare_tables(run.metrics)
        skip = {"rows", "pairs"}
    for key, value in run.metrics.items():
        if key in skip:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            cols: list[str] = []
            for rec in value:
                cols += [k for k, v in rec.items() if k not in cols and not isinstance(v, (dict, list))]
            rows = [[_record_cell(rec, c) for c in cols] for rec in value[:MAX_TABLE_ROWS]]
            title = key if len(value) <= MAX_TABLE_ROWS else f"{key} (first {MAX_TABLE_ROWS} of {len(value)})"
            tables.append((title, cols, rows))
    return tables


def per_class_rows(block: dict[str, Any]) -> list[list[str]]:
    """class, precision, recall, F1, support rows of a split's per_class metrics (or per-label ones)."""
    rows = []
    for rec in block.get("per_class") or []:
        rows.append([str(rec.get("class")), format_cell(rec.get("precision")), format_cell(rec.get("recall")),
                     format_cell(rec.get("f1")), format_cell(rec.get("support"))])
    return rows


def per_label_rows(block: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a multi-label split's per_label metrics (AUROC, AUPRC, sensitivity, ...)."""
    recs = [r for r in block.get("per_label") or [] if isinstance(r, dict)]
    if not recs:
        return [], []
    cols = [k for k in recs[0] if not isinstance(recs[0][k], (dict, list))]
    return cols, [[format_cell(r.get(c)) for c in cols] for r in recs]


def repeats_rows(run: Run) -> tuple[str, list[str], list[list[str]]] | None:
    """The median ± std over seeds table of a `train --repeats` run, or None."""
    rep = run.metrics.get("repeats")
    if not isinstance(rep, dict):
        return None
    split = "test" if isinstance(rep.get("test"), dict) else "val"
    block = rep.get(split) or {}
    shown = [m for m in KEY_METRICS if isinstance(block.get(m), dict)]
    if not shown:
        return None
    seeds = rep.get("seeds") or []
    def over(m: str) -> str:  # a metric undefined in some seeds is summarised over fewer
        n = len(block[m].get("values", []))
        return f" (over {n} of {len(seeds)} seeds)" if seeds and n < len(seeds) else ""

    rows = [[m, f"{format_cell(block[m].get('median'))} ± {format_cell(block[m].get('std'))}{over(m)}",
             ", ".join(format_cell(v) for v in block[m].get("values", []))] for m in shown]
    title = f"{split} over {len(seeds)} seeds ({', '.join(map(str, seeds))}): median ± std"
    return title, ["metric", "median ± std", "per seed"], rows
def compare_tables(metrics: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The two tables of a `featcache compare` run: files best first (rank, file, model, method,
    metric value [CI]) and every pairwise difference a - b with its paired-bootstrap CI; the first
    title says how the intervals were made (a run written before compare gave proportions Wilson
    intervals bootstrapped every one)."""
    ranking = list(metrics.get("ranking") or [])
    rows = [r for r in metrics.get("rows") or [] if isinstance(r, dict)]
    primary = metrics.get("primary_metric")
    # pairs grow as files squared: the report shows the ranking metric's (metrics.json has all)
    pairs = [p for p in metrics.get("pairs") or [] if isinstance(p, dict) and p.get("metric") in (primary, None)]
    pairs.sort(key=lambda p: p.get("method") != "probe")  # the ranking's own pairs first, should the table be cut
    positive = metrics.get("positive_class")
    about = f"; positive class {positive}" if positive else ""
    how = metrics.get("intervals") or "95 % intervals: paired bootstrap for every metric and difference"

    def ci(rec: dict[str, Any]) -> tuple[float, float] | None:
        pair = rec.get("ci")
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_num(p) is not None for p in pair)
        return (float(pair[0]), float(pair[1])) if ok else None

    ranked = [[str(ranking.index(r["file"]) + 1) if r.get("file") in ranking else "n/a", str(r.get("file")),
               str(r.get("model")), str(r.get("method")), str(r.get("metric")), fmt(_num(r.get("value")), ci(r))]
              for r in rows]
    diffs = [[str(p.get("a")), str(p.get("b")), str(p.get("method")), str(p.get("metric")),
              fmt(_num(p.get("diff")), ci(p)),
              "yes" if ci(p) and (ci(p)[0] > 0 or ci(p)[1] < 0) else "no"] for p in pairs]
    cap = 4 * MAX_TABLE_ROWS
    return [("backbones ranked best first (value [95% CI]" + about + "; " + str(how) + ")"
             + (f", first {cap} of {len(ranked)}" if len(ranked) > cap else ""),
             ["rank", "file", "model", "method", "metric", "value"], ranked[:cap]),
            (f"paired differences a - b of {primary} (95% CI from the same resamples{about})"
             + (f", first {cap} of {len(diffs)}" if len(diffs) > cap else ""),
             ["a", "b", "method", "metric", "a - b", "CI excludes 0"], diffs[:cap])]


def format_cell(value: Any) -> str:
    """The one number format of tables on screen and in reports: integers as integers (n 360),
    fractions to 4 places (0.9123), very small or large values in scientific form (C 1e-05),
    missing or undefined values as n/a."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, dict):  # counts by name (few-shot rows per class): "benign 6, malignant 1"
        return ", ".join(f"{k} {format_cell(v)}" for k, v in value.items())
    v = _num(value)
    if v is None:
        return str(value)
    if v == 0:
        return "0"
    return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}"


def _record_cell(rec: dict[str, Any], column: str) -> str:
    """One cell of a table of records: a setting exactly, a metric with its "<metric>_ci" interval
    when the record has one (a k-NN row's top1 [low, high]), else the one number format."""
    value = rec.get(column)
    if column in SETTING_COLUMNS:
        return _setting(value)
    ci = rec.get(f"{column}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(v) is not None for v in ci) \
            and _num(value) is not None:
        return fmt(float(value), (float(ci[0]), float(ci[1])))
    return format_cell(value)


def _setting(value: Any) -> str:
    """A hyper-parameter as given (12 significant digits), not rounded like a metric."""
    v = _num(value)
    if v is None or isinstance(value, numbers.Integral):
        return format_cell(value)
    return f"{v:.12g}"


def _readable(value: Any) -> Any:
    """A config value for display: floats at 12 significant digits, so a C grid made by
    np.logspace shows as 1e-05 rather than 9.999999999999999e-06 (config.json keeps the exact value)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.12g}")
    if isinstance(value, (list, tuple)):
        return [_readable(v) for v in value]
    if isinstance(value, dict):
        return {k: _readable(v) for k, v in value.items()}
    return value


def _config_rows(config: dict[str, Any], positive: str | None = None) -> list[tuple[str, str]]:
    """A run's settings as (key, text); a head's settings its kind does not read (a linear head's
    hidden width and dropout) are left out, so the table lists what shaped the run. `positive`:
    the positive class the run resolved, said beside a positive_class left at its default."""
    head = config.get("head")
    unused = {k for k, kinds in HEAD_ONLY_SETTINGS.items() if isinstance(head, str) and head not in kinds}
    keys = [k for k in CONFIG_FIRST if k in config] + sorted(k for k in config if k not in CONFIG_FIRST)
    keys = [k for k in keys if k not in unused]
    rows = []
    resolved = config.get("splits") if isinstance(config.get("splits"), dict) else {}
    for key in keys:
        value = config[key]
        text = value if isinstance(value, str) else "none" if value is None else attribute_json(_readable(value))
        if value is None and key.endswith("_split") and key[:-len("_split")] in resolved:
            # the option left at its default (None): say what it resolved to, not "none"
            text = f"default ({resolved[key[:-len('_split')]] or 'none'})"
        if value is None and key == "positive_class" and positive:   # "none" above metrics naming a class
            text = f"default ({positive})"
        if len(text) > 120:
            text = text[:117] + "..."
        rows.append((key, text))
    return rows


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------

def _copy_figures(run: Run, out: Path, index: int) -> list[tuple[str, str]]:
    """Copy a run's figures under out/figures/<index>-<run>/ (the index keeps apart runs whose names
    read alike once made safe for a folder, p/q and p_q); return (title, relative png-or-svg path)."""
    if not run.figures:
        return []
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run.name)
    dest = out / "figures" / f"{index:02d}-{safe}"
    dest.mkdir(parents=True, exist_ok=True)
    stems: dict[str, Path] = {}
    for fig in run.figures:
        target = dest / fig.name
        if fig.resolve() != target.resolve():
            shutil.copy2(fig, target)
        # show the PNG (every browser and markdown viewer); fall back to SVG when alone
        if fig.suffix.lower() == ".png" or fig.stem not in stems:
            stems[fig.stem] = target
    return [(stem.replace("_", " "), path.relative_to(out).as_posix()) for stem, path in sorted(stems.items())]


def md_escape(text: Any) -> str:
    """Text shown literally in Markdown: a run or model name with * _ [ ] ( ) ` < > | # never
    becomes emphasis, a link, HTML or a table border."""
    return re.sub(r"([\\`*_{}\[\]()#+!|<>])", r"\\\1", str(text))


def _md_cell(text: Any) -> str:
    """A table cell: like md_escape, but brackets stay (a CI [0.86, 0.88] is no link without "(")."""
    return re.sub(r"([\\`*_()|<>])", r"\\\1", str(text))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = _md_cell
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], wrap: bool = False,
                compact: bool = False) -> str:
    """A table that scrolls sideways rather than break a number; `wrap`: its last column is prose
    (a key/value table's values, e.g. a threshold's provenance) and wraps within the page;
    `compact` (the many-column comparison): a cell may break between a value and its interval,
    or between words, never inside a number or an interval, so the table fits the page."""
    def cell(text: str) -> str:
        text = html.escape(str(text))
        return re.sub(r"\[([^\]]*)\]", lambda m: "[" + m.group(1).replace(" ", "&nbsp;") + "]", text) if compact else text

    def title(text: str) -> str:  # balanced_accuracy may break after its underscore in a compact table
        text = html.escape(str(text))
        return text.replace("_", "_<wbr>") if compact else text

    head = "".join(f"<th>{title(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    kind = "scroll wrap" if wrap else "scroll compact" if compact else "scroll"
    return f"<div class='{kind}'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:left;font-size:0.9em}th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:0.5em;vertical-align:top}figure img{max-width:760px;width:100%;border:1px solid #eee}
figcaption{font-size:0.85em;color:#555}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em}
.scroll{overflow-x:auto;max-width:100%}.scroll td{white-space:nowrap}
.wrap td:last-child{white-space:normal;overflow-wrap:anywhere}.compact td{white-space:normal}.compact th,.compact td{font-size:0.8em;padding:3px 5px}"""


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                 title: str = "featcache report", positive_class: str | None = None) -> dict[str, Path]:
    """Write out/report.md and out/report.html comparing run_dirs; return both paths.

    Raises FileNotFoundError naming the directory when one has no metrics.json. With
    `positive_class`, binary runs must all have used that positive class (a table mixing
    "sensitivity for abnormal" with "sensitivity for normal" would compare nothing)."""
    if not run_dirs:
        raise ValueError("no run directories given; pass one or more RUN_DIRs written with --out.")
    runs = [load_run(p) for p in run_dirs]
    if positive_class is not None:
        if not any(r.positive_class is not None for r in runs):
            raise ValueError(f"--positive-class {positive_class}: none of these runs is a binary task (they have no "
                             f"positive class to check); drop --positive-class.")
        other = [f"{r.path.name} ({r.positive_class})" for r in runs
                 if r.positive_class is not None and r.positive_class != positive_class]
        if other:
            known = {str(e.get("class")) for r in runs for split in ("val", "test")
                     if isinstance(r.metrics.get(split), dict)
                     for e in r.metrics[split].get("per_class") or [] if isinstance(e, dict)}
            if known and positive_class not in known:
                raise ValueError(f"--positive-class {positive_class!r} is not a class of these runs (their classes: "
                                 f"{', '.join(sorted(known))}).")
            raise ValueError(f"--positive-class {positive_class}: these runs used another positive class: "
                             f"{', '.join(other)}. Re-run them with --positive-class {positive_class}.")
    _unique_names(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = comparison_rows(runs)
    def intro(escape: Callable[[str], str]) -> str:
        text = (f"{len(runs)} run(s). Numbers are on the test split when the run has one (else val); "
                f"[low, high] is a 95 % interval when the run computed one (a value without one has none: "
                f"compare intervals only between runs that have them, and made the same way); each run's "
                f"section says how its intervals were made (since 2026-12-01 train, probe and knn give top-1, "
                f"sensitivity and specificity Wilson score intervals and bootstrap the rest, as compare does for "
                f"each file, whose differences are a paired bootstrap) and whether whole groups (patients) were "
                f"drawn.")
        positives = sorted({str(r.positive_class) for r in runs if r.positive_class is not None})
        if len(positives) > 1:
            text += (f" Warning: the binary runs do not share a positive class ({escape(', '.join(positives))}), "
                     f"so sensitivity, AUROC and the threshold of one row are about another class than another's; "
                     f"re-run them with one --positive-class (report --positive-class checks it).")
        if any(r.kind == "compare" for r in runs):
            text += " Compare runs are not in the table (each holds several backbones): see their sections."
        return text

    header, rows, every = shared_columns(header, rows)
    md = [f"# {md_escape(title)}", "", intro(md_escape), "", "## Comparison", "",
          *([md_escape(every), ""] if every else []), _md_table(header, rows), ""]
    hs = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
          f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
          f"<p>{html.escape(intro(str))}</p>", "<h2>Comparison</h2>",
          *([f"<p>{html.escape(every)}</p>"] if every else []),
          *(_html_table(h, r, compact=True) for h, r in column_groups(header, rows))]

    for index, run in enumerate(runs):
        anchor = html.escape(run.name)
        md += [f"## {md_escape(run.name)}", "", f"{md_escape(run.path)} — kind {md_escape(run.kind)}, model "
               f"{md_escape(run.model)}, features {md_escape(run.features)}", ""]
        hs += [f"<h2 id='{anchor}'>{anchor}</h2>",
               f"<p><code>{html.escape(str(run.path))}</code> — kind {html.escape(run.kind)}, model "
               f"{html.escape(run.model)}, features {html.escape(run.features)}</p>"]
        notes = [str(n) for n in run.metrics.get("notes") or []]
        if notes:   # what the run warned about (leakage, unconverged fits, dropped resamples) travels with it
            md += ["### Notes", ""] + [f"- {md_escape(n)}" for n in notes] + [""]
            hs += ["<h3>Notes</h3>", "<ul class='notes'>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
        chosen = [(k, _setting(run.metrics[k]) if k == "best_C" else format_cell(run.metrics[k]))
                  for k in CHOSEN_KEYS if run.metrics.get(k) is not None and not isinstance(run.metrics[k], (dict, list))
                  and not (k == "cv_folds" and run.metrics.get("selection") != "cv")]
        if isinstance(run.metrics.get("threshold"), dict):
            chosen.append(("threshold", threshold_text(run, {"threshold": run.metrics["threshold"].get("value")})))
        if isinstance(run.metrics.get("best"), dict):  # a sweep's winning configuration
            chosen += [(f"best {k}", _setting(v) if k in SETTING_COLUMNS else format_cell(v))
                       for k, v in run.metrics["best"].items()
                       if not isinstance(v, (dict, list)) and k not in ("rank", "config", "best_epoch")]
        rep = run.metrics.get("repeats")
        seeds = rep.get("seeds") if isinstance(rep, dict) else None
        # a --repeats run's own numbers, head and threshold are its first seed's: say so beside the medians
        seed_note = f", seed {seeds[0]} of {len(seeds)}: the saved head" if seeds else ""
        if chosen:
            md += [f"### Chosen{md_escape(seed_note)}", "", _md_table(["what", "value"], chosen), ""]
            hs += [f"<h3>Chosen{html.escape(seed_note)}</h3>", _html_table(["what", "value"], chosen, wrap=True)]
        cfg = _config_rows(run.config, run.positive_class)
        if cfg:
            md += ["### Configuration", "", _md_table(["key", "value"], cfg), ""]
            hs += ["<h3>Configuration</h3>", _html_table(["key", "value"], cfg, wrap=True)]
        for split in ("val", "test"):
            block = run.metrics.get(split)
            if isinstance(block, dict):
                vals = _scalar_metrics(block)
                where = split_label(run, split) + _counts(block) + seed_note
                if vals:
                    md += [f"### Metrics ({md_escape(where)})", "", _md_table(["metric", "value"], vals), ""]
                    # wrap: the "intervals" row is a sentence (it was cut at the page edge)
                    hs += [f"<h3>Metrics ({html.escape(where)})</h3>", _html_table(["metric", "value"], vals, wrap=True)]
                split_notes = [str(n) for n in block.get("notes") or []]
                if split_notes:
                    md += [f"Notes ({md_escape(where)}):", ""] + [f"- {md_escape(n)}" for n in split_notes] + [""]
                    hs += [f"<p>Notes ({html.escape(where)}):</p><ul class='notes'>"] + [
                        f"<li>{html.escape(n)}</li>" for n in split_notes] + ["</ul>"]
                per_class = per_class_rows(block)
                if per_class:
                    cols = ["class", "precision", "recall", "F1", "support"]
                    md += [f"### Per class ({md_escape(where)})", "", _md_table(cols, per_class), ""]
                    hs += [f"<h3>Per class ({html.escape(where)})</h3>", _html_table(cols, per_class)]
                cols, per_label = per_label_rows(block)
                if per_label:
                    md += [f"### Per label ({md_escape(where)})", "", _md_table(cols, per_label), ""]
                    hs += [f"<h3>Per label ({html.escape(where)})</h3>", _html_table(cols, per_label)]
        repeats = repeats_rows(run)
        if repeats:
            title, cols, rows_ = repeats
            md += [f"### {md_escape(title)}", "", _md_table(cols, rows_), ""]
            hs += [f"<h3>{html.escape(title)}</h3>", _html_table(cols, rows_)]
        for name, cols, trows in _tables(run):
            md += [f"### {md_escape(name)}", "", _md_table(cols, trows), ""]
            hs += [f"<h3>{html.escape(name)}</h3>", _html_table(cols, trows)]
        figs = _copy_figures(run, out, index)
        if figs:
            md += ["### Figures", ""] + [f"![{md_escape(t)}]({p})" for t, p in figs] + [""]
            hs += ["<h3>Figures</h3>"] + [
                f"<figure><a href='{html.escape(p)}'><img src='{html.escape(p)}' alt='{html.escape(t)}'></a>"
                f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, p in figs]
    hs.append("</body></html>")
    paths = {"md": out / "report.md", "html": out / "report.html"}
    paths["md"].write_text("\n".join(md) + "\n")
    paths["html"].write_text("\n".join(hs) + "\n")
    return paths
