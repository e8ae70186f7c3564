"""Manifests: frozen dataclasses written last (they mark a dataset or version complete)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from visual_search import __version__, storage

EMBEDDINGS_FORMAT = 1


def code_version() -> dict:
    """Package version, plus the git commit when running from a checkout."""
    out = {"package": __version__}
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if sha.returncode == 0:
            out["git"] = sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


class _JsonManifest:
    """manifest.json in and out; subclasses set FORMAT / KIND and rebuild nested records."""

    FORMAT: int
    KIND: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def _records(cls, d: dict) -> dict:
        return d

    @classmethod
    def from_dict(cls, d: dict):
        if d.get("format_version") != cls.FORMAT:
            raise ValueError(f"unsupported {cls.KIND} format_version {d.get('format_version')!r}")
        return cls(**cls._records(dict(d)))

    def write(self, root: str) -> None:
        storage.write_json(storage.join(root, "manifest.json"), self.to_dict())

    @classmethod
    def read(cls, root: str):
        return cls.from_dict(storage.read_json(storage.join(root, "manifest.json")))


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the dataset root
    rows: int


@dataclass(frozen=True)
class EmbeddingsManifest(_JsonManifest):
    FORMAT = EMBEDDINGS_FORMAT
    KIND = "embeddings"

    model: dict  # model_id, weights, dim, preprocess
    catalog: dict  # uri, kind, fingerprint, rows, metadata_columns
    counts: dict  # input, embedded, errors, errors_by_code
    partition_size: int
    embeddings: list[FileRecord]
    errors: list[FileRecord]
    timings: dict
    code_version: dict = field(default_factory=code_version)
    format_version: int = EMBEDDINGS_FORMAT

    @property
    def dim(self) -> int:
        return int(self.model["dim"])

    @classmethod
    def _records(cls, d: dict) -> dict:
        d["embeddings"] = [FileRecord(**r) for r in d["embeddings"]]
        d["errors"] = [FileRecord(**r) for r in d["errors"]]
        return d


INDEX_FORMAT = 1
# A file a manifest names: a relative path inside its version folder, nothing that climbs out.
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_relative(path: str, what: str = "file") -> str:
    """`path` when it is a plain relative path (a/b.ext parts; no "..", no absolute path, no
    scheme or backslash), else ValueError naming it."""
    parts = path.split("/") if isinstance(path, str) else [""]
    # Each part starts with a letter or digit: "..", "" (a leading "/") and "s3:" never match.
    if not all(_PART.fullmatch(p) for p in parts) or len(path) > 512:
        raise ValueError(f"manifest {what} {path!r} is not a relative path inside the version")
    return path


@dataclass(frozen=True)
class ShardRecord:
    file: str  # relative to the version folder
    sha256: str
    count: int
    bytes: int
    id_range: tuple[int, int]  # [first, last + 1) of the global ids it holds
    docs: str  # its docs Parquet file, relative to the version folder

    def __post_init__(self):
        check_relative(self.file, "shard file")
        check_relative(self.docs, "docs file")


@dataclass(frozen=True)
class IndexManifest(_JsonManifest):
    FORMAT = INDEX_FORMAT
    KIND = "index"

    version: str
    created_unix: float
    model: dict  # from the embeddings manifest: model_id, weights, dim, preprocess
    dim: int
    metric: str  # "ip" or "l2"
    factory: str
    search_params: dict  # e.g. {"nprobe": 16}
    shards: list[ShardRecord]
    count: int
    recall: dict  # recall_at_10, target, queries, method
    embeddings: dict  # uri, catalog fingerprint, counts
    timings: dict
    code_version: dict = field(default_factory=code_version)
    format_version: int = INDEX_FORMAT
    # {column: "string" | "number"}: what filter= accepts (None: versions built before filters)
    filterable: dict | None = None
    # {"columns", "shards": [fulltext.build_shard_from_docs records]}: BM25 per shard, or None
    text: dict | None = None
    # texttower.build's record: the semantic text tower's file, training and tuned fusion
    # weights, or {"skipped": why}; None: not built
    text_tower: dict | None = None
    # {"file", "sha256"}: the trained, empty index every shard was filled from (None: older)
    template: dict | None = None
    # {"seq", "segment"}: the update log (updates.py) folded in; the service applies the rest
    updates_through: dict | None = None

    @classmethod
    def _records(cls, d: dict) -> dict:
        d["shards"] = [ShardRecord(**{**r, "id_range": tuple(r["id_range"])}) for r in d["shards"]]
        return d
