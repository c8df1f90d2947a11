"""The ``cellst`` command line: a thin layer over the stage packages.

Every command that runs a stage takes a config (YAML) and any number of ``--set
key.path=value`` overrides: ``train``, ``stpp`` and ``tune`` take the experiment file as
their argument (``cellst train experiments/supervised.yaml``), the others ``--config FILE``.
Errors name the offending field, file or item.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from cellst import __version__
from cellst._monai_import import skip_monai_extras

app = typer.Typer(
    name="cellst",
    help="Ray-distributed ST++ self-training of HoVer-Net for cell instance segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # paragraphs of the docstrings re-flow to the terminal's width (Rich mode keeps each
    # source line break, which left one-word lines in an 80-column terminal)
    rich_markup_mode="markdown",
)
#: piped or logged output gets 120 columns (rich would use 80); tables are printed whole
#: (:func:`print_whole`) whatever the width
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def _fold_option_names() -> None:
    """Let ``--help`` fold a long option name onto a second line in a narrow terminal:
    typer's options table cut it (``--rescale-diame…`` at 80 columns), so the flag a user
    must type could not be read. Its highlighters make the name cells; they now fold."""
    from typer import rich_utils

    class Folding:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __call__(self, text):
            out = self.inner(text)
            out.overflow = "fold"
            return out

    for name in ("highlighter", "negative_highlighter"):
        current = getattr(rich_utils, name)
        if type(current).__name__ != "Folding":  # once per process
            setattr(rich_utils, name, Folding(current))


def _one_line_usage_errors() -> None:
    """Print a usage error (a missing argument, an unknown option, a value out of range) as
    cellst's other errors: one ``error:`` line naming the option and the ``--help`` to read.
    typer drew it as the usage line, a hint and a boxed panel, six lines for one fact, and
    the box cut long messages at the terminal's edge."""
    from typer import rich_utils

    def one_line(exc) -> None:
        if type(exc).__name__ == "NoArgsIsHelpError":  # typer printed the help already
            return
        message = " ".join(exc.format_message().split())
        ctx = getattr(exc, "ctx", None)
        if ctx is not None and ctx.command.get_help_option(ctx) is not None:
            message += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
        err_console.print(
            f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True
        )

    rich_utils.rich_format_error = one_line


_fold_option_names()
_one_line_usage_errors()

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="experiment YAML (see experiments/); defaults if omitted"),
]


def set_option(example: str) -> Any:
    """The ``--set`` option, with an example of a field the command reads."""
    return Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help=f"override a config field, e.g. --set {example}"),
    ]


#: each command's --set, with an example of a field it reads
SetIngest = set_option("ingest.min_side=64")
SetEvaluate = set_option("evaluate.iou_threshold=0.7")
SetPredict = set_option("inference.tta=true")
SetSegment = set_option("postprocess.min_object_size=30")
SetTrain = set_option("train.epochs=40")
SetStppRun = set_option("stpp.reliable_fraction=0.5")
SetTune = set_option("tune.num_samples=16")
RescaleOpt = Annotated[
    float | None,
    typer.Option(
        min=1.0,
        help="cell-size rescaling: images whose cells are smaller than this diameter (px) are "
        "upsampled to it and segmented again (e.g. 20; inference.rescale_diameter)",
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        envvar="RAY_ADDRESS",
        help="Ray cluster to join (default: the one last started on this machine by `ray start` if it answers, else a local one)",
    ),
]


def _fail(message: str, code: int = 1) -> None:
    err_console.print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True
    )
    raise typer.Exit(code)


#: user errors that are not ValueErrors, by module and class name; looked up only among
#: modules already imported (an error of a module never imported cannot occur), so the
#: wrapper imports nothing: `cellst evaluate` must not pay for Ray, torch or zarr
_USER_ERRORS = (
    ("cellst.data.arrays", "StoreError"),
    ("cellst.train.config", "TrainingDiverged"),
    ("cellst.raycluster", "ClusterError"),
    ("cellst.model.checkpoint_files", "CheckpointError"),
    ("cellst.fs", "FolderBusy"),
)


#: errors of the file system a user can mend (permissions, a read-only or full disk, a
#: folder where a file goes), shown as one line naming the path instead of a traceback
_STORAGE_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EISDIR}
)


