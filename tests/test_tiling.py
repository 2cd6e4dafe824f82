"""test.py's translation in strips (--tile): the output equals the untiled translation
up to float rounding on odd sizes, for both generator layouts and strips from one row
to the whole image; no tensor it computes is larger than a strip; its temporary files
never outlive it; and the command line uses it when asked or when an image is large."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import tiling  # noqa: E402
from models import GeneratorResNet, OfficialGenerator, to_levels, translate  # noqa: E402
from conftest import live_tensor_bytes, run_translate as run_main, translate_script  # noqa: E402

tt = translate_script()

ARCHS = {
    "seed": lambda c: GeneratorResNet((c, 0, 0), 1),  # Upsample + conv, reflection pads
    "official": lambda c: OfficialGenerator(c, c, 16, 2),  # transposed convolutions
    # the anti-aliased layout: stride-1 convs then reflection-padded blurs of stride 2, and
    # replication-padded transposed blurs (tiling.py opens both into plain layers)
    "antialiased": lambda c: GeneratorResNet((c, 0, 0), 1, antialias=True, antialias_up=True),
    # placed in a larger frame by the image's own detail: a reflection pad in front, an offset crop
    "canonical": lambda c: GeneratorResNet((c, 0, 0), 1, canonical_shift=True),
}


def generator(arch, channels=3, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = ARCHS[arch](channels).eval()
        for m in G.modules():  # biases that are not zero, so every layer's padding shows
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    return G


def image_tensor(h, w, channels=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    smooth = torch.stack([xx, yy, xx * yy][:channels])  # structure, so the borders matter
    return (0.6 * smooth + 0.4 * torch.rand(channels, h, w, generator=g) - 0.2).clamp(-1, 1)[None].to(dtype)


def untiled_by_numpy_padding(G, x):
    """G on the image padded right and bottom to a multiple of 4 by numpy's reflection
    (the same as torch's), cropped back: the whole-image translation, computed without
    test.py."""
    h, w = x.shape[-2:]
    H, W = -(-h // 4) * 4, -(-w // 4) * 4
    a = np.pad(x[0].numpy(), ((0, 0), (0, H - h), (0, W - w)), mode="reflect")
    with torch.no_grad():
        return G(torch.from_numpy(a)[None])[..., :h, :w]


def levels(y):
    return ((y.double().clamp(-1, 1) + 1) * 127.5).round()



# -----------------------------------------------------------------------------
# exactness

@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("h, w, strip_rows", [
    (67, 91, 1),     # strips far thinner than any layer's receptive field
    (67, 91, 5),     # not aligned to the stride-2 convolutions
    (130, 97, 16),
    (130, 97, 1000),  # one strip: the whole image
])
def test_tiled_equals_untiled_in_float64_exactly_and_in_float32_to_rounding(arch, h, w, strip_rows):
    G = generator(arch)
    x = image_tensor(h, w)
    # float64: equal to the whole-image computation to 1e-10, so nothing but rounding
    # separates the two; a strip seam or a wrong statistic would be ~1e-2.
    torch.testing.assert_close(tiling.translate_tiled(G.double(), x.double(), strip_rows),
                               untiled_by_numpy_padding(G, x.double()), atol=1e-10, rtol=0)
    G.float()
    tiled, untiled = tiling.translate_tiled(G, x, strip_rows), untiled_by_numpy_padding(G, x)
    assert tiled.shape == untiled.shape == (1, 3, h, w)
    assert (tiled - untiled).abs().max() < 1e-4  # float32 rounding (measured ~5e-6)
    diff = (levels(tiled) - levels(untiled)).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3


def test_tiled_grayscale_image_smaller_than_the_padding_uses_replication_like_translate():
    G = generator("seed", channels=1)
    x = image_tensor(3, 2, channels=1)  # padded to 8x8: too small to reflect
    torch.testing.assert_close(tiling.translate_tiled(G.double(), x.double(), 1),
                               translate(G.double(), x.double()).double(), atol=1e-6, rtol=0)


def test_tiled_batch_is_each_image_translated_on_its_own():
    G = generator("official").double()
    x = torch.cat([image_tensor(21, 18, seed=1), image_tensor(21, 18, seed=2)]).double()
    y = tiling.translate_tiled(G, x, 4)
    for i in range(2):
        torch.testing.assert_close(y[i:i + 1], untiled_by_numpy_padding(G, x[i:i + 1]), atol=1e-10, rtol=0)


def test_8_bit_image_in_gives_8_bit_levels_out_equal_to_the_float_paths_rounded():
    G = generator("official")
    x8 = levels(image_tensor(29, 22)).byte()  # what main() passes: the image file's values
    y8 = tiling.translate_tiled(G, x8, 5)
    y = tiling.translate_tiled(G, x8.float() / 127.5 - 1, 5)  # to_tensor's conversion
    assert y8.dtype == torch.uint8 and torch.equal(y8, to_levels(y))  # same process, same kernels: bitwise


def test_tiled_bf16_is_as_close_to_fp32_as_untiled_bf16():
    G, x = generator("seed"), image_tensor(37, 29)
    fp32 = levels(translate(G, x))
    G, x = G.to(torch.bfloat16), x.to(torch.bfloat16)
    untiled = (levels(translate(G, x)) - fp32).abs()
    tiled = (levels(tiling.translate_tiled(G, x, 7)) - fp32).abs()
    assert tiled.mean() < 1.5 * untiled.mean() + 0.1 and tiled.max() <= 2 * untiled.max() + 2


# -----------------------------------------------------------------------------
# memory: bounded by the strip, and temporary files never outlive the call

class LargestTensor(TorchFunctionMode):
    """Records the largest memory block (in bytes) behind any tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
        return out


def test_no_tensor_computed_in_strips_is_larger_than_a_strip_while_the_whole_map_is_8x_larger():
    G = generator("seed")  # 64 channels at full resolution
    h, w, strip_rows = 512, 64, 8
    x = image_tensor(h, w)
    with LargestTensor() as spy:
        tiling.translate_tiled(G, x, strip_rows)
    # The widest strip: 128 channels upsampled to full resolution, with a few halo rows
    # (3 above and below at most: the 7x7 convolutions), and the 7x7's column padding.
    strip = 4 * 128 * (strip_rows + 6) * (w + 6)
    assert spy.nbytes <= strip, (spy.nbytes, strip)
    with LargestTensor() as spy:
        translate(G, x)
    assert spy.nbytes >= 4 * 64 * h * w > 8 * strip  # untiled, a 64-channel map of the whole image


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc (Linux)")
def test_temporary_files_have_no_name_and_are_closed_after_success_and_after_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tiling.tempfile, "tempdir", str(tmp_path))
    G, x = generator("official"), image_tensor(30, 22)
    seen = []
    write_rows = tiling.write_rows

    def spying_write_rows(m, r0, y):
        seen.append(os.listdir(tmp_path))  # the files exist but have no name in TMPDIR
        if len(seen) == 7:
            raise OSError(28, "No space left on device (simulated)")
        return write_rows(m, r0, y)

    before = open_fds()
    monkeypatch.setattr(tiling, "write_rows", spying_write_rows)
    with pytest.raises(OSError):
        tiling.translate_tiled(G, x, 4)
    assert open_fds() == before and os.listdir(tmp_path) == []
    monkeypatch.setattr(tiling, "write_rows", write_rows)
    tiling.translate_tiled(G, x, 4)
    assert open_fds() == before and os.listdir(tmp_path) == []
    assert len(seen) == 7 and all(names == [] for names in seen)


