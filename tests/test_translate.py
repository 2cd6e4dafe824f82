"""test.py, the translation script: output names and sizes, pixel values checked
against computations that do not use test.py (the generator called directly on an
image whose size is already a multiple of 4; an odd-sized image against the crop of the
translation of a larger image built with numpy's reflection; the official generator
against conftest's functional forward), inputs (file, folder, glob, every image
mode), checkpoints of every layout, device and precision flags, the results page, and
the one-line errors for bad inputs. Tiny generators (one residual block) keep it fast;
the CLI itself runs in a subprocess only where the exit code or a traceback is the point.
Every run is fp32 (--amp none) unless a test says otherwise: --amp auto would pick bf16
on CPUs with native bf16, and these tests compare with fp32 computations."""
import html.parser
import os
import pickle
import re
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "test.py")

import conftest  # noqa: E402
from conftest import (G_direct, assert_same_pixels, expected_translation, fp32, make_generator,  # noqa: E402
                      official_reference_forward, random_image, run_translate as run_main, translate_in_process)
import models  # noqa: E402
from datasets import load_image  # noqa: E402
from models import Discriminator  # noqa: E402

# The script is named test.py; import it by path so the stdlib `test` package is not picked up.
tt = conftest.translate_script()


# -----------------------------------------------------------------------------
# helpers

def save(obj, path):
    torch.save(obj, str(path))
    return str(path)


def run_cli(args, cwd):
    return conftest.run_cli("test.py", *fp32(args), cwd=cwd)


def translations(d):
    """The translations in an output folder (not the results page and its inputs/)."""
    return sorted(f for f in os.listdir(d) if f not in ("index.html", "inputs", "references"))


def err_lines(err):
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def g3(tmp_path_factory):
    G = make_generator(3, seed=0)
    return save(G.state_dict(), tmp_path_factory.mktemp("g3") / "G_BA_1.pth"), G


@pytest.fixture(scope="module")
def g1(tmp_path_factory):
    G = make_generator(1, seed=1)
    return save(G.state_dict(), tmp_path_factory.mktemp("g1") / "G_AB_1.pth"), G



@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is ever written into the repository


# -----------------------------------------------------------------------------
# one file: name, size, pixel values