def _storage_error_line(exc: OSError) -> str:
    """``PATH: reason``: the destination of a failed rename, else the file; a hidden
    temporary name (``.NAME.1a2b3c4d.tmp``) is shown as its folder, where the user acts."""
    name = exc.filename2 or exc.filename
    path = Path(name) if name else None
    if path is not None and path.name.startswith("."):
        path = path.parent
    reason = exc.strerror or type(exc).__name__
    return f"{path}: {reason}" if path is not None else reason


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | FileExistsError | NotADirectoryError | ValueError):
        return True  # ConfigError, ImageFormatError, IngestError, SegmentError, ...
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return True
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def user_errors(fn):
    """Turn expected user errors into a clear message and a non-zero exit, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from cellst.config import ConfigError

        if os.environ.get("CELLST_DEBUG") == "1":
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            _fail(str(exc), code=2)
        except KeyboardInterrupt as exc:  # a command's own says how far it got
            _fail(
                str(exc)
                or "interrupted; what was written so far is whole (every write is atomic): "
                "run the same command again to go on",
                code=130,
            )
        except Exception as exc:
            if not _is_user_error(exc):
                raise
            if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
                _fail(_storage_error_line(exc))
            _fail(
                f"{exc}\n(set CELLST_DEBUG=1 for a traceback)"
                if type(exc) is ValueError
                else str(exc)
            )

    return wrapper


def _load(config: Path | None, overrides: list[str] | None):
    from cellst.experiment import load_config

    return load_config(config, overrides or [])


def _version(value: bool) -> None:
    if value:
        console.print(f"cellst {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Ray-distributed ST++ self-training of HoVer-Net for cell instance segmentation.

    Data flows one way: image folders -> `cellst ingest` -> zarr store -> training ->
    checkpoints -> `cellst predict` -> pseudo-label sets -> `cellst evaluate`.
    """


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Argument(help="output folder (challenge layout)")],
    n_labeled: Annotated[int, typer.Option(min=0, help="labelled training images")] = 40,
    n_unlabeled: Annotated[int, typer.Option(min=0, help="unlabelled images")] = 80,
    n_test: Annotated[int, typer.Option(min=0, help="labelled test images")] = 20,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same bytes)")] = 0,
    min_size: Annotated[int, typer.Option(min=64, help="smallest image side")] = 256,
    max_size: Annotated[int, typer.Option(min=64, help="largest image side")] = 1024,
) -> None:
    """Write synthetic multi-modality microscopy in the NeurIPS 2022 CellSeg layout.

    Four modalities (fluorescence 16-bit, brightfield RGB, phase contrast, DIC) with exact
    instance labels: the embedded default data of the demo and the tests.
    """
    from cellst.data.synth import synthesize_dataset

    if min_size > max_size:
        _fail(f"--min-size ({min_size}) must not exceed --max-size ({max_size})", code=2)
    summary = synthesize_dataset(
        out, n_labeled, n_unlabeled, n_test, seed=seed, min_size=min_size, max_size=max_size
    )
    console.print(f"wrote synthetic data to [bold]{out}[/]")
    console.print_json(json.dumps(summary, default=str))


@app.command()
@user_errors
def ingest(
    src: Annotated[Path, typer.Argument(help="image folder: challenge layout or plain images")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="store to create (in a new or empty folder) or update; its images/, labels/ "
            "and manifests/ are cellst's",
        ),
    ],
    config: ConfigOpt = None,
    set_: SetIngest = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="split of every image found: labeled, unlabeled or test (default: from the "
            "challenge layout's folder names; a plain folder is labeled where its images have "
            "labels, else unlabeled)"
        ),
    ] = None,
    modality: Annotated[
        str | None, typer.Option(help="modality of every image (else modalities.csv)")
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="ingest the rest, report bad files")
    ] = False,
    prune: Annotated[bool, typer.Option("--prune", help="drop items no longer in SRC")] = False,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="let an image of another folder replace a stored item of its name, and a "
            "labelled item lose its label (refused otherwise)",
        ),
    ] = False,
    ray_address: RayOpt = None,
) -> None:
    """Ingest image folders into a zarr store with a manifest.parquet.

    Reads tif/tiff/png/bmp/jpg of any bit depth, normalises each channel to uint8 between
    percentiles of its non-zero pixels, checks every label, and commits atomically: a
    failed ingest leaves the previous store unchanged. Re-running only ingests new or
    changed files.
    """
    from cellst.data.ingest import REPORT as INGEST_REPORT
    from cellst.data.ingest import check_source, check_target
    from cellst.data.ingest import ingest as run_ingest
    from cellst.data.store import CellStore
    from cellst.fs import check_writable
    from cellst.raycluster import ensure_ray

    cfg = _load(config, set_)
    check_source(src)  # before Ray starts (seconds) for nothing
    check_writable(out)  # e.g. a file at the store's name: one line, not [Errno 17]
    check_target(out)  # a folder of the user's own files never becomes a store
    try:
        ensure_ray(ray_address)
        result = run_ingest(
            src,
            out,
            cfg.ingest,
            split=split,
            modality=modality,
            skip_bad=skip_bad,
            prune=prune,
            replace=replace,
        )
    except KeyboardInterrupt as exc:  # IngestInterrupted says whether anything was committed
        _fail(str(exc) or "interrupted, the store is unchanged", code=130)
    console.print(f"[green]ingested[/] {src} -> {out}: {result.summary()}")
    if result.renamed:
        first_image, first_id = result.renamed[0]
        more = f" and {len(result.renamed) - 1} more" if len(result.renamed) > 1 else ""
        console.print(
            f"{len(result.renamed)} image name(s) also used in another folder got the folder's "
            f"name as a prefix: {first_image} is item {first_id}{more}",
            highlight=False,
            markup=False,
        )
    for warning in result.warnings:
        err_console.print(f"warning: {warning}", highlight=False, markup=False)
    if result.skipped:
        err_console.print(
            f"[yellow]skipped {len(result.skipped)} bad file(s)[/], "
            f"see {Path(out) / INGEST_REPORT}:"
        )
        for path, why in result.skipped:
            err_console.print(f"  {path}: {why}", highlight=False, markup=False)
    if result.kept:
        err_console.print(
            f"kept as an earlier ingest stored them, not as their files now are: "
            f"{', '.join(result.kept)} (fix the files and ingest again to update them)",
            highlight=False,
            markup=False,
        )
    _print_frame(_items_table(CellStore(out, lease=False).manifest), "items per modality and split")


@app.command()
@user_errors
def info(store: Annotated[Path, typer.Argument(help="a cellst store")]) -> None:
    """Summarise a store: items per split and modality, instances, pseudo-label sets."""
    from cellst.data.store import CellStore

    s = CellStore(store)
    console.print_json(json.dumps(s.info()))
    _print_frame(_items_table(s.manifest), "items per modality and split")


