"""Attribute filters (Contract 4, continued): which columns are filterable, `filter=` parsing,
and row masks / id lists per shard.

Syntax: comma-separated conditions, all of which must hold::

    field:value        equal (strings: exact; numbers: numeric equality)
    field:v1|v2        any of
    field<N  field>N   strict bounds (number fields only)
    field:lo..hi       inclusive range (number fields only)

Values may contain spaces; whitespace around fields and values is ignored. A backslash escapes
the next character, so `\\,` `\\|` and `\\\\` are a literal comma, pipe and backslash. An empty or
all-blank filter string means "no filter". Nulls never match.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_FILTER_CHARS = 2000
MAX_CONDITIONS = 50
MAX_DISTINCT = 1000
MAX_DISTINCT_FRACTION = 0.5

STRING, NUMBER = "string", "number"
# Identifiers and free text are never filterable, whatever their cardinality.
NEVER_FILTERABLE = frozenset(
    {"id", "product_id", "image_uri", "title", "name", "description", "text", "caption"}
)
_NEVER_SUFFIXES = ("_uri", "_url", "_path")
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_COND_RE = re.compile(r"([^:<>]*)([:<>])(.*)", re.DOTALL)


class FilterError(ValueError):
    """A malformed `filter=` (the message names the condition or field); the API answers 400."""


def _kind(typ: pa.DataType) -> str | None:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):
        return NUMBER
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return STRING
    return None


def filterable_columns(docs: pa.Table) -> dict[str, str]:
    """{column: "string" | "number"}: numeric columns and low-cardinality string columns."""
    out: dict[str, str] = {}
    for name in docs.column_names:
        lower = name.lower()
        if lower in NEVER_FILTERABLE or lower.endswith(_NEVER_SUFFIXES):
            continue
        col = docs.column(name)
        kind = _kind(col.type)
        if kind is None or col.null_count == len(col):
            continue
        if kind == STRING:
            distinct = len(pc.unique(col.cast(pa.string())).drop_null())
            if distinct > MAX_DISTINCT or distinct > MAX_DISTINCT_FRACTION * len(col):
                continue
        out[name] = kind
    return out


def string_values(docs: pa.Table, fields: dict[str, str], limit: int = 100) -> dict[str, list]:
    """{string field: its most frequent non-null values (at most `limit`)}, e.g. for chips."""
    out = {}
    for name, kind in fields.items():
        if kind != STRING or name not in docs.column_names:
            continue
        counts = pc.value_counts(docs.column(name).cast(pa.string()).drop_null())
        pairs = zip(
            counts.field("counts").to_pylist(), counts.field("values").to_pylist(), strict=True
        )
        out[name] = [v for _, v in sorted(pairs, key=lambda p: (-p[0], p[1]))[:limit]]
    return out


@dataclass(frozen=True, order=True)
class Condition:
    """One condition. op: "in" (values), "lt"/"gt" (lo/hi bound) or "range" (lo..hi)."""

    field: str
    op: str
    values: tuple = ()
    lo: float | None = None
    hi: float | None = None

    def key(self) -> str:
        if self.op == "in":
            return f"{self.field}:" + "|".join(_escape(str(v)) for v in sorted(set(self.values)))
        if self.op == "lt":
            return f"{self.field}<{self.hi!r}"
        if self.op == "gt":
            return f"{self.field}>{self.lo!r}"
        return f"{self.field}:{self.lo!r}..{self.hi!r}"

    def mask(self, table: pa.Table) -> np.ndarray:
        if self.field not in table.column_names:
            raise FilterError(f"filter field {self.field!r}: no such column in this table")
        col = table.column(self.field)
        kind = _kind(col.type)
        if kind is None:
            raise FilterError(
                f"filter field {self.field!r}: column type {col.type} is not filterable"
            )
        if kind == STRING:
            if self.op != "in" or not all(isinstance(v, str) for v in self.values):
                raise FilterError(f"filter {self.key()!r}: {self.field!r} is a string field")
            hit = pc.is_in(col.cast(pa.string()), value_set=pa.array(self.values, pa.string()))
        else:
            num = col.cast(pa.float64())
            if self.op == "in":
                values = [float(v) for v in self.values]
                hit = pc.is_in(num, value_set=pa.array(values, pa.float64()))
            elif self.op == "lt":
                hit = pc.less(num, self.hi)
            elif self.op == "gt":
                hit = pc.greater(num, self.lo)
            else:
                hit = pc.and_(pc.greater_equal(num, self.lo), pc.less_equal(num, self.hi))
        return pc.fill_null(hit, False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


@dataclass(frozen=True)
class Filter:
    """A conjunction of conditions; `Filter()` matches every row. With `words`, only the rows
    whose text matches them as well (POST /search?q=: the words narrow, the photo ranks); that
    needs a shard's text index (query.ShardIndex), so `mask` refuses it."""

    conditions: tuple[Condition, ...] = ()
    words: str = ""

    @classmethod
    def category(cls, value: str) -> Filter:
        """The `category=X` shorthand as a Filter (same key as `filter=category:X`)."""
        return cls((Condition("category", "in", (value,)),))

    def and_(self, other: Filter) -> Filter:
        conditions = tuple(sorted(set(self.conditions) | set(other.conditions)))
        return Filter(conditions, " ".join(w for w in (self.words, other.words) if w))

    def __bool__(self) -> bool:
        return bool(self.conditions or self.words)

    def key(self) -> str:
        """Stable text for caching: equal for filters that differ only in order or repeats."""
        keys = sorted({c.key() for c in self.conditions})
        return ",".join(keys + ([f"words={_escape(self.words)}"] if self.words else []))

    def mask(self, table: pa.Table) -> np.ndarray:
        """bool (n_rows,): rows where every condition holds."""
        if self.words:
            raise FilterError("a words filter needs a text index, not a table")
        out = np.ones(table.num_rows, dtype=bool)
        for cond in self.conditions:
            out &= cond.mask(table)
        return out

    def ids(self, table: pa.Table) -> np.ndarray:
        """int64: the `id` column of matching rows (e.g. for faiss.IDSelectorBatch)."""
        if "id" not in table.column_names:
            raise FilterError("filter: table has no 'id' column")
        ids = table.column("id").to_numpy().astype(np.int64, copy=False)
        return ids[self.mask(table)]


