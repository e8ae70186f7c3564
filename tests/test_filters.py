"""Attribute filters: filterable columns as a table, parse errors, masks vs a Python reference."""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visual_search import filters
from visual_search.filters import Filter, FilterError, filterable_columns, parse

FIELDS = {"category": "string", "colour": "string", "price": "number", "year": "number"}


def _docs(n: int = 10) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "product_id": [f"p{i}" for i in range(n)],
            "image_uri": [f"img/{i}.jpg" for i in range(n)],
            "title": [f"Product number {i}" for i in range(n)],
            "category": [["Shirts", "Dress, long", "Shoes"][i % 3] for i in range(n)],
            "colour": [None if i % 4 == 0 else ["Red", "Navy Blue"][i % 2] for i in range(n)],
            "price": pa.array([None if i == 3 else 10.0 * i for i in range(n)], pa.float64()),
            "year": pa.array([2000 + i % 5 for i in range(n)], pa.int32()),
            "sku": [f"sku-{i}" for i in range(n)],
            "flag": [i % 2 == 0 for i in range(n)],
        }
    )


@pytest.mark.parametrize(
    "column, values, expected",
    [
        ("category", ["a", "b"] * 5, "string"),
        ("category", [f"c{i}" for i in range(10)], None),  # every row distinct
        ("category", [f"c{i % 6}" for i in range(10)], None),  # 6 distinct > 50% of 10
        ("category", [f"c{i % 5}" for i in range(10)], "string"),  # exactly 50%
        ("big", [f"c{i % 1001}" for i in range(5000)], None),  # > 1000 distinct
        ("big", [f"c{i % 1000}" for i in range(5000)], "string"),
        ("price", [1.5] * 10, "number"),
        ("count", list(range(10)), "number"),  # numbers: any cardinality
        ("empty", [None] * 10, None),
        ("flag", [True, False] * 5, None),
        ("title", ["t"] * 10, None),
        ("product_id", ["p"] * 10, None),
        ("id", list(range(10)), None),
        ("image_uri", ["x"] * 10, None),
        ("thumb_url", ["x"] * 10, None),
    ],
)
def test_filterable_columns(column, values, expected):
    got = filterable_columns(pa.table({column: values}))
    assert got == ({column: expected} if expected else {})


def test_filterable_columns_of_docs():
    assert filterable_columns(_docs(10)) == FIELDS


def test_string_values_most_frequent_first():
    got = filters.string_values(_docs(10), FIELDS, limit=2)
    assert got == {"category": ["Shirts", "Dress, long"], "colour": ["Navy Blue", "Red"]}
    assert filters.string_values(_docs(10), FIELDS)["colour"] == ["Navy Blue", "Red"]


@pytest.mark.parametrize(
    "text, rows",
    [
        ("", list(range(10))),
        ("   ", list(range(10))),
        ("category:Shirts", [0, 3, 6, 9]),
        ("category: Shirts ", [0, 3, 6, 9]),
        ("category:Shirts|Shoes", [0, 2, 3, 5, 6, 8, 9]),
        ("category:Dress\\, long", [1, 4, 7]),
        ("colour:Navy Blue", [1, 3, 5, 7, 9]),
        ("colour:Red", [2, 6]),  # nulls at 0, 4, 8 never match
        ("price>40", [5, 6, 7, 8, 9]),
        ("price<20", [0, 1]),
        ("price:20..40", [2, 4]),  # 3 is null
        ("price:30", []),
        ("price:20|50", [2, 5]),
        ("year:2001..2002,category:Shoes", [2]),
        ("year>2001,year<2004", [2, 3, 7, 8]),
        ("year:-1e10..1e10", list(range(10))),
        ("category:Nope", []),
    ],
)
def test_parse_and_mask(text, rows):
    f = parse(text, FIELDS)
    docs = _docs(10)
    assert np.flatnonzero(f.mask(docs)).tolist() == rows
    assert f.ids(docs).dtype == np.int64
    assert f.ids(docs).tolist() == rows


@pytest.mark.parametrize(
    "text, named",
    [
        ("brand:Nike", "'brand'"),
        ("category>3", "'category>3'"),
        ("price:cheap", "'cheap'"),
        ("price<1x", "'1x'"),
        ("price:nan", "'nan'"),
        ("price:1e999", "1e999"),
        ("price:5..1", "empty range"),
        ("category:Shirts,,price>1", "empty condition"),
        ("category:Shirts,", "empty condition"),
        ("category:", "empty value"),
        ("category:a|", "empty value"),
        ("Shirts", "'Shirts'"),
        (":Shirts", "missing field"),
        ("x" * (filters.MAX_FILTER_CHARS + 1), "characters"),
        (",".join(["year>1"] * (filters.MAX_CONDITIONS + 1)), "conditions"),
    ],
)
def test_parse_errors_name_the_problem(text, named):
    with pytest.raises(FilterError) as err:
        parse(text, FIELDS)
    assert named in str(err.value)
    assert isinstance(err.value, ValueError)


