"""Contract 1: catalog tables (Parquet, CSV, JSONL) and folders of images, read by catalog.py.

Everything is generated under tmp_path; reading a catalog never decodes images, so the image
files are empty (their existence matters only for the folder form).
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visual_search import storage
from visual_search.catalog import RESERVED, CatalogError, read_catalog

FORMATS = ("parquet", "csv", "jsonl")

# A catalog with metadata columns before, between and after the required ones; two rows share a
# product_id (two photos of one product), and the image URIs mix relative, absolute and s3://.
ROWS = [
    {"title": "Red mug", "product_id": "p1", "category": "mugs", "image_uri": "img/p1.jpg"},
    {"title": "Red mug", "product_id": "p1", "category": "mugs", "image_uri": "img/p1-b.jpg"},
    {"title": "Blue cup", "product_id": "p2", "category": "cups", "image_uri": "/abs/p2.png"},
    {"title": "Plate", "product_id": "p3", "category": "plates", "image_uri": "s3://bkt/p3.jpg"},
]


# ---------------------------------------------------------------------------------------------
# Helpers


def write_rows(path: pathlib.Path, rows: list[dict], fmt: str | None = None) -> str:
    """Write rows as a Parquet, CSV or JSONL catalog (fmt from the suffix unless given)."""
    fmt = fmt or path.suffix.lstrip(".").lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        columns = list(rows[0]) if rows else ["product_id", "image_uri"]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif fmt in ("jsonl", "ndjson"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        raise AssertionError(fmt)
    return str(path)


def touch(path: pathlib.Path, data: bytes = b"") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def catalog_error(uri: str) -> pytest.ExceptionInfo:
    with pytest.raises(CatalogError) as info:
        read_catalog(uri)
    assert uri in str(info.value), f"message does not name the file: {info.value}"
    return info


def expected_uris(folder: pathlib.Path, rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        uri = r["image_uri"]
        out.append(uri if uri.startswith(("/", "s3://")) else f"{folder}/{uri}")
    return out


# ---------------------------------------------------------------------------------------------
# Table formats


@pytest.mark.parametrize("fmt", FORMATS)
def test_table_normalized(tmp_path: pathlib.Path, fmt: str) -> None:
    uri = write_rows(tmp_path / f"catalog.{fmt}", ROWS)
    cat = read_catalog(uri)
    t = cat.table
    assert cat.kind == "table"
    assert cat.uri == uri
    assert cat.num_rows == len(ROWS)
    # Required columns first, then the metadata in the catalog's own order.
    assert t.column_names == ["product_id", "image_uri", "title", "category"]
    assert cat.metadata_columns == ["title", "category"]
    for name in t.column_names:
        assert t.schema.field(name).type == pa.string(), name
    assert t["product_id"].to_pylist() == ["p1", "p1", "p2", "p3"]
    assert t["image_uri"].to_pylist() == expected_uris(tmp_path, ROWS)
    assert t["title"].to_pylist() == [r["title"] for r in ROWS]
    assert t["category"].to_pylist() == [r["category"] for r in ROWS]


def test_formats_give_the_same_table(tmp_path: pathlib.Path) -> None:
    cats = {fmt: read_catalog(write_rows(tmp_path / f"c.{fmt}", ROWS)) for fmt in FORMATS}
    first = cats["parquet"]
    for fmt, cat in cats.items():
        assert cat.table.equals(first.table), fmt
        assert cat.fingerprint() == first.fingerprint(), fmt


@pytest.mark.parametrize("name", ["catalog.ndjson", "CATALOG.CSV", "Catalog.Parquet", "c.JSONL"])
def test_suffix_variants(tmp_path: pathlib.Path, name: str) -> None:
    fmt = {".ndjson": "ndjson", ".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}[
        pathlib.Path(name).suffix.lower()
    ]
    uri = write_rows(tmp_path / name, ROWS, fmt)
    assert read_catalog(uri).table["product_id"].to_pylist() == ["p1", "p1", "p2", "p3"]


def test_only_required_columns(tmp_path: pathlib.Path) -> None:
    rows = [{"image_uri": "a.jpg", "product_id": "a"}]
    cat = read_catalog(write_rows(tmp_path / "c.parquet", rows))
    assert cat.table.column_names == ["product_id", "image_uri"]
    assert cat.metadata_columns == []


def test_metadata_keeps_its_types(tmp_path: pathlib.Path) -> None:
    rows = [
        {"product_id": "a", "image_uri": "a.jpg", "price": 3.5, "stock": 2, "tags": ["x", "y"]},
        {"product_id": "b", "image_uri": "b.jpg", "price": 1.0, "stock": 0, "tags": []},
    ]
    t = read_catalog(write_rows(tmp_path / "c.parquet", rows)).table
    assert t.column_names == ["product_id", "image_uri", "price", "stock", "tags"]
    assert t["price"].to_pylist() == [3.5, 1.0]
    assert t["stock"].to_pylist() == [2, 0]
    assert t["tags"].to_pylist() == [["x", "y"], []]


def test_csv_keeps_leading_zeros_and_na_like_ids(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "product_id,image_uri,title\n00123,00123.jpg,zeros\nNA,na.jpg,na\nnull,null.jpg,x\n"
        "1e5,e.jpg,sci\n",
        encoding="utf-8",
    )
    t = read_catalog(str(path)).table
    assert t["product_id"].to_pylist() == ["00123", "NA", "null", "1e5"]
    assert t["image_uri"].to_pylist() == [
        f"{tmp_path}/00123.jpg",
        f"{tmp_path}/na.jpg",
        f"{tmp_path}/null.jpg",
        f"{tmp_path}/e.jpg",
    ]


def test_csv_with_utf8_bom_and_quoted_fields(tmp_path: pathlib.Path) -> None:
    # Spreadsheet exports start with a byte order mark and quote fields holding commas.
    path = tmp_path / "c.csv"
    path.write_bytes(
        '\ufeffproduct_id,image_uri,title\r\nA1,"dir, with comma/a.jpg","Mug, red"\r\n'.encode()
    )
    t = read_catalog(str(path)).table
    assert t.column_names == ["product_id", "image_uri", "title"]
    assert t.to_pylist() == [
        {"product_id": "A1", "image_uri": f"{tmp_path}/dir, with comma/a.jpg", "title": "Mug, red"}
    ]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_integer_product_id_becomes_string(tmp_path: pathlib.Path, fmt: str) -> None:
    rows = [{"product_id": 123, "image_uri": "a.jpg"}, {"product_id": 7, "image_uri": "b.jpg"}]
    t = read_catalog(write_rows(tmp_path / f"c.{fmt}", rows)).table
    assert t.schema.field("product_id").type == pa.string()
    assert t["product_id"].to_pylist() == ["123", "7"]


@pytest.mark.parametrize(
    "array",
    [
        pa.array(["a", "b"], pa.large_string()),
        pa.array(["a", "b"]).dictionary_encode(),  # e.g. a pandas "category" column
    ],
    ids=["large_string", "dictionary"],
)
def test_parquet_string_like_product_id(tmp_path: pathlib.Path, array: pa.Array) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"product_id": array, "image_uri": ["a.jpg", "b.jpg"]}), path)
    t = read_catalog(str(path)).table
    assert t.schema.field("product_id").type == pa.string()
    assert t["product_id"].to_pylist() == ["a", "b"]


def test_float_product_id_rejected(tmp_path: pathlib.Path) -> None:
    uri = write_rows(tmp_path / "c.parquet", [{"product_id": 1.5, "image_uri": "a.jpg"}])
    msg = str(catalog_error(uri).value)
    assert "'product_id'" in msg
    assert "double" in msg


def test_several_photos_per_product(tmp_path: pathlib.Path) -> None:
    rows = [{"product_id": "p", "image_uri": f"p-{i}.jpg"} for i in range(5)]
    t = read_catalog(write_rows(tmp_path / "c.csv", rows)).table
    assert t["product_id"].to_pylist() == ["p"] * 5
    assert len(set(t["image_uri"].to_pylist())) == 5


# ---------------------------------------------------------------------------------------------
# image_uri resolution


@pytest.mark.parametrize(
    ("image_uri", "expected"),
    [
        ("a.jpg", "{folder}/a.jpg"),
        ("sub/dir/a.jpg", "{folder}/sub/dir/a.jpg"),
        ("/elsewhere/a.jpg", "/elsewhere/a.jpg"),
        ("file:///elsewhere/a.jpg", "file:///elsewhere/a.jpg"),
        ("s3://bucket/key/a.jpg", "s3://bucket/key/a.jpg"),
    ],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_image_uri_resolution(
    tmp_path: pathlib.Path, fmt: str, image_uri: str, expected: str
) -> None:
    folder = tmp_path / "catalogs"
    uri = write_rows(folder / f"c.{fmt}", [{"product_id": "p", "image_uri": image_uri}])
    got = read_catalog(uri).table["image_uri"].to_pylist()
    assert got == [expected.format(folder=folder)]


@pytest.mark.parametrize("image_uri", ["./a.jpg", "../imgs/a.jpg"])
def test_dotted_relative_uri_points_at_the_file(tmp_path: pathlib.Path, image_uri: str) -> None:
    folder = tmp_path / "catalogs"
    uri = write_rows(folder / "c.csv", [{"product_id": "p", "image_uri": image_uri}])
    (got,) = read_catalog(uri).table["image_uri"].to_pylist()
    assert os.path.isabs(got)
    assert os.path.normpath(got) == os.path.normpath(folder / image_uri)


def test_relative_catalog_path_gives_absolute_image_uris(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_rows(tmp_path / "data" / "c.csv", [{"product_id": "p", "image_uri": "img/a.jpg"}])
    monkeypatch.chdir(tmp_path)
    cat = read_catalog("data/c.csv")
    assert cat.table["image_uri"].to_pylist() == [f"{tmp_path}/data/img/a.jpg"]


def test_file_uri_catalog(tmp_path: pathlib.Path) -> None:
    write_rows(tmp_path / "c.jsonl", [{"product_id": "p", "image_uri": "a.jpg"}])
    cat = read_catalog(f"file://{tmp_path}/c.jsonl")
    assert cat.table["image_uri"].to_pylist() == [f"{tmp_path}/a.jpg"]


# ---------------------------------------------------------------------------------------------
# Invalid catalogs: CatalogError naming the file, and the row and column where they apply


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("missing", ["product_id", "image_uri"])
def test_missing_required_column(tmp_path: pathlib.Path, fmt: str, missing: str) -> None:
    rows = [{k: v for k, v in r.items() if k != missing} for r in ROWS]
    uri = write_rows(tmp_path / f"c.{fmt}", rows)
    msg = str(catalog_error(uri).value)
    assert f"missing required column {missing!r}" in msg


def _rows_with(column: str, row: int, value) -> list[dict]:
    rows = [{"product_id": f"p{i}", "image_uri": f"p{i}.jpg", "title": "t"} for i in range(1, 6)]
    rows[row - 1][column] = value
    return rows


EMPTY_CASES = [
    # (format, column, 1-based row, bad value)
    ("csv", "product_id", 3, ""),
    ("csv", "product_id", 1, "   "),
    ("csv", "product_id", 5, "\t"),
    ("csv", "image_uri", 2, ""),
    ("csv", "image_uri", 4, " "),
    ("jsonl", "product_id", 4, None),
    ("jsonl", "product_id", 2, ""),
    ("jsonl", "image_uri", 5, None),
    ("jsonl", "image_uri", 3, "  "),
    ("parquet", "product_id", 2, None),
    ("parquet", "product_id", 5, " \n "),
    ("parquet", "image_uri", 1, None),
    ("parquet", "image_uri", 3, ""),
]


@pytest.mark.parametrize(("fmt", "column", "row", "value"), EMPTY_CASES)
def test_empty_required_value(
    tmp_path: pathlib.Path, fmt: str, column: str, row: int, value
) -> None:
    uri = write_rows(tmp_path / f"c.{fmt}", _rows_with(column, row, value))
    msg = str(catalog_error(uri).value)
    assert f"row {row}," in msg
    assert f"{column!r}" in msg


def test_null_in_integer_product_id(tmp_path: pathlib.Path) -> None:
    rows = [{"product_id": i, "image_uri": f"{i}.jpg"} for i in (1, None, 3)]
    msg = str(catalog_error(write_rows(tmp_path / "c.parquet", rows)).value)
    assert "row 2," in msg
    assert "'product_id'" in msg


def test_all_null_image_uri(tmp_path: pathlib.Path) -> None:
    rows = [{"product_id": "a", "image_uri": None}, {"product_id": "b", "image_uri": None}]
    msg = str(catalog_error(write_rows(tmp_path / "c.jsonl", rows)).value)
    assert "row 1," in msg
    assert "'image_uri'" in msg


BIG = 40_000  # ~1.5 MB of CSV/JSONL: more than one read block, several Parquet row groups


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_numbers_in_large_catalogs(tmp_path: pathlib.Path, fmt: str) -> None:
    rows = [
        {"product_id": f"product-{i:08d}", "image_uri": f"images/{i:08d}.jpg"} for i in range(BIG)
    ]
    ok = read_catalog(write_rows(tmp_path / f"ok.{fmt}", rows))
    assert ok.num_rows == BIG
    assert ok.table["product_id"].to_pylist()[-1] == f"product-{BIG - 1:08d}"

    bad_row = BIG - 3
    rows[bad_row - 1] = {**rows[bad_row - 1], "product_id": " "}
    path = tmp_path / f"bad.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4096)
    else:
        write_rows(path, rows)
    msg = str(catalog_error(str(path)).value)
    assert f"row {bad_row}," in msg

    rows[bad_row - 1] = dict(rows[5])  # a late row repeating row 6
    msg = str(catalog_error(write_rows(tmp_path / f"dup.{fmt}", rows)).value)
    assert re.search(rf"\brow {bad_row}\b", msg)
    assert re.search(r"\brow 6\b", msg)


def test_jsonl_row_without_the_key(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"product_id": "a", "image_uri": "a.jpg"}\n{"image_uri": "b.jpg"}\n', encoding="utf-8"
    )
    msg = str(catalog_error(str(path)).value)
    assert "row 2," in msg
    assert "'product_id'" in msg


def test_empty_reported_at_the_first_bad_row(tmp_path: pathlib.Path) -> None:
    rows = _rows_with("product_id", 2, "")
    rows[3]["product_id"] = ""
    msg = str(catalog_error(write_rows(tmp_path / "c.csv", rows)).value)
    assert re.search(r"\brow 2\b", msg)
    assert not re.search(r"\brow 4\b", msg)


@pytest.mark.parametrize(
    "bad", ["http://example.com/a.jpg", "https://cdn.example.com/a.jpg", "gs://bucket/a.jpg"]
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_unsupported_scheme(tmp_path: pathlib.Path, fmt: str, bad: str) -> None:
    uri = write_rows(tmp_path / f"c.{fmt}", _rows_with("image_uri", 3, bad))
    msg = str(catalog_error(uri).value)
    assert "row 3," in msg
    assert "'image_uri'" in msg
    assert bad in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_rows(tmp_path: pathlib.Path, fmt: str) -> None:
    rows = _rows_with("title", 1, "t")
    rows[3] = dict(rows[1])  # row 4 repeats row 2
    msg = str(catalog_error(write_rows(tmp_path / f"c.{fmt}", rows)).value)
    assert re.search(r"\brow 4\b", msg)
    assert re.search(r"\brow 2\b", msg)
    assert "'p2'" in msg


def test_duplicate_after_resolution(tmp_path: pathlib.Path) -> None:
    # "a.jpg" relative to the catalog's folder and its absolute spelling are the same image.
    rows = [
        {"product_id": "p", "image_uri": "a.jpg"},
        {"product_id": "q", "image_uri": "a.jpg"},
        {"product_id": "p", "image_uri": str(tmp_path / "a.jpg")},
    ]
    msg = str(catalog_error(write_rows(tmp_path / "c.csv", rows)).value)
    assert re.search(r"\brow 3\b", msg)
    assert re.search(r"\brow 1\b", msg)


@pytest.mark.parametrize("reserved", RESERVED)
@pytest.mark.parametrize("fmt", FORMATS)
def test_reserved_column(tmp_path: pathlib.Path, fmt: str, reserved: str) -> None:
    assert set(RESERVED) == {"embedding", "error", "detail"}
    rows = [{**r, reserved: "x"} for r in ROWS]
    msg = str(catalog_error(write_rows(tmp_path / f"c.{fmt}", rows)).value)
    assert repr(reserved) in msg


def test_zero_rows_parquet(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.parquet"
    schema = pa.schema([("product_id", pa.string()), ("image_uri", pa.string())])
    pq.write_table(schema.empty_table(), path)
    assert "no rows" in str(catalog_error(str(path)).value)


def test_zero_rows_csv_header_only(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("product_id,image_uri,title\n", encoding="utf-8")
    assert "no rows" in str(catalog_error(str(path)).value)


@pytest.mark.parametrize("name", ["c.jsonl", "c.csv"])
def test_zero_byte_table(tmp_path: pathlib.Path, name: str) -> None:
    catalog_error(str(touch(tmp_path / name)))


@pytest.mark.parametrize("name", ["catalog.txt", "catalog.json", "catalog.xlsx", "catalog"])
def test_unknown_file_type(tmp_path: pathlib.Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("product_id,image_uri\na,a.jpg\n", encoding="utf-8")
    msg = str(catalog_error(str(path)).value)
    assert "not a catalog table" in msg


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("c.csv", "product_id,image_uri\na,a.jpg\nb,b.jpg,extra\n"),
        ("c.csv", 'product_id,image_uri\n"a,a.jpg\n'),
        ("c.jsonl", '{"product_id": "a", "image_uri": "a.jpg"}\n{"product_id": "b",\n'),
        ("c.jsonl", "not json at all\n"),
        ("c.ndjson", '[{"product_id": "a", "image_uri": "a.jpg"}]\n'),
        ("c.jsonl", '{"product_id": 1, "image_uri": "a"}\n{"product_id": "b", "image_uri": "b"}\n'),
    ],
    ids=[
        "csv-extra-field",
        "csv-open-quote",
        "jsonl-truncated",
        "jsonl-garbage",
        "json-array",
        "jsonl-mixed-types",
    ],
)
def test_unparseable(tmp_path: pathlib.Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    msg = str(catalog_error(str(path)).value)
    assert "cannot parse" in msg


def test_corrupt_parquet_is_a_catalog_error(tmp_path: pathlib.Path) -> None:
    # A file that exists and reads fine but is not Parquet is an invalid catalog (CatalogError,
    # a ValueError), not an I/O failure (StorageError).
    path = touch(tmp_path / "c.parquet", b"this is not parquet at all, just some bytes")
    catalog_error(str(path))


@pytest.mark.parametrize("name", ["nope.csv", "nope.parquet", "no-such-folder", "a/b/c.jsonl"])
def test_missing_catalog_is_a_storage_error(tmp_path: pathlib.Path, name: str) -> None:
    uri = str(tmp_path / name)
    with pytest.raises(storage.StorageError) as info:
        read_catalog(uri)
    assert uri in str(info.value)
    assert "not found" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Folder of images


@pytest.fixture
def image_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "photos"
    for rel in [
        "shoes/boots/b1.jpg",
        "shoes/boots/b2.JPEG",
        "shoes/s1.png",
        "bags/tote.v2.webp",
        "root.jpg",
        "ROOT2.PNG",
        "shoes/notes.txt",
        "shoes/boots/meta.json",
        "README",
        "bags/.DS_Store",
        "bags/._tote.jpg",
        ".thumbnails/root.jpg",
    ]:
        touch(root / rel)
    (root / "empty-subfolder").mkdir()
    return root


FOLDER_EXPECTED = [
    # (product_id, relative path, category), sorted by URI
    ("ROOT2", "ROOT2.PNG", None),
    ("bags/tote.v2", "bags/tote.v2.webp", "bags"),
    ("root", "root.jpg", None),
    ("shoes/boots/b1", "shoes/boots/b1.jpg", "boots"),
    ("shoes/boots/b2", "shoes/boots/b2.JPEG", "boots"),
    ("shoes/s1", "shoes/s1.png", "shoes"),
]


@pytest.mark.parametrize("spelling", ["{root}", "{root}/", "file://{root}"])
def test_folder(image_folder: pathlib.Path, spelling: str) -> None:
    uri = spelling.format(root=image_folder)
    cat = read_catalog(uri)
    t = cat.table
    assert cat.kind == "prefix"
    assert t.column_names == ["product_id", "image_uri", "category"]
    assert cat.metadata_columns == ["category"]
    assert all(t.schema.field(c).type == pa.string() for c in t.column_names)
    got = sorted(zip(*(t[c].to_pylist() for c in t.column_names), strict=True))
    want = sorted((pid, f"{image_folder}/{rel}", c) for pid, rel, c in FOLDER_EXPECTED)
    assert got == want
    for image_uri in t["image_uri"].to_pylist():
        assert os.path.isfile(image_uri)


def test_folder_fingerprint_matches_equivalent_table(
    tmp_path: pathlib.Path, image_folder: pathlib.Path
) -> None:
    cat = read_catalog(str(image_folder))
    rows = cat.table.to_pylist()
    as_table = read_catalog(write_rows(tmp_path / "c.parquet", rows))
    assert as_table.table.equals(cat.table)
    assert as_table.fingerprint() == cat.fingerprint()


@pytest.mark.parametrize("content", [[], ["notes.txt", "sub/data.csv", "sub/README"]])
def test_folder_without_images(tmp_path: pathlib.Path, content: list[str]) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    (root / "sub").mkdir()
    for rel in content:
        touch(root / rel)
    msg = str(catalog_error(str(root)).value)
    assert "no images" in msg


def test_folder_of_parquet_parts_is_a_table(tmp_path: pathlib.Path) -> None:
    """Spark/Ray write a table as a folder of part files; image URIs are relative to it."""
    folder = tmp_path / "catalog.parquet"
    folder.mkdir()
    write_rows(folder / "part-0.parquet", [{"product_id": "a", "image_uri": "img/a.jpg"}])
    write_rows(folder / "part-1.parquet", [{"product_id": "b", "image_uri": "/abs/b.jpg"}])
    touch(folder / "_SUCCESS")
    cat = read_catalog(str(folder))
    assert cat.kind == "table"
    assert cat.table.to_pylist() == [
        {"product_id": "a", "image_uri": f"{folder}/img/a.jpg"},
        {"product_id": "b", "image_uri": "/abs/b.jpg"},
    ]


# ---------------------------------------------------------------------------------------------
# fingerprint


def _fp(tmp_path: pathlib.Path, name: str, rows: list[dict]) -> str:
    return read_catalog(write_rows(tmp_path / name, rows)).fingerprint()


def test_fingerprint_stable(tmp_path: pathlib.Path) -> None:
    fp = _fp(tmp_path, "a.parquet", ROWS)
    assert fp.startswith("sha256:")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert _fp(tmp_path, "a.parquet", ROWS) == fp  # same file read twice
    assert _fp(tmp_path, "b.csv", ROWS) == fp  # same rows, other format, same folder


def test_fingerprint_ignores_parquet_row_groups(tmp_path: pathlib.Path) -> None:
    rows = [{"product_id": f"p{i}", "image_uri": f"{i}.jpg"} for i in range(50)]
    one = tmp_path / "one.parquet"
    many = tmp_path / "many.parquet"
    pq.write_table(pa.Table.from_pylist(rows), one)
    pq.write_table(pa.Table.from_pylist(rows), many, row_group_size=7)
    assert pq.ParquetFile(many).metadata.num_row_groups > 1
    assert read_catalog(str(one)).fingerprint() == read_catalog(str(many)).fingerprint()


def _changed_rows() -> dict[str, list[dict]]:
    base = [dict(r) for r in ROWS]
    return {
        "product_id": [{**base[0], "product_id": "p9"}, *base[1:]],
        "image_uri": [*base[:3], {**base[3], "image_uri": "s3://bkt/p3-other.jpg"}],
        "order": [base[1], base[0], *base[2:]],
        "row_removed": base[:-1],
        "row_added": [*base, {**base[0], "image_uri": "img/new.jpg"}],
        "swap_across_rows": [
            {**base[0], "image_uri": base[1]["image_uri"]},
            {**base[1], "image_uri": base[0]["image_uri"]},
            *base[2:],
        ],
    }


@pytest.mark.parametrize("change", list(_changed_rows()))
def test_fingerprint_changes(tmp_path: pathlib.Path, change: str) -> None:
    base = _fp(tmp_path, "base.parquet", ROWS)
    rows = _changed_rows()[change]
    assert _fp(tmp_path, "changed.parquet", rows) != base


def test_fingerprint_changes_with_the_catalog_folder(tmp_path: pathlib.Path) -> None:
    # Relative image_uri values resolve against the folder: another folder, other images.
    rows = [{"product_id": "p", "image_uri": "a.jpg"}]
    assert _fp(tmp_path / "x", "c.csv", rows) != _fp(tmp_path / "y", "c.csv", rows)


# ---------------------------------------------------------------------------------------------
# S3 (moto server on 127.0.0.1)


def test_s3_table_and_prefix() -> None:
    try:
        from tests.s3server import S3Server
    except ImportError:  # pragma: no cover - tests/ as a plain folder on sys.path
        from s3server import S3Server  # type: ignore[no-redef]

    with S3Server() as s3:
        buf = io.StringIO()
        buf.write("product_id,image_uri,title\n")
        buf.write("00042,img/a.jpg,rel\n")
        buf.write("b,s3://other-bucket/b.jpg,abs\n")
        buf.write("c,/local/c.jpg,local\n")
        storage.write_text(s3.uri("cats", "catalog.csv"), buf.getvalue())
        cat = read_catalog(s3.uri("cats", "catalog.csv"))
        assert cat.kind == "table"
        assert cat.table.to_pylist() == [
            {"product_id": "00042", "image_uri": s3.uri("cats/img/a.jpg"), "title": "rel"},
            {"product_id": "b", "image_uri": "s3://other-bucket/b.jpg", "title": "abs"},
            {"product_id": "c", "image_uri": "/local/c.jpg", "title": "local"},
        ]

        for key in ["photos/shoes/boots/b1.jpg", "photos/top.PNG", "photos/notes.txt"]:
            s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"")
        for spelling in (s3.uri("photos"), s3.uri("photos") + "/"):
            t = read_catalog(spelling).table
            assert t.to_pylist() == [
                {
                    "product_id": "shoes/boots/b1",
                    "image_uri": s3.uri("photos/shoes/boots/b1.jpg"),
                    "category": "boots",
                },
                {"product_id": "top", "image_uri": s3.uri("photos/top.PNG"), "category": None},
            ], spelling

        missing = s3.uri("cats", "missing.parquet")
        with pytest.raises(storage.StorageError, match=re.escape(missing)):
            read_catalog(missing)
