# Helpers of the benchmark scripts (sourced by students.sh and levers.sh); they need R (the runs folder) and LOG_NAME.
mkdir -p "$R/logs"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$R/$LOG_NAME"; }
timed() {  # timed NAME CMD...: runs CMD (output in $R/logs/NAME.log), appends wall time + peak RSS to $R/times.jsonl
    local name=$1; shift
    if [ -x /usr/bin/time ]; then
        /usr/bin/time -f "{\"step\": \"$name\", \"wall_s\": %e, \"peak_rss_kib\": %M}" -a -o "$R/times.jsonl" "$@" \
            >>"$R/logs/$name.log" 2>&1
    else  # a machine without GNU time (the lent GPU machine): wall time only
        local t0=$SECONDS rc=0
        "$@" >>"$R/logs/$name.log" 2>&1 || rc=$?
        echo "{\"step\": \"$name\", \"wall_s\": $((SECONDS - t0)), \"peak_rss_kib\": null}" >>"$R/times.jsonl"
        return $rc
    fi
}
train_or_resume() {  # train_or_resume DIR CMD...: --resume when DIR holds a started run
    local dir=$1; shift
    if [ -f "$dir/summary.json" ]; then log "done: $dir"; return; fi
    if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then "$@" --resume; else "$@"; fi
}