def test_key_is_stable_and_category_shorthand_is_the_same_filter():
    a = parse("year>2001, category:Shoes|Shirts", FIELDS)
    b = parse("category:Shirts|Shoes,year>2001,year>2001", FIELDS)
    assert a == b and a.key() == b.key()
    assert parse("category:Shoes", FIELDS) == Filter.category("Shoes")
    merged = Filter.category("Shoes").and_(parse("year>2001", FIELDS))
    assert merged.key() == parse("year>2001,category:Shoes", FIELDS).key()
    assert parse("category:a\\|b", FIELDS).key() == "category:a\\|b"
    assert (
        parse(parse("category:a\\|b|c\\,d", FIELDS).key(), FIELDS).key() == "category:a\\|b|c\\,d"
    )
    assert not Filter() and Filter().key() == ""


def test_words_join_the_conditions_and_need_a_text_index():
    """Filter(words=...): part of the key and of and_, refused by mask (query.ShardIndex
    answers it from the shard's text index)."""
    words = Filter(words="blue, shirt")
    assert words and words.key() == "words=blue\\, shirt"
    both = Filter.category("Shoes").and_(words)
    assert both.key() == "category:Shoes,words=blue\\, shirt" and both.conditions
    assert Filter(words="a").and_(Filter(words="b")).words == "a b"
    with pytest.raises(FilterError):
        both.mask(pa.table({"id": [1], "category": ["Shoes"]}))


def test_mask_on_chunked_and_dictionary_columns():
    docs = _docs(10)
    chunked = pa.concat_tables([docs.slice(0, 4), docs.slice(4)])
    chunked = chunked.set_column(
        chunked.column_names.index("category"), "category", pc_dict(chunked.column("category"))
    )
    f = parse("category:Shoes,year<2003", FIELDS)
    assert f.mask(chunked).tolist() == f.mask(docs).tolist()
    with pytest.raises(FilterError, match="'brand'"):
        Filter.category("x").and_(Filter((filters.Condition("brand", "in", ("x",)),))).mask(docs)


def pc_dict(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pa.chunked_array([c.dictionary_encode() for c in col.chunks])


_ALPHABET = st.sampled_from(list("ab ,|:<>.\\-+e019") + ["category", "price", "..", "é", "\x00"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_parse_raises_only_filter_error(text):
    try:
        f = parse(text, FIELDS)
    except FilterError:
        return
    assert parse(f.key(), FIELDS) == f  # the key round-trips


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_raises_only_filter_error_on_any_text(text):
    with contextlib.suppress(FilterError):
        parse(text, FIELDS)


_CATS = ["a", "b", "c d", "e,f"]


def _reference(rows: list[dict], cond: tuple) -> list[bool]:
    kind, arg = cond
    out = []
    for r in rows:
        if kind == "cat":
            out.append(r["cat"] is not None and r["cat"] in arg)
        else:
            v = r["num"]
            lo, hi = arg
            out.append(v is not None and lo <= v <= hi)
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "cat": st.none() | st.sampled_from(_CATS),
                "num": st.none() | st.integers(-5, 5),
            }
        ),
        max_size=30,
    ),
    st.sets(st.sampled_from(_CATS), min_size=1),
    st.integers(-6, 6),
    st.integers(0, 4),
)
def test_mask_matches_python_reference(rows, cats, lo, width):
    table = pa.table(
        {
            "id": pa.array(range(len(rows)), pa.int64()),
            "cat": pa.array([r["cat"] for r in rows], pa.string()),
            "num": pa.array([r["num"] for r in rows], pa.int64()),
        }
    )
    fields = {"cat": "string", "num": "number"}
    cat_text = "|".join(filters._escape(c) for c in sorted(cats))
    f = parse(f"cat:{cat_text},num:{lo}..{lo + width}", fields)
    ref = np.array(_reference(rows, ("cat", cats)), bool) & np.array(
        _reference(rows, ("num", (lo, lo + width))), bool
    )
    assert f.mask(table).tolist() == ref.tolist()
    assert f.ids(table).tolist() == np.flatnonzero(ref).tolist()
    strict = parse(f"num>{lo},num<{lo + width}", fields).mask(table)
    assert strict.tolist() == [r["num"] is not None and lo < r["num"] < lo + width for r in rows]
