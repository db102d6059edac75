"""`nanochat data`: one command over the data tooling below it.

- `download -n N`: FineWeb-Edu shuffle shards (nanochat.data.shards.download)
- `offline`: the offline demo corpus from Debian packages (nanochat.data.offline_corpus); not FineWeb
- `from-files`: shards from your own text files, JSONL or parquet (nanochat.data.from_files)
- `evals`: the eval/task data, delegated to nanochat.tasks.offline_data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from nanochat.data import from_files, offline_corpus
from nanochat.data.shards import HF_BASE_URL, DownloadConfig, data_dir, download, list_shards
from nanochat.tasks import offline_data


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanochat data", description="get pretraining and evaluation data")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download FineWeb-Edu shuffle shards (train shards + the validation shard)")
    dl.add_argument("-n", "--num-shards", type=int, required=True,
                    help="number of train shards (~100 MB, ~55 M tokens each; -1 = all 1822); "
                         "the validation shard is always added")
    dl.add_argument("--base-url", default=None,
                    help=f"where shard_XXXXX.parquet live (default $NANOCHAT_DATA_URL or {HF_BASE_URL})")
    dl.add_argument("--workers", type=int, default=8, help="parallel downloads (threads)")
    dl.add_argument("--attempts", type=int, default=5, help="tries per shard before giving up")
    dl.add_argument("--backoff", type=float, default=2.0, help="first retry wait in seconds (doubles each try)")
    dl.add_argument("--data-dir", default=None, help="output folder (default $NANOCHAT_BASE_DIR/base_data)")
    off = sub.add_parser("offline", help="build the offline PIPELINE DEMO corpus from Debian packages (not FineWeb)")
    off.add_argument("--data-dir", default=None, help="output folder (default $NANOCHAT_BASE_DIR/base_data)")
    off.add_argument("--extra", action="store_true",
                     help="also use fortunes, fortunes-min and linux-doc-6.1 (~38 MB more .debs, ~4x the text)")
    off.add_argument("--packages", default=",".join(("python3.11-doc", "r-cran-janeaustenr")),
                     help="comma-separated Debian packages to read (known: python3.11-doc, r-cran-janeaustenr, "
                          "fortunes, fortunes-min, linux-doc-6.1)")
    off.add_argument("--src", default=None,
                     help="folder holding already unpacked packages as SRC/<package>/ (skips apt-get)")
    off.add_argument("--seed", type=int, default=1234, help="shuffle seed")
    off.add_argument("--shard-chars", type=int, default=4_000_000, help="target characters per train shard")
    off.add_argument("--force", action="store_true", help="replace shards already in the data folder")
    from_files.add_parser(sub)
    ev = sub.add_parser("evals", help="build/fetch the evaluation and task data (nanochat.tasks.offline_data)",
                        add_help=False)
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _offline(args) -> int:
    out = Path(args.data_dir) if args.data_dir else data_dir()
    existing = list_shards(out)
    packages = [p.strip() for p in args.packages.split(",") if p.strip()]
    packages += [p for p in offline_corpus.OPTIONAL_PACKAGES if args.extra and p not in packages]
    marker = out / "offline_corpus.json"
    if existing and not args.force and marker.exists():  # already built: done, so recipes can call this every time
        built = json.loads(marker.read_text())
        if (built.get("packages"), built.get("seed")) == (packages, args.seed) and \
                [p.name for p in existing] == sorted(built.get("shards", {})):
            print(f"{out} already holds the offline demo corpus ({len(existing)} shards); --force rebuilds it")
            print(offline_corpus.DEMO_NOTICE)
            return 0
    if existing and not args.force:
        print(f"error: {out} already holds {len(existing)} shard(s) ({existing[0].name} ...); pass --force to "
              "replace them with the offline demo corpus", file=sys.stderr)
        return 1
    print(offline_corpus.DEMO_NOTICE)
    config = offline_corpus.CorpusConfig(seed=args.seed, train_shard_chars=args.shard_chars)
    staging = out.parent / f".{out.name}.offline-build"  # old shards stay until the new ones are complete
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stats = offline_corpus.build_offline(staging, packages, src_dir=args.src, config=config)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in existing:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, out / path.name)
    staging.rmdir()
    for name, shard in stats["shards"].items():
        print(f"  {name}: {shard['split']:<5} {shard['rows']:>6} rows {shard['chars']:>12,} chars")
    print(f"wrote {len(stats['shards'])} shards to {out} (the last is validation)")
    print(offline_corpus.DEMO_NOTICE)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evals"]:  # everything after `evals` belongs to the other module's parser
        return int(offline_data.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    if args.command == "download":
        config = DownloadConfig(base_url=args.base_url or os.environ.get("NANOCHAT_DATA_URL") or HF_BASE_URL,
                                workers=args.workers, attempts=args.attempts, backoff_s=args.backoff)
        out = Path(args.data_dir) if args.data_dir else data_dir()
        print(f"downloading {args.num_shards} train shard(s) + the validation shard from {config.base_url} to {out}")
        try:
            result = download(args.num_shards, out, config)
        except (RuntimeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"done: {len(result['downloaded'])} downloaded, {len(result['skipped'])} already present")
        return 0
    if args.command == "offline":
        return _offline(args)
    if args.command == "from-files":
        return from_files.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
