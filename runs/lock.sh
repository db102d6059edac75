#!/usr/bin/env bash
# Refresh uv.lock to the newest versions pyproject.toml allows, on purpose and tested: the new lock is resolved and
# installed in a separate copy of the checkout, the whole test suite runs there, and only when it passes does the
# new uv.lock replace this one (then commit it). The checkout's own .venv is not touched.
#
#   bash runs/lock.sh                  # upgrade everything
#   bash runs/lock.sh -P transformers  # upgrade one package (any `uv lock` flags are passed through)
#   KEEP=1 bash runs/lock.sh           # keep the trial copy for a look afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bash runs/setup.sh >/dev/null  # brings .uv/bin/uv at the pinned version
work=$(mktemp -d "${TMPDIR:-/tmp}/nanochat-lock.XXXXXX")
cleanup() { [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
trial=$work/nanochat
mkdir "$trial"
# the working tree as it is (tracked and untracked files, not the ignored build outputs), ../shared beside it
git ls-files -z --cached --others --exclude-standard | (cd "$repo" && xargs -0 cp --parents -t "$trial")
if [ -d ../shared ]; then ln -s "$(cd ../shared && pwd)" "$work/shared"; fi
cp -r .uv "$trial/.uv"
cd "$trial"
if [ "$#" = 0 ]; then set -- --upgrade; fi
echo "== uv lock $*"
.uv/bin/uv lock "$@"
echo "== what moved (package: old -> new)"
python3 - "$repo/uv.lock" uv.lock <<'PY'
import re, sys
def versions(path):
    out = {}
    for block in open(path).read().split("[[package]]")[1:]:
        name = re.search(r'^name = "([^"]+)"', block, re.M).group(1)
        version = re.search(r'^version = "([^"]+)"', block, re.M)
        out.setdefault(name, set()).add(version.group(1) if version else "?")
    return out
old, new = versions(sys.argv[1]), versions(sys.argv[2])
rows = [(n, ", ".join(sorted(old.get(n, {"-"}))), ", ".join(sorted(new.get(n, {"-"}))))
        for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]
for name, a, b in rows:
    print(f"  {name}: {a} -> {b}")
print(f"  {len(rows)} packages changed" if rows else "  nothing moved")
PY
echo "== set-up and the whole suite on the new lock (in $trial)"
bash runs/test.sh
cp uv.lock "$repo/uv.lock"
echo "== the suite passed on the new lock: $repo/uv.lock updated; review \`git diff uv.lock\` and commit it"
