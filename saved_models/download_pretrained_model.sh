#!/bin/sh
# Download one of the CycleGAN generators released by the paper's authors (the
# models of junyanz/pytorch-CycleGAN-and-pix2pix, scripts/download_cyclegan_model.sh)
# into the folder that holds this script, in the official layout:
#   saved_models/NAME_pretrained/latest_net_G.pth
# then translate with
#   python test.py --checkpoint saved_models/NAME_pretrained/latest_net_G.pth --image_path horse.jpg
#
# Usage (from the repository root or from inside saved_models/):
#   sh saved_models/download_pretrained_model.sh NAME
#
# Locations, tried in this order until one gives a file that passes the check:
#   https://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models/NAME.pth
#   http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models/NAME.pth
# The second is the URL of the official script; the same host over https is tried
# first, and the plain http one is kept because that host has answered 404 over https
# for files it serves over http. The authors publish no checksums, so each download is
# checked instead: it must load with torch.load(weights_only=True), which never runs
# code from the file, into the official ResNet generator (models.build_generator) and
# give a finite output. A file that fails is deleted and the next location is tried.
#
# Environment:
#   CYCLEGAN_MODEL_URLS  space-separated base URLs to try instead of the two above,
#                        each holding NAME.pth (the tests use a server on 127.0.0.1)
#   PYTHON               the Python with torch that checks the file (default: python,
#                        else python3)
#
# Plain POSIX sh: behaves the same under dash and bash. Needs curl or wget.

MODELS="apple2orange orange2apple summer2winter_yosemite winter2summer_yosemite horse2zebra zebra2horse monet2photo style_monet style_cezanne style_ukiyoe style_vangogh sat2map map2sat cityscapes_photo2label cityscapes_label2photo facades_photo2label facades_label2photo iphone2dslr_flower"
PROG=saved_models/download_pretrained_model.sh

# SCRIPT_DIR (the folder of this script: all downloads go there), usage, err,
# run, the cleanup traps: shared with data/download_cyclegan_dataset.sh,
# in scripts/download.sh
. "$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)/scripts/download.sh" || exit 1

# ---- arguments (checked before anything touches the disk or the network) ----
check_name model "$MODELS" "$@"
NAME=$1

# ---- locations: always the folder that holds this script ----
ROOT=$(dirname -- "$SCRIPT_DIR")
DEST_DIR="$SCRIPT_DIR/${NAME}_pretrained"
DEST="$DEST_DIR/latest_net_G.pth"
PART="$SCRIPT_DIR/${NAME}_pretrained.pth.part"
# the path to give test.py from the repository root
SHOWN="${SCRIPT_DIR##*/}/${NAME}_pretrained/latest_net_G.pth"

exit_if_present "$DEST" "$NAME"

URLS=${CYCLEGAN_MODEL_URLS:-"https://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models"}

