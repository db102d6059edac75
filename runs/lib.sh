# Shared by runs/cpu_default.sh and runs/speedrun.sh (sourced, not run).
# stage NAME CMD...: run CMD unless NAME completed before (a marker in $NANOCHAT_BASE_DIR/report/stages/), so a
# rerun of the whole recipe resumes at the first unfinished stage. NANOCHAT_REDO=1 reruns everything.
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
STAGE_DIR="$NANOCHAT_BASE_DIR/report/stages"
mkdir -p "$STAGE_DIR"

stage() {
    local name=$1; shift
    if [ -f "$STAGE_DIR/$name.done" ] && [ "${NANOCHAT_REDO:-0}" != 1 ]; then
        echo "== $name: done in an earlier run, skipped (NANOCHAT_REDO=1 reruns it)"
        return 0
    fi
    echo "== $name: $*"
    local t0=$SECONDS
    "$@"
    echo "$((SECONDS - t0))" > "$STAGE_DIR/$name.done"
    echo "== $name: finished in $((SECONDS - t0)) s"
}
