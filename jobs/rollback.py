"""Move CURRENT back to an older complete index version: undo a bad publish.

    python jobs/rollback.py --index-root URI --to VERSION [--s3-endpoint URL]

The move is a compare-and-swap like a publish, and is recorded in {index_root}/history/ with
"rollback": true. Refused (exit 2) when VERSION is missing, incomplete or not older than
CURRENT, or when the update log no longer holds the updates it would need (segments it did not
fold in are retired). The service switches on POST /admin/reload, then replays the update log
from that version's `updates_through`, so no acknowledged live update is lost. The next build
publishes forward over it as usual.
"""

from __future__ import annotations

import sys

from jobs import cli
from visual_search import storage, updates, versions


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    cli.add_index_root(p)
    p.add_argument("--to", required=True, metavar="VERSION", help="the version to make CURRENT")
    cli.add_s3_endpoint(p)
    args = p.parse_args(argv)
    if args.s3_endpoint:
        storage.configure(args.s3_endpoint)
    root = storage.normalize(args.index_root)

    def work() -> None:
        left = versions.roll_back(root, args.to)
        print(f"[rollback] CURRENT {left} -> {args.to}; POST /admin/reload to serve it", flush=True)

    return cli.exit_code("rollback", work, errors=(updates.LogError,))


if __name__ == "__main__":
    sys.exit(main())
