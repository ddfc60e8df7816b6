# Shared by the scripts/gpu/*.sh runs that take one deadline: source it after setting
#   D (output folder), START and DEADLINE (epoch seconds);
# optional STEP_SCALE (multiplies each step's MAX_S, e.g. 8 for CPU smoke runs) and
# STEP_TIMEOUT_NOTE (what a timeout means for that script's results).

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$D/progress.log"; }

# step NAME RESERVE_S MAX_S CMD...: runs CMD with timeout = min(MAX_S, time left - RESERVE_S),
# output in $D/step_NAME.log, exit status in $D/step_NAME.rc; returns that status (1 if skipped).
step() {
    local name=$1 reserve=$2 max=$(( $3 * ${STEP_SCALE:-1} )); shift 3
    local left=$(( DEADLINE - $(date +%s) - reserve ))
    local t=$(( max < left ? max : left ))
    if [ "$t" -lt 30 ]; then log "step $name: SKIPPED (only ${t}s left)"; echo "skipped" > "$D/step_$name.rc"; return 1; fi
    log "step $name: start (timeout ${t}s)"
    timeout -k 10 "$t" "$@" > "$D/step_$name.log" 2>&1
    local rc=$?
    echo "$rc" > "$D/step_$name.rc"
    log "step $name: rc=$rc$( [ $rc -eq 124 ] && echo " (TIMEOUT${STEP_TIMEOUT_NOTE:+: $STEP_TIMEOUT_NOTE})")"
    grep -E '^\[[0-9:]{8}\]|Error|error:|Traceback' "$D/step_$name.log" | grep -v Warning | tail -n 25
    return $rc
}