def test_single_jpeg_via_cli_writes_png_named_after_input_with_its_size_and_the_generators_pixels(g3, tmp_path):
    ckpt, G = g3
    random_image(36, 24).save(tmp_path / "photo.jpg", quality=90)  # a multiple of 4: no padding involved
    r = run_cli(["--checkpoint", ckpt, "--image_path", "photo.jpg", "--output_dir", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["index.html", "inputs", "photo.png"]
    out = Image.open(tmp_path / "out" / "photo.png")
    assert out.size == (36, 24) and out.mode == "RGB"
    assert_same_pixels(out, G_direct(G, load_image(tmp_path / "photo.jpg")))


@pytest.mark.parametrize("size", [(5, 9), (50, 7), (13, 31), (37, 23)])
def test_odd_size_output_is_the_crop_of_the_translation_of_the_image_reflected_to_a_multiple_of_4(
        g3, tmp_path, capsys, size):
    ckpt, G = g3
    w, h = size
    a = np.asarray(random_image(w, h, seed=3))
    padded = np.pad(a, ((0, max(8, -(-h // 4) * 4) - h), (0, max(8, -(-w // 4) * 4) - w), (0, 0)), mode="reflect")
    (tmp_path / "in").mkdir()
    Image.fromarray(a).save(tmp_path / "in" / "odd.png")
    Image.fromarray(padded).save(tmp_path / "in" / "padded.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", tmp_path / "in",
                             "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    odd, big = Image.open(tmp_path / "out" / "odd.png"), Image.open(tmp_path / "out" / "padded.png")
    assert odd.size == size
    assert_same_pixels(big, G_direct(G, Image.fromarray(padded)))
    assert_same_pixels(odd, np.asarray(big)[:h, :w])
    # and not merely close to it: any other padding changes the borders and the statistics
    zero_padded = np.zeros_like(padded)
    zero_padded[:h, :w] = a
    assert np.abs(G_direct(G, Image.fromarray(zero_padded))[:h, :w].astype(int) - np.asarray(odd).astype(int)).max() > 5


def test_tiny_images_down_to_one_pixel_are_translated_at_their_own_size(g3, tmp_path, capsys):
    ckpt, G = g3
    sizes = [(1, 1), (2, 3), (3, 3), (4, 1), (1, 7)]
    (tmp_path / "in").mkdir()
    for w, h in sizes:
        random_image(w, h, seed=w * 10 + h).save(tmp_path / "in" / f"t{w}x{h}.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", tmp_path / "in",
                             "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    for w, h in sizes:
        out = Image.open(tmp_path / "out" / f"t{w}x{h}.png")
        assert (out.size, out.mode) == ((w, h), "RGB")
        # Too small to reflect: padded by replication. (A one-pixel-wide image replicates into
        # maps with almost no variance, which InstanceNorm then amplifies rounding noise
        # of: no pixel values to compare there.)
        if min(w, h) > 1:
            assert_same_pixels(out, expected_translation(G, load_image(tmp_path / "in" / f"t{w}x{h}.png")))


def test_output_is_half_y_plus_one_rounded_not_min_max_stretched(tmp_path, capsys):
    G = make_generator(3)
    last = G.model[-2]
    assert isinstance(last, torch.nn.Conv2d)
    # constant outputs y per channel: (y + 1) * 127.5 = 153.0, 100.7, 30.3
    targets = torch.tensor([153.0, 100.7, 30.3])
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.atanh(targets / 127.5 - 1))
    ckpt = save(G.state_dict(), tmp_path / "const.pth")
    random_image(21, 14).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", tmp_path / "in.png",
                             "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "out" / "in.png"))
    assert out.shape == (14, 21, 3)
    for c, expected in enumerate([153, 101, 30]):
        assert (out[:, :, c] == expected).all(), (c, np.unique(out[:, :, c]))


# -----------------------------------------------------------------------------
# many inputs: folders, globs, names

def test_folder_translates_each_image_once_skips_hidden_and_non_images_and_prints_progress(g3, tmp_path, capsys):
    ckpt, G = g3
    d = tmp_path / "in"
    d.mkdir()
    random_image(12, 8, seed=1).save(d / "a.png")
    random_image(12, 8, seed=2).save(d / "b.bmp")
    random_image(8, 12, seed=3).save(d / "c.JPG", quality=95)  # upper-case extension
    random_image(12, 8, seed=4).save(d / ".hidden.png")
    (d / "notes.txt").write_text("not an image")
    (d / "sub.png").mkdir()  # a folder with an image-like name
    code, out, err = run_main(["--checkpoint", ckpt, "--image_path", d, "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    assert translations(tmp_path / "out") == ["a.png", "b.png", "c.png"]
    for k, name in enumerate(["a.png", "b.bmp", "c.JPG"], 1):
        assert re.search(rf"\[{k}/3\].*{re.escape(name)}", out), out
        assert_same_pixels(Image.open(tmp_path / "out" / (os.path.splitext(name)[0] + ".png")),
                           G_direct(G, load_image(d / name)))


def test_quoted_glob_translates_only_matching_files(g3, tmp_path, capsys):
    ckpt, _ = g3
    d = tmp_path / "in"
    d.mkdir()
    for name in ["x.jpg", "y.jpg", "z.png", ".h.jpg"]:
        random_image(10, 9).save(d / name)
    (d / "w.jpg.txt").write_text("no")
    code, out, err = run_main(["--checkpoint", ckpt, "--image_path", "in/*.jpg", "--output_dir", "out"], capsys)
    assert code == 0, err
    assert translations(tmp_path / "out") == ["x.png", "y.png"]
    assert "[2/2]" in out


def test_glob_matching_nothing_is_a_one_line_error(g3, tmp_path, capsys):
    ckpt, _ = g3
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "nowhere/*.jpg", "--output_dir", "out"], capsys)
    assert code != 0
    assert len(err_lines(err)) == 1 and "nowhere/*.jpg" in err


def test_inputs_sharing_a_stem_get_distinct_outputs_with_their_own_translation(g3, tmp_path, capsys):
    ckpt, G = g3
    d = tmp_path / "in"
    d.mkdir()
    random_image(10, 9, seed=1).save(d / "a.jpg")
    random_image(10, 9, seed=2).save(d / "a.png")
    random_image(10, 9, seed=3).save(d / "a_jpg.png")  # looks like a.jpg's disambiguated name
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", d, "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    outs = translations(tmp_path / "out")
    assert len(outs) == 3, outs
    expected = [expected_translation(G, load_image(d / n)) for n in ["a.jpg", "a.png", "a_jpg.png"]]
    got = [np.asarray(Image.open(tmp_path / "out" / n)) for n in outs]
    # every input's translation is among the outputs (none overwrote another)
    for e in expected:
        assert any(np.abs(g.astype(int) - e.astype(int)).max() <= 1 for g in got)


def test_glob_over_folders_with_same_file_name_keeps_both_outputs(g3, tmp_path, capsys):
    ckpt, G = g3
    for sub, seed in [("x", 1), ("y", 2)]:
        (tmp_path / "in" / sub).mkdir(parents=True)
        random_image(10, 9, seed=seed).save(tmp_path / "in" / sub / "a.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in/*/a.png", "--output_dir", "out"], capsys)
    assert code == 0, err
    outs = translations(tmp_path / "out")
    assert len(outs) == 2, outs
    got = [np.asarray(Image.open(tmp_path / "out" / n)).astype(int) for n in outs]
    for sub in ["x", "y"]:
        e = expected_translation(G, load_image(tmp_path / "in" / sub / "a.png")).astype(int)
        assert any(np.abs(g - e).max() <= 1 for g in got)


def test_unreadable_files_in_folder_are_each_named_on_stderr_others_translated_exit_nonzero(g3, tmp_path):
    ckpt, G = g3
    d = tmp_path / "in"
    d.mkdir()
    random_image(12, 10, seed=1).save(d / "good.png")
    random_image(40, 40, seed=2).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "empty.png").write_bytes(b"")
    random_image(9, 7, seed=3).save(d / "zlast.png")
    r = run_cli(["--checkpoint", ckpt, "--image_path", "in", "--output_dir", "out"], tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = err_lines(r.stderr)
    for bad in ["truncated.jpg", "empty.png"]:
        assert sum("cannot read" in line and bad in line for line in lines) == 1, r.stderr
    assert translations(tmp_path / "out") == ["good.png", "zlast.png"]
    assert_same_pixels(Image.open(tmp_path / "out" / "zlast.png"), expected_translation(G, load_image(d / "zlast.png")))


# -----------------------------------------------------------------------------
# flags

def test_checkpoint_model_is_an_alias_of_checkpoint(g3, tmp_path, capsys):
    ckpt, G = g3
    random_image(11, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint_model", ckpt, "--image_path", "in.png", "--output_dir", "out"], capsys)
    assert code == 0, err
    assert_same_pixels(Image.open(tmp_path / "out" / "in.png"),
                       expected_translation(G, load_image(tmp_path / "in.png")))


def test_side_by_side_is_twice_as_wide_with_the_input_left_and_translation_right(g3, tmp_path, capsys):
    ckpt, G = g3
    img = random_image(37, 23, seed=5)
    img.save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out",
                             "--side_by_side"], capsys)
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "out" / "in.png"))
    assert out.shape == (23, 74, 3)
    assert (out[:, :37] == np.asarray(img)).all()
    assert_same_pixels(out[:, 37:], expected_translation(G, img))


def test_img_height_and_width_resize_the_output_to_that_size(g3, tmp_path, capsys):
    ckpt, _ = g3
    random_image(37, 23).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out",
                             "--img_height", 16, "--img_width", 24], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "out" / "in.png").size == (24, 16)


def test_amp_bf16_on_cpu_runs_in_bf16_and_stays_within_3_levels_of_fp32(g3, tmp_path, capsys, monkeypatch):
    ckpt, _ = g3
    random_image(37, 23, seed=7).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "fp32",
                             "--device", "cpu"], capsys)
    assert code == 0, err
    dtypes = _generator_dtype(monkeypatch)
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "bf16", "--device", "cpu",
                             "--amp", "bf16"], capsys)
    assert code == 0, err
    assert dtypes == [torch.bfloat16]
    a = np.asarray(Image.open(tmp_path / "fp32" / "in.png")).astype(float)
    b = np.asarray(Image.open(tmp_path / "bf16" / "in.png")).astype(float)
    assert a.shape == b.shape == (23, 37, 3)
    assert np.abs(a - b).mean() < 3