# ---- tools (checked before downloading anything) ----
find_downloader "$NAME.pth"
if [ -z "$PYTHON" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
# find_spec, not import: answers in a fraction of a second
if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' >/dev/null 2>&1; then
    err "'$PYTHON' is not a Python with torch, which is needed to check the download; install the requirements or set PYTHON=/path/to/python"
    exit 1
fi
if [ ! -f "$ROOT/models.py" ] || [ ! -f "$ROOT/utils.py" ]; then
    err "models.py and utils.py are not in $ROOT; run the script from its place in the repository"
    exit 1
fi

# Checks a downloaded file: prints what it is, or one line on stderr and exits 2.
# The repository goes first on sys.path, before the current folder. (No single
# quotes inside: it is one sh string.)
CHECK='
import sys
sys.path.insert(0, sys.argv[1])
import torch
from models import OfficialGenerator, build_generator
from utils import load_checkpoint
path = sys.argv[2]
state = load_checkpoint(path)  # weights_only=True: one line and exit 2 for anything but tensors
try:
    G = build_generator(state).eval()
    if not isinstance(G, OfficialGenerator):
        raise ValueError("it is not in the official layout")
    c_in, c_out = G.model[1].in_channels, G.model[-2].out_channels
    with torch.no_grad():
        y = G(torch.zeros(1, c_in, 16, 16))
    if not torch.isfinite(y).all():
        raise ValueError("its output is not finite")
except Exception as e:
    print("error: not a CycleGAN generator (%s)" % str(e).splitlines()[0][:200], file=sys.stderr)
    sys.exit(2)
n_blocks = sum(1 for m in G.model if hasattr(m, "conv_block"))
print("Checked: an official ResNet generator, %d residual blocks, %d -> %d channels" % (n_blocks, c_in, c_out))
'

# ---- cleanup on failure or interruption ----
# what on_exit (scripts/download.sh) removes when the script stops, finished or not
MADE_DIR=
cleanup() {
    rm -f "$PART"
    if [ -n "$MADE_DIR" ]; then
        rmdir "$DEST_DIR" 2>/dev/null
    fi
}
clean_up_on_exit

# What a downloader's exit status means, in words.
why() {
    if [ "$FETCH" = curl ]; then
        case $1 in
            5) echo "cannot resolve the proxy" ;;
            6) echo "cannot resolve the host name" ;;
            7) echo "cannot connect to the host" ;;
            22) echo "the server answered with an HTTP error, e.g. 404" ;;
            28) echo "timed out" ;;
            35 | 60) echo "TLS/SSL failure" ;;
            52 | 56) echo "the connection was closed" ;;
            *) echo "download failed" ;;
        esac
    else
        case $1 in
            4) echo "network failure: host unreachable or name not resolved" ;;
            5) echo "TLS/SSL failure" ;;
            8) echo "the server answered with an HTTP error, e.g. 404" ;;
            *) echo "download failed" ;;
        esac
    fi
}

# ---- try each location ----
tried=0
unreachable=0
for base in $URLS; do
    URL="${base%/}/$NAME.pth"
    [ "$tried" -gt 0 ] && echo "Trying the next location"
    tried=$((tried + 1))
    echo "Downloading $URL"
    rm -f "$PART"
    if [ "$FETCH" = curl ]; then
        run curl -fL --retry 2 --connect-timeout 20 -o "$PART" "$URL"
    else
        run wget --tries=3 --timeout=30 -O "$PART" "$URL"
    fi
    rc=$?
    if [ "$rc" -ne 0 ]; then
        note "$URL: $(why "$rc") ($FETCH exit $rc)"
        case "$FETCH:$rc" in
            curl:5 | curl:6 | curl:7 | curl:28 | curl:35 | curl:60 | wget:4 | wget:5) unreachable=$((unreachable + 1)) ;;
        esac
        rm -f "$PART"
        continue
    fi
    if [ ! -s "$PART" ]; then
        note "$URL: empty file"
        rm -f "$PART"
        continue
    fi
    run "$PYTHON" -c "$CHECK" "$ROOT" "$PART"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        note "$URL: rejected and deleted"
        rm -f "$PART"
        continue
    fi
    if [ ! -d "$DEST_DIR" ]; then
        mkdir "$DEST_DIR" || {
            err "cannot create $DEST_DIR"
            exit 1
        }
        MADE_DIR=1
    fi
    move_into_place "$PART" "$DEST" "the download"
    MADE_DIR=
    echo "Model $NAME is ready in $DEST"
    echo "Translate with: python test.py --checkpoint $SHOWN --image_path horse.jpg"
    exit 0
done

if [ "$unreachable" -eq "$tried" ]; then
    err "could not reach any of the $tried locations of $NAME.pth (see above): no network or a proxy here, or the host is down; set CYCLEGAN_MODEL_URLS to other locations"
else
    err "none of the $tried locations gave a valid $NAME.pth (see above); set CYCLEGAN_MODEL_URLS to other locations"
fi
exit 1
