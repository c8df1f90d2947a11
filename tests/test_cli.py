"""The ``cellst`` command line: help, synth -> ingest -> info -> evaluate, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from typer.testing import CliRunner

from cellst.cli import app
from cellst.data.store import CellStore
from cellst.metrics.report import evaluate_folders

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "synth",
    "ingest",
    "info",
    "evaluate",
    "predict",
    "segment",
    "export",
    "compare",
    "train",
    "stpp",
    "tune",
]
#: commands of sub-apps (``cellst stpp run`` ...), and hidden forms kept for older scripts
SUBCOMMANDS = [["stpp", "run"], ["stpp", "status"], ["stpp-status"]]


def test_console_script_help():
    exe = Path(sys.executable).with_name("cellst")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0
    assert "Usage" in res.output and len(res.output) > 300


@pytest.mark.parametrize("cmd", [[c] for c in COMMANDS] + SUBCOMMANDS, ids=" ".join)
def test_help_paragraphs_flow_to_the_terminal_width(cmd):
    """The description under "Usage" re-flows to an 80-column terminal: every line of a
    paragraph but its last is well filled (keeping the docstrings' own line breaks left
    lines of one or two words)."""
    res = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0, res.output
    text = res.output.split("Usage:", 1)[1].split("\u256d", 1)[0]  # up to the first panel
    paragraphs: list[list[str]] = [[]]
    for line in text.splitlines()[1:]:  # after the usage line; rich pads blank lines
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    assert sum(map(len, paragraphs)) >= 1, text
    for lines in paragraphs:
        short = [ln for ln in lines[:-1] if len(ln) < 40]
        assert not short, f"cellst {' '.join(cmd)} --help: {short}\n{text}"


@pytest.mark.parametrize("cmd", [[c] for c in COMMANDS] + SUBCOMMANDS, ids=" ".join)
def test_option_names_are_whole_in_an_80_column_terminal(cmd):
    """typer's options table cut long names at 80 columns (`--rescale-diame…`,
    `--exclude-on-ed…`), so the help did not say what to type: they fold instead."""
    import re

    res = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0, res.output
    cut = re.findall(r"--[\w-]*\u2026", res.output)
    assert not cut, f"cellst {' '.join(cmd)} --help cuts {cut}:\n{res.output}"


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert f"Usage: cellst {' '.join(cmd)}" in " ".join(res.output.split())
    assert ("RUN_DIR" if cmd[-1].endswith("status") else "CONFIG") in res.output


SET_COMMANDS = [["ingest"], ["evaluate"], ["predict"], ["segment"], ["train"], ["stpp", "run"]]


@pytest.mark.parametrize("cmd", [*SET_COMMANDS, ["tune"]], ids=" ".join)
def test_set_help_example_is_a_field_of_that_command(cmd, tmp_path):
    """Each command's ``--set`` help shows a field it reads, and the example loads with the
    config that command loads (one example copied to every command named other stages)."""
    import re

    from cellst.experiment import load_config
    from cellst.stpp.experiment import load_stpp_config
    from cellst.tune.space import load_tune_config

    res = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    example = re.search(r"e\.g\. --set (\S+)", res.output).group(1)
    section = example.split(".")[0]
    assert section == {"stpp": "stpp", "tune": "tune", "segment": "postprocess"}.get(
        cmd[0], "inference" if cmd[0] == "predict" else cmd[0]
    ), example
    loader = {
        "stpp": lambda o: load_stpp_config(None, o),
        # as a sweep YAML users start from (a training sweep: no checkpoint needed)
        "tune": lambda o: load_tune_config(ROOT / "experiments" / "sweep_augment.yaml", o),
    }
    cfg = loader.get(cmd[0], lambda o: load_config(None, o))([example, f"store={tmp_path}"])
    field, value = example.split("=")
    obj = cfg
    for part in field.split("."):
        obj = getattr(obj, part)
    assert str(obj).lower() == value.lower(), (example, obj)


def test_synth_ingest_info_evaluate(ray_session, tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    res = runner.invoke(
        app,
        [
            "synth",
            str(src),
            "--n-labeled",
            "4",
            "--n-unlabeled",
            "2",
            "--n-test",
            "4",
            "--min-size",
            "128",
            "--max-size",
            "192",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(list((src / "test" / "labels").glob("*_label.tiff"))) == 4
    res = runner.invoke(app, ["ingest", str(src), "--out", str(store)])
    assert res.exit_code == 0, res.output
    assert "10 added" in res.output
    res = runner.invoke(app, ["info", str(store)])
    assert res.exit_code == 0 and '"items": 10' in res.output
    # the labelled split's cells, not the test split's ground truth with them
    info = CellStore(store, lease=False).info()
    per_split = CellStore(store, lease=False).manifest.groupby("split")["n_instances"].sum()
    assert info["labeled_instances"] == per_split["labeled"]
    assert info["instances_per_split"] == {
        "labeled": per_split["labeled"],
        "test": per_split["test"],
    }

    # ground truth against itself (folder vs store): every image perfect (border cells kept:
    # a small image whose cells all touch the border has no TP and scores 0 officially)
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--gt",
            str(store),
            "--pred",
            str(src / "test" / "labels"),
            "--out",
            str(tmp_path / "rep"),
            "--count-boundary",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert report["f1"] == pytest.approx(1.0)
    assert len(report["images"]) == 4 and set(report["per_modality"]) >= {"fluorescence"}
    assert (tmp_path / "rep" / "metrics.csv").read_text().count("\n") == 5

    # a degraded prediction scores below 1 and equals the folder-level metric
    pred = tmp_path / "pred"
    pred.mkdir()
    for i, p in enumerate(sorted((src / "test" / "labels").glob("*.tiff"))):
        lab = tifffile.imread(p)
        if i % 2 == 0:
            lab = ndi.shift(lab, (4, 3), order=0)
        else:
            lab = np.where(ndi.binary_erosion(lab > 0, iterations=2), lab, 0)
        tifffile.imwrite(pred / p.name, lab.astype(np.int32))
    (pred / sorted(pred.iterdir())[0].name).unlink()  # one prediction missing -> F1 0 for it
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--gt",
            str(src / "test" / "labels"),
            "--pred",
            str(pred),
            "--out",
            str(tmp_path / "rep2"),
            "--set",
            "evaluate.count_boundary=true",
        ],
    )
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "rep2" / "metrics.json").read_text())
    ref = evaluate_folders(src / "test" / "labels", pred, count_boundary=True)
    assert got["f1"] == pytest.approx(ref["f1"], abs=1e-12) and 0 < got["f1"] < 1
    assert len(got["missing"]) == 1 and got["count_boundary"] is True


def test_ingest_bad_input_exit_code_and_message(ray_session, tmp_path, synth_src):
    src = tmp_path / "src"
    shutil.copytree(synth_src, src)
    bad = sorted((src / "labeled" / "images").iterdir())[0]
    bad.write_bytes(b"garbage")
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "store")])
    assert res.exit_code == 1
    assert str(bad) in res.output.replace("\n", "") and "cannot read image" in res.output
    assert not (tmp_path / "store").exists()
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "store"), "--skip-bad"])
    assert res.exit_code == 0 and "skipped 1" in res.output


def test_config_error_exit_code_names_field(tmp_path):
    res = runner.invoke(
        app, ["ingest", str(tmp_path), "--out", str(tmp_path / "s"), "--set", "ingest.chunk=7"]
    )
    assert res.exit_code == 2
    assert "ingest.chunk" in res.output


def test_out_given_as_a_file_is_named_in_one_line(tmp_path, synth_src):
    """``--out`` naming an existing file: one line naming it (exit 1) before any work, where
    ingest, evaluate and compare printed a bare ``[Errno 17] File exists`` after it."""
    taken = tmp_path / "taken"
    taken.write_text("a user's file")
    for args in (
        ["ingest", str(synth_src), "--out", str(taken)],
        ["evaluate", "--gt", str(synth_src), "--pred", str(synth_src), "--out", str(taken)],
        ["compare", "--tracking-uri", str(tmp_path / "mlruns"), "--out", str(taken)],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 1, (args[0], res.output)
        assert f"{taken} is a file, not a folder" in res.output.replace("\n", ""), res.output
        assert "Errno" not in res.output and "Traceback" not in res.output
    assert taken.read_text() == "a user's file"


def test_evaluate_missing_inputs(tmp_path):
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--gt",
            str(tmp_path / "nope"),
            "--pred",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 1 and "nope" in res.output


def test_predict_refuses_an_ignore_band_outside_its_range(tmp_path):
    """``--ignore-band`` is checked before anything loads (exit 2, naming the option)."""
    res = runner.invoke(
        app,
        ["predict", "--checkpoint", str(tmp_path), "-i", str(tmp_path), "--ignore-band", "0.7"],
    )
    assert res.exit_code == 2
    assert "Invalid value for '--ignore-band'" in res.output
    assert "less than or equal to 0.49" in res.output


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["train"], ("Missing argument 'config'", "'cellst train --help'")),
        (["segment", "--bogus", "x"], ("No such option: --bogus", "'cellst segment --help'")),
        (["synth", "out", "--n-labeled", "-3"], ("'--n-labeled'", "'cellst synth --help'")),
        (["nosuch"], ("No such command 'nosuch'", "'cellst --help'")),
        (["stpp", "run"], ("Missing argument 'CONFIG'", "'cellst stpp run --help'")),
        (["evaluate", "--gt"], ("Option '--gt' requires an argument",)),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_a_usage_error_is_one_line_naming_the_option_and_the_help(args, names):
    """typer drew a usage error as six lines (usage, a hint, a boxed panel that cut long
    messages at the terminal's edge); it is one ``error:`` line, as cellst's other errors,
    naming what was wrong and the ``--help`` to read. Exit code 2, as before."""
    res = runner.invoke(app, args, env={"COLUMNS": "60"}, terminal_width=60)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert all(name in lines[0] for name in names), lines[0]


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(capsys):
    """Ctrl-C said "stored data is unchanged", which a training that had written two
    epochs' checkpoints contradicted: it says what holds for every command, and exits 130."""
    import typer

    from cellst.cli import user_errors

    @user_errors
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as exit_:
        interrupted()
    assert exit_.value.exit_code == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "written so far is whole" in err and "run the same command again" in err
    assert "unchanged" not in err


def test_a_ctrl_c_while_the_process_exits_is_one_line_not_a_traceback():
    """A Ctrl-C that lands in an ``atexit`` callback (as during Ray's shutdown of the local
    cluster an ingest started, after its store was committed) is one line and exit 130.

    The script registers, before cellst runs, an ``atexit`` callback that interrupts the
    process: such callbacks run last, after any cellst or Ray registered."""
    import subprocess
    import sys

    from cellst.cli import AFTER_THE_COMMAND

    script = (
        "import atexit, os, signal, sys, time\n"
        "def interrupted():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "atexit.register(interrupted)\n"
        "sys.argv = ['cellst', '--version']\n"
        "from cellst.cli import main\n"
        "main()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 130, res.stderr
    assert res.stderr == AFTER_THE_COMMAND and "cellst " in res.stdout


def test_a_ray_address_where_no_cluster_answers_is_one_line_at_once(tmp_path, synth_src):
    """``ray.init`` retries a dead address for ever (a warning every few seconds); a typo
    in ``--ray-address`` or a stale ``RAY_ADDRESS`` is one line and exit 1 instead, before
    anything is written."""
    import os

    from conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    exe = Path(sys.executable).with_name("cellst")
    out = tmp_path / "store"
    res = subprocess.run(
        [
            str(exe),
            "ingest",
            str(synth_src),
            "--out",
            str(out),
            "--ray-address",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 1, res.stderr
    said = " ".join(res.stderr.split())
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in said, res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_check_answers_takes_ray_address_forms(monkeypatch):
    import socket

    from cellst.raycluster import ClusterError, check_answers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for address in (
            f"127.0.0.1:{port}",
            f"ray://127.0.0.1:{port}",
            f"127.0.0.1:{port}/",
            None,
            "local",
            "auto",
            "anyscale://my-cluster",  # Ray's other client schemes are Ray's to resolve
        ):
            check_answers(address)  # raises nothing
    with pytest.raises(ClusterError, match="not HOST:PORT"):
        check_answers("127.0.0.1")
    with pytest.raises(ClusterError, match=f"no Ray cluster answers at ray://127.0.0.1:{port}"):
        check_answers(f"ray://127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # "auto" means RAY_ADDRESS
    with pytest.raises(ClusterError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        check_answers("auto")


def test_sigterm_stops_a_command_as_ctrl_c_does():
    """``ray.init`` makes SIGTERM a ``sys.exit``, which unwound through a running ST++ stage
    and was recorded as a failure with Ray's tracebacks. Once cellst has joined Ray,
    SIGTERM is an interrupt: one line, exit 130, as for Ctrl-C."""
    import os
    import subprocess
    import sys

    script = (
        "import os, signal, sys, time, typer\n"
        "from cellst.cli import user_errors\n"
        "from cellst.raycluster import ensure_ray\n"
        "@user_errors\n"
        "def work():\n"
        "    ensure_ray(num_cpus=1)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
        "try:\n"
        "    work()\n"
        "except typer.Exit as exc:\n"
        "    sys.exit(exc.exit_code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert res.returncode == 130, res.stderr[-3000:]
    assert "interrupted; what was written so far is whole" in " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr


def test_a_stale_record_of_the_last_cluster_is_not_joined(tmp_path, monkeypatch, capsys):
    """A `ray start` head killed by a signal leaves /tmp/ray/ray_current_cluster behind, and
    ray.init() with no address retried that dead address for ever: every later cellst
    command on the machine hung. The record is now checked first: a stale one gets a note
    and the command starts a local cluster of its own; a live one is joined as before."""
    import socket

    from cellst.raycluster import recorded_cluster, recorded_cluster_answers

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert recorded_cluster() is None and recorded_cluster_answers()  # nothing recorded
    (tmp_path / "ray").mkdir()
    record = tmp_path / "ray" / "ray_current_cluster"
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen(1)
        record.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert recorded_cluster_answers()  # a head that answers is joined
        dead = live.getsockname()[1]
    record.write_text(f"127.0.0.1:{dead}")
    assert recorded_cluster() == f"127.0.0.1:{dead}"
    assert not recorded_cluster_answers()
    err = capsys.readouterr().err
    assert f"last started on this machine (127.0.0.1:{dead}) does not answer" in err, err


def test_cellsts_warnings_are_one_line_each_once(tmp_path, capsys):
    """A checkpoint whose postprocess.json was calibrated for other weights: Python showed
    `/.../calibrate.py:446: UserWarning: ...` with the source line under it, and again from
    a second caller. The console script shows `warning: ...` once; other packages'
    warnings keep Python's form."""
    import warnings

    from cellst.cli import warnings_as_lines
    from cellst.model.checkpoint_files import POSTPROCESS_FILE, POSTPROCESS_FORMAT
    from cellst.postprocess.calibrate import _recorded_inference, effective_postprocess

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes(b"weights")
    record = {"format": POSTPROCESS_FORMAT, "weights_sha256": "0" * 64, "settings": {}}
    (ckpt / POSTPROCESS_FILE).write_text(json.dumps(record))
    with warnings.catch_warnings(record=True) as python_shown, warnings_as_lines():
        warnings.simplefilter("default")
        assert "not calibrated" in effective_postprocess(None, ckpt)[1]
        assert _recorded_inference(ckpt) is None  # a second place asks again
        warnings.warn_explicit("not ours", UserWarning, "/elsewhere/pkg.py", 7)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    ours = [ln for ln in lines if "calibrated for other weights" in ln]
    assert len(ours) == 1 and ours[0].startswith("warning: "), err
    assert "UserWarning" not in ours[0] and ".py:" not in ours[0]
    assert "not ours" not in err  # Python's own display has it (here: the recorder)
    assert [(str(w.message), w.filename) for w in python_shown] == [
        ("not ours", "/elsewhere/pkg.py")
    ]
