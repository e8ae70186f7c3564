"""Near-duplicate groups (Contract 6): the pure stages on hand-made vectors and against a brute-
force reference, and jobs/dedup.py end to end on a tiny catalog embedded by jobs/embed.py and
indexed by jobs/build_index.py (2 Flat shards): 12 products, 3 of them re-listed as resized,
re-encoded copies, one product with two identical photos (never an edge with itself)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import draw_product
from synthetic import clustered_vectors, read_in_manifest_order

from jobs import build_index, embed
from jobs import dedup as dedup_job
from visual_search import dedup, storage, versions

THRESHOLD = 0.85  # the drawn copies score 0.89-0.93 with their sources


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _all_pairs(vectors: np.ndarray, codes: np.ndarray):
    """Every item pair as candidates (exact scores)."""
    n = len(vectors)
    sims = vectors @ vectors.T
    cand = np.tile(np.arange(n), (n, 1))
    cand[np.arange(n), np.arange(n)] = -1
    return np.arange(n), cand, sims.astype(np.float32)


def reference_groups(vectors: np.ndarray, pids: list[str], t: float) -> dict[frozenset, float]:
    """Brute force: product similarity = max over photos; edge iff mutual argmax and >= t;
    groups are connected components (pairs under mutual 1-NN) -> {members: edge score}."""
    names = sorted(set(pids))
    code = np.array([names.index(p) for p in pids])
    m = len(names)
    sim = np.full((m, m), -np.inf)
    full = vectors @ vectors.T
    for i in range(len(pids)):
        for j in range(len(pids)):
            if code[i] != code[j]:
                sim[code[i], code[j]] = max(sim[code[i], code[j]], full[i, j])
    best = [min(range(m), key=lambda j: (-sim[i, j], j)) for i in range(m)]
    out = {}
    for i in range(m):
        j = best[i]
        if i < j and best[j] == i and sim[i, j] >= t:
            out[frozenset((names[i], names[j]))] = float(sim[i, j])
    return out


def test_chain_is_not_one_group():
    # a~b (0.95), b~c (0.94), a-c unrelated: only the mutual pair a-b is an edge.
    a = np.array([1.0, 0.0, 0.0])
    b = _unit(np.array([[0.95, np.sqrt(1 - 0.95**2), 0.0]]))[0]
    c = _unit(np.array([[0.6, 0.8, 0.0]]))[0]
    x = np.stack([a, b, c]).astype(np.float32)
    assert x[0] @ x[2] < 0.7
    q, cand, s = _all_pairs(x, np.arange(3))
    pa_, pb, ps = dedup.product_pairs(q, cand, s, np.arange(3))
    edges = dedup.mutual_edges(pa_, pb, ps, 0.5)
    groups = dedup.groups_from_edges(edges, ["a", "b", "c"])
    assert [sorted(g["members"]) for g in groups] == [["a", "b"]]
    assert groups[0]["members"]["a"] == 1.0 or groups[0]["members"]["b"] == 1.0


def test_same_product_photos_are_not_edges():
    x = _unit(np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]]))
    codes = np.array([0, 0, 1])  # two photos of product 0
    q, cand, s = _all_pairs(x, codes)
    a, b, sc = dedup.product_pairs(q, cand, s, codes)
    assert list(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 1)]
    assert dedup.mutual_edges(a, b, sc, 0.5) == []


def test_groups_match_brute_force():
    rng = np.random.default_rng(3)
    base = clustered_vectors(60, 16, seed=1, clusters=4)
    copies = _unit(base[:15] + 0.05 * rng.standard_normal((15, 16)).astype(np.float32))
    x = np.concatenate([base, copies])
    pids = [f"p{i:03d}" for i in range(60)] + [f"c{i:03d}" for i in range(15)]
    pids[5] = pids[6]  # one product with two photos
    names = sorted(set(pids))
    codes = np.array([names.index(p) for p in pids])
    q, cand, s = _all_pairs(x, codes)
    a, b, sc = dedup.product_pairs(q, cand, s, codes)
    groups = dedup.groups_from_edges(dedup.mutual_edges(a, b, sc, THRESHOLD), names)
    got = {frozenset(g["members"]): min(g["members"].values()) for g in groups}
    want = reference_groups(x, pids, THRESHOLD)
    assert set(got) == set(want) and len(want) >= 5
    for key, score in want.items():
        assert got[key] == pytest.approx(score, abs=1e-5)
    assert [g["group_id"] for g in groups] == list(range(len(groups)))


def test_representative_and_determinism():
    # mutual_k=2 lets a triangle form; the representative has the highest sum of edge scores.
    a = np.array([0, 0, 1])
    b = np.array([1, 2, 2])
    s = np.array([0.99, 0.98, 0.95], np.float32)
    names = ["x", "y", "z"]
    g1 = dedup.groups_from_edges(dedup.mutual_edges(a, b, s, 0.9, k=2), names)
    g2 = dedup.groups_from_edges(dedup.mutual_edges(a[::-1], b[::-1], s[::-1], 0.9, k=2), names)
    assert g1 == g2
    assert g1[0]["representative"] == "x" and g1[0]["members"]["y"] == pytest.approx(0.99)


def test_pr_curve_and_threshold():
    scores = np.array([0.99, 0.97, 0.95, 0.93, 0.9, 0.8])
    labels = np.array([1, 1, 0, 1, 0, 0])
    curve = dedup.pr_curve(scores, labels, np.array([0.96, 0.94, 0.92, 0.85]))
    assert [(p["precision"], p["recall"]) for p in curve] == [
        (1.0, 2 / 3),
        (2 / 3, 2 / 3),
        (0.75, 1.0),
        (0.6, 1.0),
    ]
    assert dedup.choose_threshold(curve, 0.99)["threshold"] == 0.96


def test_load_groups_refuses_malformed_output(tmp_path):
    """What the service reads: a complete output with GROUPS_SCHEMA's columns, else an error
    (the ingress logs it and serves without groups)."""
    out = str(tmp_path)
    good = dedup.groups_table(dedup.groups_from_edges([(0, 1, 0.98)], ["a", "b"]))
    pq.write_table(good, tmp_path / "groups.parquet")
    with pytest.raises(dedup.DedupError, match="no manifest.json"):
        dedup.load_groups(out)
    (tmp_path / "manifest.json").write_text("{}")
    g = dedup.load_groups(out)
    assert g.group_of == {"a": 0, "b": 0} and g.duplicates("b") == [("a", 1.0)]
    nulls = pa.table({"product_id": pa.array(["a", None]), "group_id": pa.array([0, 0]),
                      "score": pa.array([1.0, 0.9], pa.float32())})  # fmt: skip
    for bad in (good.drop_columns(["score"]), good.set_column(1, "group_id", good["score"]), nulls):
        pq.write_table(bad, tmp_path / "groups.parquet")
        with pytest.raises(dedup.DedupError, match="needs a column"):
            dedup.load_groups(out)
    (tmp_path / "groups.parquet").write_bytes(b"not parquet")
    with pytest.raises(storage.StorageError):
        dedup.load_groups(out)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup_catalog")
    rows = []
    for i in range(12):
        draw_product(i, (160, 120)).save(root / f"p{i:02d}.jpg", quality=95)
        rows.append({"product_id": f"p{i:02d}", "image_uri": f"p{i:02d}.jpg", "category": "c0"})
    for i in range(3):  # re-listed: 0.9x, 1 px cropped, JPEG q 70
        img = draw_product(i, (160, 120)).resize((144, 108)).crop((1, 1, 143, 107))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=70)
        (root / f"q{i:02d}.jpg").write_bytes(buf.getvalue())
        rows.append({"product_id": f"q{i:02d}", "image_uri": f"q{i:02d}.jpg", "category": "c1"})
    (root / "p03-b.jpg").write_bytes((root / "p03.jpg").read_bytes())  # a 2nd, same photo
    rows.append({"product_id": "p03", "image_uri": "p03-b.jpg", "category": "c0"})
    pq.write_table(pa.Table.from_pylist(rows), root / "catalog.parquet")
    work = str(tmp_path_factory.mktemp("dedup_work") / "emb")
    index_root = str(tmp_path_factory.mktemp("dedup_index"))
    embed.run(embed.Config(catalog=str(root / "catalog.parquet"), out=work, batch_size=16))
    build = build_index.Config(embeddings=work, index_root=index_root, shards=2, factory="Flat")
    version = build_index.run(build).version
    return {"index_root": index_root, "work": work, "version": version}


def _read(*parts: str) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read()


def test_job_end_to_end(world):
    summary = dedup_job.run(dedup_job.Config(index_root=world["index_root"], threshold=THRESHOLD))
    out = os.path.join(world["index_root"], "dedup", world["version"])
    files = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    assert {"groups.parquet", "report.html", "summary.md", "manifest.json"} <= set(files)
    assert max(files, key=files.get) == "manifest.json"  # written last
    table = pq.read_table(os.path.join(out, "groups.parquet"))
    assert table.schema.equals(dedup.GROUPS_SCHEMA)
    pids, vectors = read_in_manifest_order(world["work"])
    want = reference_groups(vectors, pids, THRESHOLD)
    g = dedup.load_groups(out)
    got = {frozenset(p for p, _ in m) for m in g.members.values()}
    assert got == set(want)
    assert {frozenset((f"p{i:02d}", f"q{i:02d}")) for i in range(3)} <= got
    assert all("p03" not in k or len(k) == 2 for k in got)
    assert g.duplicates("q00")[0][0] == "p00"
    assert json.loads(_read(out, "manifest.json"))["groups"] == len(want)
    assert summary["vectors"] == "embeddings dataset"
    html = _read(out, "report.html")
    assert "data:image/jpeg;base64," in html and "c1" in html
    assert "Share per category" in _read(out, "summary.md")


def test_incremental_reuses_previous(world, tmp_path):
    first = dedup_job.run(
        dedup_job.Config(index_root=world["index_root"], threshold=THRESHOLD, full=True)
    )
    build = build_index.Config(
        embeddings=world["work"], index_root=world["index_root"], shards=2, factory="Flat"
    )
    again = build_index.run(build).version
    second = dedup_job.run(dedup_job.Config(index_root=world["index_root"], threshold=THRESHOLD))
    assert second["version"] == again and second["reused_from"] is not None
    assert second["queried_items"] == 0  # nothing new: every product's photos are unchanged
    assert second["groups"] == first["groups"]
    a = pq.read_table(os.path.join(world["index_root"], "dedup", again, "groups.parquet"))
    b = pq.read_table(
        os.path.join(world["index_root"], "dedup", first["version"], "groups.parquet")
    )
    assert a.equals(b)


def test_s3_output_round_trip(world):
    from s3server import S3Server

    with S3Server() as s3:
        out = f"s3://{s3.bucket}/dedup-out"
        dedup_job.run(
            dedup_job.Config(
                index_root=world["index_root"], out=out, threshold=THRESHOLD, full=True
            )
        )
        g = dedup.load_groups(out)
        assert storage.exists(f"{out}/report.html")
    assert {frozenset(p for p, _ in m) for m in g.members.values()} >= {frozenset(("p00", "q00"))}


def test_unknown_version_or_root(world, tmp_path, capsys):
    assert dedup_job.main(["--index-root", str(tmp_path / "nowhere")]) == 2
    assert "index root not found" in capsys.readouterr().err
    assert dedup_job.main(["--index-root", world["index_root"], "--version", "v-nope"]) == 2
    assert "error:" in capsys.readouterr().err
    assert versions.current(world["index_root"]) is not None
