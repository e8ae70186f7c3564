"""Per-shard full-text (BM25, bm25s) index over the docs' title and string metadata columns.

Tokens: NFKC + lower case, runs of letters/digits, English stop words dropped, Snowball
(PyStemmer) English stems. Scores are Lucene BM25 (k1=1.5, b=0.75), keyed by the docs' global
`id`. A saved index is a folder of plain files (bm25s arrays, `ids.npy`, `meta.json`), each
written atomically; it is memory-mapped when loaded from a local folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata

import bm25s
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

from visual_search import storage
from visual_search.manifest import check_relative

MAX_QUERY_CHARS = 500
K1, B = 1.5, 0.75
# A doc matches words (a words filter, TextIndex.matching) when its BM25 score is at least this
# share of the best doc's: a long doc that names the word once still matches, a doc that has only
# the commonest word of several does not.
MATCH_SHARE = 0.4
FORMAT = 1
META_FILE, IDS_FILE = "meta.json", "ids.npy"
_NOT_TEXT = frozenset({"id", "product_id", "image_uri"})
_NOT_TEXT_SUFFIXES = ("_uri", "_url", "_path")
_WORD = re.compile(r"[^\W_]+")
_STOP = frozenset(STOPWORDS_EN)
_STEMMER = Stemmer.Stemmer("english")


def tokenize(text: str) -> list[str]:
    """Stemmed, lower-cased word tokens of `text`, stop words removed (order and repeats kept)."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).lower())
    return _STEMMER.stemWords([w for w in words if w not in _STOP])


def text_columns(docs: pa.Table) -> list[str]:
    """The columns indexed for text: `title` first, then the other string metadata columns."""
    out = []
    for field in docs.schema:
        typ = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            continue
        if field.name.lower() in _NOT_TEXT or field.name.lower().endswith(_NOT_TEXT_SUFFIXES):
            continue
        out.append(field.name)
    return sorted(out, key=lambda c: (c != "title", docs.column_names.index(c)))


def doc_texts(docs: pa.Table, columns: list[str]) -> list[str]:
    """Each row's text: its `columns` joined by spaces (nulls as empty)."""
    if not columns:
        return [""] * docs.num_rows
    parts = [pc.fill_null(docs.column(c).cast(pa.string()), "") for c in columns]
    return pc.binary_join_element_wise(*parts, " ").to_pylist()