# -----------------------------------------------------------------------------
# the command line

@pytest.fixture
def ckpt(tmp_path):
    G = generator("seed")
    torch.save(G.state_dict(), tmp_path / "G_AB_1.pth")
    return str(tmp_path / "G_AB_1.pth"), G


def save_png(x, path):
    a = levels(x)[0].permute(1, 2, 0).byte().numpy()
    Image.fromarray(a).save(path)
    return path


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_tile_flag_gives_the_untiled_pixels(ckpt, tmp_path, capsys):
    path, _ = ckpt
    save_png(image_tensor(45, 38), tmp_path / "in.png")
    for tile, out in [(8, "tiled"), (0, "whole")]:
        code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "in.png",
                                 "--output_dir", tmp_path / out, "--tile", tile], capsys)
        assert code == 0, err
        assert "strips" not in err  # asked for: no note
    diff = np.abs(pixels(tmp_path / "tiled" / "in.png") - pixels(tmp_path / "whole" / "in.png"))
    assert diff.shape == (45, 38, 3) and diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_images_that_do_not_fit_max_memory_go_in_the_largest_strips_that_do_with_a_one_line_note(
        ckpt, tmp_path, capsys, monkeypatch):
    path, G = ckpt
    small, large = tt.memory_needed(G, 3, 30, 40), tt.memory_needed(G, 3, 60, 80)
    budget = (small + large) // 2  # the small image fits in one piece, the large one does not
    calls = []
    translate_tiled = tt.translate_tiled
    monkeypatch.setattr(tt, "translate_tiled", lambda *a, **k: calls.append(a[2]) or translate_tiled(*a, **k))
    (tmp_path / "in").mkdir()
    save_png(image_tensor(30, 40), tmp_path / "in" / "small.png")
    save_png(image_tensor(60, 80), tmp_path / "in" / "large.png")
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "in", "--output_dir", tmp_path / "out",
                             "--max_memory", f"{budget}B"], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "strips" in line]
    assert len(notes) == 1 and "large.png" in notes[0] and "--max_memory" in notes[0], err
    assert "--tile 0" in notes[0] and "--tile N" in notes[0]
    assert len(calls) == 1  # only the large image, in the largest strips within the budget
    assert tt.memory_needed(G, 3, 60, 80, calls[0]) <= budget < tt.memory_needed(G, 3, 60, 80, calls[0] + 1)
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "in" / "large.png", "--output_dir",
                             tmp_path / "whole", "--tile", 0, "--max_memory", f"{budget}B"], capsys)
    assert code == 0 and "strips" not in err and len(calls) == 1
    diff = np.abs(pixels(tmp_path / "out" / "large.png") - pixels(tmp_path / "whole" / "large.png"))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def opts(max_memory, tile=None, batch_size=4, shift_average=False):
    return argparse.Namespace(max_memory=int(max_memory), tile=tile, batch_size=batch_size, shift_average=shift_average)