@app.command()
@user_errors
def evaluate(
    gt: Annotated[Path, typer.Option(help="ground truth: folder of NAME_label.tiff or a store")],
    pred: Annotated[Path, typer.Option(help="prediction: folder of NAME_label.tiff or a store")],
    out: Annotated[Path, typer.Option(help="report folder (metrics.json, metrics.csv)")],
    pred_set: Annotated[
        str | None, typer.Option(help="pseudo-label set when --pred is a store")
    ] = None,
    gt_split: Annotated[str, typer.Option(help="split of the items when --gt is a store")] = "test",
    count_boundary: Annotated[
        bool | None, typer.Option("--count-boundary", help="keep cells touching the image border")
    ] = None,
    per_cell: Annotated[
        bool,
        typer.Option("--per-cell", help="also write cells.csv: each cell's matched cell and IoU"),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="replace metrics.json / metrics.csv / cells.csv of another tool"
        ),
    ] = False,
    config: ConfigOpt = None,
    set_: SetEvaluate = None,
) -> None:
    """The NeurIPS 2022 CellSeg F1 at IoU 0.5, plus PQ and per-modality means.

    Cells touching a 2-pixel image border are removed from both maps (unless
    --count-boundary), matching is Hungarian, F1 is 0 without true positives, and the
    score is the mean over images, exactly as the official evaluation script.
    """
    from cellst.fs import check_writable
    from cellst.metrics.report import foreign_report_files, format_table
    from cellst.metrics.sources import evaluate_sources

    cfg = _load(config, set_)
    check_writable(out)  # before the scoring, not a bare [Errno 17] after it
    _refuse_foreign(foreign_report_files(out, per_cell), "cellst evaluate", overwrite)
    boundary = cfg.evaluate.count_boundary if count_boundary is None else count_boundary
    try:
        report = evaluate_sources(
            gt,
            pred,
            out,
            pred_set=pred_set,
            gt_split=gt_split,
            count_boundary=boundary,
            iou_threshold=cfg.evaluate.iou_threshold,
            progress=sys.stderr.isatty(),
            per_cell=per_cell,
        )
    except ValueError as exc:  # a label file that is no instance map, mismatched shapes
        _fail(str(exc), code=2)
    _warn_unmatched(report, pred, pred_set)
    print_whole(format_table(report))
    console.print(
        f"mean F1 = [bold]{report['f1']:.4f}[/] over {report['count']} images; "
        f"report in {out}/metrics.json"
    )


@app.command()
@user_errors
def predict(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint directory (model.pt + model.json)")],
    input: Annotated[
        Path, typer.Option("--input", "-i", help="a cellst store or a folder of images")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="folder for NAME_label.tiff files; a re-run keeps the files this model "
            "wrote and does the rest",
        ),
    ] = None,
    set_name: Annotated[
        str | None, typer.Option(help="pseudo-label set to write into the store")
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help="store split to predict (default: unlabeled, else every item)"),
    ] = None,
    num_actors: Annotated[
        int | None,
        typer.Option(min=0, help="model replicas (actor pool size); 0: in this process"),
    ] = None,
    num_gpus_per_actor: Annotated[
        float | None, typer.Option(min=0, help="GPUs per actor (0: CPU)")
    ] = None,
    tta: Annotated[
        bool | None, typer.Option("--tta/--no-tta", help="flip test-time augmentation")
    ] = None,
    rescale_diameter: RescaleOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="replace an existing set, and this run's NAME_label.tiff files in --out "
            "(also files cellst did not write or another model wrote; nothing else there)",
        ),
    ] = False,
    skip_bad: Annotated[
        bool,
        typer.Option("--skip-bad", help="images that fail are listed, not an error (exit 0)"),
    ] = False,
    ignore_band: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.49,
            help="with --set-name: also store each item's ignore mask, the pixels whose "
            "foreground probability is within this of the mask threshold; training on the "
            "set (train.pseudo_set) leaves them out of the loss (0: none)",
        ),
    ] = 0.0,
    config: ConfigOpt = None,
    set_: SetPredict = None,
    ray_address: RayOpt = None,
) -> None:
    """Distributed batch prediction on a Ray Data actor pool (one model per actor).

    Writes instance maps into the store as a pseudo-label set (--set-name) and/or as
    challenge files NAME_label.tiff (--out). Items already written are skipped, so an
    interrupted run resumes where it stopped; no item is written twice or half-written,
    and a set is resumed only by the model (weights and post-processing) that wrote it.
    The checkpoint is checked before Ray starts. An image that cannot be read or predicted
    is named and the others are written; the exit code is 1 unless --skip-bad.
    """
    from cellst.inference.batch import predict as run_predict

    cfg = _load(config, set_)
    if num_actors is not None:
        cfg.predict.num_actors = num_actors
    if num_gpus_per_actor is not None:
        cfg.predict.num_gpus_per_actor = num_gpus_per_actor
    if tta is not None:
        cfg.inference.tta = tta
    if rescale_diameter is not None:
        cfg.inference.rescale_diameter = rescale_diameter
    result = run_predict(  # checks the checkpoint and the request, then starts Ray
        checkpoint,
        input,
        set_name=set_name,
        out_dir=out,
        split=split,
        infer=cfg.inference,
        post=cfg.postprocess,
        resources=cfg.predict,
        overwrite=overwrite,
        skip_bad=skip_bad,
        ray_address=ray_address,
        ignore_band=ignore_band,
        ingest=cfg.ingest,
    )
    console.print(f"[green]predicted[/] {result.summary()}")
    if result.failed:
        err_console.print(f"[yellow]skipped {len(result.failed)} bad image(s)[/] (--skip-bad):")
        for _, why in result.failed:
            err_console.print(f"  {why}", highlight=False, markup=False, soft_wrap=True)
    console.print(result.postprocess_note, highlight=False, markup=False, soft_wrap=True)
    if result.stats is not None and len(result.stats):
        s = result.stats
        console.print(
            f"set {set_name!r}: {len(s)} items, {int(s['n_instances'].sum())} instances, "
            f"mean {s['n_instances'].mean():.1f} per image"
        )


