"""A change feed's files and what of them is in the update log (jobs/stream.py's input side).

Files: CSV with a header `op,product_id,image_uri[,metadata columns...]`; each record becomes a
`Row`, or an error row when it cannot become an update. Checkpoint: `FeedState`, at
`{index_root}/updates/feeds/{feed key}.json`; error records under
`{index_root}/updates/errors/{feed key}/`. The rules for producers are in jobs/stream.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
from dataclasses import dataclass, field

from visual_search import storage, updates
from visual_search.updates import DELETE, UPSERT, Position

HEADER = ("op", "product_id", "image_uri")
DETAIL_MAX = 500  # characters of an error's detail that are kept


class FeedError(ValueError):
    """A feed checkpoint that cannot be read."""


@dataclass(frozen=True)
class Row:
    """One feed record; `error` set when it cannot become an update (malformed, bad image)."""

    file: str
    row: int
    op: str = ""
    product_id: str = ""
    image_uri: str | None = None
    metadata: dict = field(default_factory=dict)
    error: str | None = None
    detail: str | None = None

    @property
    def source(self) -> str:
        return f"feed:{self.file}#{self.row}"


def parse_source(source: str | None) -> tuple[str, int] | None:
    """`feed:<file>#<row>` -> (file, row); None for updates from elsewhere."""
    if not source or not source.startswith("feed:"):
        return None
    name, _, row = source[len("feed:") :].rpartition("#")
    return (name, int(row)) if name and row.isdigit() else None


def parse_file(name: str, uri: str, data: bytes, numbers: frozenset = frozenset()) -> list[Row]:
    """A landed file's rows; what cannot be read becomes error rows (row 0: the whole file)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [Row(name, 0, error="bad_file", detail=f"not UTF-8: {exc}"[:DETAIL_MAX])]
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        _check_header(header)
    except (csv.Error, ValueError) as exc:
        return [Row(name, 0, error="bad_header", detail=str(exc)[:DETAIL_MAX])]
    base, out, n = storage.parent(uri), [], 0
    try:
        for n, record in enumerate(reader, start=1):
            if record:  # a blank line keeps its number but is no row
                out.append(_parse_record(name, n, header, record, base, numbers))
    except csv.Error as exc:  # the reader cannot go on: the rest of the file is one error
        out.append(Row(name, n + 1, error="malformed_row", detail=str(exc)[:DETAIL_MAX]))
    return out


def _check_header(header: list[str]) -> None:
    if tuple(header[:3]) != HEADER:
        raise ValueError(f"header must start with {','.join(HEADER)}, got {header[:3]}")
    extra = header[3:]
    bad = [c for c in extra if not c or c in updates.RESERVED or c in HEADER]
    if bad or len(set(extra)) != len(extra):
        raise ValueError(f"metadata columns must be named, unique and not reserved: {extra}")


def _parse_record(name, n, header, record, base, numbers) -> Row:
    if len(record) != len(header):
        detail = f"{len(record)} fields, the header has {len(header)}"
        return Row(name, n, error="malformed_row", detail=detail)
    op, pid, uri = (v.strip() for v in record[:3])
    if op not in (UPSERT, DELETE) or not pid or (op == UPSERT and not uri):
        detail = f"need op upsert|delete, a product_id and (upsert) an image_uri: {record[:3]}"
        return Row(name, n, error="malformed_row", detail=detail[:DETAIL_MAX])
    try:
        meta = _metadata(header[3:], record[3:], numbers)
    except ValueError as exc:
        return Row(name, n, op, pid, error="bad_metadata", detail=str(exc)[:DETAIL_MAX])
    uri = _absolute(base, uri) if op == UPSERT else None
    return Row(name, n, op, pid, uri, meta)


def _metadata(columns: list[str], values: list[str], numbers: frozenset) -> dict:
    out: dict = {}
    for col, value in zip(columns, values, strict=True):
        if value == "":
            continue
        out[col] = float(value) if col in numbers else value
    return out


def _absolute(base: str, uri: str) -> str:
    """Image URIs as the catalog has them: absolute, or relative to the file's folder."""
    return uri if "://" in uri or uri.startswith("/") else storage.join(base, uri)


def list_feed(feed: str) -> dict[str, int]:
    """{file name below the feed: size} of the landed CSV files, in name order."""
    base = storage.normalize(feed)
    out = {}
    for e in storage.list_files(feed, (".csv",)):
        name = e.uri[len(base) :].lstrip("/")
        if not any(part.startswith((".", "_")) for part in name.split("/")):
            out[name] = e.size
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------ where the feed is


def feed_key(feed: str) -> str:
    return hashlib.sha256(storage.normalize(feed).encode()).hexdigest()[:16]


def checkpoint_uri(index_root: str, feed: str) -> str:
    return storage.join(updates.log_root(index_root), "feeds", f"{feed_key(feed)}.json")


def error_uri(index_root: str, feed: str, file: str, row: int) -> str:
    root = storage.join(updates.log_root(index_root), "errors", feed_key(feed))
    return storage.join(root, file, f"{row:08d}.json")


def _ranges(rows: set[int]) -> list[list[int]]:
    """{1, 2, 3, 7} -> [[1, 3], [7, 7]]: a checkpoint stays small however long a file is."""
    out: list[list[int]] = []
    for r in sorted(rows):
        if out and out[-1][1] == r - 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return out


def _expand(ranges: list[list[int]]) -> set[int]:
    return {r for lo, hi in ranges for r in range(lo, hi + 1)}


@dataclass
class FeedState:
    """What of the feed is in the log: files done (name -> size read), rows handled in the
    others, and the log position this reflects."""

    position: Position = Position()
    done: dict[str, int] = field(default_factory=dict)
    handled: dict[str, set[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, index_root: str, feed: str) -> FeedState:
        """The checkpoint, then every later log segment's rows of this feed."""
        uri = checkpoint_uri(index_root, feed)
        d = storage.read_json(uri) if storage.exists(uri) else {}
        try:
            state = cls(
                Position.of(d.get("position")),
                dict(d.get("done", {})),
                {k: _expand(v) for k, v in d.get("partial", {}).items()},
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise FeedError(f"{uri}: malformed checkpoint: {exc}") from exc
        for pos, found in updates.follow(index_root, state.position):
            for u in found:
                if (src := parse_source(u.source)) and src[0] not in state.done:
                    state.handled.setdefault(src[0], set()).add(src[1])
            state.position = pos
        return state

    def save(self, index_root: str, feed: str) -> None:
        partial = {k: _ranges(v) for k, v in self.handled.items() if k not in self.done and v}
        body = {
            "feed": storage.normalize(feed),
            "position": self.position.as_dict(),
            "done": self.done,
            "partial": partial,
            "updated_unix": time.time(),
        }
        storage.write_json(checkpoint_uri(index_root, feed), body)
