"""Near-duplicate groups (Contract 6): the pure stages on hand-made vectors and against a brute-
force reference, copy verification on drawn photos, and jobs/dedup.py end to end on a tiny
catalog embedded by jobs/embed.py and indexed by jobs/build_index.py (2 Flat shards): 12
products, 3 of them re-listed once as resized, re-encoded copies, one listed 3 more times (a
group of 4), one product with two identical photos (never an edge with itself); then a copy
added through the update log (Contract 5) and compacted joins its group incrementally."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import draw_product
from synthetic import clustered_vectors

from jobs import build_index, compact, embed
from jobs import dedup as dedup_job
from visual_search import dedup, dedup_verify, images, storage, updates, versions

THRESHOLD = 0.85  # cosine: the drawn copies score 0.89-0.93 with their sources


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


@pytest.mark.parametrize("k", [1, 3])
def test_chain_is_not_one_group(k):
    # a~b (0.95), b~c (0.82), a-c (0.6) unrelated: mutual 1-NN links a-b only; mutual top-3 links
    # both, and the completeness check keeps c out of a and b's group.
    a = np.array([1.0, 0.0, 0.0])
    b = _unit(np.array([[0.95, np.sqrt(1 - 0.95**2), 0.0]]))[0]
    c = _unit(np.array([[0.6, 0.8, 0.0]]))[0]
    x = np.stack([a, b, c]).astype(np.float32)
    assert x[0] @ x[2] < 0.7
    q, cand, s = _all_pairs(x, np.arange(3))
    pa_, pb, ps, ia, ib = dedup.product_pairs(q, cand, s, np.arange(3))
    assert (pa_ == ia).all() and (pb == ib).all()  # one photo per product: its own id
    edges = dedup.mutual_edges(pa_, pb, ps, 0.8, k)
    assert len(edges) == k // 3 + 1
    scores = dict(zip(zip(pa_.tolist(), pb.tolist(), strict=True), ps.tolist(), strict=True))
    groups = dedup.groups_from_edges(edges, ["a", "b", "c"], scores, 0.8)
    assert [sorted(g["members"]) for g in groups] == [["a", "b"]]
    assert groups[0]["members"]["a"] == 1.0 or groups[0]["members"]["b"] == 1.0


def test_copies_form_one_group_and_chains_split():
    """Four copies of one photo (every pair verified) form one group under mutual top-3; a
    look-alike verified with one of them only stays out; a chain w-x-y-z of look-alikes
    (consecutive pairs only) never puts two unrelated products in one group."""
    names = ["c0", "c1", "c2", "c3", "look", "w", "x", "y", "z"]
    scores = {(i, j): 0.99 - 0.001 * (i + j) for i in range(4) for j in range(i + 1, 4)}
    scores[(0, 4)] = 0.985
    scores.update({(5, 6): 0.98, (6, 7): 0.98, (7, 8): 0.98})
    pairs = sorted(scores)
    a, b = (np.array([p[j] for p in pairs]) for j in (0, 1))
    s = np.array([scores[p] for p in pairs], np.float32)
    edges = dedup.mutual_edges(a, b, s, 0.97, k=3)
    groups = dedup.groups_from_edges(edges, names, scores, 0.97)
    got = [sorted(g["members"]) for g in groups]
    assert ["c0", "c1", "c2", "c3"] in got
    code = {n: i for i, n in enumerate(names)}
    for g in got:  # every two members of a group were verified above the threshold
        for m, n in [(m, n) for m in g for n in g if code[m] < code[n]]:
            assert scores.get((code[m], code[n]), 0) >= 0.97, (m, n)
    assert all(len(g) == 2 for g in got if "w" in g or "z" in g)
    four = next(g for g in groups if "c1" in g["members"])
    assert four["members"][four["representative"]] == 1.0 and "look" not in four["members"]


def _photo(img) -> dedup_verify.Photo:
    return dedup_verify.photo_of(images.Preprocess(224, "pad")(img))


def _jpeg(img, quality: int):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return images.to_rgb(images.decode(buf.getvalue()))


def test_copy_score_tells_copies_from_look_alikes():
    """A resized, cropped, re-encoded copy scores above the default threshold; the same
    drawing in other colours (a colour variant), a different drawing, and a plain panel in
    another aspect ratio (two sizes of one product line) score below it."""
    from PIL import Image

    t = dedup_job.DEFAULT_THRESHOLD
    base = draw_product(7, (200, 160))
    copy = _jpeg(base.resize((140, 112)).crop((4, 3, 135, 108)), 60)
    assert dedup_verify.copy_score(_photo(base), _photo(copy)) >= t
    variant = Image.merge("RGB", base.split()[::-1])  # same shapes, channels swapped
    other = draw_product(8, (200, 160))
    for look_alike in (variant, other):
        assert dedup_verify.copy_score(_photo(base), _photo(look_alike)) < t
    panel, wider = (Image.new("RGB", (160, 200), "white") for _ in range(2))
    panel.paste((236, 232, 226), (50, 20, 110, 180))
    wider.paste((236, 232, 226), (35, 20, 125, 180))
    a, b = _photo(panel), _photo(wider)
    assert dedup_verify.box_transform(a, b) is None
    assert dedup_verify.copy_score(a, b) < t
    assert dedup_verify.copy_score(a, _photo(_jpeg(panel, 70))) >= t  # a copy of the panel


def test_same_product_photos_are_not_edges():
    x = _unit(np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]]))
    codes = np.array([0, 0, 1])  # two photos of product 0
    q, cand, s = _all_pairs(x, codes)
    a, b, sc, ia, ib = dedup.product_pairs(q, cand, s, codes)
    assert list(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 1)]
    assert (ia.tolist(), ib.tolist()) == ([1], [2])  # photo 1 of product 0 is the closer one
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
    a, b, sc, _, _ = dedup.product_pairs(q, cand, s, codes)
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


def _relist(path, seed: int, f: float, crop: int, quality: int) -> None:
    """A re-listed copy of draw_product(seed): resized f x, cropped `crop` px, JPEG."""
    w, h = round(160 * f), round(120 * f)
    img = draw_product(seed, (160, 120)).resize((w, h)).crop((crop, crop, w - crop, h - crop))
    img.save(path, format="JPEG", quality=quality)


COPY_GROUPS = {frozenset((f"p{i:02d}", f"q{i:02d}")) for i in range(3)} | {
    frozenset(("p04", "r040", "r041", "r042"))
}


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup_catalog")
    rows = []
    for i in range(12):
        draw_product(i, (160, 120)).save(root / f"p{i:02d}.jpg", quality=95)
        rows.append({"product_id": f"p{i:02d}", "image_uri": f"p{i:02d}.jpg", "category": "c0"})
    for i in range(3):  # re-listed: 0.9x, 1 px cropped, JPEG q 70
        _relist(root / f"q{i:02d}.jpg", i, 0.9, 1, 70)
        rows.append({"product_id": f"q{i:02d}", "image_uri": f"q{i:02d}.jpg", "category": "c1"})
    for j, (f, crop, q) in enumerate([(0.8, 3, 60), (0.7, 2, 80), (0.95, 4, 50)]):  # p04 x 3
        _relist(root / f"r04{j}.jpg", 4, f, crop, q)
        rows.append({"product_id": f"r04{j}", "image_uri": f"r04{j}.jpg", "category": "c1"})
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
    summary = dedup_job.run(dedup_job.Config(index_root=world["index_root"]))
    out = os.path.join(world["index_root"], "dedup", world["version"])
    files = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    assert {"groups.parquet", "report.html", "summary.md", "manifest.json"} <= set(files)
    assert max(files, key=files.get) == "manifest.json"  # written last
    table = pq.read_table(os.path.join(out, "groups.parquet"))
    assert table.schema.equals(dedup.GROUPS_SCHEMA)
    g = dedup.load_groups(out)
    got = {frozenset(p for p, _ in m) for m in g.members.values()}
    assert got == COPY_GROUPS  # every copy with its source, nothing else (p03's twin photos)
    assert g.duplicates("q00") == [("p00", pytest.approx(1.0))]
    assert all(s >= dedup_job.DEFAULT_THRESHOLD for m in g.members.values() for _, s in m)
    pairs = pq.read_table(os.path.join(out, "pairs.parquet"))
    verified = ~np.isnan(pairs["copy_score"].to_numpy())  # NaN: below E, never verified
    above = pairs["score"].to_numpy() >= dedup_job.DEFAULT_EMBEDDING_THRESHOLD
    assert (verified == above).all() and summary["verified_pairs"] == above.sum() >= 9
    assert json.loads(_read(out, "manifest.json"))["groups"] == len(COPY_GROUPS)
    assert summary["vectors"] == "embeddings dataset"
    html = _read(out, "report.html")
    assert "data:image/jpeg;base64," in html and "c1" in html
    assert "Share per category" in _read(out, "summary.md")


def test_incremental_reuses_previous(world, tmp_path):
    first = dedup_job.run(dedup_job.Config(index_root=world["index_root"], full=True))
    build = build_index.Config(
        embeddings=world["work"], index_root=world["index_root"], shards=2, factory="Flat"
    )
    again = build_index.run(build).version
    second = dedup_job.run(dedup_job.Config(index_root=world["index_root"]))
    assert second["version"] == again and second["reused_from"] is not None
    assert second["queried_items"] == 0  # nothing new: every product's photos are unchanged
    assert second["verified_pairs"] == 0  # and their copy scores are reused
    assert second["groups"] == first["groups"]
    a = pq.read_table(os.path.join(world["index_root"], "dedup", again, "groups.parquet"))
    b = pq.read_table(
        os.path.join(world["index_root"], "dedup", first["version"], "groups.parquet")
    )
    assert a.equals(b)


def test_update_log_copy_joins_its_group_incrementally(world, tmp_path):
    """A copy of p01 PUT through the update log (Contract 5, no vector: compaction embeds it)
    joins p01 and q01's group; only its photo is queried, the rest is reused."""
    photo = tmp_path / "live.jpg"
    _relist(photo, 1, 0.75, 2, 65)
    live = versions.open_version(world["index_root"]).manifest
    writer = updates.Writer(world["index_root"], updates.Position.of(live.updates_through), 1)
    writer.append([updates.Update(updates.UPSERT, "live01", str(photo), {"category": "c2"})])
    before = dedup_job.run(dedup_job.Config(index_root=world["index_root"]))
    compacted = compact.run(compact.Config(index_root=world["index_root"])).version
    after = dedup_job.run(dedup_job.Config(index_root=world["index_root"]))
    assert after["version"] == compacted and after["reused_from"] is not None
    assert before["version"] != compacted and after["queried_items"] == 1
    g = dedup.load_groups(dedup.output_root(world["index_root"], compacted))
    got = {frozenset(p for p, _ in m) for m in g.members.values()}
    assert got == (COPY_GROUPS - {frozenset(("p01", "q01"))}) | {
        frozenset(("p01", "q01", "live01"))
    }


def test_s3_output_round_trip(world):
    from s3server import S3Server

    with S3Server() as s3:
        out = f"s3://{s3.bucket}/dedup-out"
        dedup_job.run(dedup_job.Config(index_root=world["index_root"], out=out, full=True))
        g = dedup.load_groups(out)
        assert storage.exists(f"{out}/report.html")
    assert {frozenset(p for p, _ in m) for m in g.members.values()} >= {frozenset(("p00", "q00"))}


def test_unknown_version_or_root(world, tmp_path, capsys):
    assert dedup_job.main(["--index-root", str(tmp_path / "nowhere")]) == 2
    assert "index root not found" in capsys.readouterr().err
    assert dedup_job.main(["--index-root", world["index_root"], "--version", "v-nope"]) == 2
    assert "error:" in capsys.readouterr().err
    assert versions.current(world["index_root"]) is not None