@app.command()
@user_errors
def segment(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="image files and/or folders of images (tif, png, bmp, jpg)"),
    ],
    checkpoint: Annotated[
        Path, typer.Option(help="checkpoint folder (model.json + model.pt)", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="output folder (default: beside each image)"),
    ] = None,
    save_png: Annotated[
        bool,
        typer.Option(
            "--save-png", help="also write NAME_overlay.png (outlines; ids where they fit)"
        ),
    ] = False,
    save_csv: Annotated[
        bool, typer.Option("--save-csv", help="also write per-cell measurements NAME_cells.csv")
    ] = False,
    save_geojson: Annotated[
        bool, typer.Option("--save-geojson", help="also write NAME.geojson (QuPath detections)")
    ] = False,
    save_ome_zarr: Annotated[
        bool, typer.Option("--save-ome-zarr", help="also write NAME.ome.zarr (image + labels)")
    ] = False,
    tta: Annotated[
        bool | None, typer.Option("--tta/--no-tta", help="flip test-time augmentation")
    ] = None,
    rescale_diameter: RescaleOpt = None,
    exclude_on_edges: Annotated[
        bool | None,
        typer.Option("--exclude-on-edges", help="drop cells touching the image border"),
    ] = None,
    min_size: Annotated[
        int | None, typer.Option(min=0, help="drop cells of fewer pixels (after post-processing)")
    ] = None,
    mask_threshold: Annotated[
        float | None, typer.Option(help="foreground probability threshold (default: calibrated)")
    ] = None,
    marker_threshold: Annotated[
        float | None, typer.Option(help="marker border-energy threshold (default: calibrated)")
    ] = None,
    sobel_kernel: Annotated[
        int | None,
        typer.Option(help="odd Sobel kernel size of the watershed (default: calibrated)"),
    ] = None,
    ray: Annotated[
        bool | None,
        typer.Option(
            "--ray/--in-process",
            help="run on Ray (the `cellst predict` path) or in this process; default: by size",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="in-process torch device (default: cuda if available)")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="replace files at the output names that cellst did not write (e.g. a "
            "NAME_label.tiff ground truth beside its image); refused by default",
        ),
    ] = False,
    config: ConfigOpt = None,
    set_: SetSegment = None,
    ray_address: RayOpt = None,
) -> None:
    """Segment image files: NAME_label.tiff per image, plus overlays and exports on request.

    Images are normalised as `cellst ingest` stores them, predicted, and post-processed with
    the checkpoint's calibrated thresholds unless given here, with --set or in the YAML.
    Small jobs run in this process without starting Ray; large ones (settings
    segment.in_process_max_images / _mpx) or --ray use the distributed `cellst predict`
    path. An image that cannot be read is named and the others are written (exit code 1).
    """
    from cellst.inference.inputs import SegmentError
    from cellst.inference.segment import segment as run_segment

    options = {
        "postprocess.mask_threshold": mask_threshold,
        "postprocess.marker_threshold": marker_threshold,
        "postprocess.sobel_kernel": sobel_kernel,
        "inference.tta": tta,
        "inference.rescale_diameter": rescale_diameter,
        "segment.exclude_on_edges": exclude_on_edges,
        "segment.min_size": min_size,
        "segment.save_png": save_png or None,
        "segment.save_csv": save_csv or None,
        "segment.save_geojson": save_geojson or None,
        "segment.save_ome_zarr": save_ome_zarr or None,
    }
    # as overrides after --set: options win, and a bad value is a ConfigError naming the field
    given = [f"{k}={json.dumps(v)}" for k, v in options.items() if v is not None]
    cfg = _load(config, [*(set_ or []), *given])

    def started(paths: list[Path], distributed: bool) -> None:
        how = "on Ray" if distributed else "in this process"
        console.print(f"segmenting {len(paths)} image(s) {how}", highlight=False)

    try:
        result = run_segment(
            inputs,
            checkpoint,
            out_dir=out,
            infer=cfg.inference,
            post=cfg.postprocess,
            segment_cfg=cfg.segment,
            ingest=cfg.ingest,
            resources=cfg.predict,
            ray=ray,
            ray_address=ray_address,
            device=device,
            overwrite=overwrite,
            on_start=started,
        )
    except SegmentError as exc:
        _fail(str(exc), code=2)
    console.print(result.postprocess_note, highlight=False, markup=False, soft_wrap=True)
    where = f"in {out}" if out is not None else "beside each image"
    console.print(f"[green]done:[/] {result.summary()}; outputs {where}", soft_wrap=True)
    if result.empty:
        err_console.print(
            f"note: {result.empty_note()}", highlight=False, markup=False, soft_wrap=True
        )
    if result.removed:
        more = f" and {len(result.removed) - 1} more" if len(result.removed) > 1 else ""
        console.print(
            f"removed {result.removed[0]}{more}: outputs of an earlier run that no longer "
            "matched the new labels",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for path in result.stale_kept:
        err_console.print(
            f"warning: {path} is from an earlier run and holds additions of yours, so it was "
            "kept, but its segmentation no longer matches the new labels (--save-ome-zarr "
            "refreshes it and keeps your additions)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if result.failed:
        for _, why in result.failed:
            err_console.print(why, highlight=False, markup=False, soft_wrap=True)
        _fail(result.failure_message())


@app.command()
@user_errors
def train(
    config: Annotated[Path, typer.Argument(help="experiment YAML (see experiments/)")],
    set_: SetTrain = None,
    run_name: Annotated[
        str | None, typer.Option(help="run name; re-using it resumes the run")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="start a finished or changed run over")
    ] = False,
    ray_address: RayOpt = None,
) -> None:
    """Train HoVer-Net with Ray Train (DDP) on the store's labelled items.

    Optionally together with a pseudo-label set (train.pseudo_set). Each epoch validates
    on held-out labelled items with the challenge F1 and keeps the best checkpoint, the
    last ones and the ST++ snapshots. Every run is recorded in MLflow. Re-running the same
    command resumes an interrupted run.
    """
    from cellst.raycluster import ensure_ray
    from cellst.train.trainer import check_request, check_run_dir
    from cellst.train.trainer import train as run_train

    cfg = _load(config, set_)
    if run_name is not None:
        from cellst.config import check_folder_name

        try:
            check_folder_name(run_name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--run-name") from None
    _, _, val_ids = check_request(cfg)  # store problems are reported before Ray starts
    check_run_dir(cfg)
    no_validation = (
        f"no validation items (data.val_fraction={cfg.data.val_fraction} of the labelled "
        "items of each modality leaves none), so no best checkpoint and no calibration"
    )
    if not val_ids:
        err_console.print(f"warning: {no_validation}", highlight=False, markup=False)
    ensure_ray(ray_address)
    result = run_train(cfg, run_name=run_name, force=force)
    m = result.metrics
    state = "already finished (nothing to do)" if result.resumed else "finished"
    # paths and the command to copy: whole lines (never wrapped at the terminal's width)
    # and never read as rich markup
    console.print(
        f"[green]training {state}[/]: {escape(str(result.run_path))}", soft_wrap=True, emoji=False
    )
    if val_ids:
        best_f1 = m.get("best_val_f1", float("nan"))
        console.print(f"  epochs {m.get('epoch')}, best validation F1 {best_f1:.4f}")
    else:
        console.print(f"  epochs {m.get('epoch')}, {no_validation}", highlight=False)
    t = cfg.train
    if t.min_workers and not result.resumed:
        from cellst.train.checkpoints import RunPaths

        sizes = RunPaths(result.run_path).group_sizes()
        group = f"the elastic group (train.min_workers={t.min_workers})"
        changes = " -> ".join(map(str, sizes))
        if sizes and sizes[-1] < t.num_workers:
            console.print(
                f"  ended with {sizes[-1]} of {t.num_workers} workers: {group} lost room and "
                f"went on without it (workers: {changes})",
                highlight=False,
            )
        elif len(sizes) > 1:
            console.print(
                f"  workers: {changes}: {group} lost room and grew back "
                "(each change restarted it from its last checkpoint)",
                highlight=False,
            )
    lines = [f"  best checkpoint: {result.best}"] if result.best.exists() else []
    lines += [
        f"  last checkpoint: {result.last}",
        f"  ST++ snapshots: {', '.join(p.name for p in result.snapshots)}",
    ]
    if result.mlflow_run_id:  # the store the run went to: a server or the run's SQLite file
        from cellst.tracking import resolve_tracking, ui_command

        uri = resolve_tracking(cfg.tracking, result.run_path, cfg.name)[0]
        lines.append(f"  MLflow run {result.mlflow_run_id}: {ui_command(uri)}")
    for line in lines:
        console.print(line, soft_wrap=True, markup=False, highlight=False, emoji=False)


class _RunByDefault(TyperGroup):
    """``cellst stpp CONFIG ...`` (the form before the sub-commands) means
    ``cellst stpp run CONFIG ...``: anything but a sub-command name or ``--help`` first."""

    def parse_args(self, ctx, args):  # noqa: D102
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


stpp_app = typer.Typer(
    cls=_RunByDefault,
    name="stpp",
    help="ST++ self-training: `cellst stpp run CONFIG` (or `cellst stpp CONFIG`) and "
    "`cellst stpp status RUN_DIR`.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(stpp_app)


@stpp_app.command("run")
@user_errors
def stpp_run(
    config: Annotated[
        Path, typer.Argument(help="experiment YAML (see experiments/stpp.yaml)", metavar="CONFIG")
    ],
    set_: SetStppRun = None,
    force_from: Annotated[
        str | None,
        typer.Option(
            "--force-from", help="run this stage (number or name) and every later one again"
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until",
            help="stop once this stage (number or name) is done, e.g. 2 to look at the "
            "reliability ranking first; the same command without it goes on",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="replace pseudo-label sets of this pipeline's names left by others"
        ),
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="tiny model and data settings (minutes on 2 CPUs)")
    ] = False,
    ray_address: RayOpt = None,
) -> None:
    """Run (or resume) ST++: supervised -> reliability -> pseudo-label -> re-train (x2) -> F1.

    Every stage is recorded durably in the pipeline folder (stpp.run_dir/name). Re-running
    the same command after a crash or Ctrl-C resumes at the first unfinished stage; a
    finished stage is never recomputed unless its inputs changed or --force-from asks. All
    stages are MLflow child runs of one parent run. `cellst stpp status RUN_DIR` shows them.
    """
    from cellst.raycluster import ensure_ray
    from cellst.stpp import load_stpp_config, run_stpp
    from cellst.tracking.config import ui_command

    cfg = load_stpp_config(config, set_ or [], quick=quick)
    if ray_address:
        ensure_ray(ray_address)
    from cellst.config import ConfigError

    refused = False  # a bad request (an unknown stage...): nothing ran, no status to show
    ended = False  # the MLflow line then comes once, at the very end
    try:
        result = run_stpp(cfg, force_from=force_from, overwrite=overwrite, until=until)
        ended = True
    except ConfigError:
        refused = True
        raise
    finally:
        if not refused and (cfg.pipeline_dir / "stages").is_dir():
            with contextlib.suppress(Exception):
                _stpp_status(cfg.pipeline_dir, mlflow_line=not ended)
    if result.report is not None:
        _print_f1_table(result.report)
    console.print(f"pipeline folder: [bold]{result.pipeline_dir}[/]")
    ui = ui_command(result.tracking_uri)
    if ui:
        console.print(f"MLflow (parent run {result.parent_run_id}): {ui}", soft_wrap=True)


RunDirArg = Annotated[
    Path, typer.Argument(help="an ST++ pipeline folder (stpp.run_dir/name)", metavar="RUN_DIR")
]


@stpp_app.command("status")
@user_errors
def stpp_status(run_dir: RunDirArg) -> None:
    """Show every stage of an ST++ pipeline and its state (also while it runs)."""
    _stpp_status(run_dir)


@app.command("stpp-status", hidden=True)
@user_errors
def stpp_status_legacy(run_dir: RunDirArg) -> None:
    """Same as `cellst stpp status RUN_DIR` (kept for scripts of earlier cellst)."""
    _stpp_status(run_dir)


def _stpp_status(run_dir: Path, mlflow_line: bool = True) -> None:
    from cellst.stpp.outputs import STAGES, TITLES
    from cellst.stpp.pipeline import pipeline_active, pipeline_status
    from cellst.stpp.report import outputs_summary
    from cellst.tracking.config import ui_command

    meta, records = pipeline_status(run_dir)
    active = pipeline_active(run_dir)
    colours = {
        "done": "green",
        "running": "yellow",
        "failed": "red",
        "interrupted": "yellow",
        "pending": "dim",
    }
    table = Table(title=f"ST++ pipeline {run_dir}" + (" (running now)" if active else ""))
    for col in ("#", "stage", "status", "time", "tries", "inputs", "MLflow run"):
        table.add_column(col, justify="right" if col in ("#", "time", "tries") else "left")
    table.add_column("outputs", overflow="fold", min_width=24)
    for rec in records:
        status = rec.status
        if status == "running" and not active:
            status = "interrupted"
        if rec.forced and status == "pending":
            status = "pending (forced)"
        secs = rec.seconds
        table.add_row(
            str(rec.index),
            rec.name,
            f"[{colours.get(rec.status, 'white')}]{status}[/]",
            f"{secs:.0f} s" if secs is not None and rec.status == "done" else "",
            str(rec.attempts),
            (rec.input_hash or "")[:8],
            (rec.mlflow_run_id or "")[:8],
            outputs_summary(rec) or (rec.error or "")[:200] or TITLES[rec.name],
        )
    print_whole(table)
    done = sum(r.status == "done" for r in records)
    console.print(f"{done}/{len(STAGES)} stages done", highlight=False)
    ui = ui_command(meta.get("tracking_uri"))
    if mlflow_line and ui and meta.get("parent_run_id"):
        console.print(f"MLflow parent run {meta['parent_run_id']}: {ui}", soft_wrap=True)


@app.command()
@user_errors
def tune(
    config: Annotated[Path, typer.Argument(help="experiment YAML with a tune section")],
    set_: SetTune = None,
    ray_address: RayOpt = None,
) -> None:
    """Sweep post-processing or training settings with Ray Tune; scored on validation items.

    tune.mode=postprocess predicts the validation items once with tune.checkpoint and tries
    post-processing settings on the cached maps (seconds per trial); tune.mode=train trains
    one model per trial and lets ASHA stop poor trials early. Writes results.csv, best.yaml
    (the best settings as --set overrides) and sweep.png; every trial is an MLflow child run.
    Re-running an interrupted sweep resumes it. See experiments/sweep_*.yaml.
    """
    from cellst.raycluster import ensure_ray
    from cellst.tune.space import load_tune_config
    from cellst.tune.sweep import run_sweep

    cfg = load_tune_config(config, set_ or [])
    ensure_ray(ray_address)
    result = run_sweep(cfg)
    top = result.table.head(10)
    table = Table(title=f"best trials of {len(result.table)} ({result.metric}, validation items)")
    for c in top.columns:
        if c != "mlflow_run_id":  # swept fields by their last name: the table must fit
            table.add_column(
                str(c).rsplit(".", 1)[-1],
                justify="left" if c in ("trial_id", "status") else "right",
            )
    for row in top.to_dict(orient="records"):
        table.add_row(
            *[
                f"{v:.4g}" if isinstance(v, float) else str(v)
                for k, v in row.items()
                if k != "mlflow_run_id"
            ]
        )
    print_whole(table)
    sets = " ".join(f"--set {k}={v!r}" for k, v in result.best_params.items())
    if result.baseline_score is not None:
        console.print(f"current settings: {result.metric} {result.baseline_score:.4f}")
    if result.keeps_current:
        console.print(
            f"no trial beat the current settings: keep them (best trial {result.metric} "
            f"{result.best_score:.4f} with: {sets})",
            soft_wrap=True,
        )
    else:
        console.print(f"best {result.metric} {result.best_score:.4f} with: {sets}", soft_wrap=True)
    console.print(f"results: {result.sweep_dir}/results.csv, best.yaml, sweep.png")
    if result.tracking_uri:
        from cellst.tracking.config import ui_command

        console.print(
            f"MLflow (parent run {result.parent_run_id}): {ui_command(result.tracking_uri)}",
            soft_wrap=True,
        )


@app.command()
@user_errors
def export(
    store: Annotated[Path, typer.Argument(help="a cellst store")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the NAME.ome.zarr groups")],
    item: Annotated[
        list[str] | None, typer.Option("--item", help="item id to export (repeatable); all")
    ] = None,
    pseudo: Annotated[
        bool, typer.Option("--pseudo/--no-pseudo", help="add pseudo-label sets as label images")
    ] = True,
    measure: Annotated[
        bool, typer.Option("--measure/--no-measure", help="per-cell measurements as properties")
    ] = True,
    pixel_size: Annotated[
        float | None,
        typer.Option(
            "--pixel-size",
            help="physical size of a pixel, written as the groups' scale (viewers' scale "
            "bars, distances); default: what each source OME-TIFF or ImageJ TIFF declares, "
            "else none (1 pixel)",
        ),
    ] = None,
    unit: Annotated[
        str | None,
        typer.Option(
            help="unit of --pixel-size: micrometer (um), nanometer (nm), ... [default: micrometer]"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="rewrite every export")] = False,
) -> None:
    """Export store items as OME-Zarr (NGFF 0.5): image, ground truth and pseudo-labels.

    One OUT/ITEM.ome.zarr per item, readable by napari (pip install 'cellst[napari]'),
    the ome-zarr package, Fiji (MoBIE / n5-viewer) and QuPath's OME-Zarr support. Label
    images carry colours and the per-cell measurements. Re-running skips unchanged items.
    """
    from cellst.data.images import ome_unit
    from cellst.data.store import CellStore
    from cellst.export.omezarr import check_pixel_size, export_store

    if unit is not None and pixel_size is None:  # it was ignored, exit 0
        raise typer.BadParameter(
            "--unit is the unit of --pixel-size; give both (without them, each item's "
            "source declares its own)",
            param_hint="--unit",
        )
    unit = ome_unit(unit or "micrometer") or unit  # um, \u00b5m, micron: micrometer
    try:
        check_pixel_size(1.0 if pixel_size is None else pixel_size, unit)
    except ValueError as exc:
        hint = "--unit" if "unit" in str(exc) else "--pixel-size"
        raise typer.BadParameter(str(exc), param_hint=hint) from None
    CellStore(store, lease=False)  # a clear error for a folder that is not a store
    written = export_store(
        store,
        out,
        items=item or None,
        include_pseudo=pseudo,
        overwrite=overwrite,
        measure=measure,
        pixel_size=pixel_size,
        unit=unit,
        progress=sys.stderr.isatty(),
        log=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True),
    )
    console.print(f"{len(written)} OME-Zarr groups in {out}", highlight=False)


@app.command()
@user_errors
def compare(
    experiment: Annotated[
        list[str] | None,
        typer.Option("--experiment", "-e", help="experiment name (repeatable); default: all"),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="server URL, sqlite:/// URI, mlflow.db file or runs folder; default: "
            "$MLFLOW_TRACKING_URI, else every mlflow.db under runs/",
        ),
    ] = None,
    sort: Annotated[
        str, typer.Option(help="column to sort by: test_f1, val_f1/MODALITY, train.lr...")
    ] = "test_f1",
    ascending: Annotated[bool, typer.Option("--ascending", help="smallest first")] = False,
    kind: Annotated[
        list[str] | None,
        typer.Option(help="pipeline, train, sweep, trial, stage, other or all (repeatable)"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="show the first N runs")] = 50,
    out: Annotated[Path | None, typer.Option(help="folder for compare.csv and compare.png")] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="replace compare.csv / compare.png of another tool"),
    ] = False,
) -> None:
    """Compare MLflow runs without a browser: test and validation F1 per modality, each
    run's stage, and only the config fields that differ between the runs shown."""
    from cellst.fs import check_writable
    from cellst.tracking.compare import compare_command, foreign_outputs

    if out is not None:
        check_writable(out)
        _refuse_foreign(foreign_outputs(out), "cellst compare", overwrite)
    compare_command(experiment, tracking_uri, sort, out, limit, kind, ascending)


