"""Config loading: YAML + --set overrides, errors that name the field path."""

from __future__ import annotations

import re
from types import UnionType
from typing import Union, get_args, get_origin

import pytest
from pydantic import BaseModel, ValidationError

from cellst.config import ConfigError, apply_overrides, dump_config, read_yaml
from cellst.experiment import ExperimentConfig, load_config


def test_defaults_and_overrides(tmp_path):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("name: demo\ndata:\n  crop_size: 128\n")
    cfg = load_config(cfg_file, ["data.crops_per_visit=8", "ingest.high_percentile=99.5"])
    assert cfg.name == "demo"
    assert cfg.data.crop_size == 128
    assert cfg.data.crops_per_visit == 8
    assert cfg.ingest.high_percentile == 99.5
    # the dump is loadable and round-trips
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    "override, path",
    [
        (["data.crop_size=100"], "data.crop_size"),
        (["data.crop_size=abc"], "data.crop_size"),
        (["data.bogus=1"], "data.bogus"),
        (["evaluate.iou_threshold=0"], "evaluate.iou_threshold"),
        (["ingest.low_percentile=99.9"], "ingest"),
        (["inference.roi=100"], "inference.roi"),
    ],
)
def test_errors_name_the_field(override, path):
    with pytest.raises(ConfigError) as exc:
        load_config(None, override)
    assert f"  {path}" in str(exc.value)


def test_a_validators_own_words_are_shown_once():
    """A validator's message that gives the value: no pydantic prefix, no value repeated."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["ingest.low_percentile=99.5", "ingest.high_percentile=99"])
    last = str(exc.value).splitlines()[-1]
    assert last == "  ingest: low_percentile (99.5) must be below high_percentile (99.0)"
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["inference.roi=100"])
    assert (
        str(exc.value).splitlines()[-1]
        == "  inference.roi: Input should be a multiple of 32 (got 100)"
    )


def test_unknown_section_and_bad_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_config(f)
    f.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax():
    assert apply_overrides({}, ["a.b=1", "a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    # a section set to a value by an earlier override: that one is named, not the later
    with pytest.raises(ConfigError, match=r"override 'train=5' sets train, a section, to a"):
        load_config(None, ["train=5", "train.run_dir=runs"])
    for field in ("train.run_dir", "stpp.run_dir"):  # an empty one wrote into the cwd
        with pytest.raises(ConfigError, match=f"{field}: String should have at least 1"):
            load_config(None, [f"{field}="])
    assert isinstance(load_config(None, ["name=x"]), ExperimentConfig)


def test_set_reaches_a_dotted_key_of_the_tune_space(tmp_path):
    """``tune.space`` maps dotted field names to distributions: ``--set
    tune.space.postprocess.mask_threshold=...`` sets that one entry (it was split on every
    dot into a nested mapping and refused), keeping the file's other entries."""
    f = tmp_path / "sweep.yaml"
    f.write_text("tune:\n  space:\n    train.lr: {grid: [0.001, 0.003]}\n")
    cfg = load_config(f, ["tune.space.postprocess.mask_threshold={uniform: [0.3, 0.6]}"])
    assert set(cfg.tune.space) == {"train.lr", "postprocess.mask_threshold"}
    assert cfg.tune.space["postprocess.mask_threshold"].uniform == (0.3, 0.6)
    assert cfg.tune.space["train.lr"].grid == [0.001, 0.003]
    # a bad key inside the space is still named whole
    with pytest.raises(ConfigError, match=r"tune\.space\.postprocess\.bogus"):
        from cellst.tune.space import load_tune_config

        load_tune_config(f, ["store=x", "tune.space.postprocess.bogus={grid: [1]}"])


def _float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every float field of a config model and its nested sections."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        options = get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)
        for opt in options:
            if isinstance(opt, type) and issubclass(opt, BaseModel):
                out += _float_fields(opt, f"{prefix}{name}.")
            elif opt is float:
                out.append(f"{prefix}{name}")
    return out


FLOAT_FIELDS = _float_fields(ExperimentConfig)


def test_every_float_field_is_found():
    # every section of the experiment
    assert {"train.lr", "ingest.low_percentile", "predict.num_cpus_per_actor"} <= set(FLOAT_FIELDS)
    assert len({p.split(".")[0] for p in FLOAT_FIELDS}) >= 8


@pytest.mark.parametrize("path", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf"])
def test_non_finite_numbers_are_refused_in_every_field(path, value):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"{path}={value}"])
    assert f"\n  {path}: " in str(exc.value)


