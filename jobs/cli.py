"""What every job's command line shares: the parser, the common flags, flags -> Config, and the
error exit (a message and exit status 2 for bad input or storage, never a traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable

from visual_search import catalog, embeddings, storage

# Errors any job reports as a message: the input, the storage or the arguments are wrong.
COMMON_ERRORS: tuple[type[BaseException], ...] = (
    catalog.CatalogError,
    embeddings.DatasetError,
    storage.StorageError,
    OSError,
    ValueError,
)


def parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)


def add_s3_endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--s3-endpoint", help=f"S3-compatible endpoint (or ${storage.ENDPOINT_ENV})")


def config(cls: type, args: argparse.Namespace, **overrides):
    """cls (a Config dataclass) from the flags of the same names (a flag left unset, None, keeps
    the field's default), then overrides."""
    given = vars(args)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {name: given[name] for name in names if given.get(name) is not None}
    return cls(**{**values, **overrides})


INDEX_ROOT_HELP = "index root URI (versions/, CURRENT)"


def add_index_root(p: argparse.ArgumentParser, help: str = INDEX_ROOT_HELP) -> None:
    p.add_argument("--index-root", required=True, help=help)


def exit_code(name: str, work: Callable[[], object], errors: tuple = (), log: bool = False) -> int:
    """Run work(); 0, or 2 with `[name] error: ...` on stderr for the expected errors. `log`:
    send INFO logging to stderr first (the jobs that report progress through logging)."""
    if log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        work()
    except (*errors, *COMMON_ERRORS) as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