def _refuse_foreign(paths: list[Path], writer: str, overwrite: bool) -> None:
    """Exit 2, before any work, when this run would replace files ``writer`` did not
    write (unless ``--overwrite``)."""
    if paths and not overwrite:
        more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
        _fail(
            f"{paths[0]}{more} was not written by {writer}; pass --overwrite to replace it, "
            "or choose another --out",
            code=2,
        )


def _warn_unmatched(report: dict, pred: Path, pred_set: str | None) -> None:
    """One warning per ground-truth image without prediction and per extra prediction,
    and one for the predictions that are binary masks (scored as one cell each)."""
    files: dict[str, Path] = {}
    if pred_set is None and pred.is_dir():
        from cellst.metrics.report import load_label_folder

        with contextlib.suppress(Exception):
            files = load_label_folder(pred)
    where = f"set {pred_set!r} of {pred}" if pred_set else str(pred)
    # names are compared as they are spelled; one that differs only in letter case is named
    by_case = {name.casefold(): name for name in report.get("extra", [])}
    for name in report.get("missing", []):
        near = by_case.get(name.casefold())
        hint = f"; {near!r} there differs only in letter case" if near else ""
        err_console.print(
            f"[yellow]warning:[/] no prediction for {name!r} in {where} (scored as F1 0{hint})",
            highlight=False,
            soft_wrap=True,
        )
    for name in report.get("extra", []):
        what = str(files[name]) if name in files else f"{name!r} in {where}"
        err_console.print(
            f"[yellow]warning:[/] prediction {what} has no ground truth (not scored)",
            highlight=False,
            soft_wrap=True,
        )
    if binary := report.get("binary"):
        name, regions = next(iter(sorted(binary.items())))
        what = str(files[name]) if name in files else f"{name!r} in {where}"
        others = f" and {len(binary) - 1} other prediction(s)" if len(binary) > 1 else ""
        err_console.print(
            f"[yellow]warning:[/] prediction {what}{others} is a binary mask ({regions} separate "
            "regions, one label value), scored as one cell: give each cell its own value "
            "(e.g. skimage.measure.label) to score instances",
            highlight=False,
            soft_wrap=True,
        )
    if binary_gt := report.get("binary_gt"):
        name, regions = next(iter(sorted(binary_gt.items())))
        others = f" and {len(binary_gt) - 1} other(s)" if len(binary_gt) > 1 else ""
        err_console.print(
            f"[yellow]warning:[/] ground truth {name!r} in {report['gt']}{others} is a binary "
            f"mask ({regions} separate regions, one label value), so it is one cell: give "
            "each cell its own value (e.g. skimage.measure.label)",
            highlight=False,
            soft_wrap=True,
        )
    scattered = report.get("scattered") or {}
    for side, folder in (("pred", where), ("gt", report.get("gt"))):
        if found := scattered.get(side):
            name, (values, pieces) = next(iter(sorted(found.items())))
            what = str(files[name]) if side == "pred" and name in files else f"{name!r} in {folder}"
            others = f" and {len(found) - 1} other(s)" if len(found) > 1 else ""
            kind = "prediction" if side == "pred" else "ground truth"
            err_console.print(
                f"[yellow]warning:[/] {kind} {what}{others} looks like an intensity image, not "
                f"a label map: its {values} values lie in {pieces} separate pieces (a label "
                "map gives each cell one value); is this the image folder?",
                highlight=False,
                soft_wrap=True,
            )


