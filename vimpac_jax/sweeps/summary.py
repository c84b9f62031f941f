"""The summary of a sweep's runs: `collect` reads each run's files into one row (failed and
unfinished runs included), `write_summary` writes summary.md / summary.csv, `plot_summary` summary.png."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from vimpac_jax import exit_codes, io_utils
from vimpac_jax.sweeps.spec import LOG_FILE, OVERRIDES_FILE, STATUS_FILE, read_json, format_value

# Metrics shown in summary.md (summary.csv has every logged metric); eval/* are always shown.
MARKDOWN_METRICS = ("train/total_loss", "train/mlm_loss", "train/nce_loss", "train/mask_accuracy", "train/mask_ratio",
                    "train/loss", "train/accuracy")


def _last_rows(metrics_file: Path) -> tuple[int | None, dict, dict]:
    """(last step, last row's train/* metrics, last row's eval/* metrics) of metrics.jsonl."""
    step, train, evals = None, {}, {}
    if not metrics_file.is_file():
        return step, train, evals
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut off by a killed run
        if not isinstance(row, dict):
            continue
        if isinstance(row.get("step"), int):
            step = row["step"] if step is None else max(step, row["step"])
        t = {k: v for k, v in row.items() if k.startswith("train/") and isinstance(v, (int, float))}
        e = {k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))}
        if t:
            train = t
        if e:
            evals = e
    return step, train, evals


def _last_log_line(run_dir: Path) -> str:
    """The last line of log.txt that says what went wrong (an 'error' line if there is one)."""
    log = run_dir / LOG_FILE
    if not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[-1][:200]


def collect(root: str | os.PathLike) -> list[dict]:
    """One row per run directory under ROOT (those holding overrides.json), in index order.

    Row keys: run, overrides (dict), status ('ok' | 'preempted' | 'failed (rc=N)' | 'not finished'),
    returncode, step, metrics (dict of train/* and eval/* numbers), note (failed runs: the
    error line of log.txt).
    """
    root = Path(root)
    rows = []
    for run_dir in sorted(p for p in root.iterdir() if (p / OVERRIDES_FILE).is_file()) if root.is_dir() else []:
        info = read_json(run_dir / OVERRIDES_FILE) or {}
        status = read_json(run_dir / STATUS_FILE)
        code = status.get("returncode") if status else None
        step, train, evals = _last_rows(run_dir / "metrics.jsonl")
        results = read_json(run_dir / "eval_results.json") or {}
        for k, v in results.items():  # fine-tuning's final multi-view scores
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                evals.setdefault(f"eval/{k}", v)
        if code is None:
            state = "not finished"
        elif code == exit_codes.PREEMPTED:
            state = "preempted"  # saved; the next `vimpac sweep` resumes it
        else:
            state = "ok" if code == 0 else f"failed (rc={code})"
        rows.append(dict(run=run_dir.name, index=info.get("index", len(rows)), overrides=info.get("overrides", {}),
                         status=state, returncode=code, step=step, metrics={**train, **evals},
                         note="" if code == 0 else _last_log_line(run_dir)))
    rows.sort(key=lambda r: (r["index"], r["run"]))
    if not rows:
        raise FileNotFoundError(f"no runs under {root} (no */{OVERRIDES_FILE}); was it made by `vimpac sweep`?")
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _columns(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    fields = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    metrics = sorted({k for r in rows for k in r["metrics"]},
                     key=lambda k: (MARKDOWN_METRICS.index(k) if k in MARKDOWN_METRICS else len(MARKDOWN_METRICS), k))
    return fields, metrics


def summary_csv(rows: Sequence[dict]) -> str:
    fields, metrics = _columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", *fields, "status", "returncode", "step", *metrics, "note"])
    for r in rows:
        writer.writerow([r["run"], *(r["overrides"].get(f, "") for f in fields), r["status"],
                         "" if r["returncode"] is None else r["returncode"], "" if r["step"] is None else r["step"],
                         *(repr(r["metrics"][m]) if m in r["metrics"] else "" for m in metrics), r["note"]])
    return buf.getvalue()


def summary_markdown(rows: Sequence[dict], title: str = "") -> str:
    fields, metrics = _columns(rows)
    shown = [m for m in metrics if m in MARKDOWN_METRICS or m.startswith("eval/")]
    header = ["run", *fields, "status", "step", *shown]
    has_notes = any(r["note"] for r in rows)
    if has_notes:
        header.append("note")
    lines = [f"# {title}\n"] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        cells = [r["run"], *(format_value(r["overrides"][f]) if f in r["overrides"] else "" for f in fields),
                 r["status"], _fmt(r["step"]),
                 *(_fmt(r["metrics"].get(m)) for m in shown)]
        if has_notes:
            cells.append(r["note"])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    ok = sum(r["status"] == "ok" for r in rows)
    lines.append(f"\n{ok}/{len(rows)} runs ok. All logged metrics: summary.csv.\n")
    return "\n".join(lines)


def write_summary(root: str | os.PathLike) -> tuple[Path, Path, list[dict]]:
    """Collects ROOT's runs and writes ROOT/summary.md and ROOT/summary.csv (atomically, so a
    summary on disk is always a whole one)."""
    root = Path(root)
    rows = collect(root)
    outputs = []
    for name, text in (("summary.md", summary_markdown(rows, title=f"Sweep {root.name}")),
                       ("summary.csv", summary_csv(rows))):
        io_utils.write_text_atomic(root / name, text)
        outputs.append(root / name)
    return outputs[0], outputs[1], rows


SUMMARY_PLOT = "summary.png"
PLOT_PANELS = 9  # metrics drawn at most


def plot_points(rows: Sequence[dict]) -> tuple[str, list[tuple[Any, dict]], list[str]]:
    """-> (swept field(s), [(swept value, final metrics)] of the finished runs, metrics to draw).

    The swept value is the field whose value differs between runs (several: their values joined,
    "a=1, b=2"); the metrics are the final eval/* ones, else the train ones of the summary table."""
    fields, metrics = _columns(rows)
    done = [r for r in rows if r["status"] == "ok" and r["metrics"]]
    varied = [f for f in fields if len({format_value(r["overrides"].get(f)) for r in rows}) > 1] or fields
    if not done or not varied:
        return "", [], []
    if len(varied) == 1:
        field = varied[0]
        points = [(r["overrides"].get(field), r["metrics"]) for r in done]
    else:
        field = ", ".join(varied)
        points = [(", ".join(f"{f}={format_value(r['overrides'][f])}" for f in varied if f in r["overrides"]),
                   r["metrics"]) for r in done]
    evals = [m for m in metrics if m.startswith("eval/")]
    shown = evals or [m for m in metrics if m in MARKDOWN_METRICS]
    return field, points, shown[:PLOT_PANELS]


def plot_summary(root: str | os.PathLike, rows: Sequence[dict]) -> Path | None:
    """ROOT/summary.png: each final metric against the swept value (`plot_points`), also in
    ROOT/tensorboard (tag `sweep/summary`); None when no finished run has metrics. Needs the viz
    extra (`plots.VizExtraMissing` otherwise)."""
    from vimpac_jax import plots

    root = Path(root)
    field, points, metrics = plot_points(rows)
    if not points or not metrics:
        return None
    image = plots.sweep_plot_image(points, field, metrics, title=f"Sweep {root.name}: final metrics")
    path = plots.write_png(root / SUMMARY_PLOT, image)
    plots.write_tensorboard_images(root / "tensorboard", 0, {"sweep/summary": image})
    return path