def test_non_finite_messages(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lr: .inf\n")
    with pytest.raises(
        ConfigError, match=r"train\.lr: Input should be a finite number \(got inf\)"
    ):
        load_config(f)
    # a nested section, a list of untyped choices: the nested field is named
    with pytest.raises(ConfigError, match=r"predict\.num_cpus_per_actor: .*finite number"):
        load_config(None, ["predict.num_cpus_per_actor=inf"])
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.lr\.choice\.1: .*finite"):
        load_config(None, ['tune.space={"train.lr": {"choice": [0.1, .nan]}}'])
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.lr\.uniform\.1: .*finite"):
        load_config(None, ['tune.space={"train.lr": {"uniform": [0.1, .inf]}}'])
    cfg = load_config(None)
    with pytest.raises(ValidationError, match="finite number"):
        cfg.train.lr = float("inf")  # assignments are validated too


def test_every_section_refuses_non_finite_numbers_when_built_alone():
    """Sections are built outside an experiment too (a checkpoint's post-processing, a
    sweep's trial inference settings): the same rules hold there."""
    sections = {
        name: field.annotation
        for name, field in ExperimentConfig.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }
    assert {"inference", "predict", "postprocess", "tracking", "segment"} <= set(sections)
    for name, section in sections.items():
        assert section.model_config.get("allow_inf_nan") is False, name
        assert section.model_config.get("extra") == "forbid", name
    for path in FLOAT_FIELDS:
        section, _, field = path.partition(".")
        if "." in field:
            continue
        with pytest.raises(ValidationError, match="finite number"):
            sections[section](**{field: float("inf")})


@pytest.mark.parametrize(
    ("nodes", "actors", "requested", "reserve", "expected"),
    [
        ([1, 1], 2, 1, 0.25, 0.75),  # the 2 x 1-CPU cluster: 0.88 by the total starved reads
        ([4], 2, 1, 0.25, 1.0),  # room enough: the request stands
        ([2, 1], 3, 1, 0.25, 0.75),  # 2 actors on the big node, 1 on the small one
        ([8, 8], 4, 2, 0.25, 2.0),
        ([0.2], 1, 1, 0.25, 0.0),  # no node can hold the reads: nothing fits
    ],
)
def test_actor_cpus_fit_per_node(nodes, actors, requested, reserve, expected):
    """Every node keeps the reserve for the other stages whatever node an actor lands on."""
    from cellst.raycluster import cpus_per_actor

    share = cpus_per_actor(nodes, actors, requested, reserve)
    assert share == pytest.approx(expected)
    if share:
        placed = sum(int((c - reserve) / share + 1e-9) for c in nodes)
        assert placed >= actors and share <= requested


@pytest.mark.parametrize(
    ("nodes", "actors", "requested", "reserve", "caps", "expected"),
    [
        # the 2-CPU node left after a loss: 2 workers of 1 CPU filled it and the stream
        # never ran again; at 1.5 it holds one worker and a read task (the head: 0 CPUs)
        ([0, 2, 2], 2, 1, 0.5, None, 1.5),
        ([4, 4], 2, 1, 0.5, None, 1.0),  # a node holds both workers with room to spare
        ([2], 2, 1, 0.5, None, 0.75),  # one node for both: below the request, reads kept
        ([64, 64], 8, 1, 0.5, [8, 8], 1.0),  # GPU nodes: their GPUs bound the count
        ([0.5], 1, 1, 0.5, None, 0.0),  # the read task alone fills the node
    ],
)
def test_an_elastic_group_leaves_every_node_it_fills_a_read_task(
    nodes, actors, requested, reserve, caps, expected
):
    """Ray Train's elastic policy restarts a smaller group with as many workers as the
    nodes' resources hold; the share chosen leaves a read-and-augment task on every node
    however Ray packs it."""
    import math

    from cellst.raycluster import elastic_cpus_per_actor

    share = elastic_cpus_per_actor(nodes, actors, requested, reserve, caps)
    assert share == pytest.approx(expected)
    if share:
        limits = caps or [actors] * len(nodes)
        packed = [min(math.floor(c / share + 1e-9), m) for c, m in zip(nodes, limits, strict=True)]
        assert sum(packed) >= actors
        assert all(c - k * share >= reserve - 1e-9 for c, k in zip(nodes, packed, strict=True) if k)


@pytest.mark.parametrize(
    ("total", "driver_node", "driver_cpus", "expected"),
    [
        (2, 2, 1, 1),  # one node: the driver's threads are taken from it
        (4, 0, 2, 4),  # a head with no Ray CPUs: the worker nodes' CPUs all go to the stream
        (6, 2, 4, 4),  # the driver's node has fewer CPUs than its threads: only those
        (2, 2, 2, 0.5),  # never below the minimum
    ],
)
def test_a_computation_in_the_driver_holds_back_only_its_own_nodes_cpus(
    total, driver_node, driver_cpus, expected
):
    """A training in the driver process (train.num_workers=0) on a cluster whose head has
    no Ray CPUs held the stream back by its threads on the worker nodes, which it never
    shares."""
    from cellst.raycluster import stream_cpus

    assert stream_cpus(total, driver_node, driver_cpus, minimum=0.5) == expected


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["train.num_workers=2", "train.min_workers=3"], "must be at most num_workers"),
        (["train.num_workers=0", "train.min_workers=1"], "needs train.num_workers >= 1"),
        (
            [
                "train.num_workers=2",
                "train.min_workers=1",
                "train.placement_strategy=STRICT_SPREAD",
            ],
            "cannot go with placement_strategy=STRICT_SPREAD",
        ),
        (["train.num_workers=2", "train.min_workers=0"], "greater than or equal to 1"),
    ],
)
def test_an_elastic_group_refuses_what_it_cannot_do(overrides, error):
    """min_workers above num_workers, without a worker group, or with a strict placement
    (Ray sizes a restarted group by resources alone: a STRICT_SPREAD group of that size
    waited for ever in a trial run) is one error naming the field."""
    from cellst.experiment import load_config

    with pytest.raises(ConfigError, match="train") as info:
        load_config(None, ["store=s", *overrides])
    assert error in str(info.value)


