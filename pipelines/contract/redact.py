"""Keeping credentials out of everything we write: manifests, plans, summaries, checkpoints, logs.

Users may pass keys in ``--storage-options`` (or inside a URL's user-info). Those values are
needed in memory to reach the store and nowhere else. Two mechanisms:

- :func:`redact` returns a copy of a config, options mapping or URL with secrets replaced, for
  anything we persist or print on purpose;
- :func:`remember` records the secret values a process was given, and :class:`SecretFilter`
  (installed on the root logger's handlers) masks them in every log line, including exception
  texts from libraries we do not control.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping

MASK = "***"
# Option names whose values are credentials (fsspec/s3fs, botocore, polars/object_store, gcsfs, adlfs).
_SECRET_NAME = re.compile(
    r"(secret|token|password|passwd|credential|private_key|access_key|account_key|(^|_)sas(_|$)|(^|_)key$)", re.I
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_known: set[str] = set()
_lock = threading.Lock()


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name)))


def redact_url(url: str) -> str:
    """``s3://AKIA:secret@bucket/x`` -> ``s3://***@bucket/x``; other URLs unchanged."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", url)


def redact(value):
    """A copy of ``value`` (mapping, list, string, scalar) with credentials masked: values under
    secret-looking keys, URL user-info, and any value :func:`remember` was told about."""
    if isinstance(value, Mapping):
        return {k: (MASK if is_secret_name(k) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return mask_known(redact_url(value))
    return value


def _secret_values(options) -> list[str]:
    out = []
    if isinstance(options, Mapping):
        for k, v in options.items():
            if is_secret_name(k) and isinstance(v, str) and v:
                out.append(v)
            else:
                out.extend(_secret_values(v))
    elif isinstance(options, (list, tuple)):
        for v in options:
            out.extend(_secret_values(v))
    elif isinstance(options, str):
        out.extend(m["userinfo"] for m in _URL_USERINFO.finditer(options))
    return out


def remember(options) -> None:
    """Record the secrets inside storage options (or a URL) so that logs mask them."""
    values = [v for v in _secret_values(options) if len(v) >= 4]
    if values:
        with _lock:
            _known.update(values)
        install_log_filter()


def mask_known(text: str) -> str:
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for v in known:
        if v in text:
            text = text.replace(v, MASK)
    return text


class SecretFilter(logging.Filter):
    """Masks remembered secrets in a record's final text (message, arguments and traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _known:
            return True
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = mask_known(text), None
        if record.exc_text:
            record.exc_text = mask_known(record.exc_text)
        return True


_filter = SecretFilter()


def install_log_filter() -> None:
    """Put the filter on the root logger's handlers: every record that is written passes one of them
    (a filter on a logger would not see its children's records). Called by each job once logging is
    configured, and again whenever a secret is remembered, so later handlers are covered too."""
    for handler in logging.getLogger().handlers:
        if _filter not in handler.filters:
            handler.addFilter(_filter)