def _generator_dtype(monkeypatch):
    """Records the dtype of the first layer's output each time test.py runs its generator."""
    dtypes = []
    build = models.build_generator

    def spying_build(state):
        G = build(state)
        G.model[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        return G

    monkeypatch.setattr(models, "build_generator", spying_build)
    return dtypes


def test_amp_auto_is_the_default_and_translates_in_bf16_exactly_where_the_cpu_computes_it_natively(
        g3, tmp_path, capsys, monkeypatch, cpu_bf16):
    ckpt, _ = g3
    random_image(12, 8).save(tmp_path / "in.png")
    dtypes = _generator_dtype(monkeypatch)
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out", "--device", "cpu"],
                            capsys, fp32_default=False)
    assert code == 0, err
    assert dtypes == [torch.bfloat16 if cpu_bf16 else torch.float32]
    assert "warning" not in err


def test_amp_bf16_warns_on_stderr_exactly_where_the_cpu_emulates_bf16(g3, tmp_path, capsys, cpu_bf16):
    ckpt, _ = g3
    random_image(12, 8).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out", "--device", "cpu",
                             "--amp", "bf16"], capsys)
    assert code == 0, err
    lines = err_lines(err)
    if cpu_bf16:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith("warning: --amp bf16") and "emulated" in lines[0]


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_device_mps_where_there_is_none_is_a_one_line_error_naming_it(g3, tmp_path, capsys):
    random_image(9, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", g3[0], "--image_path", "in.png", "--output_dir", "out",
                             "--device", "mps"], capsys)
    assert code == 2 and len(err_lines(err)) == 1 and "mps" in err
    assert not (tmp_path / "out").exists()


