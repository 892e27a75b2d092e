"""Built-in evaluation tasks, one YAML file of :class:`TaskSpec` fields each, and :func:`load_task`.

A task's ``query`` and ``support`` are the arguments of its reader (a function of
:data:`interleaf.eval.readers.READERS`) for the evaluated split and for the split the
demonstrations come from. Paths in them may start with ``{root}``, the data root given to
:func:`load_task`: the built-in tasks expect the benchmarks in their standard layouts under
one root (each YAML says which files), the tiny-world tasks the directory written by
``interleaf data tinyworld``. A user adds a task by writing a YAML file of the same fields.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import yaml

from interleaf.config import from_dict
from interleaf.eval.readers import READERS
from interleaf.eval.task import Example, TaskSpec

TASK_DIR = Path(__file__).parent
TASKS = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
"""The names of the built-in tasks."""

ROOT = "{root}"
READER_ARGS = ("query", "support")


def load_task(
    name_or_path: str | Path, root: str | Path | None = None
) -> tuple[TaskSpec, list[Example], list[Example]]:
    """The task ``name_or_path`` (a built-in name or the path of a YAML file), with its support
    examples (demonstrations are drawn from them) and its query examples (the evaluated ones).

    ``root`` replaces ``{root}`` in the reader arguments; tasks that use it need it. A task
    without ``support`` has no support examples (0-shot only).
    """
    path = task_file(name_or_path)
    spec = parse_task(path)
    _check_root(spec, root, path)
    support = _read(spec, "support", root, path) if spec.support else []
    return spec, support, _read(spec, "query", root, path)


def task_file(name_or_path: str | Path) -> Path:
    """The YAML file of a built-in task name, or the given path of a task file."""
    if str(name_or_path) in TASKS:
        return TASK_DIR / f"{name_or_path}.yaml"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"task file {path} does not exist")
        return path
    raise ValueError(f"unknown task {str(name_or_path)!r}; built-in tasks: {', '.join(TASKS)} (or give a YAML file)")


def parse_task(path: Path) -> TaskSpec:
    """A :class:`TaskSpec` from a YAML file; unknown keys, a missing field, an unknown reader or
    reader arguments that do not fit the reader are errors that name them."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the task: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a task is a mapping of TaskSpec fields, got {type(data).__name__}")
    required = [f.name for f in dataclasses.fields(TaskSpec) if _required(f)] + ["query"]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{path}: missing field {missing[0]!r}")
    args = {key: data.pop(key) for key in READER_ARGS if key in data}
    spec = from_dict(TaskSpec, data, where=str(path))
    for key, value in args.items():
        if key == "support" and value == {}:
            continue  # no demonstrations: 0-shot only
        _check_reader_args(spec.reader, value, f"{path}: {key}")
    if spec.answer_mode == "rank" and spec.candidates == "fixed" and not spec.fixed_candidates:
        raise ValueError(f"{path}: candidates 'fixed' needs fixed_candidates")
    return dataclasses.replace(spec, **args)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_reader_args(reader: str, args: Any, where: str) -> None:
    if reader not in READERS:
        raise ValueError(f"{where}: unknown reader {reader!r}; known readers: {', '.join(READERS)}")
    if not isinstance(args, dict):
        raise ValueError(f"{where}: expected a mapping of {reader}() arguments, got {args!r}")
    try:
        inspect.signature(READERS[reader]).bind(**args)
    except TypeError as e:
        raise ValueError(f"{where}: arguments do not fit reader {reader!r}: {e}") from None


def _check_root(spec: TaskSpec, root: str | Path | None, path: Path) -> None:
    """A task whose files lie under ``{root}`` needs ``root``, an existing directory."""
    uses = [
        (f"{key}.{name}", value)
        for key in ("support", "query")  # in the order they are read
        for name, value in (getattr(spec, key) or {}).items()
        if ROOT in str(value)
    ]
    if not uses:
        return
    where, value = uses[0]
    if root is None or not str(root):
        raise ValueError(
            f"task {spec.name} needs --root, the directory holding its files "
            f"({path.name}: {where}: {value!r} lies under the data root; pass root)"
        )
    if not Path(root).is_dir():
        raise ValueError(f"task {spec.name}: the data root {str(root)!r} (--root) is not a directory")


def _read(spec: TaskSpec, key: str, root: str | Path | None, path: Path) -> list[Example]:
    """Run the reader on the ``key`` arguments, ``{root}`` filled in; check the template's fields."""
    args = {name: _fill_root(value, root, f"{path}: {key}.{name}") for name, value in getattr(spec, key).items()}
    examples = READERS[spec.reader](**args)
    _check_examples(spec, examples, f"{path}: {key}")
    return examples


def _fill_root(value: Any, root: str | Path | None, where: str) -> Any:
    if isinstance(value, list):
        return [_fill_root(v, root, where) for v in value]
    if not isinstance(value, str) or ROOT not in value:
        return value
    if root is None:
        raise ValueError(f"{where}: {value!r} lies under the data root; pass root (the directory holding the files)")
    return value.replace(ROOT, str(root))


def _check_examples(spec: TaskSpec, examples: list[Example], where: str) -> None:
    """Every example fills the template; ranking over options needs options."""
    for example in examples:
        missing = spec.fields - set(example.fields)
        if missing:
            raise ValueError(f"{where}: example {example.id!r} lacks template field(s) {sorted(missing)}")
        if spec.answer_mode == "rank" and spec.candidates == "options" and not example.options:
            raise ValueError(f"{where}: example {example.id!r} has no options to rank")