def test_an_elastic_group_is_no_new_configuration_of_its_run():
    """A run started as a fixed group resumes as an elastic one: the run's identity leaves
    out how many workers may carry it after a loss, as it leaves out train.max_failures."""
    from cellst.experiment import load_config
    from cellst.fingerprint import training_fingerprint

    fixed = load_config(None, ["store=s", "train.num_workers=2"])
    elastic = load_config(None, ["store=s", "train.num_workers=2", "train.min_workers=1"])
    assert training_fingerprint(fixed) == training_fingerprint(elastic)


def test_gpu_actors_fit_on_the_cpus_of_nodes_with_gpus():
    """GPU actors were fitted on every node's CPUs: an 8-CPU node without a GPU beside a
    1-CPU GPU node gave 2 CPUs per actor, which the GPU node could never place (the pool
    waited for ever). Only nodes that can hold an actor's GPUs count now, each for as many
    actors as its GPUs hold."""
    from cellst.raycluster import actors_per_node, cpus_per_actor

    assert actors_per_node([0, 1, 4], 1) == [0, 1, 4]
    assert actors_per_node([1, 2], 0.5) == [2, 4]
    # the 8-CPU node holds no GPU: the 1-CPU GPU node cannot keep the reserve beside one
    assert cpus_per_actor([8, 1], 1, 2, 1.25, actors_per_node([0, 1], 1)) == 0.0
    assert cpus_per_actor([8, 1], 1, 2, 1.25) == 2.0  # (what CPU actors would get)
    # two actors on the one 4-GPU node of 4 CPUs: 2.75 CPUs beside the reserve, shared
    assert cpus_per_actor([8, 4], 2, 2, 1.25, actors_per_node([0, 4], 1)) == pytest.approx(1.375)
    # two GPU nodes of one GPU each: one actor each, the request stands
    assert cpus_per_actor([8, 8], 2, 2, 1.25, actors_per_node([1, 1], 1)) == 2.0


def test_config_fingerprint_counts_only_what_is_computed():
    """Settings left at their defaults and settings of where/how a run goes do not change
    the fingerprint, so a cellst that adds a setting does not invalidate earlier runs."""
    from cellst.experiment import load_config
    from cellst.fingerprint import config_fingerprint
    from cellst.stpp.inputs import training_hash
    from cellst.train.trainer import config_hash

    base = load_config(None, ["store=s", "train.lr=0.01"])
    same = [
        load_config(None, ["store=s", "train.lr=0.01", "train.run_dir=elsewhere"]),
        load_config(None, ["store=s", "train.lr=0.01", "train.cpus_per_worker=3"]),
        load_config(None, ["store=s", "train.lr=0.01", "train.elastic_resize_s=5"]),
        load_config(None, ["store=s", "train.lr=0.01", "tracking.enabled=false"]),
        # a default written out explicitly is the same computation
        load_config(None, ["store=s", "train.lr=0.01", f"data.crop_size={base.data.crop_size}"]),
    ]
    for cfg in same:
        assert config_fingerprint(cfg) == config_fingerprint(base) == config_hash(base)
    assert config_hash(load_config(None, ["store=s", "train.lr=0.02"])) != config_hash(base)
    # ST++ stages: the store path and experiment name are not part of what a stage computes
    moved = load_config(None, ["store=other", "name=n2", "train.lr=0.01"])
    assert training_hash(moved) == training_hash(base) and config_hash(moved) != config_hash(base)


