"""The ST++ report: the test-split F1 table of the three models, its MLflow metric names,
its console form, and one line per stage for ``cellst stpp status``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cellst.stpp.outputs import MODELS, STAGES
from cellst.stpp.stages import StageRecord


def f1_table(reports: dict[str, dict]) -> pd.DataFrame:
    """One row per model: test F1 overall and per modality (NaN where a model lacks one)."""
    mods = sorted({m for r in reports.values() for m in r.get("per_modality", {})})
    rows = []
    for label, r in reports.items():
        row = {
            "model": label,
            "stage": MODELS[label],
            "stage_index": STAGES.index(MODELS[label]) + 1,
            "images": r.get("count"),
            "iou_threshold": r.get("iou_threshold", 0.5),
            "f1": r["f1"],
        }
        for m in mods:
            block = r.get("per_modality", {}).get(m)
            row[f"f1_{m}"] = block["f1"] if block else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def format_f1_table(df: pd.DataFrame):
    """The F1 table as a ``rich`` table: one row per model, overall and per modality."""
    from rich.table import Table

    iou = sorted(set(df["iou_threshold"])) if "iou_threshold" in df else [0.5]
    table = Table(
        title=f"test-split F1 (NeurIPS 2022 CellSeg, IoU {', '.join(f'{v:g}' for v in iou)})"
    )
    table.add_column("model")
    table.add_column("overall", justify="right")
    mods = [c for c in df.columns if c.startswith("f1_")]
    for c in mods:
        table.add_column(c[3:], justify="right")
    for row in df.to_dict(orient="records"):
        table.add_row(
            f"{row['model']} (stage {row['stage_index']})",
            f"{row['f1']:.4f}",
            *[f"{row[c]:.4f}" if row[c] == row[c] else "-" for c in mods],
        )
    return table


def table_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Metrics of an F1 table: ``test_f1_<model>`` and ``test_f1_<model>_<modality>`` for
    every model, and for the pipeline's final model (its last stage) the names every cellst
    run uses, ``test_f1`` and ``test_f1/<modality>``, so that MLflow's compare view and
    ``cellst compare`` line pipelines up with trainings and sweeps."""
    out = {}
    rows = table.to_dict(orient="records")
    for row in rows:
        for k, v in row.items():
            if k == "f1" or k.startswith("f1_"):
                out[f"test_{k.replace('f1', 'f1_' + row['model'], 1)}"] = v
    if rows:
        final = max(rows, key=lambda r: r.get("stage_index", 0))
        out["test_f1"] = final["f1"]
        for k, v in final.items():
            if k.startswith("f1_"):
                out[f"test_f1/{k[3:]}"] = v
    return {k: float(v) for k, v in out.items() if v == v}


def outputs_summary(rec: StageRecord) -> str:
    """One line about a stage's outputs, for ``cellst stpp status``."""
    o = rec.outputs or {}
    if not o:
        return ""
    if "best" in o:
        f1 = o.get("best_val_f1")
        f1_text = f"{f1:.3f}" if isinstance(f1, int | float) else "?"
        return f"{Path(o['run_path']).name}: {o.get('epochs')} epochs, best val F1 {f1_text}"
    if "reliable" in o:
        return (
            f"{len(o['reliable'])} reliable / {len(o['unreliable'])} unreliable, "
            f"cut-off {o['cutoff']:.3f}"
        )
    if "table" in o:
        return ", ".join(f"{r['model']} {r['f1']:.3f}" for r in o["table"]) + " (test F1)"
    if "skipped" in o:
        return f"skipped: {o['skipped']}"
    if "sources" in o:
        return f"set {o['set']} = {' + '.join(o['sources'])}"
    if "set" in o:
        return f"set {o['set']}: {o.get('items', 0)} items"
    return ""
