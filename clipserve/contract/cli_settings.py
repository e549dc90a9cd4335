"""One configuration convention for the command lines: a typed pydantic-settings class per command
is its flags, its environment variables and its `--help`, listed once.

A field `max_wait_ms` of a class whose `env_prefix` is `CLIPSERVE_` is the flag `--max-wait-ms` and
the environment variable `CLIPSERVE_MAX_WAIT_MS`; a bool field is `--x` / `--no-x`. Where one value
is given several ways, the later wins: the field's default, an options file (for a class that names
one, `options_file`), the environment, the flags. A bad value is a `SettingsError` whose message is
one line naming the flag, variable or file it came from.

Only pydantic and pydantic-settings: the service, the exporter and training all use it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BeforeValidator, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as EnvParseError


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line that says which and why."""


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may keep busy: its affinity mask (a container's cpuset), capped by a cgroup
    CPU quota, which the mask does not show (a container's `--cpus`, a Kubernetes CPU limit: without
    the cap, a pod limited to 2 cores on a 64-core node would start 64 threads per pool). cgroup v2's
    `cpu.max`, else v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`; at least 1."""
    cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    quota: str | int
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text()
        except (OSError, ValueError):
            return cores
    if quota in ("max", -1):
        return cores
    try:
        return max(1, min(cores, int(int(quota) / int(period))))
    except (ValueError, ZeroDivisionError):
        return cores


def split_list(value: object) -> object:
    """A list from the command line or the environment: JSON (`["a","b"]`) or comma-separated (`a,b`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


T = TypeVar("T")
# A list field given as `a,b` or as JSON; NoDecode leaves the splitting to split_list.
CommaList = Annotated[list[T], NoDecode, BeforeValidator(split_list)]


class CliSettings(BaseSettings):
    """Base of every command's settings. Subclasses set `env_prefix` in their `model_config`."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    # The field naming a YAML or JSON file of options (keys: the field or flag names), if any.
    options_file: ClassVar[str | None] = None

    @classmethod
    def env_name(cls, field: str) -> str:
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @staticmethod
    def flag(field: str) -> str:
        return "--" + field.replace("_", "-")


S = TypeVar("S", bound=CliSettings)


class _Parser(argparse.ArgumentParser):
    """argparse that raises SettingsError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise SettingsError(f"{message} (see {self.prog} --help)")


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; other annotations as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _is_switch(info: FieldInfo) -> bool:
    return _unwrap(info.annotation) is bool


_METAVARS = {int: "N", float: "NUMBER", Path: "PATH", str: "TEXT"}


def _metavar(info: FieldInfo) -> str:
    annotation = _unwrap(info.annotation)
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(str(choice) for choice in typing.get_args(annotation)) + "}"
    if typing.get_origin(annotation) is list:
        return "A,B,..."
    return _METAVARS.get(annotation, "VALUE")


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value) or "empty"
    return str(value)


def _help(cls: type[CliSettings], name: str, info: FieldInfo) -> str:
    if info.is_required():
        default = "required"
    else:
        default = "default: " + _shown(info.get_default(call_default_factory=True))
    text = f"{info.description} " if info.description else ""
    # argparse expands %-formats in help texts
    return f"{text}[{default}; env {cls.env_name(name)}]".replace("%", "%%")


def build_parser(
    cls: type[CliSettings], prog: str, description: str | None = None, epilog: str | None = None
) -> argparse.ArgumentParser:
    """The flags of `cls`: one per field."""
    note = f"Every option is also an environment variable {cls.env_name('')}<OPTION>; flags win over it."
    parser = _Parser(
        prog=prog,
        usage=f"{prog} [options]",
        description=description,
        epilog=f"{epilog}\n\n{note}" if epilog else note,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for name, info in cls.model_fields.items():
        if _is_switch(info):
            parser.add_argument(
                cls.flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_help(cls, name, info),
            )
        else:
            parser.add_argument(
                cls.flag(name), dest=name, default=None, metavar=_metavar(info), help=_help(cls, name, info)
            )
    return parser


def read_options_file(cls: type[CliSettings], path: Path) -> dict[str, Any]:
    """Options from a YAML (.yaml, .yml) or JSON file: a mapping of field or flag names to values."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SettingsError(f"options file {path} does not exist") from None
    except OSError as exc:
        raise SettingsError(f"cannot read options file {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError both derive from it
        raise SettingsError(f"options file {path} is not valid: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"options file {path} must hold a mapping of option names to values")
    options = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(options) - set(cls.model_fields) - {cls.options_file})
    if unknown:
        raise SettingsError(f"unknown option(s) in {path}: {unknown}")
    options.pop(cls.options_file, None)
    return options


def _environment_names() -> set[str]:
    return {key.upper() for key in os.environ}


def _describe(exc: ValidationError, cls: type[CliSettings], origin: Mapping[str, str]) -> str:
    """The first error of `exc` as one line, naming where the value came from."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    field = str(first["loc"][0]) if first["loc"] else None
    if field is None or field not in cls.model_fields:
        line = message
    else:
        where = origin.get(field) or (
            cls.env_name(field) if cls.env_name(field) in _environment_names() else cls.flag(field)
        )
        if first["type"] == "missing":
            description = cls.model_fields[field].description
            line = f"{where} is required" + (f": {description}" if description else "")
        else:
            line = f"{where}: {message} (got {first['input']!r})"
    more = len(errors) - 1
    return line + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def validated(cls: type[S], values: Mapping[str, Any], origin: Mapping[str, str] | None = None) -> S:
    """`cls(**values)` (the environment fills in what `values` leaves out), a bad value raised as a
    one-line SettingsError."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, cls, origin or {})) from None
    except EnvParseError as exc:
        raise SettingsError(str(exc)) from None


def load_settings(
    cls: type[S],
    argv: Sequence[str] | None,
    prog: str,
    description: str | None = None,
    epilog: str | None = None,
) -> S:
    """The settings of one command: its flags (`argv`; None reads sys.argv), the environment and, for
    a class with an options file, that file. `--help` prints every option and exits."""
    parser = build_parser(cls, prog, description, epilog)
    given = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    flags = {key: value for key, value in given.items() if value is not None}
    origin = {key: cls.flag(key) for key in flags}
    in_env = {name for name in cls.model_fields if cls.env_name(name) in _environment_names()}
    from_file: dict[str, Any] = {}
    if cls.options_file is not None:
        path = flags.get(cls.options_file) or os.environ.get(cls.env_name(cls.options_file))
        if path:
            # the environment outranks the file: its keys are left to it
            from_file = {
                key: value for key, value in read_options_file(cls, Path(path)).items() if key not in in_env
            }
            for key in from_file:
                origin.setdefault(key, f"{key} in {path}")
    return validated(cls, {**from_file, **flags}, origin)
