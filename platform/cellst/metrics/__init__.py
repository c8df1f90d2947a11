"""Evaluation metrics: the NeurIPS 2022 Cell Segmentation challenge F1 and panoptic quality."""

from cellst.metrics.instance import (
    MatchResult,
    image_scores,
    match_instances,
    remove_boundary_cells,
    summarize,
)
from cellst.metrics.report import (
    evaluate_folders,
    evaluate_pairs,
    format_table,
    load_label_folder,
    write_report,
)

__all__ = [
    "MatchResult",
    "evaluate_folders",
    "evaluate_pairs",
    "format_table",
    "image_scores",
    "load_label_folder",
    "match_instances",
    "remove_boundary_cells",
    "summarize",
    "write_report",
]
