#!/bin/sh
# Download one of the unpaired CycleGAN datasets and unpack it next to this
# script, i.e. into data/NAME/{trainA,trainB,testA,testB}.
#
# Usage (from the repository root or from inside data/):
#   sh data/download_cyclegan_dataset.sh NAME
#   cd data && sh download_cyclegan_dataset.sh NAME
#
# The datasets used to be hosted under
#   https://people.eecs.berkeley.edu/~taesung_park/CycleGAN/datasets/
# which is the URL many tutorials still use; that host is dead. The authors now
# serve them from efrosgans.eecs.berkeley.edu (see DEFAULT_BASE_URL below).
#
# Environment:
#   CYCLEGAN_DATASET_URL  base URL to download NAME.zip from instead of the
#                         default one (the tests point it at a file:// URL or
#                         an http server on 127.0.0.1).
#
# Plain POSIX sh: behaves the same under dash and bash. Needs curl or wget, and
# unzip or python3 (python3 -m zipfile is used when unzip is missing).

DATASETS="apple2orange summer2winter_yosemite horse2zebra monet2photo cezanne2photo ukiyoe2photo vangogh2photo maps facades iphone2dslr_flower ae_photos mini"
DEFAULT_BASE_URL="https://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
PROG=download_cyclegan_dataset.sh

usage() {
    echo "usage: sh data/download_cyclegan_dataset.sh NAME" >&2
    echo "valid names: $DATASETS" >&2
    exit 1
}

err() {
    echo "$PROG: error: $*" >&2
}

# ---- arguments (checked before anything touches the disk or the network) ----
if [ "$#" -ne 1 ]; then
    [ "$#" -eq 0 ] && err "no dataset name given"
    [ "$#" -gt 1 ] && err "expected exactly one dataset name, got $#"
    usage
fi
NAME=$1
known=0
for d in $DATASETS; do
    if [ "$d" = "$NAME" ]; then
        known=1
    fi
done
if [ "$known" -ne 1 ]; then
    err "unknown dataset '$NAME'"
    usage
fi

# ---- locations: always the folder that holds this script ----
SCRIPT_DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P) || {
    err "cannot find the directory of $0"
    exit 1
}
DEST="$SCRIPT_DIR/$NAME"
PART="$SCRIPT_DIR/$NAME.zip.part"
TMP_DIR="$SCRIPT_DIR/.$NAME.unpack.$$"

if [ -e "$DEST" ]; then
    echo "$DEST already exists; not downloading $NAME again (delete it to re-download)."
    exit 0
fi

BASE_URL=${CYCLEGAN_DATASET_URL:-$DEFAULT_BASE_URL}
BASE_URL=${BASE_URL%/}
URL="$BASE_URL/$NAME.zip"

# ---- tools (checked before downloading anything) ----
if command -v curl >/dev/null 2>&1; then
    FETCH=curl
elif command -v wget >/dev/null 2>&1; then
    FETCH=wget
else
    err "neither curl nor wget is installed; install one of them to download $URL"
    exit 1
fi
if command -v unzip >/dev/null 2>&1; then
    UNZIP=unzip
elif command -v python3 >/dev/null 2>&1 && python3 -c 'import zipfile' >/dev/null 2>&1; then
    UNZIP=python3
else
    err "neither unzip nor python3 is installed; install one of them to unpack $NAME.zip"
    exit 1
fi

# ---- cleanup on failure or interruption ----
CHILD=
cleanup() {
    if [ -n "$CHILD" ]; then
        kill "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
        CHILD=
    fi
    rm -f "$PART"
    rm -rf "$TMP_DIR"
}
on_exit() {
    status=$?
    trap - EXIT INT TERM HUP
    cleanup
    exit "$status"
}
on_signal() {
    err "interrupted by SIG$1; removing the partial download"
    exit "$2"
}
trap on_exit EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

# Run a command in the background and wait for it, so that a signal sent to
# this shell is handled at once (and the child is killed by cleanup) instead of
# only after a long download has finished.
run() {
    "$@" &
    CHILD=$!
    wait "$CHILD"
    rc=$?
    CHILD=
    return "$rc"
}

# ---- download ----
echo "Downloading $URL"
echo "  -> $PART"
rm -f "$PART"
if [ "$FETCH" = curl ]; then
    run curl -fL --retry 3 -o "$PART" "$URL"
else
    run wget -O "$PART" "$URL"
fi
rc=$?
if [ "$rc" -ne 0 ]; then
    err "download of $URL failed ($FETCH exit $rc)"
    exit 1
fi
if [ ! -s "$PART" ]; then
    err "download of $URL failed (empty file)"
    exit 1
fi

# ---- unpack into a temporary folder, then move into place ----
echo "Unpacking $NAME.zip"
mkdir "$TMP_DIR" || {
    err "cannot create $TMP_DIR"
    exit 1
}
if [ "$UNZIP" = unzip ]; then
    run unzip -q "$PART" -d "$TMP_DIR"
    rc=$?
    # unzip exit 1 means "warnings, but every file was extracted"
    if [ "$rc" -eq 1 ]; then
        echo "$PROG: warning: unzip reported warnings for $NAME.zip" >&2
        rc=0
    fi
else
    run python3 -m zipfile -e "$PART" "$TMP_DIR"
    rc=$?
fi
if [ "$rc" -ne 0 ]; then
    err "extraction of $NAME.zip failed ($UNZIP exit $rc)"
    exit 1
fi

if [ -d "$TMP_DIR/$NAME" ]; then
    SRC="$TMP_DIR/$NAME"          # official layout: NAME/trainA, ...
elif [ -d "$TMP_DIR/trainA" ] || [ -d "$TMP_DIR/testA" ]; then
    SRC="$TMP_DIR"                # archive without the top-level folder
else
    err "$NAME.zip does not contain a $NAME/ folder (nor trainA/ or testA/)"
    exit 1
fi
if [ -e "$DEST" ]; then
    err "$DEST appeared while downloading; leaving it alone"
    exit 1
fi
mv "$SRC" "$DEST" || {
    err "cannot move the unpacked dataset to $DEST"
    exit 1
}
rm -f "$PART"
rm -rf "$TMP_DIR"

# ---- report ----
echo "Dataset $NAME is ready in $DEST"
for sub in trainA trainB testA testB; do
    if [ -d "$DEST/$sub" ]; then
        n=$(find "$DEST/$sub" -type f \( -name '*.[jJ][pP][gG]' -o -name '*.[jJ][pP][eE][gG]' \
            -o -name '*.[pP][nN][gG]' -o -name '*.[bB][mM][pP]' -o -name '*.[tT][iI][fF]' \
            -o -name '*.[tT][iI][fF][fF]' -o -name '*.[wW][eE][bB][pP]' \) | wc -l)
        echo "  $sub: $((n + 0)) images"
    else
        echo "  $sub: missing"
    fi
done
exit 0