def test_plan_takes_as_many_frames_as_batch_size_asks_and_max_memory_holds_and_strips_for_a_frame_that_does_not_fit():
    G = generator("seed")
    one = tt.memory_needed(G, 3, 40, 48)
    assert tt.plan(G, 3, 40, 48, opts(100 * one)) == (4, None)  # room for more: --batch_size decides
    assert tt.plan(G, 3, 40, 48, opts(2.5 * one)) == (2, None)
    assert tt.plan(G, 3, 40, 48, opts(one)) == (1, None)
    batch, rows = tt.plan(G, 3, 40, 48, opts(one - 1))
    assert batch == 1 and rows < 40 and tt.memory_needed(G, 3, 40, 48, rows) <= one - 1
    assert tt.plan(G, 3, 40, 48, opts(1, tile=0)) == (1, None)  # --tile 0: in one piece, however little memory
    assert tt.plan(G, 3, 100, 100, opts(2**40, tile=512)) == (1, 512 * 512 // 100 + 1)  # --tile N: always in strips
    assert tt.plan(G, 3, 10, 10**6, opts(2**40, tile=4)) == (1, 1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_bytes_bounds_the_tensors_alive_at_once_in_one_piece_and_in_strips(arch, dtype):
    G = generator(arch).to(dtype)
    for h, w, rows in [(37, 50, None), (37, 50, 1), (37, 50, 6), (37, 50, 1000), (130, 24, 16)]:
        # in one piece as test.py translates: float; in strips 8-bit levels in and out
        x = image_tensor(h, w, dtype=dtype) if rows is None else levels(image_tensor(h, w)).byte()
        with live_tensor_bytes() as m:
            translate(G, x) if rows is None else tiling.translate_tiled(G, x, rows)
        need = tiling.peak_bytes(G, (3, h, w), rows)
        assert need / 4 < m.peak <= need, (h, w, rows)  # an upper bound, not a wild one


def test_not_enough_temporary_space_is_one_line_naming_tmpdir(ckpt, tmp_path, capsys, monkeypatch):
    path, _ = ckpt
    save_png(image_tensor(20, 20), tmp_path / "in.png")
    monkeypatch.setattr(tiling.shutil, "disk_usage", lambda p: type("usage", (), {"free": 1000})())
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "in.png",
                             "--output_dir", tmp_path / "out", "--tile", 8], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in err
    assert any("TMPDIR" in line and "in.png" in line for line in lines), err
    assert not (tmp_path / "out" / "in.png").exists()


@pytest.mark.parametrize("flags", [["--tile", "-1"], ["--batch_size", "0"], ["--max_memory", "0"],
                                   ["--max_memory", "2TB"]])
def test_negative_tile_zero_batch_size_and_bad_max_memory_are_one_line_errors_naming_the_flag(ckpt, tmp_path, capsys,
                                                                                              flags):
    code, _, err = run_main(["--checkpoint", ckpt[0], "--image_path", tmp_path, *flags], capsys)
    assert code == 2 and len([line for line in err.splitlines() if line.strip()]) == 1 and flags[0] in err
