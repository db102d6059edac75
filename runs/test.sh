#!/usr/bin/env bash
# The README's test command: set up (idempotent), then the Rust crate's tests and the Python suite.
# As root with the user nanochat-ci present (CI: .ci/run creates it), the sandbox suite runs a second time as that
# unprivileged user, where only the kernel barrier (seccomp + Landlock) and the rlimits hold.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
cargo test --locked --release --workspace
python -m pytest -q --durations=20 "$@"

if [ "$#" = 0 ] && [ "$(id -u)" = 0 ] && id nanochat-ci >/dev/null 2>&1; then
    # The user must reach the checkout and the interpreter behind .venv (e.g. under /root): grant search (x) on the
    # dirs that lack it for others, and take it back afterwards.
    opened=()
    restore() { for d in "${opened[@]+"${opened[@]}"}"; do chmod o-x "$d"; done; }
    trap restore EXIT
    for path in "$PWD" "$(readlink -f .venv/bin/python)"; do
        d=$(dirname "$path")
        [ -d "$path" ] && d=$path
        while [ "$d" != / ]; do
            perm=$(stat -c %A "$d")
            case "${perm: -1}" in x|t) ;; *) chmod o+x "$d"; opened+=("$d") ;; esac
            d=$(dirname "$d")
        done
    done
    # User namespaces are refused too (a seccomp filter around pytest, as on machines that disable them), so the
    # sandbox gets no network namespace either: only seccomp, Landlock and the rlimits are left.
    no_userns='import errno, os, sys, pyseccomp as sc
f = sc.SyscallFilter(sc.ALLOW)
f.add_rule(sc.ERRNO(errno.EPERM), "unshare", sc.Arg(0, sc.MASKED_EQ, 0x10000000, 0x10000000))
f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, 0x10000000, 0x10000000))
f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
f.load()
os.execv(sys.executable, [sys.executable] + sys.argv[1:])'
    echo "sandbox suite as the unprivileged user nanochat-ci, without user namespaces:"
    runuser -u nanochat-ci -- env -i PATH="$PATH" HOME="$(getent passwd nanochat-ci | cut -d: -f6)" TMPDIR=/tmp \
        LANG=C.UTF-8 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 \
        "$PWD/.venv/bin/python" -c "$no_userns" -m pytest -q -p no:cacheprovider \
        tests/test_sandbox.py tests/test_sandbox_child.py tests/test_sandbox_escapes.py tests/test_humaneval.py
fi