class TextIndex:
    """BM25 over one shard's docs rows; `search` answers (scores, ids) like a FAISS shard."""

    def __init__(self, bm25: bm25s.BM25 | None, ids: np.ndarray, columns: list[str]):
        self._bm25 = bm25
        self.ids = np.asarray(ids, dtype=np.int64)
        self.columns = list(columns)
        n = len(self.ids)
        # Shards hold a contiguous id range: allowed ids then map to rows without a search.
        contiguous = n and np.array_equal(self.ids, np.arange(self.ids[0], self.ids[0] + n))
        self._first_id = int(self.ids[0]) if contiguous else None

    @classmethod
    def build(cls, docs: pa.Table, columns: list[str] | None = None) -> TextIndex:
        """Index `docs` (needs an int `id` column); columns default to text_columns(docs)."""
        if "id" not in docs.column_names:
            raise ValueError("text index: docs have no 'id' column")
        columns = text_columns(docs) if columns is None else list(columns)
        missing = sorted(set(columns) - set(docs.column_names))
        if missing:
            raise ValueError(f"text index: docs lack columns {missing}")
        ids = docs.column("id").to_numpy().astype(np.int64)
        tokens = [tokenize(t) for t in doc_texts(docs, columns)]
        if not any(tokens):
            return cls(None, ids, columns)
        bm25 = bm25s.BM25(k1=K1, b=B, method="lucene")
        bm25.index(tokens, show_progress=False)
        return cls(bm25, ids, columns)

    def __len__(self) -> int:
        return len(self.ids)

    def search(
        self, query: str, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """float32 (k,) scores, descending, and int64 (k,) ids; -inf / -1 pad when fewer match.

        Only docs sharing a token with the query match; ties go to the smaller id. With
        `allowed_ids` only those ids are candidates, so k results come whenever k allowed match.
        """
        self._check(query)
        if k < 0:
            raise ValueError(f"k must be >= 0, not {k}")
        scores_out = np.full(k, -np.inf, dtype=np.float32)
        ids_out = np.full(k, -1, dtype=np.int64)
        token_ids = self._token_ids(query)
        if not token_ids or k == 0:
            return scores_out, ids_out
        scores = np.asarray(self._bm25.get_scores_from_ids(token_ids), dtype=np.float32)
        hit = scores > 0
        if allowed_ids is not None:
            hit &= self._allowed_rows(np.asarray(allowed_ids, dtype=np.int64))
        pos = np.flatnonzero(hit)
        if len(pos) > k:
            kth = np.partition(scores[pos], len(pos) - k)[len(pos) - k]
            pos = pos[scores[pos] >= kth]
        order = np.lexsort((self.ids[pos], -scores[pos]))[:k]
        n = len(order)
        scores_out[:n] = scores[pos[order]]
        ids_out[:n] = self.ids[pos[order]]
        return scores_out, ids_out

    def matching(self, query: str, share: float = MATCH_SHARE) -> np.ndarray:
        """int64 ids, ascending, of the docs whose score for `query` is at least `share` of the
        best doc's (none when no doc shares a token with it)."""
        self._check(query)
        token_ids = self._token_ids(query)
        if not token_ids:
            return np.zeros(0, np.int64)
        scores = np.asarray(self._bm25.get_scores_from_ids(token_ids), dtype=np.float32)
        best = scores.max(initial=0.0)
        if best <= 0:
            return np.zeros(0, np.int64)
        return np.sort(self.ids[scores >= share * best])

    def _allowed_rows(self, allowed_ids: np.ndarray) -> np.ndarray:
        if self._first_id is None:
            return np.isin(self.ids, allowed_ids)
        rows = allowed_ids - self._first_id
        mask = np.zeros(len(self.ids), dtype=bool)
        mask[rows[(rows >= 0) & (rows < len(self.ids))]] = True
        return mask

    @staticmethod
    def _check(query: str) -> None:
        if not isinstance(query, str):
            raise ValueError(f"text query must be a string, not {type(query).__name__}")
        if len(query) > MAX_QUERY_CHARS:
            raise ValueError(f"text query: {len(query)} characters, at most {MAX_QUERY_CHARS}")

    def _token_ids(self, query: str) -> list[int]:
        if self._bm25 is None:
            return []
        # Unique query terms: a repeated word does not count twice.
        tokens = list(dict.fromkeys(tokenize(query)))
        return [self._bm25.vocab_dict[t] for t in tokens if t in self._bm25.vocab_dict]

    def save(self, uri: str) -> dict[str, dict]:
        """Write the index under folder `uri` (local or S3), each file atomically.

        Returns {file name: {"sha256", "size"}} for the manifest; meta.json is written last.
        """
        with tempfile.TemporaryDirectory() as tmp:
            if self._bm25 is not None:
                self._bm25.save(tmp, show_progress=False)
            np.save(os.path.join(tmp, IDS_FILE), self.ids)
            files = {}
            for name in sorted(os.listdir(tmp)):
                path = os.path.join(tmp, name)
                with storage.staged_file(storage.join(uri, name)) as staged:
                    shutil.copyfile(path, staged)
                files[name] = {"sha256": storage.sha256_file(path), "size": os.path.getsize(path)}
        meta = {"format": FORMAT, "columns": self.columns, "k1": K1, "b": B, "files": files}
        meta["empty"] = self._bm25 is None
        storage.write_json(storage.join(uri, META_FILE), meta)
        return {**files, META_FILE: _file_record(storage.read_bytes(storage.join(uri, META_FILE)))}

    @classmethod
    def load(cls, uri: str, verify: bool = True, meta_sha256: str | None = None) -> TextIndex:
        """Read a saved index (S3 folders are copied to a local temp folder first); with
        `verify`, every file's sha256 must match meta.json, and meta.json `meta_sha256` (the
        manifest's record) when given."""
        raw = storage.read_bytes(storage.join(uri, META_FILE))
        if meta_sha256 is not None and hashlib.sha256(raw).hexdigest() != meta_sha256:
            raise ValueError(f"{storage.join(uri, META_FILE)}: sha256 mismatch")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{uri}: text index format {meta.get('format')}, expected {FORMAT}")
        folder = _local_folder(uri, list(meta["files"]))
        if verify:
            for name, rec in meta["files"].items():
                if storage.sha256_file(os.path.join(folder, name)) != rec["sha256"]:
                    raise ValueError(f"{storage.join(uri, name)}: sha256 mismatch")
        ids = np.load(os.path.join(folder, IDS_FILE))
        bm25 = None
        if not meta["empty"]:
            bm25 = bm25s.BM25.load(folder, mmap=True, show_progress=False, verbosity=0)
        return cls(bm25, ids, meta["columns"])


def _file_record(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _local_folder(uri: str, names: list[str]) -> str:
    if not storage.is_s3(uri):
        return storage.resolve(uri)[1]
    # Kept for the life of the process: the arrays are memory-mapped from it.
    folder = tempfile.mkdtemp(prefix="visual_search-text-")
    for name in names:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(storage.read_bytes(storage.join(uri, name)))
    return folder


def text_folder(i: int) -> str:
    """Shard i's text index folder, relative to the version root (next to docs/)."""
    return f"text/shard-{i:05d}"


def build_shard(docs: pa.Table, uri: str, columns: list[str] | None = None) -> dict[str, dict]:
    """Build one shard's text index from its docs and save it under `uri`; returns save()'s
    {file: {"sha256", "size"}}."""
    return TextIndex.build(docs, columns).save(uri)


def build_shard_from_docs(
    version_root: str, i: int, docs_file: str, columns: list[str] | None = None
) -> dict:
    """Build step body (a Ray task): read shard i's docs parquet, write text_folder(i).

    Returns {"folder", "files": {file: {"sha256", "size"}}, "count"}, paths relative to the
    version root, for the manifest.
    """
    docs = storage.read_parquet(storage.join(version_root, docs_file))
    folder = text_folder(i)
    files = build_shard(docs, storage.join(version_root, folder), columns)
    return {"folder": folder, "files": files, "count": docs.num_rows}


def load_shard(version_root: str, record: dict, verify: bool = True) -> TextIndex:
    """Load the text index that build_shard_from_docs recorded (meta.json checked against it)."""
    check_relative(record["folder"], "text index folder")
    meta = record["files"][META_FILE]["sha256"]
    index = TextIndex.load(storage.join(version_root, record["folder"]), verify, meta)
    if len(index) != record["count"]:
        raise ValueError(f"{record['folder']}: {len(index)} docs, expected {record['count']}")
    return index
