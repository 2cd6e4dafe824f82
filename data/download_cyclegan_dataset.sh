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
# serve them from efrosgans.eecs.berkeley.edu (the default of CYCLEGAN_DATASET_URL below).
#
# Environment:
#   CYCLEGAN_DATASET_URL  base URL to download NAME.zip from instead of the
#                         default one (the tests point it at a file:// URL or
#                         an http server on 127.0.0.1).
#
# Plain POSIX sh: behaves the same under dash and bash. Needs curl or wget, and
# unzip or python3 (python3 -m zipfile is used when unzip is missing).

DATASETS="apple2orange summer2winter_yosemite horse2zebra monet2photo cezanne2photo ukiyoe2photo vangogh2photo maps facades iphone2dslr_flower ae_photos mini"
PROG=data/download_cyclegan_dataset.sh

# SCRIPT_DIR (the folder of this script: all downloads go there), usage, err,
# run, the cleanup traps: shared with saved_models/download_pretrained_model.sh,
# in scripts/download.sh (found with cd, not by path: data/ may be a symbolic link)
. "$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)/scripts/download.sh" || exit 1

# ---- arguments (checked before anything touches the disk or the network) ----
check_name dataset "$DATASETS" "$@"
NAME=$1

# ---- locations: always the folder that holds this script ----
DEST="$SCRIPT_DIR/$NAME"
PART="$SCRIPT_DIR/$NAME.zip.part"
TMP_DIR="$SCRIPT_DIR/.$NAME.unpack.$$"

exit_if_present "$DEST" "$NAME"

BASE_URL=${CYCLEGAN_DATASET_URL:-https://efrosgans.eecs.berkeley.edu/cyclegan/datasets}
BASE_URL=${BASE_URL%/}
URL="$BASE_URL/$NAME.zip"

# ---- tools (checked before downloading anything) ----
find_downloader "$URL"
if command -v unzip >/dev/null 2>&1; then
    UNZIP=unzip
elif command -v python3 >/dev/null 2>&1 && python3 -c 'import zipfile' >/dev/null 2>&1; then
    UNZIP=python3
else
    err "neither unzip nor python3 is installed; install one of them to unpack $NAME.zip"
    exit 1
fi

# ---- cleanup on failure or interruption ----
# what on_exit (scripts/download.sh) removes when the script stops, finished or not
cleanup() {
    rm -f "$PART"
    rm -rf "$TMP_DIR"
}
clean_up_on_exit

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
        note "warning: unzip reported warnings for $NAME.zip"
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
move_into_place "$SRC" "$DEST" "the unpacked dataset"
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