def test_generator_flag_on_a_single_generator_file_is_noted_not_silently_ignored(g3, tmp_path, capsys):
    ckpt, G = g3
    random_image(12, 8).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out",
                             "--generator", "G_BA"], capsys)
    assert code == 0, err
    lines = err_lines(err)
    assert len(lines) == 1 and "--generator G_BA" in lines[0] and "G_BA_1.pth" in lines[0] and "ignored" in lines[0]
    assert_same_pixels(Image.open(tmp_path / "out" / "in.png"), G_direct(G, load_image(tmp_path / "in.png")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed where CUDA is")
def test_amp_fp16_on_cpu_is_a_one_line_error(g3, tmp_path, capsys):
    ckpt, _ = g3
    random_image(9, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out",
                             "--amp", "fp16"], capsys)
    assert code != 0 and len(err_lines(err)) == 1 and "fp16" in err


# -----------------------------------------------------------------------------
# every image mode the dataset accepts

def _mode_files(d):
    """{file name: displayed (w, h)} for one file per mode/format load_image accepts."""
    w, h = 11, 7
    rgb = random_image(w, h, seed=9)
    a = np.asarray(rgb)
    files = {}

    def put(name, img, **kw):
        img.save(d / name, **kw)
        files[name] = (w, h)

    put("L.png", rgb.convert("L"))
    put("P.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    put("P_transparent.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), transparency=0)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray((np.arange(w * h).reshape(h, w) * 3 % 256).astype(np.uint8)))
    put("RGBA.png", rgba)
    put("LA.png", rgba.convert("LA"))
    put("I16.png", Image.fromarray(a[:, :, 0].astype(np.uint16) * 257))
    put("I32.tif", Image.fromarray(a[:, :, 1].astype(np.int32) * 257))
    put("F.tif", Image.fromarray(a[:, :, 2].astype(np.float32) / 255.0))
    put("CMYK.jpg", rgb.convert("CMYK"), quality=95)
    put("CMYK_t.tiff", rgb.convert("CMYK"))
    put("bilevel.png", rgb.convert("1"))
    put("bilevel_b.bmp", rgb.convert("1"))
    put("still.gif", rgb.convert("P", palette=Image.Palette.ADAPTIVE))  # animated GIFs: tests/test_video.py
    put("rgb_w.webp", rgb, lossless=True)
    put("rgb_b.bmp", rgb)
    put("rgb_t.tif", rgb)
    put("rgb_p.ppm", rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as h x w
    rgb.save(d / "rotated.jpg", exif=exif)
    files["rotated.jpg"] = (h, w)
    return files


MODE_FILES = ["L.png", "P.png", "P_transparent.png", "RGBA.png", "LA.png", "I16.png", "I32.tif", "F.tif", "CMYK.jpg",
              "CMYK_t.tiff", "bilevel.png", "bilevel_b.bmp", "still.gif", "rgb_w.webp", "rgb_b.bmp", "rgb_t.tif",
              "rgb_p.ppm", "rotated.jpg"]


@pytest.mark.parametrize("channels", [3, 1])
def test_a_decoded_video_frame_is_converted_as_load_image_converts_the_file(tmp_path, channels):
    # frames are composited on white and converted by the same function as still images
    files = _mode_files(tmp_path)
    for name in ("P_transparent.png", "RGBA.png", "LA.png", "P.png", "still.gif", "L.png"):
        with Image.open(tmp_path / name) as frame:
            frame.load()
            got = np.asarray(tt.model_frame(frame, channels))
        assert np.array_equal(got, np.asarray(load_image(tmp_path / name, channels))), name
    assert files


@pytest.fixture(scope="module")
def modes_run(g3, g1, tmp_path_factory):
    d = tmp_path_factory.mktemp("modes")
    (d / "in").mkdir()
    sizes = _mode_files(d / "in")
    assert sorted(sizes) == sorted(MODE_FILES)
    results = {}
    for channels, (ckpt, _) in [(3, g3), (1, g1)]:
        out_dir = d / f"out{channels}"
        code = translate_in_process(["--checkpoint", ckpt, "--image_path", d / "in", "--output_dir", out_dir,
                                     "--amp", "none"])
        results[channels] = (code, out_dir)
    return d / "in", sizes, results


@pytest.mark.parametrize("name", MODE_FILES)
def test_every_image_mode_is_translated_to_rgb_of_input_size_with_an_rgb_generator(modes_run, g3, name):
    in_dir, sizes, results = modes_run
    code, out_dir = results[3]
    assert code == 0
    out = Image.open(out_dir / (os.path.splitext(name)[0] + ".png"))
    assert (out.mode, out.size) == ("RGB", sizes[name])
    assert_same_pixels(out, expected_translation(g3[1], load_image(in_dir / name, 3)))


@pytest.mark.parametrize("name", MODE_FILES)
def test_every_image_mode_is_translated_to_grayscale_with_a_one_channel_generator(modes_run, g1, name):
    in_dir, sizes, results = modes_run
    code, out_dir = results[1]
    assert code == 0
    out = Image.open(out_dir / (os.path.splitext(name)[0] + ".png"))
    assert (out.mode, out.size) == ("L", sizes[name])
    assert_same_pixels(out, expected_translation(g1[1], load_image(in_dir / name, 1)))


# -----------------------------------------------------------------------------
# checkpoints: layout read from the file

def _official_release_state(G):
    """An old official latest_net_G.pth: InstanceNorm layers carry running stats."""
    state = dict(G.state_dict())
    for name, m in G.named_modules():
        if isinstance(m, torch.nn.InstanceNorm2d):
            state[f"{name}.running_mean"] = torch.zeros(m.num_features)
            state[f"{name}.running_var"] = torch.ones(m.num_features)
            state[f"{name}.num_batches_tracked"] = torch.tensor(0)
    return state


def test_official_checkpoint_with_instancenorm_running_stats_translates_as_the_functional_official_forward(
        tmp_path, capsys):
    G = make_generator(3, seed=4, official=True)
    ckpt = save(_official_release_state(G), tmp_path / "latest_net_G.pth")
    img = random_image(36, 24)
    img.save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out"], capsys)
    assert code == 0, err
    x = torch.from_numpy(np.asarray(img, dtype=np.float64) / 127.5 - 1.0).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        y = official_reference_forward(G.state_dict(), x)[0].permute(1, 2, 0).double().numpy()
    assert_same_pixels(Image.open(tmp_path / "out" / "in.png"), np.floor((np.clip(y, -1, 1) + 1) / 2 * 255 + 0.5))


# DataParallel/DDP, torch.compile, both
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_dataparallel_or_compiled_prefixed_checkpoint_loads(g3, tmp_path, capsys, prefix):
    _, G = g3
    ckpt = save({prefix + k: v for k, v in G.state_dict().items()}, tmp_path / "dp.pth")
    random_image(13, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out"], capsys)
    assert code == 0, err
    assert_same_pixels(Image.open(tmp_path / "out" / "in.png"),
                       expected_translation(G, load_image(tmp_path / "in.png")))


def test_checkpoint_saved_with_cuda_tensors_loads_on_cpu(g3, tmp_path, capsys):
    _, G = g3
    import torch.serialization as ts
    if not isinstance(getattr(ts, "_package_registry", None), list):
        pytest.skip("torch.serialization has no location-tagger registry to simulate a GPU save with")
    registry = list(ts._package_registry)
    ts.register_package(-1000, lambda storage: "cuda:0", lambda obj, location: None)  # tag every storage as cuda:0
    try:
        ckpt = save(G.state_dict(), tmp_path / "gpu.pth")
    finally:
        ts._package_registry[:] = registry
    if not torch.cuda.is_available():  # the file really does ask for a GPU
        with pytest.raises(RuntimeError):
            torch.load(ckpt, weights_only=True)
    random_image(13, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out",
                             "--device", "cpu"], capsys)
    assert code == 0, err
    assert_same_pixels(Image.open(tmp_path / "out" / "in.png"),
                       expected_translation(G, load_image(tmp_path / "in.png")))


@pytest.fixture
def full_state(tmp_path):
    G_AB, G_BA = make_generator(3, seed=11), make_generator(3, seed=12)
    state = {"G_AB": G_AB.state_dict(), "G_BA": G_BA.state_dict(), "epoch": 3, "batch": 0,
             "args": {"dataset_name": "x"}}
    return save(state, tmp_path / "last.pt"), G_AB, G_BA


def test_full_state_checkpoint_without_generator_flag_is_a_one_line_error_naming_the_flag(full_state, tmp_path, capsys):
    ckpt, _, _ = full_state
    random_image(9, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out"], capsys)
    assert code != 0
    assert len(err_lines(err)) == 1 and "--generator" in err and "last.pt" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["G_AB", "G_BA"])
def test_full_state_checkpoint_with_generator_flag_uses_that_generator(full_state, tmp_path, capsys, which):
    ckpt, G_AB, G_BA = full_state
    img = random_image(13, 9)
    img.save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out",
                             "--generator", which], capsys)
    assert code == 0, err
    chosen, other = (G_AB, G_BA) if which == "G_AB" else (G_BA, G_AB)
    assert np.abs(expected_translation(chosen, img).astype(int)
                  - expected_translation(other, img).astype(int)).mean() > 5  # distinguishable
    assert_same_pixels(Image.open(tmp_path / "out" / "in.png"), expected_translation(chosen, img))