def print_whole(renderable, out: Console | None = None) -> None:
    """Print a table at its natural width, never cut or wrapped at the console's width.

    On a terminal rich fits the table to the window; piped or logged output (where rich
    would cut at the console width) gets a console as wide as the table needs.
    """
    out = out or console
    if out.is_terminal:
        out.print(renderable)
        return
    need = out.measure(renderable, options=out.options.update_width(100_000)).maximum
    if need <= out.width:
        out.print(renderable)
        return
    Console(file=out.file, width=need, no_color=out.no_color, highlight=False).print(renderable)


def _print_f1_table(df) -> None:
    from cellst.stpp.report import format_f1_table

    print_whole(format_f1_table(df))


def _items_table(manifest):
    """Items per modality (rows) and split (columns) of a store manifest."""
    return manifest.pivot_table(
        index="modality", columns="split", values="id", aggfunc="count", fill_value=0
    )


def _print_frame(df, title: str) -> None:
    table = Table(title=title)
    table.add_column(df.index.name or "")
    for c in df.columns:
        table.add_column(str(c), justify="right")
    for idx, row in df.iterrows():
        table.add_row(str(idx), *[str(v) for v in row])
    print_whole(table)


#: what a Ctrl-C says once the command is over (Ray's clean-up at exit may still be running)
AFTER_THE_COMMAND = "cellst: interrupted after the command had finished; its output is whole\n"


