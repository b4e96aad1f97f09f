# Helpers of the benchmark scripts (sourced by students.sh and levers.sh); they need R (the runs folder) and LOG_NAME.
mkdir -p "$R/logs"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$R/$LOG_NAME"; }
timed() {  # timed NAME CMD...: runs CMD (output in $R/logs/NAME.log), appends wall time + peak RSS to $R/times.jsonl
    local name=$1; shift
    /usr/bin/time -f "{\"step\": \"$name\", \"wall_s\": %e, \"peak_rss_kib\": %M}" -a -o "$R/times.jsonl" "$@" \
        >>"$R/logs/$name.log" 2>&1
}
train_or_resume() {  # train_or_resume DIR CMD...: --resume when DIR holds a started run
    local dir=$1; shift
    if [ -f "$dir/summary.json" ]; then log "done: $dir"; return; fi
    if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then "$@" --resume; else "$@"; fi
}