# -----------------------------------------------------------------------------
# bad inputs: one clear line, no traceback

def test_missing_checkpoint_via_cli_is_one_line_naming_the_path_without_traceback(tmp_path):
    random_image(9, 9).save(tmp_path / "in.png")
    r = run_cli(["--checkpoint", "no/such/G.pth", "--image_path", "in.png", "--output_dir", "out"], tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(err_lines(r.stderr)) == 1 and "no/such/G.pth" in r.stderr


def _not_a_generator(kind, tmp_path):
    if kind == "discriminator":
        return Discriminator((3, 32, 32)).state_dict()
    if kind == "tensor":
        return torch.zeros(3, 3)
    if kind == "list":
        return [1, 2, 3]
    if kind == "optimizer_like":
        return {"state": {}, "param_groups": [{"lr": 0.1}]}
    if kind == "generator_missing_a_key":
        state = dict(make_generator(3).state_dict())
        del state["model.4.bias"]
        return state
    if kind == "generator_with_wrong_shape":
        state = dict(make_generator(3).state_dict())
        state["model.4.weight"] = state["model.4.weight"][:, :, :2, :2].clone()
        return state
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["discriminator", "tensor", "list", "optimizer_like", "generator_missing_a_key",
                                  "generator_with_wrong_shape"])
