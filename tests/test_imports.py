"""Start-up: configuration loading and the light commands import neither torch nor Ray.

Each check runs in a fresh interpreter and reads ``sys.modules`` when it exits, so an
import anywhere on the path (a config section defined in a heavy module, an eager package
``__init__``) fails it. And no two modules of cellst import each other, directly or through
others, not even inside functions (:func:`import_graph`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "monai", "mlflow")

_REPORT = """
import atexit, json, sys
atexit.register(lambda: print("MODULES=" + json.dumps(
    sorted(m for m in {heavy!r} if m in sys.modules))))
"""


def _fresh(code: str, marker: str) -> Any:
    """Run ``code`` in a fresh interpreter, which must succeed; the JSON value it printed
    on its last ``MARKER=...`` line."""
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    lines = [line for line in res.stdout.splitlines() if line.startswith(f"{marker}=")]
    assert lines and res.returncode == 0, (
        f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len(marker) + 1 :])


def _heavy_imports(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy packages imported when it exits."""
    return _fresh(_REPORT.format(heavy=HEAVY) + code, "MODULES")


def _cli(*args: str) -> str:
    return f"""
from cellst.cli import main
sys.argv = ["cellst", *{list(args)!r}]
try:
    main()
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
"""


def test_loading_every_experiment_yaml_imports_no_torch_or_ray():
    files = sorted(str(p) for p in (ROOT / "experiments").glob("*.yaml"))
    assert len(files) >= 3
    code = f"""
from cellst.config import ConfigError
from cellst.experiment import load_config
from cellst.stpp import load_stpp_config
from cellst.tune.space import load_tune_config
for f in {files!r}:
    load_config(f)
    for loader in (load_stpp_config, load_tune_config):  # not every file is an ST++ / sweep
        try:
            loader(f, ["store=s"])
        except ConfigError:
            pass
"""
    assert _heavy_imports(code) == []


def _cellst_imports(module: str) -> set[str]:
    """The ``cellst`` modules that ``module``'s source imports anywhere: at the top, inside
    functions, or under ``TYPE_CHECKING`` (an import cycle hidden in a function is still one)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    found = set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from cellst.x import config` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] == "cellst"}


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_configuration_modules_form_no_import_cycle():
    """Every module the experiment schema and its loaders reach, through any import
    statement, is imported before the modules that import it: no cycles, not even inside
    functions (issue 12), and none of them is a heavy stage module."""
    import graphlib

    roots = ["cellst.experiment", "cellst.stpp.experiment", "cellst.tune.config"]
    graph: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        mod = todo.pop()
        if mod in graph:
            continue
        graph[mod] = _cellst_imports(mod) - {mod}
        todo.extend(graph[mod])
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    assert {"cellst.config", "cellst.stpp.config", "cellst.train.config"} <= set(order)
    heavy = [m for m in order if m.rsplit(".", 1)[-1] in ("trainer", "pipeline", "networks")]
    assert heavy == [], heavy


@pytest.mark.parametrize(
    "args",
    [("--help",), ("info", "--help"), ("evaluate", "--help"), ("segment", "--help")],
    ids=lambda a: " ".join(a),
)
def test_help_imports_no_torch_or_ray(args):
    assert _heavy_imports(_cli(*args)) == []


def test_evaluate_imports_no_torch_or_ray(tmp_path):
    lab = np.zeros((4, 4), np.uint16)
    lab[1:3, 1:3] = 1
    for side in ("gt", "pred"):
        (tmp_path / side).mkdir()
        tifffile.imwrite(tmp_path / side / "x_label.tiff", lab)
    args = ("evaluate", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"))
    code = _cli(*args, "--out", str(tmp_path / "report"), "--count-boundary")
    assert _heavy_imports(code) == []
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["f1"] == 1.0


def test_store_info_imports_no_torch_or_ray(store_dir):
    assert _heavy_imports(_cli("info", str(store_dir))) == []


def test_segment_in_process_starts_no_ray(tmp_path):
    import torch
    from PIL import Image

    from cellst.model import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(name="hovernet-lite", width=4)
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(cfg), cfg)
    Image.fromarray(np.full((40, 50), 128, np.uint8)).save(tmp_path / "img.png")
    code = _cli("segment", str(tmp_path / "img.png"), "--checkpoint", str(ckpt))
    imported = _heavy_imports(code)
    assert "torch" in imported and "ray" not in imported
    assert (tmp_path / "img_label.tiff").is_file()  # default: beside the image


def test_training_stream_transform_unpickles_without_torch():
    """Ray Train's controller and split coordinator unpickle the training dataset: its
    augmentation must not drag torch and MONAI into them (4-7 s each on 2 CPUs)."""
    import pickle

    from cellst.experiment import ExperimentConfig, load_config
    from cellst.train.step import augment_batch
    from cellst.train.trainer import augment_transform

    cfg = load_config(ROOT / "experiments" / "demo.yaml", model=ExperimentConfig)
    transform = augment_transform(cfg)
    blob = pickle.dumps(transform)
    heavy = _heavy_imports(f"import pickle\nt = pickle.loads({blob!r})\nassert callable(t)")
    assert "torch" not in heavy and "monai" not in heavy, heavy
    # and it is the augmentation: same outputs as calling augment_batch directly
    rng = np.random.default_rng(0)
    c = cfg.data.crop_size
    batch = {
        "image": rng.integers(0, 255, (2, c, c, 3), dtype=np.uint8),
        "label": np.zeros((2, c, c), np.int32),
        "source": np.zeros(2, np.int64),
    }
    batch["label"][:, 10:30, 10:30] = 1
    got = pickle.loads(blob)(dict(batch))
    want = augment_batch(dict(batch), cfg.augment.model_dump(mode="json"), c)
    assert sorted(got) == sorted(want)
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)


def test_ray_worker_setup_hook_quiets_train_without_importing_it():
    """``quiet_logs`` runs in every Ray worker process (the quiet runtime env's setup
    hook): it must lower Ray Train's per-report logger without importing ``ray.train``
    (about 0.9 s of CPU per process, pandas included)."""
    code = """
