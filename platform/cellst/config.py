"""Experiment configuration: pydantic models loaded from YAML plus ``--set key=value`` overrides.

Every command reads one :class:`cellst.experiment.ExperimentConfig`. Sections that a command does not use
keep their defaults, so one YAML file can describe a whole experiment. Validation errors
are re-raised as :class:`ConfigError` whose message names each field's dotted path.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

M = TypeVar("M", bound=BaseModel)


#: names that become folder names (experiments, pipelines, sweeps, pseudo-label sets)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(value: str | None) -> str | None:
    """``value`` if it can name a folder (:data:`NAME_RE`), else ``ValueError`` (a pydantic
    field validator's message)."""
    if value is not None and not NAME_RE.match(value):
        raise ValueError(
            f"must start with a letter or digit and hold only letters, digits, '.', '_' "
            f"and '-', got {value!r}"
        )
    return value


def check_folder_name(value: str | None) -> str | None:
    """``value`` if it names one folder inside another (no ``/`` or ``\\``, not ``.``,
    ``..`` or hidden), else ``ValueError``: a run or experiment name never writes outside
    its run folder. Looser than :func:`check_name` (spaces are kept)."""
    if value is not None and (
        "/" in value or "\\" in value or value.startswith(".") or not value.strip()
    ):
        raise ValueError(
            f"must be a plain folder name (no '/', not starting with '.'), got {value!r}"
        )
    return value


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field path."""


def _non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    """The first ``(dotted path, value)`` of a NaN or infinite float inside ``value``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, BaseModel):
        items: Iterable[tuple[Any, Any]] = (
            (k, getattr(value, k)) for k in type(value).model_fields
        )
    elif isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        items = enumerate(value)
    else:
        return None
    for key, sub in items:
        found = _non_finite(sub, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _numbers_only(annotation: Any) -> bool:
    """Whether a field takes numbers and nothing else (``int``, ``float``, optionally
    ``None``): true or false given there is a mistake, not 1 or 0."""
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
    else:
        kinds = [annotation]
    return bool(kinds) and all(k in (int, float) for k in kinds)


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated, and
    NaN or infinite numbers are refused in every field (``lr=inf`` would train nothing).

    ``allow_inf_nan=False`` covers the float fields of every ``Section``, also built on
    its own (a checkpoint's post-processing, a sweep trial's inference settings); the ``*``
    validator also covers untyped values (``Any``, lists of choices), naming the nested
    field that holds the number.
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
        coerce_numbers_to_str=True,  # `--set name=2024` names a run "2024"
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true/false as 1/0 for a number field:
        # `--set train.epochs=true` trained one epoch
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            if _numbers_only(cls.model_fields[info.field_name].annotation):
                raise PydanticCustomError(
                    "number_type",
                    "Input should be a number, not {value}",
                    {"value": str(value).lower()},
                )
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _finite_everywhere(cls, value: Any) -> Any:
        found = _non_finite(value)
        if found is not None:
            sub, number = found
            raise PydanticCustomError(
                "finite_number",
                "Input should be a finite number",
                {"subpath": sub, "number": repr(number)},
            )
        return value


class IngestConfig(Section):
    """How source images become the uint8 store (challenge baseline normalisation)."""

    low_percentile: float = Field(
        1.0, ge=0, lt=100, description="lower percentile of non-zero pixels"
    )
    high_percentile: float = Field(
        99.0, gt=0, le=100, description="upper percentile of non-zero pixels"
    )
    chunk: int = Field(256, ge=32, le=4096, description="zarr chunk side in pixels")
    compression_level: int = Field(1, ge=0, le=22, description="zstd level of stored arrays")
    max_pixels: int = Field(
        100_000_000,
        ge=1,
        description="refuse images whose header declares more pixels (height x width) than "
        "this, before decoding them (a 100000 x 100000 TIFF would need ~10 GB per channel)",
    )
    min_side: int = Field(
        8, ge=1, description="refuse images whose height or width is below this many pixels"
    )
    tiled_pixels: int = Field(
        16_777_216,
        ge=1,
        description="TIFFs with more pixels than this (height x width) are read and "
        "normalised band by band, so ingest memory stays bounded",
    )

    @model_validator(mode="after")
    def _ordered(self) -> IngestConfig:
        if self.low_percentile >= self.high_percentile:
            raise ValueError(
                f"low_percentile ({self.low_percentile}) must be below high_percentile "
                f"({self.high_percentile})"
            )
        return self


class DataConfig(Section):
    """The training stream: random crops sampled from the store."""

    crop_size: int = Field(
        256, ge=32, multiple_of=32, description="side of square training crops; multiple of 32"
    )
    crops_per_epoch: int = Field(512, ge=1, description="crops drawn per epoch (all workers)")
    crops_per_visit: int = Field(
        4, ge=1, le=64, description="crops cut from one region read (amortises zarr decoding)"
    )
    balance_by: Literal["none", "modality"] = Field(
        "modality", description="sample items so every modality gets equal weight"
    )
    val_fraction: float = Field(
        0.15, ge=0, lt=1, description="labelled items held out for validation"
    )
    seed: int = Field(
        0, description="picks the validation items: the same seed holds out the same ones"
    )


class EvaluateConfig(Section):
    """The challenge metric."""

    iou_threshold: float = Field(0.5, gt=0, le=1)
    count_boundary: bool = Field(False, description="keep cells touching the 2-px image border")


def _format_errors(err: ValidationError, source: str) -> str:
    return "\n".join([f"invalid configuration ({source}):", *(f"  {x}" for x in field_errors(err))])


def field_errors(err: ValidationError, prefix: str = "") -> list[str]:
    """One ``path.of.field: reason (got value)`` line per error of ``err``, each path
    preceded by ``prefix`` (e.g. ``"model."`` for a checkpoint's model section)."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        ctx = e.get("ctx") or {}
        if e["type"] == "finite_number" and ctx.get("subpath"):
            loc.append(ctx["subpath"])  # a non-finite number deep inside a nested model
        path = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":  # our own validators' words, as they wrote them
            msg = msg.removeprefix("Value error, ")
        got = e.get("input")
        if "number" in ctx:
            got = float(ctx["number"])
        quiet = e["type"] == "extra_forbidden" or isinstance(got, dict) or "got " in msg
        shown = "" if quiet else f" (got {got!r})"
        lines.append(f"{path}: {msg}{shown}")
    return lines


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice (PyYAML would keep the last silently)."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(None, None, f"key {key!r} appears twice (line {line})")
        self.key, self.line = key, line

    def __str__(self) -> str:
        return str(self.problem)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader without implicit dates: ``run_name: 2026-12-02`` stays the text
    it is (a config holds no date fields, and a date is no valid name), and that refuses a
    key given twice in one mapping, at any depth (:class:`DuplicateKeyError`)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: merged keys may be overridden
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:  # an unhashable key: the constructor says so below
                    continue
                if dup:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


#: YAML 1.2's booleans only: `--set name=yes` (or no, on, off) is text, not true/false
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, _BOOL if tag == "tag:yaml.org,2002:bool" else rx)
        for tag, rx in resolvers
        if tag != "tag:yaml.org,2002:timestamp"
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value.

    >>> parse_override("train.lr=0.001")
    (['train', 'lr'], 0.001)
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"override {text!r}: value is not valid YAML ({first})") from None
    if (value is None or isinstance(value, str)) and re.search(r"\s#", raw):
        value = raw.strip()  # `name=run #2`: text, not a YAML comment that drops "#2"
    return key.split("."), value


def key_path(path: list[str], model: type[BaseModel] | None) -> list[str]:
    """``path`` as keys of ``model``'s nested data: past a field that is a mapping (such as
    ``tune.space``, whose keys are dotted field names) the rest of the path is one key.

    >>> from cellst.experiment import ExperimentConfig
    >>> key_path("tune.space.train.lr".split("."), ExperimentConfig)
    ['tune', 'space', 'train.lr']
    """
    import typing

    for i, part in enumerate(path[:-1]):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return path
        ann = field.annotation
        if typing.get_origin(ann) is dict:
            return [*path[: i + 1], ".".join(path[i + 1 :])]
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return path


def _text_field(path: list[str], model: type[BaseModel] | None) -> bool:
    """Whether ``path`` names a text field of ``model`` (``str`` or ``str | None``), whose
    ``--set`` value is kept as typed: YAML reads ``007`` as 7, ``0x1F`` as 31 and ``1:30``
    as 90, which a text field then took silently (``store=010`` became the folder ``8``)."""
    import types
    import typing

    for part in path[:-1]:
        field = model.model_fields.get(part) if model is not None else None
        ann = field.annotation if field is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    field = model.model_fields.get(path[-1]) if model is not None else None
    if field is None:
        return False
    ann = field.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args == [str]
    return ann is str


def apply_overrides(
    data: Mapping[str, Any], overrides: Iterable[str], model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.path=value`` override applied; with the
    ``model`` the data is for, a path into a mapping field keeps its dotted key whole
    (:func:`key_path`)."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    set_by: dict[str, str] = {}  # dotted path -> the override that set it
    for text in overrides:
        path, value = parse_override(text)
        path = key_path(path, model)
        if not isinstance(value, str) and value is not None and _text_field(path, model):
            value = text.split("=", 1)[1].strip()  # `name=007`: YAML read 7; `1:30` was 90
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                where = ".".join(path[: i + 1])
                culprit = set_by.get(where)
                raise ConfigError(
                    f"override {culprit!r} sets {where}, a section, to a value: set its "
                    f"fields ({text!r} is one)"
                    if culprit
                    else f"override {text!r}: {where} is a value, not a section"
                )
            node = nxt
        node[path[-1]] = value
        set_by[".".join(path)] = text
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = _load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
            f"{exc.start}); is it a YAML file?"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read ({exc.strerror})") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(p, exc)) from None
    if data is None:  # an empty file, or only comments: every default
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line for a file that is not valid YAML: ``FILE:LINE:COLUMN: what is wrong``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(
        str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part
    )
    return f"{where}: not valid YAML ({what or str(exc).splitlines()[0]})"


def load_yaml_config(path: str | Path | None, overrides: Iterable[str], model: type[M]) -> M:
    """Load ``path`` (optional) into ``model``, apply overrides and validate.

    The generic loader of every configuration model; :func:`cellst.experiment.load_config`
    is the one commands use (an experiment by default).

    Raises
    ------
    ConfigError
        With one line per invalid field, each naming the field's dotted path.
    """
    overrides = list(overrides)
    data = read_yaml(path) if path is not None else {}
    for key, field in model.model_fields.items():  # `evaluate:` left empty: its defaults
        ann = field.annotation
        if data.get(key, {}) is None and isinstance(ann, type) and issubclass(ann, BaseModel):
            data[key] = {}
    data = apply_overrides(data, overrides, model)
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " + --set " + " ".join(overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved configuration as YAML (what was actually run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