def _escape(text: str) -> str:
    return re.sub(r"([\\,|])", r"\\\1", text)


def _split(text: str, sep: str) -> list[str]:
    """Split on unescaped `sep`, keeping escapes for later splits (see _unescape)."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text, flags=re.DOTALL)


def _number(text: str, cond: str) -> float:
    text = text.strip()
    if not _NUMBER_RE.fullmatch(text) or not math.isfinite(float(text)):
        raise FilterError(f"filter condition {cond!r}: {text!r} is not a number")
    return float(text)


def _condition(raw: str, fields: dict[str, str]) -> Condition:
    cond = raw.strip()
    if not cond:
        raise FilterError("filter: empty condition (two commas in a row, or a trailing comma)")
    match = _COND_RE.fullmatch(cond)
    if not match:
        raise FilterError(f"filter condition {cond!r}: expected field:value, field<N or field>N")
    field, op, rest = match.group(1).strip(), match.group(2), match.group(3)
    if not field:
        raise FilterError(f"filter condition {cond!r}: missing field name")
    if field not in fields:
        known = ", ".join(sorted(fields)) or "none"
        raise FilterError(f"filter field {field!r} is not filterable (filterable: {known})")
    kind = fields[field]
    if op in "<>":
        if kind != NUMBER:
            raise FilterError(
                f"filter condition {cond!r}: {op} needs a number field, {field!r} is a {kind} field"
            )
        bound = _number(_unescape(rest), cond)
        return Condition(field, "lt", hi=bound) if op == "<" else Condition(field, "gt", lo=bound)
    if kind == NUMBER and ".." in rest and "|" not in rest:
        lo, _, hi = rest.partition("..")
        lo_v, hi_v = _number(lo, cond), _number(hi, cond)
        if lo_v > hi_v:
            raise FilterError(f"filter condition {cond!r}: empty range ({lo_v} > {hi_v})")
        return Condition(field, "range", lo=lo_v, hi=hi_v)
    values = [_unescape(v).strip() for v in _split(rest, "|")]
    if any(not v for v in values):
        raise FilterError(f"filter condition {cond!r}: empty value")
    if kind == NUMBER:
        return Condition(field, "in", tuple(sorted({_number(v, cond) for v in values})))
    return Condition(field, "in", tuple(sorted(set(values))))


def parse(text: str, fields: dict[str, str]) -> Filter:
    """Parse a `filter=` string against {field: kind}; raises FilterError (a ValueError)."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter: {len(text)} characters, at most {MAX_FILTER_CHARS}")
    if not text.strip():
        return Filter()
    raw = _split(text, ",")
    if len(raw) > MAX_CONDITIONS:
        raise FilterError(f"filter: {len(raw)} conditions, at most {MAX_CONDITIONS}")
    return Filter(tuple(sorted({_condition(r, fields) for r in raw})))
