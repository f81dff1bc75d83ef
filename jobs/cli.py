"""One small helper so every job's CLI is generated from its typed dataclass config.

Field help comes from ``field(metadata={"help": ...})``; defaults and types come from the
dataclass, so ``--help`` always tells the truth about what the job will do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Sequence
from typing import NoReturn, TypeVar

from pipelines.contract.redact import install_log_filter, redact, redact_url
from pipelines.contract.storage import exists, filesystem

T = TypeVar("T")


def _arg_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _arg_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Build an argparse parser from dataclass ``cls`` and return the parsed config."""
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip())
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        tp, is_list = _arg_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):  # a required operand, e.g. the files a job compares
            parser.add_argument(f.name, type=tp, help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kwargs = dict(default=default, help=f"{help_text} (default: {default})")
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if is_list:
            kwargs.update(nargs="+", type=tp)
        else:
            kwargs["type"] = tp
        parser.add_argument(*flags, dest=f.name, **kwargs)
    ns = parser.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is tuple and values[f.name] is not None:
            values[f.name] = tuple(values[f.name])
    return cls(**values)


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines with a time stamp; credentials a job was given are masked in every line."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("aiobotocore.credentials").setLevel(logging.WARNING)  # one line per S3 client otherwise
    install_log_filter()


class UsageError(Exception):
    """A user mistake (bad flag value, unreadable options file): one line on stderr, exit code 2."""


def fail(message: object) -> NoReturn:
    print(f"error: {redact(str(message))}", file=sys.stderr)
    sys.exit(2)


def storage_options(text: str) -> dict:
    """``--storage-options``: inline JSON, or ``@FILE`` holding JSON. The file form keeps keys off
    the command line, which process listings, ``ray job list`` and the Ray dashboard show."""
    source = "--storage-options"
    if text.startswith("@"):
        source = text[1:]
        try:
            with open(source) as f:
                text = f.read(1 << 20)
        except OSError as e:
            raise UsageError(f"cannot read storage options from {source}: {e.strerror or e}") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{source} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{source} must be a JSON object, not {type(value).__name__}")
    return value


def require_files(storage: dict, *flags: tuple[str, str | None]) -> None:
    """A :class:`UsageError` for the first (flag, URL) whose file is certainly not there, found
    before the slow part of a job (Ray's start, indexing the input). A store this machine cannot
    ask (no credentials here, a protocol without its package) is left to the loader's own error."""
    for flag, url in flags:
        if not url:
            continue
        try:
            missing = not exists(*filesystem(url, storage))
        except Exception:  # noqa: BLE001 - a pre-flight check only; loading reports the real error
            missing = False
        if missing:
            raise UsageError(f"{flag} {redact_url(url)} does not exist")