def test_a_trainings_fingerprint_counts_what_it_reads_and_knows_earlier_recipes():
    """Validation reads ``evaluate`` (which checkpoint is best, the calibration): changing
    it re-runs ST++'s training stages, which it used to skip with stale checkpoints. The
    sections a training never reads (``predict``, ``segment``, ``tune``, ``stpp``, the
    ``ingest`` settings but its chunk) no longer refuse a `cellst train` resume. A run
    recorded by recipe 2 is still recognised, and one of another training is not."""
    from cellst.experiment import load_config
    from cellst.fingerprint import VERSION
    from cellst.stpp.inputs import training_hash
    from cellst.train.trainer import config_hash, same_configuration

    base = load_config(None, ["store=s"])
    for changed in (
        "evaluate.iou_threshold=0.7",
        "evaluate.count_boundary=true",
        "ingest.chunk=128",
    ):
        cfg = load_config(None, ["store=s", changed])
        assert training_hash(cfg) != training_hash(base), changed
        assert config_hash(cfg) != config_hash(base), changed
    unread = [
        "predict.num_actors=3",
        "segment.min_size=5",
        "tune.num_samples=3",
        "stpp.reliable_fraction=0.25",
        "ingest.high_percentile=99",
        "name=other",
    ]
    for setting in unread:
        cfg = load_config(None, ["store=s", setting])
        assert config_hash(cfg) == config_hash(base), setting
        assert training_hash(cfg) == training_hash(base), setting
    # run.json of a run that cellst's recipe 2 fingerprinted (it counted `predict`)
    cfg = load_config(None, ["store=s", "predict.num_actors=3", "train.lr=0.02"])
    legacy = {"config_hash": config_fingerprint_v2(cfg), "fingerprint": 2}
    assert legacy["config_hash"] != config_hash(cfg)
    assert same_configuration(legacy, cfg) is True
    assert same_configuration(legacy, load_config(None, ["store=s", "train.lr=0.03"])) is False
    assert same_configuration({"config_hash": config_hash(cfg), "fingerprint": VERSION}, cfg)
    assert same_configuration({"config_hash": "0123", "fingerprint": 99}, cfg) is None


def config_fingerprint_v2(cfg) -> str:
    """What cellst's fingerprint recipe 2 wrote for `cellst train` (every section but
    ``tracking`` and the run-only ``train`` fields)."""
    from cellst.fingerprint import stable_hash

    data = cfg.model_dump(mode="json", exclude_defaults=True)
    data.pop("tracking", None)
    return stable_hash(data)


def test_strong_augmentation_counts_only_in_trainings_on_pseudo_labels():
    """The strong preset acts on pseudo-labelled crops alone, so its settings leave the
    fingerprint of a supervised training (ST++ stage 1, ``cellst train``) unchanged: an ST++
    variant with other strong augmentation re-runs the re-training stages, not stage 1."""
    from cellst.experiment import load_config
    from cellst.stpp.inputs import training_hash
    from cellst.train.trainer import config_hash

    base = load_config(None, ["store=s"])
    weak = load_config(None, ["store=s", "augment.cutout_prob=0", "augment.jitter_prob=0"])
    assert training_hash(weak) == training_hash(base) and config_hash(weak) == config_hash(base)
    # the standard preset's settings still count
    flips = load_config(None, ["store=s", "augment.flip_prob=0"])
    assert config_hash(flips) != config_hash(base)
    # and on pseudo-labels the strong ones do
    pseudo = ["store=s", "train.pseudo_set=p"]
    assert training_hash(load_config(None, [*pseudo, "augment.cutout_prob=0"])) != (
        training_hash(load_config(None, pseudo))
    )