def _interrupted_after_the_command(signum: int, frame: Any) -> None:
    """A Ctrl-C during the interpreter's exit (Ray's ``atexit`` shutdown of the cluster it
    started): one line and exit 130, not the traceback of an interrupted ``atexit``
    callback. What Ray leaves goes with this process (``PR_SET_PDEATHSIG``,
    :mod:`cellst.reaper`)."""
    os.write(2, AFTER_THE_COMMAND.encode())
    os._exit(130)


@contextlib.contextmanager
def warnings_as_lines():
    """Show cellst's own warnings as one ``warning: ...`` line each, once per message.

    Python prints ``/path/to/module.py:446: UserWarning: ...`` followed by the source line
    that warned, and once per place that warns, so one problem seen by two callers came
    twice, with code in it. Warnings of other packages keep Python's form.
    """
    import warnings

    from rich.text import Text

    package = Path(__file__).resolve().parent
    original = warnings.showwarning
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        try:
            ours = Path(filename).resolve().is_relative_to(package)
        except (OSError, ValueError):
            ours = False
        if not ours:
            return original(message, category, filename, lineno, file, line)
        text = str(message)
        if text not in shown:
            shown.add(text)
            err_console.print(Text.assemble(("warning:", "yellow"), " ", text), soft_wrap=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main() -> None:
    """Entry point of the ``cellst`` console script."""
    import signal

    skip_monai_extras()
    try:
        with warnings_as_lines():
            app(prog_name="cellst")
    finally:
        signal.signal(signal.SIGINT, _interrupted_after_the_command)


if __name__ == "__main__":
    sys.exit(main())
