# What the two download scripts share. data/download_cyclegan_dataset.sh and
# saved_models/download_pretrained_model.sh set
#   PROG  the script as run from the repository root, e.g. data/download_cyclegan_dataset.sh
# then source this file, which sets SCRIPT_DIR (the script's folder) and defines
# the functions below. Running it on its own does nothing. Plain POSIX sh, like
# them: no "local", so the functions' variables are global, named with a leading
# _ so as not to clash with theirs.

err() {
    note "error: $*"
}

# One line on stderr, after the script's file name.
note() {
    echo "${PROG##*/}: $*" >&2
}

# SCRIPT_DIR: the folder that holds the script, where all it writes goes.
SCRIPT_DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P) || {
    err "cannot find the directory of $0"
    exit 1
}

# check_name KIND "NAME1 NAME2 ..." ARG...: returns if ARG... is exactly one of
# the names, else exits 1 with the usage and the list; KIND is "dataset" or
# "model", for the messages.
check_name() {
    _kind=$1
    _names=$2
    shift 2
    if [ "$#" -ne 1 ]; then
        [ "$#" -eq 0 ] && err "no $_kind name given"
        [ "$#" -gt 1 ] && err "expected exactly one $_kind name, got $#"
        usage "$_names"
    fi
    for _name in $_names; do
        [ "$_name" = "$1" ] && return 0
    done
    err "unknown $_kind '$1'"
    usage "$_names"
}

usage() {
    echo "usage: sh $PROG NAME" >&2
    echo "valid names: $1" >&2
    exit 1
}

# exit_if_present DEST NAME: a download already in place is left as it is.
exit_if_present() {
    if [ -e "$1" ]; then
        echo "$1 already exists; not downloading $2 again (delete it to re-download)."
        exit 0
    fi
}

# find_downloader WHAT: sets FETCH to curl, else wget, else exits naming WHAT.
find_downloader() {
    if command -v curl >/dev/null 2>&1; then
        FETCH=curl
    elif command -v wget >/dev/null 2>&1; then
        FETCH=wget
    else
        err "neither curl nor wget is installed; install one of them to download $1"
        exit 1
    fi
}

# ---- cleanup on failure or interruption ----
# The script defines cleanup() (the partial files to remove) and calls
# clean_up_on_exit once there is something to remove.
CHILD=
on_exit() {
    _status=$?
    trap - EXIT INT TERM HUP
    if [ -n "$CHILD" ]; then
        kill "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
        CHILD=
    fi
    cleanup
    exit "$_status"
}
on_signal() {
    err "interrupted by SIG$1; removing the partial download"
    exit "$2"
}
clean_up_on_exit() {
    trap on_exit EXIT
    trap 'on_signal INT 130' INT
    trap 'on_signal TERM 143' TERM
    trap 'on_signal HUP 129' HUP
}

# Run a command in the background and wait for it, so that a signal sent to
# this shell is handled at once (and the child is killed by on_exit) instead of
# only after a long download has finished.
run() {
    "$@" &
    CHILD=$!
    wait "$CHILD"
    _rc=$?
    CHILD=
    return "$_rc"
}

# move_into_place FROM DEST WHAT: the last step; DEST that appeared meanwhile
# (another run, or the user) is left alone. WHAT names FROM in the message.
move_into_place() {
    if [ -e "$2" ]; then
        err "$2 appeared while downloading; leaving it alone"
        exit 1
    fi
    mv "$1" "$2" || {
        err "cannot move $3 to $2"
        exit 1
    }
}
