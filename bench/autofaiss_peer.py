"""autofaiss as a peer baseline for the index benchmark, in a venv of its own.

autofaiss 2.18.0 cannot share the project venv: it fails with faiss-cpu 1.15
(`OPQMatrix.__init__() got an unexpected keyword argument 'M'`) and pins numpy < 2, which
pyarrow 26 refuses. So it lives in a separate venv with the exact pin set in PEER_PINS, and this
file has two roles:

  Set-up, run by the project's python (standard library only; pip runs inside the peer venv):
      python bench/autofaiss_peer.py --setup VENV_DIR
  Idempotent: a stamp file in VENV_DIR records the pin set and the python it was built with; when
  it matches, nothing is installed (well under a second). From code: ensure_peer_venv(VENV_DIR).

  Measurement, run by the PEER venv's python:
      VENV/bin/python bench/autofaiss_peer.py --run --embeddings DIR --queries Q.npy --gt GT.npy \
          --k 10 --max-memory 280MB --threads 2 --out result.json [--metric ip]
  DIR is a folder of .npy files (float32, (n_i, d)); database ids are row positions in the
  concatenation of those files in sorted path order (that is how autofaiss' embedding_reader reads
  them), and GT.npy (int64, (nq, >= k)) must use the same ids. autofaiss.build_index picks the
  index type for the memory budget, trains, fills, tunes its own search parameters and writes the
  index plus index_infos.json. Then this script loads the written index, applies exactly the
  parameter string autofaiss chose (index_infos.json "index_param", e.g.
  "nprobe=1317,efSearch=2634,ht=2048"), and measures recall@k and batched queries/s itself.
  Prints the result JSON and writes it to --out.

Note on what autofaiss tunes: its parameter search maximises nprobe (efSearch) under a latency
bound, --max-query-time-ms (autofaiss' max_index_query_time_ms, 10 ms by default), measured one
query at a time with k=40 on random vectors, not on the real queries and not batched.

Only the standard library is imported at module level; numpy, faiss and autofaiss are imported
inside --run, after the thread-count environment variables are set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The whole peer venv, exactly (pip freeze of a working install, checked on Python 3.11).
PEER_PINS = (
    "autofaiss==2.18.0",
    "faiss-cpu==1.9.0.post1",
    "numpy==1.26.4",
    "pyarrow==15.0.2",
    "embedding-reader==1.8.1",
    "fire==0.6.0",
    "fsspec==2026.9.0",
    "pandas==2.3.3",
    "python-dateutil==4.0.0",
    "pytz==2026.6",
    "six==1.17.0",
    "termcolor==3.3.0",
    "tqdm==4.70.1",
    "tzdata==2026.6",
    "packaging==26.3",
)
STAMP_NAME = ".autofaiss-peer-stamp.json"
DEFAULT_VENV = Path(__file__).resolve().parent.parent / ".cache" / "autofaiss-venv"


# ---------------------------------------------------------------------------------------------
# Set-up (project python, standard library only)
# ---------------------------------------------------------------------------------------------


def peer_python(venv_dir: str | os.PathLike) -> Path:
    return Path(venv_dir) / "bin" / "python"


def _stamp(python: str) -> dict:
    version = subprocess.run(
        [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {"pins": list(PEER_PINS), "python": version}


def ensure_peer_venv(
    venv_dir: str | os.PathLike = DEFAULT_VENV, python: str | None = None, quiet: bool = False
) -> Path:
    """Create or update the peer venv at venv_dir with PEER_PINS; returns its python.

    Fast when the stamp file says the venv already holds exactly these pins. `python` is the
    interpreter the venv is created from (default: the one running this, which must be a version
    the pinned wheels exist for: 3.9 to 3.12)."""
    venv_dir = Path(venv_dir).resolve()
    py = peer_python(venv_dir)
    stamp_path = venv_dir / STAMP_NAME
    if py.exists() and stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == _stamp(str(py)):
                return py
        except (ValueError, OSError, subprocess.CalledProcessError):
            pass
    log = (lambda *a: None) if quiet else (lambda *a: print("[autofaiss-peer]", *a, flush=True))
    base = python or sys.executable
    t0 = time.perf_counter()
    if not py.exists():
        log(f"creating venv {venv_dir} with {base}")
        subprocess.run([base, "-m", "venv", str(venv_dir)], check=True)
    stamp_path.unlink(missing_ok=True)
    log("installing", " ".join(PEER_PINS))
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    if quiet:
        pip.append("-q")
    subprocess.run([*pip, *PEER_PINS], check=True)
    # Fails loudly here rather than in the middle of a benchmark.
    subprocess.run(
        [
            str(py),
            "-c",
            "import autofaiss, faiss; faiss.ParameterSpace(); print('faiss', faiss.__version__)",
        ],
        check=True,
    )
    stamp_path.write_text(json.dumps(_stamp(str(py)), indent=1) + "\n")
    log(f"peer venv ready in {time.perf_counter() - t0:.1f} s: {py}")
    return py


# ---------------------------------------------------------------------------------------------
# Measurement (peer venv python)
# ---------------------------------------------------------------------------------------------


def recall_at_k(found, truth, k: int) -> float:
    """Mean |found_k ∩ truth_k| / k over queries (as visual_search.index.recall_at_k)."""
    total = 0.0
    for f_row, t_row in zip(found, truth, strict=True):
        f = [int(i) for i in f_row if i >= 0][:k]
        t = [int(i) for i in t_row if i >= 0][:k]
        total += len(set(f) & set(t)) / max(len(t), 1)
    return total / max(len(found), 1)


def _effective_params(faiss, index) -> dict:
    """Search parameters as they actually are on the loaded index (read back, not parsed)."""
    out: dict = {}
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        out["nprobe"] = int(ivf.nprobe)
        out["nlist"] = int(ivf.nlist)
        q = faiss.downcast_index(ivf.quantizer)
        if hasattr(q, "hnsw"):
            out["quantizer_efSearch"] = int(q.hnsw.efSearch)
        ivf_d = faiss.downcast_index(ivf)
        if hasattr(ivf_d, "polysemous_ht"):
            out["polysemous_ht"] = int(ivf_d.polysemous_ht)
    else:
        base = faiss.downcast_index(index)
        if hasattr(base, "hnsw"):
            out["efSearch"] = int(base.hnsw.efSearch)
    return out


def run(args: argparse.Namespace) -> dict:
    threads = str(args.threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    # Imported only now, after the thread-count variables are set.
    import autofaiss
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    index_path = work / "knn.index"
    infos_path = work / "index_infos.json"
    for p in (index_path, infos_path):
        p.unlink(missing_ok=True)

    t0 = time.perf_counter()
    built, _ = autofaiss.build_index(
        embeddings=str(Path(args.embeddings).resolve()),
        index_path=str(index_path),
        index_infos_path=str(infos_path),
        file_format="npy",
        max_index_memory_usage=args.max_memory,
        current_memory_available=args.memory_available,
        max_index_query_time_ms=args.max_query_time_ms,
        metric_type=args.metric,
        nb_cores=args.threads,
        save_on_disk=True,
        verbose=args.verbose,
    )
    build_s = time.perf_counter() - t0
    if built is None or not index_path.exists():
        raise SystemExit("autofaiss.build_index built no index (see its log above)")
    del built

    infos = json.loads(infos_path.read_text())
    index_key = infos["index_key"]
    search_params = infos.get("index_param") or ""
    index = faiss.read_index(str(index_path))
    params_as_saved = _effective_params(faiss, index)
    faiss.omp_set_num_threads(args.threads)
    if search_params:
        faiss.ParameterSpace().set_index_parameters(index, search_params)
    effective = _effective_params(faiss, index)

    queries = np.ascontiguousarray(np.load(args.queries), dtype=np.float32)
    gt = np.load(args.gt).astype(np.int64)
    if gt.shape[0] != queries.shape[0] or gt.shape[1] < args.k:
        raise SystemExit(f"GT {gt.shape} does not fit queries {queries.shape} and k={args.k}")
    index.search(queries, args.k)  # warm-up
    t1 = time.perf_counter()
    _, found = index.search(queries, args.k)
    search_s = time.perf_counter() - t1

    n = int(index.ntotal)
    index_bytes = index_path.stat().st_size
    recall = recall_at_k(found, gt, args.k)
    result = {
        "peer": "autofaiss",
        "index_key": index_key,
        "factory": index_key,
        "search_params": search_params,
        "effective_params": effective,
        "params_as_saved": params_as_saved,
        f"recall_at_{args.k}": round(recall, 6),
        "k": args.k,
        "queries_per_s": round(len(queries) / search_s, 2),
        "nq": int(len(queries)),
        "build_s": round(build_s, 2),
        "bytes_per_vector": round(index_bytes / max(n, 1), 3),
        "index_bytes": index_bytes,
        "n": n,
        "d": int(index.d),
        "metric": args.metric,
        "threads": args.threads,
        "max_memory": args.max_memory,
        "memory_available": args.memory_available,
        "max_query_time_ms": args.max_query_time_ms,
        "faiss_version": faiss.__version__,
        "autofaiss_version": getattr(autofaiss, "__version__", None) or _dist_version("autofaiss"),
        "autofaiss_infos": infos,
    }
    if not args.keep_index:
        index_path.unlink(missing_ok=True)
    return result


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--setup", metavar="VENV_DIR", help="create/update the peer venv and exit")
    mode.add_argument("--run", action="store_true", help="build + measure (peer venv python)")
    ap.add_argument("--python", help="--setup: interpreter to create the venv from")
    ap.add_argument("--embeddings", help="folder of .npy files (float32 (n_i, d))")
    ap.add_argument("--queries", help="queries .npy, float32 (nq, d)")
    ap.add_argument("--gt", help="ground-truth ids .npy, int64 (nq, >= k)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-memory", default="280MB", help="autofaiss max_index_memory_usage")
    ap.add_argument(
        "--memory-available", default="8G", help="autofaiss current_memory_available (build RAM)"
    )
    ap.add_argument(
        "--max-query-time-ms",
        type=float,
        default=10.0,
        help="autofaiss max_index_query_time_ms (its tuning target; 10 is its default)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--metric", default="ip", choices=["ip", "l2"])
    ap.add_argument("--out", help="result JSON path")
    ap.add_argument("--work-dir", help="where the index is written (default: next to --out)")
    ap.add_argument("--keep-index", action="store_true")
    ap.add_argument("--verbose", type=int, default=20, help="autofaiss logging level")
    args = ap.parse_args(argv)

    if args.setup:
        py = ensure_peer_venv(args.setup, python=args.python)
        print(py)
        return 0

    missing = [o for o in ("embeddings", "queries", "gt", "out") if not getattr(args, o)]
    if missing:
        ap.error("--run needs " + ", ".join("--" + m for m in missing))
    if args.work_dir is None:
        args.work_dir = str(Path(args.out).resolve().parent / "autofaiss-work")
    result = run(args)
    text = json.dumps(result, indent=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
