"""data/make_devset.py: the benchmark sets built from npm packages, here from tiny fake packages
made on disk (no download): the splits, the skin tones and hidden icons left out, transparency
on white, the .tgz read as its folder, determinism, and one-line errors. The iconify rendering
needs rsvg-convert; those tests are skipped without it."""
import importlib.util
import json
import os
import random
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, one_thread_env, run_cli

SCRIPT = "data/make_devset.py"
SPLITS = ("trainA", "trainB", "testA", "testB")
needs_rsvg = pytest.mark.skipif(shutil.which("rsvg-convert") is None,
                                reason="rsvg-convert is not installed (apt-get install librsvg2-bin)")

# ten emoji both fake vendors draw, one each draws alone, and skin tones of a shared one (left out)
SHARED = [f"1f{0x600 + k:x}.png" for k in range(10)]
TONES = ["1f44b-1f3fb.png", "1f44b-1f3ff.png", "1f9d1-1f3fd-200d-1f4bb.png"]


def make_devset():
    """The script as a module (data/ is no package)."""
    spec = importlib.util.spec_from_file_location("make_devset", os.path.join(ROOT, SCRIPT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emoji_rgba(name, vendor):
    """An 8x8 RGBA drawing, its colour from the name and the vendor: opaque top half, alpha 128 in the next
    quarter, fully transparent bottom quarter (with a colour under it, which must not show)."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (sum(map(ord, name)) % 200, 40 if vendor == "va" else 160, 7)
    rgba[:4, :, 3], rgba[4:6, :, 3], rgba[6:, :, 3] = 255, 128, 0
    return rgba


def fake_emoji_package(folder, vendor, only):
    """folder/package/img/<vendor>/64/*.png, as emoji-datasource-<vendor> is unpacked (with its other files)."""
    img = folder / "package" / "img" / vendor / "64"
    img.mkdir(parents=True)
    (folder / "package" / "package.json").write_text('{"name": "emoji-datasource-%s"}' % vendor)
    (folder / "package" / "img" / vendor / "sheets").mkdir()
    for name in SHARED + TONES + [only]:
        Image.fromarray(emoji_rgba(name, vendor), "RGBA").save(img / name)
    return folder


def tgz(folder, path):
    """The .tgz npm pack writes: folder/package/... as package/..."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / "package", arcname="package")
    return path


def build(*args, env=None):
    return run_cli(SCRIPT, *[str(a) for a in args], env=env, timeout=60)


def listing(root):
    return {s: sorted(os.listdir(os.path.join(root, s))) for s in SPLITS}


def same_files(root1, root2):
    return listing(root1) == listing(root2) and all(
        open(os.path.join(root1, s, f), "rb").read() == open(os.path.join(root2, s, f), "rb").read()
        for s, names in listing(root1).items() for f in names)


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    """Fake packages A (its folder holding package/, and its .tgz) and B (package/ itself), and the set built
    from the folders with --n_test 3."""
    tmp = tmp_path_factory.mktemp("emoji")
    a = fake_emoji_package(tmp / "a", "va", "1f9ff.png")
    b = fake_emoji_package(tmp / "b", "vb", "1fae8.png") / "package"
    (tmp / "set").mkdir()  # an existing empty OUT_DIR is fine
    r = build("emoji", a, b, tmp / "set", "--n_test", 3)
    assert r.returncode == 0, r.stderr
    return {"a": a, "b": b, "a.tgz": tgz(a, tmp / "emoji-datasource-va-1.0.0.tgz"), "set": tmp / "set",
            "out": r.stdout, "tmp": tmp}


def test_emoji_splits(emoji):
    files = listing(emoji["set"])
    assert {s: len(f) for s, f in files.items()} == {"trainA": 3, "trainB": 4, "testA": 3, "testB": 3}
    assert not set(files["trainA"]) & set(files["trainB"])  # genuinely unpaired
    assert files["testA"] == files["testB"]  # paired by file name
    assert not set(files["testA"]) & set(files["trainA"] + files["trainB"])
    # every shared name exactly once, no skin tone, nothing only one vendor draws
    assert sorted(files["trainA"] + files["trainB"] + files["testA"]) == sorted(SHARED)
    assert emoji["out"].strip().splitlines() == [
        f"{emoji['set']}: trainA 3, trainB 4, testA 3, testB 3 (emoji, 10 shared names, seed 0)"]
    assert [f for f in os.listdir(emoji["tmp"]) if f.startswith(".make_devset")] == []  # no staging folder left


def test_emoji_split_is_the_one_of_the_sets_measured_so_far(emoji):
    """The sorted names shuffled by random.Random(seed), the first n_test held out, the rest halved: the rule that
    made emoji_apple2facebook and fluent_flat2hc, which the README's numbers were measured on."""
    names = sorted(SHARED)
    random.Random(0).shuffle(names)
    assert listing(emoji["set"]) == {"trainA": sorted(names[3:6]), "trainB": sorted(names[6:]),
                                     "testA": sorted(names[:3]), "testB": sorted(names[:3])}


def test_emoji_transparency_is_composited_on_white(emoji):
    for split in SPLITS:
        vendor = "va" if split.endswith("A") else "vb"
        for name in os.listdir(emoji["set"] / split):
            out = Image.open(emoji["set"] / split / name)
            assert out.mode == "RGB" and out.size == (8, 8)
            out, src = np.asarray(out).astype(int), emoji_rgba(name, vendor)[..., :3].astype(int)
            assert (out[:4] == src[:4]).all()  # opaque: the drawing's own colour
            assert (out[6:] == 255).all()  # transparent: white, whatever colour lies under it
            half = (src[4:6] * 128 + 255 * 127) / 255  # alpha 128 over white
            assert np.abs(out[4:6] - half).max() <= 1


def test_the_tgz_gives_the_set_its_folder_gives(emoji, tmp_path):
    r = build("emoji", emoji["a.tgz"], emoji["b"], tmp_path / "set", "--n_test", 3)
    assert r.returncode == 0, r.stderr
    assert same_files(tmp_path / "set", emoji["set"])


def test_the_same_seed_gives_the_same_set_and_another_seed_another(emoji, tmp_path):
    assert build("emoji", emoji["a"], emoji["b"], tmp_path / "again", "--n_test", 3).returncode == 0
    assert same_files(tmp_path / "again", emoji["set"])
    r = build("emoji", emoji["a"], emoji["b"], tmp_path / "seed1", "--n_test", 3, "--seed", 1)
    assert r.returncode == 0 and r.stdout.strip().endswith("seed 1)")
    assert listing(tmp_path / "seed1")["testA"] != listing(emoji["set"])["testA"]


def assert_one_line_error(r, *parts):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and all(str(p) in lines[0] for p in parts), lines[0]


def test_emoji_errors(emoji, tmp_path):
    a, b, out = emoji["a"], emoji["b"], tmp_path / "out"
    missing = tmp_path / "nope.tgz"
    assert_one_line_error(build("emoji", missing, b, out), missing, "does not exist", "emoji-datasource-<vendor>")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(build("emoji", a, tmp_path / "empty", out), tmp_path / "empty", "no img/<vendor>/64")
    (tmp_path / "junk.tgz").write_bytes(b"not a tar file")
    assert_one_line_error(build("emoji", tmp_path / "junk.tgz", b, out), "junk.tgz", "could not be read as a .tgz")
    two = fake_emoji_package(tmp_path / "two", "va", "1f9ff.png")
    shutil.copytree(two / "package" / "img" / "va", two / "package" / "img" / "vc")
    assert_one_line_error(build("emoji", two, b, out), "img/{va,vc}/64", "for one vendor")
    # 10 shared names: 8 test images leave 2 for training, 9 leave 1
    assert build("emoji", a, b, out, "--n_test", 8).returncode == 0
    assert_one_line_error(build("emoji", a, b, tmp_path / "out9", "--n_test", 9), "share 10 usable names", "--n_test")
    assert not os.path.exists(tmp_path / "out9")
    # a set already there is refused and left as it was
    before = listing(out)
    assert_one_line_error(build("emoji", a, b, out, "--n_test", 3), out, "already holds a set")
    assert listing(out) == before
    assert [f for f in os.listdir(tmp_path) if f.startswith(".make_devset")] == []


# -----------------------------------------------------------------------------
# iconify

def fake_iconify_package(folder, body, prefix):
    """folder/package/icons.json of an @iconify-json package: 16x16 icons of one body, one hidden, one skin tone."""
    icons = {f"icon-{k}": {"body": body} for k in range(8)}
    icons["icon"] = {"body": body}  # sorts before icon-0 by its name, after it as icon.png
    icons["old-icon"] = {"body": body, "hidden": True}
    icons["waving-hand-medium-dark"] = {"body": body}
    (folder / "package").mkdir(parents=True)
    (folder / "package" / "icons.json").write_text(json.dumps({"prefix": prefix, "icons": icons,
                                                               "width": 16, "height": 16}))
    return folder


LEFT_HALF = '<rect width="8" height="16"/>'  # black by SVG's default fill
TOP_HALF = '<rect width="16" height="8" fill="currentColor"/>'  # black by the color the script sets


@pytest.fixture(scope="module")
def icons(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iconify")
    a = fake_iconify_package(tmp / "a", LEFT_HALF, "fake-a")
    b = fake_iconify_package(tmp / "b", TOP_HALF, "fake-b")
    return {"a": a, "b": b, "a.tgz": tgz(a, tmp / "iconify-json-fake-a-1.0.0.tgz"), "tmp": tmp}


def test_iconify_leaves_out_hidden_icons_and_skin_tones_and_keeps_each_viewbox(icons, tmp_path):
    svgs = make_devset().iconify_svgs(str(icons["a"]))
    assert sorted(svgs) == sorted(["icon"] + [f"icon-{k}" for k in range(8)])
    assert 'viewBox="0 0 16 16" color="black">' + LEFT_HALF + "</svg>" in svgs["icon"]
    # an icon's own size and offset win over the set's
    fake_iconify_package(tmp_path, "<g/>", "x")
    data = json.loads((tmp_path / "package" / "icons.json").read_text())
    data["icons"]["icon"].update(left=2, top=-1, width=20)
    (tmp_path / "package" / "icons.json").write_text(json.dumps(data))
    assert 'viewBox="2 -1 20 16"' in make_devset().iconify_svgs(str(tmp_path / "package"))["icon"]


def test_iconify_errors(icons, tmp_path):
    a, b, out = icons["a"], icons["b"], tmp_path / "out"
    assert_one_line_error(build("iconify", a, tmp_path / "nope", out), tmp_path / "nope", "does not exist",
                          "@iconify-json")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(build("iconify", tmp_path / "empty", b, out), "has no package/icons.json")
    (tmp_path / "bad" / "package").mkdir(parents=True)
    (tmp_path / "bad" / "package" / "icons.json").write_text("{")
    assert_one_line_error(build("iconify", a, tmp_path / "bad", out), "bad", "not an Iconify icon set")
    (tmp_path / "bad" / "package" / "icons.json").write_text('{"icons": {"icon": {"width": 16}}}')
    assert_one_line_error(build("iconify", a, tmp_path / "bad", out), "icon 'icon'", "has no body")
    assert_one_line_error(build("iconify", a, b, out, "--n_test", 8), "share 9 usable names")
    # without rsvg-convert on the PATH (python is started by its full path)
    (tmp_path / "bin").mkdir()
    r = build("iconify", a, b, out, "--n_test", 3, env=one_thread_env(PATH=str(tmp_path / "bin")))
    assert_one_line_error(r, "rsvg-convert is not installed", "apt-get install librsvg2-bin", "brew install librsvg")
    assert not os.path.exists(out)


@needs_rsvg
def test_iconify_renders_the_icons_on_white_into_the_splits(icons, tmp_path):
    r = build("iconify", icons["a.tgz"], icons["b"], tmp_path / "set", "--n_test", 3, "--size", 32)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [
        f"{tmp_path / 'set'}: trainA 3, trainB 3, testA 3, testB 3 (iconify, 9 shared names, seed 0)"]
    names = sorted(["icon"] + [f"icon-{k}" for k in range(8)])  # sorted as names, not as file names
    random.Random(0).shuffle(names)
    png = lambda names: sorted(n + ".png" for n in names)  # noqa: E731
    assert listing(tmp_path / "set") == {"trainA": png(names[3:6]), "trainB": png(names[6:]),
                                         "testA": png(names[:3]), "testB": png(names[:3])}
    for split in SPLITS:
        for name in os.listdir(tmp_path / "set" / split):
            im = Image.open(tmp_path / "set" / split / name)
            assert im.mode == "RGB" and im.size == (32, 32)
            pixels = np.asarray(im)
            if split.endswith("A"):  # A's left half black, on white
                assert (pixels[:, :16] == 0).all() and (pixels[:, 16:] == 255).all()
            else:  # B's top half, drawn in currentColor
                assert (pixels[:16] == 0).all() and (pixels[16:] == 255).all()
    # the folder gives the set the .tgz gives
    assert build("iconify", icons["a"], icons["b"], tmp_path / "dir", "--n_test", 3, "--size", 32).returncode == 0
    assert same_files(tmp_path / "set", tmp_path / "dir")


@needs_rsvg
def test_an_icon_rsvg_cannot_render_stops_the_build_and_leaves_no_half_set(icons, tmp_path):
    broken = fake_iconify_package(tmp_path / "broken", "<g", "broken")  # not well-formed XML
    r = build("iconify", icons["a"], broken, tmp_path / "set", "--n_test", 3)
    assert_one_line_error(r, "6 of 12 images could not be written", "rsvg-convert failed")
    assert not os.path.exists(tmp_path / "set")
    assert [f for f in os.listdir(tmp_path) if f.startswith(".make_devset")] == []