def test_non_generator_checkpoint_is_a_one_line_error_naming_it(tmp_path, capsys, kind):
    ckpt = save(_not_a_generator(kind, tmp_path), tmp_path / f"{kind}.pth")
    random_image(9, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in.png", "--output_dir", "out"], capsys)
    assert code != 0
    assert len(err_lines(err)) == 1 and f"{kind}.pth" in err, err


def test_truncated_checkpoint_is_a_one_line_error(g3, tmp_path, capsys):
    data = open(g3[0], "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    random_image(9, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", tmp_path / "cut.pth", "--image_path", "in.png",
                             "--output_dir", "out"], capsys)
    assert code != 0
    assert len(err_lines(err)) == 1 and "cut.pth" in err


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_checkpoint_is_refused_and_does_not_run(tmp_path, capsys, fmt):
    marker = str(tmp_path / "pwned")
    payload = {"model.1.weight": _Evil(marker)}
    path = tmp_path / "evil.pth"
    if fmt == "torch_zip":
        torch.save(payload, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    random_image(9, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", path, "--image_path", "in.png", "--output_dir", "out"], capsys)
    assert code != 0
    assert not os.path.exists(marker)
    assert len(err_lines(err)) == 1 and "evil.pth" in err and "refused" in err, err


def test_nonexistent_image_path_is_a_one_line_error_naming_it(g3, capsys):
    code, _, err = run_main(["--checkpoint", g3[0], "--image_path", "missing.png", "--output_dir", "out"], capsys)
    assert code != 0 and len(err_lines(err)) == 1 and "missing.png" in err


@pytest.mark.parametrize("flags", [["--img_height", "16"], ["--img_width", "16"]])
def test_only_one_of_img_height_and_img_width_is_an_error(g3, tmp_path, capsys, flags):
    random_image(9, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", g3[0], "--image_path", "in.png", "--output_dir", "out", *flags], capsys)
    assert code != 0 and len(err_lines(err)) == 1
    assert "--img_height" in err and "--img_width" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("h, w", [(0, 16), (16, -4)])
def test_non_positive_resize_is_a_one_line_error(g3, tmp_path, capsys, h, w):
    random_image(9, 9).save(tmp_path / "in.png")
    code, _, err = run_main(["--checkpoint", g3[0], "--image_path", "in.png", "--output_dir", "out",
                             "--img_height", h, "--img_width", w], capsys)
    assert code != 0 and len(err_lines(err)) == 1