def test_config_files_that_are_not_mappings_are_named(tmp_path):
    """A folder, a binary file, a document that is a scalar or a list: one error naming
    the file. An empty file, or an empty section, means the defaults."""
    folder = tmp_path / "cfgdir"
    folder.mkdir()
    with pytest.raises(ConfigError, match=f"config file {folder} is a folder, not a YAML file"):
        load_config(folder)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ConfigError, match=f"config file {binary} is not UTF-8 text"):
        load_config(binary)
    for doc in ("0", "false", "[]", "- a", "text"):
        path = tmp_path / "doc.yaml"
        path.write_text(doc + "\n")
        with pytest.raises(ConfigError, match="must hold a mapping of sections"):
            load_config(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    assert load_config(empty) == ExperimentConfig()
    section = tmp_path / "section.yaml"
    section.write_text("name: x\nevaluate:\n  # iou_threshold: 0.7\n")
    assert load_config(section).evaluate == ExperimentConfig().evaluate
    assert load_config(section, ["evaluate.count_boundary=true"]).evaluate.count_boundary


def test_set_keeps_the_text_of_names():
    """A '#' is text in --set, not a YAML comment; numbers and dates given to text fields
    stay the text they were."""
    assert load_config(None, ["name=run #2"]).name == "run #2"
    assert load_config(None, ["name=2024"]).name == "2024"
    assert load_config(None, ["train.run_name=2026-12-02"]).train.run_name == "2026-12-02"
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001  # numbers stay numbers
    with pytest.raises(ConfigError, match="must start with a letter or digit"):
        load_config(None, ["stpp.name=run #2"])  # refused whole, not cut to 'run'
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lr=[1,2"])
    assert len(str(err.value).splitlines()) == 1


def test_names_that_make_folders_cannot_leave_their_run_folder(tmp_path):
    """`name=../../x` trained into a folder outside train.run_dir: refused, naming the field;
    `cellst train --run-name a/b` too (exit 2). Spaces stay allowed."""
    from typer.testing import CliRunner

    from cellst.cli import app
    from cellst.config import ConfigError
    from cellst.experiment import load_config

    for bad in (
        "name=../../x",
        "name=a/b",
        "name=.hidden",
        "train.run_name=..",
        "train.run_name=a\\b",
    ):
        field = bad.split("=")[0]
        with pytest.raises(ConfigError, match=rf"{re.escape(field)}: must be a plain folder name"):
            load_config(None, [bad])
    assert load_config(None, ["name=my run", "train.run_name=run 1"]).name == "my run"
    yml = tmp_path / "exp.yaml"
    yml.write_text("name: x\n")
    res = CliRunner().invoke(app, ["train", str(yml), "--run-name", "../x", "--set", "store=/no"])
    assert res.exit_code == 2 and "--run-name" in res.output and "plain folder name" in res.output


def test_a_key_given_twice_in_a_config_file_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: the first setting was silently dropped."""
    from typer.testing import CliRunner

    from cellst.cli import app

    f = tmp_path / "exp.yaml"
    f.write_text("name: a\ntrain:\n  lr: 0.1\nname: b\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: key 'name' appears twice \(line 4\)$"):
        load_config(f)
    f.write_text("name: a\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")  # at any depth
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice \(line 5\)"):
        load_config(f)
    res = CliRunner().invoke(app, ["train", str(f)])
    assert res.exit_code == 2 and "key 'lr' appears twice (line 5)" in res.output
    f.write_text("name: a\ntrain:\n  lr: 0.1\n  epochs: 2\n")  # distinct keys still load
    assert load_config(f).train.lr == 0.1


def test_windows_per_forward_pass_change_no_fingerprint():
    """``inference.sw_batch_size`` changes speed only: a new one re-runs no ST++ stage,
    while the fingerprints of configs that never set it stay what they were recorded as."""
    from cellst.experiment import load_config
    from cellst.fingerprint import config_fingerprint, training_fingerprint
    from cellst.stpp.inputs import infer_inputs, training_hash
    from cellst.train.trainer import config_hash, same_configuration

    for sets, recorded in (
        ([], ("b834cb3acde81260", "44136fa355b3678a")),
        (["train.lr=0.01", "inference.roi=96"], ("732ac2edd6c7248d", "a8c52a5365d49d81")),
    ):
        cfg = load_config(None, ["store=s", *sets])
        assert (config_hash(cfg), training_hash(cfg)) == recorded
        fast = load_config(None, ["store=s", *sets, "inference.sw_batch_size=2"])
        assert (config_hash(fast), training_hash(fast), config_fingerprint(fast)) == (
            *recorded,
            recorded[0],
        )
        assert infer_inputs(fast.inference) == infer_inputs(cfg.inference)
        # recipes 2 and 3 (an earlier cellst's records) counted it, as they were recorded,
        # so a run recorded by recipe 3 with it set is still recognised (not trained anew)
        assert training_hash(fast, version=2) != training_hash(cfg, version=2)
        assert training_hash(fast, version=3) != training_hash(cfg, version=3)
        assert training_hash(cfg, version=3) == recorded[1]
        state = {"fingerprint": 3, "config_hash": training_fingerprint(fast, version=3)}
        assert same_configuration(state, fast) is True
        assert same_configuration(state, cfg) is False


def test_the_pseudo_label_share_is_no_input_of_a_training_without_pseudo_labels():
    """ST++'s stage 1 never reads ``train.pseudo_weight`` (no pseudo-label set), yet
    changing it re-trained stage 1 and everything after it, and the benchmark's variants
    lost their shared stage 1. Recipe 5 leaves it out there; a training with a set still
    counts it, and a run recorded by recipe 4 with it set is still recognised."""
    from cellst.experiment import load_config
    from cellst.fingerprint import training_fingerprint
    from cellst.stpp.inputs import training_hash
    from cellst.train.trainer import same_configuration

    plain = load_config(None, ["store=s"])
    share = load_config(None, ["store=s", "train.pseudo_weight=0.3"])
    assert training_hash(share) == training_hash(plain) == "44136fa355b3678a"
    assert training_fingerprint(share) == training_fingerprint(plain)
    assert training_hash(share, version=4) != training_hash(plain, version=4)
    with_set = load_config(None, ["store=s", "train.pseudo_set=p"])
    with_share = load_config(None, ["store=s", "train.pseudo_set=p", "train.pseudo_weight=0.3"])
    assert training_hash(with_set) != training_hash(with_share)
    state = {"fingerprint": 4, "config_hash": training_fingerprint(share, version=4)}
    assert same_configuration(state, share) is True
    assert same_configuration(state, plain) is False


@pytest.mark.parametrize("override", ["train.epochs=true", "model.width=false", "train.lr=true"])
def test_true_or_false_for_a_number_is_an_error(override):
    """pydantic's lax mode read true/false as 1/0: `--set train.epochs=true` trained one
    epoch, silently."""
    from cellst.experiment import load_config

    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: Input should be a number, not"):
        load_config(None, [override])


def test_yes_no_on_off_are_text_where_text_is_asked():
    """YAML 1.1 read `--set name=yes` (no, on, off) as a boolean, refused for a text field;
    only true/false are booleans now (YAML 1.2), and a boolean field still takes yes/no."""
    from cellst.experiment import load_config

    for word in ("yes", "no", "on", "off"):
        assert load_config(None, [f"name={word}"]).name == word
    assert load_config(None, ["train.amp=yes"]).train.amp is True
    assert load_config(None, ["train.amp=false"]).train.amp is False


def test_a_file_that_is_not_yaml_is_one_line_naming_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\ntrain:\n  lr: [0.1\n")
    with pytest.raises(ConfigError) as err:
        read_yaml(bad)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{bad}:4:1: not valid YAML ("), message


def test_an_empty_snapshot_list_says_it_is_empty():
    from cellst.experiment import load_config

    with pytest.raises(ConfigError, match=r"train.snapshot_fractions: .*at least one fraction"):
        load_config(None, ["train.snapshot_fractions=[]"])
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\], got \[1.5\]"):
        load_config(None, ["train.snapshot_fractions=[1.5]"])


def test_set_keeps_the_text_of_a_text_field_as_typed():
    """YAML reads `007` as 7, `0x1F` as 31 and `1:30` (sexagesimal) as 90: a text field
    set with --set took them silently (`store=010` became the folder `8`). Text fields keep
    what was typed; numbers and null stay YAML's."""
    from cellst.stpp.experiment import StppExperimentConfig

    c = load_config(
        None,
        ["name=007", "store=010", "train.run_name=1:30", "stpp.name=0x1F", "train.lr=1e-3"],
        model=StppExperimentConfig,
    )
    assert (c.name, c.store, c.train.run_name, c.stpp.name) == ("007", "010", "1:30", "0x1F")
    assert c.train.lr == 0.001
    assert load_config(None, ["tracking.tracking_uri=null"]).tracking.tracking_uri is None