import logging
import sys
from cellst import raycluster
raycluster.quiet_logs()
assert "ray.train" not in sys.modules, "the setup hook imported ray.train"
name = raycluster._train_context_logger()
import ray.train.v2._internal.execution.context as context
assert context.logger.name == name, (context.logger.name, name)
assert context.logger.getEffectiveLevel() == logging.WARNING
print("HOOK-OK")
"""
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert "HOOK-OK" in res.stdout, res.stderr[-2000:]


def test_training_worker_function_unpickles_without_torch():
    """A Ray Train worker unpickles ``train_loop_per_worker`` (importing its module) before
    it runs: the module imports neither torch nor MONAI, so the function starts the crop
    stream before this worker spends seconds importing them."""
    import pickle

    from cellst.train.loop import train_loop_per_worker

    blob = pickle.dumps(train_loop_per_worker)
    heavy = _heavy_imports(f"import pickle\nf = pickle.loads({blob!r})\nassert callable(f)")
    assert "torch" not in heavy and "monai" not in heavy, heavy


#: what MONAI's ``__init__`` imports optionally that cellst never uses through MONAI
MONAI_EXTRAS = ("mlflow", "matplotlib", "pandas", "sklearn", "scipy.signal")


def _after_monai(setup: str) -> dict:
    """Run ``setup`` then ``import monai`` in a fresh interpreter; which extras it imported,
    and whether what cellst uses of MONAI (HoVer-Net, sliding-window inference, the
    augmentation's transforms) still works."""
    code = f"""
import json, sys
{setup}
import monai
extras = [m for m in {MONAI_EXTRAS!r} if m in sys.modules]
import numpy as np
from cellst.inference.predictor import predict_maps
from cellst.model import ModelConfig, build_augment, build_model
from cellst.model.config import AugmentConfig
model = build_model(ModelConfig(name="hovernet-lite", width=4)).eval()
prob, hv = predict_maps(model, np.zeros((64, 64, 3), np.uint8))  # MONAI's inferer
build_augment(AugmentConfig(), 32)  # MONAI's transforms
import mlflow, pandas  # still importable as usual afterwards
print("MONAI=" + json.dumps({{"extras": extras, "shape": [*prob.shape, *hv.shape]}}))
"""
    return _fresh(code, "MONAI")


def test_monai_imports_without_its_unused_extras_and_still_works():
    """``skip_monai_extras`` keeps MONAI's optional mlflow, matplotlib, pandas, scikit-learn
    and scipy.signal out of its import (about 2.5 of 3.9 s here); MONAI's network,
    transforms and inferer still work, and the extras import as usual afterwards."""
    # CELLST_FULL_MONAI_IMPORT=1 turns the hook off: MONAI imported whole, as without it
    # (one fresh import less than checking both: each costs about 7 s of CPU here)
    whole = _after_monai(
        "import os\nos.environ['CELLST_FULL_MONAI_IMPORT'] = '1'\n"
        "from cellst._monai_import import skip_monai_extras\nskip_monai_extras()"
    )
    assert set(whole["extras"]) == set(MONAI_EXTRAS)  # what the hook saves: MONAI does import them
    trimmed = _after_monai(
        "from cellst._monai_import import skip_monai_extras\nskip_monai_extras()"
    )
    assert trimmed["extras"] == [], trimmed
    assert trimmed["shape"] == whole["shape"] == [64, 64, 2, 64, 64]


def test_other_threads_import_the_extras_as_usual_while_monai_imports():
    """Only the thread that runs MONAI's ``__init__`` is refused the extras: a training
    worker's stream and metric threads import pandas and mlflow while its main thread may
    still be importing MONAI."""
    code = """
import json, threading, time
from cellst._monai_import import monai_initialising, skip_monai_extras
skip_monai_extras()
t = threading.Thread(target=lambda: __import__("monai"))
t.start()
deadline = time.time() + 120
while not monai_initialising() and time.time() < deadline:
    time.sleep(0.001)
began = monai_initialising()
import pandas  # in this thread, while MONAI imports in the other
t.join()
import monai
print("RACE=" + json.dumps({"began_during": began, "pandas": pandas.__name__}))
"""
    assert _fresh(code, "RACE") == {"began_during": True, "pandas": "pandas"}


def test_full_monai_import_choice_reaches_the_jobs_workers(monkeypatch):
    """The driver's ``CELLST_FULL_MONAI_IMPORT`` goes into the job's runtime env, so workers
    on other nodes (whose processes never saw the driver's environment) follow it."""
    from cellst.raycluster import job_runtime_env

    monkeypatch.delenv("CELLST_FULL_MONAI_IMPORT", raising=False)
    assert "CELLST_FULL_MONAI_IMPORT" not in job_runtime_env()["env_vars"]
    monkeypatch.setenv("CELLST_FULL_MONAI_IMPORT", "1")
    assert job_runtime_env()["env_vars"]["CELLST_FULL_MONAI_IMPORT"] == "1"


def test_cellst_ray_workers_and_command_import_monai_trimmed(ray_session):
    """The hook is installed where cellst starts processes: every Ray worker of a cellst
    job (the runtime env's setup hook) and the ``cellst`` command."""

    @ray_session.remote
    def hook_installed() -> bool:  # an idle worker may have imported MONAI long before
        from cellst._monai_import import SkipWhileMonaiImports

        return any(isinstance(f, SkipWhileMonaiImports) for f in sys.meta_path)

    assert all(ray_session.get([hook_installed.remote() for _ in range(4)]))
    code = "import json, sys\n" + _cli("--help") + "\nimport monai\nprint('EXTRAS=' + "
    code += f"json.dumps([m for m in {MONAI_EXTRAS!r} if m in sys.modules]))"
    assert _fresh(code, "EXTRAS") == []


def test_first_batch_is_fetched_before_it_is_asked_for():
    """The stream's first item is fetched in the background from the start; items keep
    their order, and an error of that first fetch reaches the first ``next()``."""
    import threading

    from cellst.train.loop import _first_item_fetched_now

    started = threading.Event()

    def stream():
        started.set()
        yield from (1, 2, 3)

    items = _first_item_fetched_now(stream())
    assert started.wait(10)  # without any next()
    assert list(items) == [1, 2, 3]

    def broken():
        raise OSError("store unreadable")
        yield

    items = _first_item_fetched_now(broken())
    with pytest.raises(OSError, match="store unreadable"):
        next(items)
    assert list(_first_item_fetched_now(iter(()))) == []


def test_bad_checkpoint_record_fails_before_torch_is_imported(tmp_path):
    """``cellst predict`` checks the checkpoint first: an invalid ``model.json`` is reported
    from the torch-free :mod:`cellst.model.checkpoint_files`, without the seconds of torch
    and MONAI imports that loading the weights costs."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.json").write_text('{"format": "cellst-model/1", "model": {"name": "nope"}}')
    code = f"""
from cellst.data.store import StoreError
from cellst.inference.batch import check_checkpoint
try:
    check_checkpoint({str(ckpt)!r})
except StoreError as exc:
    assert "has an invalid model config" in str(exc) and {str(ckpt)!r} in str(exc), exc
    assert "model.name: " in str(exc) and "'nope'" in str(exc) and "\\n" not in str(exc), exc
else:
    raise AssertionError("no StoreError")
"""
    heavy = _heavy_imports(code)
    assert "torch" not in heavy and "monai" not in heavy, heavy


def test_checkpoint_layout_is_owned_by_one_module():
    """The checkpoint file names are spelled once, in ``checkpoint_files``; the torch module
    re-exports the same objects (one ``CheckpointError`` class, whichever path imports it)."""
    import re

    from cellst.model import checkpoint, checkpoint_files

    assert checkpoint.CheckpointError is checkpoint_files.CheckpointError
    assert checkpoint.read_checkpoint_info is checkpoint_files.read_checkpoint_info
    spelled = re.compile(r"[\"'](model\.json|model\.pt|postprocess\.json)[\"']")
    code = [*(ROOT / "platform" / "cellst").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    code += (ROOT / "experiments").glob("*.py")
    owners = {str(p.relative_to(ROOT)) for p in code if spelled.search(p.read_text())}
    assert owners == {"platform/cellst/model/checkpoint_files.py"}, owners


def test_closing_the_stream_closes_it_now_fetched_or_not():
    """The training loop closes its crop stream when it ends, so that Ray Data's iterator
    is finalised while Ray is up (finalised at exit, it called Ray after its shutdown,
    which started a new local cluster and hung the command)."""
    from cellst.train.loop import _first_item_fetched_now

    closed: list[str] = []

    def stream(name):
        try:
            yield from (1, 2, 3)
        finally:
            closed.append(name)

    items = _first_item_fetched_now(stream("used"))
    assert next(items) == 1 and next(items) == 2
    items.close()
    unused = _first_item_fetched_now(stream("unused"))  # only its first item fetched
    unused.close()
    assert closed == ["used", "unused"]


# ------------------------------------------------------------------ the package's import graph
#: the package whose modules may not import each other in a cycle
PACKAGE_DIR = ROOT / "platform" / "cellst"


def _package_modules(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Every module under ``package_dir``: dotted name -> (file, whether it is a package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _reexports(package: str, tree: Any) -> dict[str, str]:
    """What a package ``__init__`` re-exports from its own submodules: name -> submodule,
    from its ``from package.sub import name`` statements (eager or under ``TYPE_CHECKING``)
    and from a ``_NAMES = {"name": "sub"}`` literal handed to :func:`cellst._lazy.lazy_getattr`."""
    import ast

    found = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith(package + ".")
        ):
            found.update({a.asname or a.name: node.module for a in node.names})
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["_NAMES"]
            and isinstance(node.value, ast.Dict)
        ):
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    found.setdefault(key.value, f"{package}.{value.value}")
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """The import graph of the modules under ``package_dir`` (module -> modules it imports).

    The rule, from the source alone (nothing is imported):

    * every ``import`` statement counts, wherever it is: module level, inside a function,
      method or class body, under ``try``: a deferred import only postpones a cycle, it
      does not remove it. Imports under ``if TYPE_CHECKING:`` count too (as in
      :func:`_cellst_imports`): the names a module is annotated with are what it depends on;
    * relative imports are resolved against the importing module's package;
    * ``import a.b.c`` imports ``a.b.c``; ``from a.b import x`` imports ``a.b``, and also
      ``a.b.x`` when that is a module, and when ``a.b`` is a package that re-exports ``x``
      from its submodule ``a.b.sub`` (eagerly or lazily, see :func:`_reexports`), ``a.b.sub``:
      a name taken through a lazy package still ties the importer to its real module;
    * a package's edges to its own submodules are left out: Python imports a package
      before any of its submodules anyway, so ``pkg -> pkg.sub`` (its ``__init__``
      importing or lazily re-exporting ``pkg.sub``) is how packages work, not a cycle;
      ``pkg``'s imports of anything else count;
    * a module importing itself is no edge.
    """
    import ast

    modules = _package_modules(package_dir)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, (path, _) in modules.items()}
    reexports = {
        name: _reexports(name, trees[name]) for name, (_, is_pkg) in modules.items() if is_pkg
    }
    graph: dict[str, set[str]] = {}
    for name, (_, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(trees[name]):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                targets.add(source)
                for alias in node.names:
                    targets.add(f"{source}.{alias.name}")
                    targets.add(reexports.get(source, {}).get(alias.name, ""))
        own = name + "." if is_package else None
        graph[name] = {
            t for t in targets if t in modules and t != name and not (own and t.startswith(own))
        }
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules, shortest
    through its first module in sorted order; empty when the graph has no cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in sorted(groups):
        start, inside = group[0], set(group)
        paths = {start: [start]}
        todo = [start]
        while todo:  # breadth first: the shortest way back to start
            v = todo.pop(0)
            for w in sorted(graph[v] & inside):
                if w == start:
                    cycles.append([*paths[v], start])
                    todo = []
                    break
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    todo.append(w)
    return cycles


def test_cellst_modules_import_each_other_without_cycles():
    """No module of cellst imports, directly or through others, a module that imports it,
    not even from inside a function (see :func:`import_graph` for what counts)."""
    graph = import_graph(PACKAGE_DIR)
    assert {"cellst.data.store", "cellst.train.trainer", "cellst.inference.segment"} <= set(graph)
    assert "cellst.data.layout" in graph["cellst.data.store"]  # the graph does see imports
    cycles = import_cycles(graph)
    assert not cycles, "import cycles between cellst modules: " + "; ".join(
        " -> ".join(c) for c in cycles
    )


def test_import_graph_counts_deferred_relative_and_lazy_imports(tmp_path):
    """The graph's rule on a small package: an import inside a function, a relative one,
    ``from pkg import module`` and a name taken through a lazy package all close a cycle;
    a package's ``__init__`` importing its own submodule does not."""
    pkg = tmp_path / "pkg"
    (pkg / "lazy").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import A\n",  # own submodule: no cycle
        "a.py": "A = 1\ndef f():\n    from .b import B\n",  # deferred and relative
        "b.py": "from pkg import a\nB = 2\n",  # a module taken from its package
        "c.py": "from pkg.lazy import D\n",  # a lazy re-export: pkg.lazy.d
        "lazy/__init__.py": "_NAMES = {'D': 'd'}\n",
        "lazy/d.py": "D = 3\ndef g():\n    import pkg.c\n",
        "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.f import F\n",
        "f.py": "import pkg.e\nF = 4\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg"] == set() and graph["pkg.lazy"] == set()
    assert import_cycles(graph) == [
        ["pkg.a", "pkg.b", "pkg.a"],
        ["pkg.c", "pkg.lazy.d", "pkg.c"],
        ["pkg.e", "pkg.f", "pkg.e"],
    ]
