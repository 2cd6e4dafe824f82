"""Anti-aliased generators (--antialias, --antialias_up; issue 36): the blur layers against a
direct computation written here in numpy, the shift equivariance that the layout keeps, the
official CUT's tapped layers, both kinds trained, saved, loaded back and translated by
test.py (whole and in strips), a resume or --epoch of another kind refused in one line,
artefacts.py's two measures on inputs whose answer is known, and --shift_average (the mean
over the grid's 16 shifts) against a direct computation and the equivariance it brings."""
import argparse
import json
from contextlib import nullcontext
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import artefacts
from conftest import fp32, make_data, run_cli, run_translate, translate_script
import cut
from models import (BlurDownsample, BlurUpsample, GeneratorResNet, PatchProjection, ResidualBlock, generator_kind,
                    load_generator, to_image, to_tensor, translate)
from shifts import SHIFT_FRAME, canonical_shift, crop_from_frame, flipped_shift, place_in_frame


def direct_blur_down(x):
    """[1 2 1]^2 / 16 over the reflection-padded input, at every second pixel from the first."""
    k = np.outer([1, 2, 1], [1, 2, 1]) / 16
    c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    out = np.zeros((c, math.ceil(h / 2), math.ceil(w / 2)))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = (xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3] * k).sum((1, 2))
    return out


def direct_blur_up(x):
    """Each pixel of the edge-replicated input spreads [1 3 3 1]^2 / 16 over a 4x4 patch two
    pixels on from its neighbour's (a transposed convolution of stride 2); the middle 2n x 2n
    of the result, from offset 3, is the output (the official CUT's crop)."""
    k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 16
    c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    full = np.zeros((c, 2 * (h + 2) + 2, 2 * (w + 2) + 2))
    for i in range(h + 2):
        for j in range(w + 2):
            full[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4] += xp[:, i, j, None, None] * k
    return full[:, 3:3 + 2 * h, 3:3 + 2 * w]


@pytest.mark.parametrize("h, w", [(7, 8), (8, 7), (5, 5), (6, 10)])
def test_blur_downsample_is_the_121_blur_of_the_reflection_padded_input_at_every_second_pixel(h, w):
    x = torch.randn(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    layer = BlurDownsample(3).double()
    y = layer(x)
    assert y.shape == (1, 3, math.ceil(h / 2), math.ceil(w / 2))
    np.testing.assert_allclose(y[0].numpy(), direct_blur_down(x[0].numpy()), rtol=0, atol=1e-12)
    plain = torch.nn.Sequential(*layer.as_layers()).double()  # tiling.py's view of the same layer
    np.testing.assert_allclose(plain(x).detach().numpy(), y.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("h, w", [(5, 6), (6, 5), (3, 3), (4, 9)])
def test_blur_upsample_is_the_1331_transposed_blur_of_the_replicated_input_cropped_to_twice_the_size(h, w):
    x = torch.randn(1, 2, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    layer = BlurUpsample(2).double()
    y = layer(x)
    assert y.shape == (1, 2, 2 * h, 2 * w)
    np.testing.assert_allclose(y[0].numpy(), direct_blur_up(x[0].numpy()), rtol=0, atol=1e-12)
    plain = torch.nn.Sequential(*layer.as_layers()).double()
    np.testing.assert_allclose(plain(x).detach().numpy(), y.numpy(), rtol=0, atol=1e-12)


def test_both_blurs_keep_a_constant_image_constant_and_their_filters_are_the_binomial_kernels():
    x = torch.full((1, 4, 6, 7), 0.3, dtype=torch.float64)
    assert torch.allclose(BlurDownsample(4).double()(x), torch.full((1, 4, 3, 4), 0.3, dtype=torch.float64))
    assert torch.allclose(BlurUpsample(4).double()(x), torch.full((1, 4, 12, 14), 0.3, dtype=torch.float64))
    down, up = BlurDownsample(2).filt, BlurUpsample(2).filt
    assert down.shape == (2, 1, 3, 3) and up.shape == (2, 1, 4, 4)
    assert torch.equal(down[1, 0] * 16, torch.tensor([[1., 2, 1], [2, 4, 2], [1, 2, 1]]))
    assert torch.equal(up[0, 0] * 16, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])))


def tiny_generator(antialias, antialias_up, seed=0, canonical_shift=False):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = GeneratorResNet((3, 0, 0), 1, ngf=8, antialias=antialias, antialias_up=antialias_up,
                            canonical_shift=canonical_shift).double().eval()
        for m in G.modules():  # biases that are not zero, so that padding a constant shows
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    return G


@pytest.mark.parametrize("antialias, antialias_up", [(False, False), (True, True), (True, False), (False, True)])
def test_content_shifted_by_the_total_stride_gives_the_same_output_shifted_away_from_the_borders(antialias,
                                                                                                antialias_up):
    # content on a flat background, far enough from the borders that what the padding sees
    # is flat in both frames: then every feature map, and InstanceNorm's statistics over it,
    # move with the content
    g = torch.Generator().manual_seed(1)
    frame = torch.full((1, 3, 128, 128), 0.6, dtype=torch.float64)
    shifted = frame.clone()
    content = torch.rand(1, 3, 20, 20, dtype=torch.float64, generator=g) * 2 - 1
    frame[..., 52:72, 52:72] = content
    shifted[..., 56:76, 48:68] = content  # 4 px down, 4 px left: the generator's total stride
    G = tiny_generator(antialias, antialias_up)
    with torch.no_grad():
        y, y_shifted = G(frame), G(shifted)
    assert not torch.allclose(y[..., 30:90, 30:90], y_shifted[..., 30:90, 30:90], atol=1e-3)  # it does move
    torch.testing.assert_close(y_shifted[..., 30 + 4:90 + 4, 30 - 4:90 - 4], y[..., 30:90, 30:90], rtol=0, atol=1e-9)


def rolled_mean(G, x):
    """The mean over the 16 offsets (dy, dx) in [0, 4)^2 of G(x rolled by the offset), rolled
    back: what --shift_average should give, written out here with G called directly."""
    outs = [torch.roll(G(torch.roll(x, (dy, dx), (2, 3))), (-dy, -dx), (2, 3)) for dy in range(4) for dx in range(4)]
    return torch.stack(outs).mean(0)


def scene_moved_off_the_grid():
    """As above, content on a flat background far from the borders, and the same content 1 px
    down and 3 px left, which the generator's grid of 4 does not follow: (frame, shifted); the
    output at [30:90, 30:90] of the one is at [31:91, 27:87] of the other."""
    g = torch.Generator().manual_seed(2)
    frame = torch.full((1, 3, 128, 128), 0.6, dtype=torch.float64)
    shifted = frame.clone()
    content = torch.rand(1, 3, 20, 20, dtype=torch.float64, generator=g) * 2 - 1
    frame[..., 52:72, 52:72] = content
    shifted[..., 53:73, 49:69] = content
    return frame, shifted


@pytest.mark.parametrize("antialias, antialias_up", [(False, False), (True, True)])
def test_shift_average_moves_the_output_with_content_shifted_by_any_whole_number_of_pixels(antialias, antialias_up):
    frame, shifted = scene_moved_off_the_grid()
    G = tiny_generator(antialias, antialias_up)
    plain, plain_shifted = translate(G, frame), translate(G, shifted)
    assert (plain_shifted[..., 31:91, 27:87] - plain[..., 30:90, 30:90]).abs().max() > 1e-3
    y, y_shifted = translate(G, frame, shift_average=True), translate(G, shifted, shift_average=True)
    torch.testing.assert_close(y_shifted[..., 31:91, 27:87], y[..., 30:90, 30:90], rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(y, rolled_mean(G, frame).float(), rtol=0, atol=1e-5)


def test_the_antialiased_generator_taps_the_official_cut_layers_0_4_8_12_16():
    # the official ResnetGenerator with anti-aliasing: pad, conv, norm, relu; (conv, norm,
    # relu, downsample) twice; the blocks. Its taps are the padded input, both downsampling
    # convolutions, and the first and fifth blocks.
    G = GeneratorResNet((3, 0, 0), 9, ngf=8, antialias=True, antialias_up=True)
    assert G.nce_layers() == [0, 4, 8, 12, 16]
    kinds = [type(G.model[i]) for i in G.nce_layers()]
    assert kinds == [torch.nn.ReflectionPad2d, torch.nn.Conv2d, torch.nn.Conv2d, ResidualBlock, ResidualBlock]
    assert [type(G.model[i]) for i in (7, 11)] == [BlurDownsample, BlurDownsample]
    assert G.model[4].stride == G.model[8].stride == (1, 1)


def test_the_default_generator_has_no_blur_and_each_flag_adds_its_own_filters():
    def filters(G):
        return {k: tuple(v.shape) for k, v in G.state_dict().items() if k.endswith("filt")}
    plain = GeneratorResNet((3, 0, 0), 2, ngf=8)
    assert filters(plain) == {} and generator_kind(plain.state_dict()) == {"antialias": False, "antialias_up": False,
                                                                      "canonical_shift": False}
    down = GeneratorResNet((3, 0, 0), 2, ngf=8, antialias=True)
    assert filters(down) == {"model.7.filt": (16, 1, 3, 3), "model.11.filt": (32, 1, 3, 3)}
    up = GeneratorResNet((3, 0, 0), 2, ngf=8, antialias_up=True)
    assert filters(up) == {"model.12.filt": (32, 1, 4, 4), "model.16.filt": (16, 1, 4, 4)}
    # the upsampling keeps the seed's indices: only the blur's buffer is new
    assert set(up.state_dict()) - set(plain.state_dict()) == set(filters(up))
    assert generator_kind(up.state_dict()) == {"antialias": False, "antialias_up": True, "canonical_shift": False}


# -----------------------------------------------------------------------------
# --canonical_shift


@pytest.mark.parametrize("r, c", [(r, c) for r in range(4) for c in range(4)])
def test_canonical_shift_puts_the_phase_that_holds_the_detail_on_the_grid_origin(r, c):
    x = torch.full((2, 3, 32, 40), 0.3)
    x[0, :, r::4, c::4][:, 2:6, 3:7] = -1.0  # isolated dots, all at (r, c) modulo 4
    x[0, 1, r + 16, c + 24] = 0.9  # a brighter one, in one channel, at the same phase
    want = torch.tensor([(4 - r) % 4, (4 - c) % 4])
    assert torch.equal(canonical_shift(x)[0], want)  # then r + dy and c + dx are multiples of 4
    assert torch.equal(canonical_shift(x)[1], torch.tensor([0, 0]))  # a blank image: the first phase


def test_place_in_frame_is_reflection_padding_by_the_offset_and_crop_from_frame_undoes_it():
    x = torch.rand(16, 2, 9, 7, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([[dy, dx] for dy in range(4) for dx in range(4)])
    framed = place_in_frame(x, shift)
    for k, (dy, dx) in enumerate(shift.tolist()):
        padded = F.pad(x[k:k + 1], (dx, SHIFT_FRAME - dx, dy, SHIFT_FRAME - dy), mode="reflect")
        assert torch.equal(framed[k:k + 1], padded), (dy, dx)
    assert torch.equal(crop_from_frame(framed, shift, 9, 7), x)
    # the frame of a left-right flipped image, placed at shift and flipped back, is the frame
    # of the image itself at flipped_shift (offsets up to SHIFT_FRAME itself are valid)
    assert torch.equal(place_in_frame(x.flip(3), shift).flip(3), place_in_frame(x, flipped_shift(shift)))


@pytest.mark.parametrize("antialias", [False, True])
def test_a_canonical_shift_generator_moves_its_output_with_content_shifted_by_any_whole_number_of_pixels(antialias):
    frame, shifted = scene_moved_off_the_grid()  # one translation each, no average
    plain = tiny_generator(antialias, antialias)
    moved = translate(plain, shifted)[..., 31:91, 27:87] - translate(plain, frame)[..., 30:90, 30:90]
    assert moved.abs().max() > 1e-3
    G = tiny_generator(antialias, antialias, canonical_shift=True)
    assert G.state_dict().keys() - plain.state_dict().keys() == {"shift_frame"}  # what marks its checkpoints
    y, y_shifted = translate(G, frame), translate(G, shifted)
    torch.testing.assert_close(y_shifted[..., 31:91, 27:87], y[..., 30:90, 30:90], rtol=0, atol=1e-9)


def test_patchnce_queries_sit_where_the_keys_did_under_a_canonical_shift():
    # G(x) = x exactly (identity_start): the queries, the features of G's translation, are
    # the keys themselves when placed where the source was, and PatchNCE is then at its
    # value for identical features; placed by their own canonical_shift they would be too
    # (the translation is the source), so a wrong offset is passed to show that it matters
    torch.manual_seed(0)
    G = GeneratorResNet((3, 0, 0), 2, ngf=8, identity_start=True, canonical_shift=True).eval()
    G.start_as_identity()
    layers = G.nce_layers()
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    shift = canonical_shift(real)
    with torch.no_grad():
        fake, features = G(real, layers, shift=shift)
        F_head = PatchProjection([f.size(1) for f in features], 16)
        assert torch.equal(fake, real)
        torch.manual_seed(1)  # the same patch locations in all three
        keys, _ = F_head(features, 8)
        same = sum(cut.patch_nce_loss(k, k, 0.07) for k in keys) / len(layers)
        torch.manual_seed(1)
        aligned = cut.nce_across_layers(G, F_head, features, fake, layers, 8, 0.07, False, shift)
        torch.manual_seed(1)
        off = cut.nce_across_layers(G, F_head, features, fake, layers, 8, 0.07, False, (shift + 1) % SHIFT_FRAME)
    torch.testing.assert_close(aligned, same)
    assert (off - same).abs().min() > 1e-3


# -----------------------------------------------------------------------------
# Both kinds end to end

TINY = ["--dataset_name", "tiny", "--img_height", "32", "--img_width", "32", "--n_residual_blocks", "1", "--ngf", "8",
        "--n_cpu", "0", "--seed", "0", "--sample_interval", "0", "--decay_epoch", "0", "--n_epochs", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{script: (its G_AB_1.pth, the kind it should hold)}: a tiny CUT run (both blurs, its
    default) and a tiny CycleGAN run with --antialias and --canonical_shift."""
    runs = {"cut.py": ([], {"antialias": True, "antialias_up": True, "canonical_shift": False}),
            "cyclegan.py": (["--antialias", "--canonical_shift"],
                            {"antialias": True, "antialias_up": False, "canonical_shift": True})}
    out = {}
    for script, (flags, kind) in runs.items():
        root = tmp_path_factory.mktemp(script.replace(".", "_"))
        make_data(root / "data" / "tiny", n_A=2, n_test=1)
        result = run_cli(script, *fp32(TINY + flags), cwd=root)
        assert result.returncode == 0, result.stderr
        out[script] = (root / "saved_models" / "tiny" / "G_AB_1.pth", kind)
    return out


@pytest.mark.parametrize("script", ["cut.py", "cyclegan.py"])
def test_both_kinds_train_save_keys_that_load_back_exactly_and_translate_any_size_whole_and_in_strips(
        trained, script, tmp_path, capsys):
    ckpt, kind = trained[script]
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert generator_kind(saved) == kind
    G = load_generator(str(ckpt))
    assert {flag: getattr(G, flag) for flag in kind} == kind
    assert G.state_dict().keys() == saved.keys()
    assert all(torch.equal(G.state_dict()[k], v) for k, v in saved.items())
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 22, 3), dtype=np.uint8))
    img.save(tmp_path / "odd.png")
    want = np.asarray(to_image(translate(G, to_tensor(img))), dtype=int)
    for flags, out in [([], "whole"), (["--tile", "16"], "strips")]:
        code, _, err = run_translate(["--checkpoint", ckpt, "--image_path", tmp_path / "odd.png",
                                      "--output_dir", tmp_path / out, *flags], capsys)
        assert code == 0, err
        got = np.asarray(Image.open(tmp_path / out / "odd.png"), dtype=int)
        assert got.shape == want.shape == (37, 22, 3)
        assert np.abs(got - want).max() <= 1


def test_test_py_shift_average_writes_the_mean_of_the_16_rolled_translations_whole_and_in_strips(
        trained, tmp_path, capsys):
    ckpt, _ = trained["cut.py"]
    G = load_generator(str(ckpt))
    # a size that is a multiple of 4, as rolled_mean calls G directly
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 20, 3), dtype=np.uint8))
    img.save(tmp_path / "img.png")
    with torch.no_grad():
        want = np.asarray(to_image(rolled_mean(G, to_tensor(img))), dtype=int)
    plain = np.asarray(to_image(translate(G, to_tensor(img))), dtype=int)
    assert np.abs(plain - want).max() > 4  # the average is not the plain translation
    for flags, out in [([], "whole"), (["--tile", "12"], "strips")]:
        code, _, err = run_translate(["--checkpoint", ckpt, "--image_path", tmp_path / "img.png", "--shift_average",
                                      "--output_dir", tmp_path / out, *flags], capsys)
        assert code == 0, err
        got = np.asarray(Image.open(tmp_path / out / "img.png"), dtype=int)
        assert got.shape == (28, 20, 3) and np.abs(got - want).max() <= 1, out
    # video and animation frames go through translate_batch
    opt = argparse.Namespace(shift_average=True, side_by_side=False)
    (_, frame_out, _), = translate_script().translate_batch(G, [(img, None)], None, opt)
    assert np.abs(np.asarray(frame_out, dtype=int) - want).max() <= 1


def test_resume_and_epoch_of_another_generator_kind_are_refused_in_one_line(trained, main_in_process):
    root = trained["cyclegan.py"][0].parents[2]  # trained with --antialias --no-antialias_up --canonical_shift
    code, _, err = main_in_process(root, *fp32(TINY[:-2]), "--n_epochs", "2", "--epoch", "1", "--no-antialias",
                                   "--canonical_shift")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "G_AB_1.pth is a generator of --antialias --no-antialias_up --canonical_shift" in lines[0]
    assert "this run asks for --no-antialias --no-antialias_up --canonical_shift" in lines[0]
    code, _, err = main_in_process(root, *fp32(TINY[:-2]), "--n_epochs", "2", "--epoch", "1", "--antialias")
    assert code == 2 and "this run asks for --antialias --no-antialias_up --no-canonical_shift" in err, err
    code, _, err = main_in_process(root, "--dataset_name", "tiny", "--resume", "--antialias_up")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--antialias_up False -> True" in lines[0], err


# -----------------------------------------------------------------------------
# artefacts.py

def write_icons(folder, n, seed, size=24):
    """n images: a coloured square on white, at a place drawn per image."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        a = np.full((size, size, 3), 255, np.uint8)
        y, x = rng.integers(2, size - 10, 2)
        a[y:y + 8, x:x + 8] = rng.integers(0, 200, 3)
        Image.fromarray(a).save(os.path.join(folder, f"{i}.png"))


def test_shimmer_of_the_identity_is_zero_and_of_a_grid_bound_output_is_what_a_direct_count_gives(tmp_path):
    write_icons(tmp_path / "a", 5, seed=0)
    paths = sorted(str(p) for p in (tmp_path / "a").iterdir())
    scene = artefacts.mosaic(paths, 32, 32 + 7 * 2, 3)
    assert scene.shape == (1, 3, 32, 46)
    identity = torch.nn.Identity()
    assert artefacts.shimmer(identity, scene, 32, 8, 1, 2, nullcontext()) == 0.0
    # a 2x2 block average: what it gives depends on where content sits on its grid of 2,
    # so a pan of 1 px shimmers and a pan of 2 px does not
    pool = torch.nn.Sequential(torch.nn.AvgPool2d(2), torch.nn.Upsample(scale_factor=2))
    assert artefacts.shimmer(pool, scene, 32, 8, 2, 2, nullcontext()) == 0.0
    one = artefacts.shimmer(pool, scene, 32, 8, 1, 2, nullcontext())
    outs = [artefacts.to_levels(pool(scene[..., :32, k:k + 32])).float() / 255 for k in range(8)]
    direct = np.mean([(outs[k][..., 2:30, 2:29] - outs[k - 1][..., 2:30, 3:30]).abs().mean().item()
                      for k in range(1, 8)])
    assert one > 0.01 and abs(one - direct) < 1e-6


def test_shimmer_of_a_grid_bound_output_vanishes_under_shift_average(tmp_path):
    # the 2x2 block average above, averaged over the 16 shifts, no longer depends on where the
    # content sits: a 1-px pan only moves it (wrapped border pixels fall in the margin)
    write_icons(tmp_path / "a", 5, seed=0)
    paths = sorted(str(p) for p in (tmp_path / "a").iterdir())
    scene = artefacts.mosaic(paths, 32, 32 + 7, 3)
    pool = torch.nn.Sequential(torch.nn.AvgPool2d(2), torch.nn.Upsample(scale_factor=2))
    assert artefacts.shimmer(pool, scene, 32, 8, 1, 4, nullcontext()) > 0.01
    assert artefacts.shimmer(pool, scene, 32, 8, 1, 4, nullcontext(), shift_average=True) < 1e-3


def test_speckle_counts_only_pixels_flat_in_the_reference_and_the_cli_writes_both_measures(tmp_path, capsys):
    write_icons(tmp_path / "a", 3, seed=1)
    write_icons(tmp_path / "b", 3, seed=1)  # the same images: a paired split where B = A
    paths = sorted(str(p) for p in (tmp_path / "a").iterdir())
    flat_identity = artefacts.speckle(torch.nn.Identity(), paths, str(tmp_path / "b"), 3, nullcontext())
    assert max(flat_identity.values()) < 1e-6  # the flat areas of a copy are flat (to float rounding)
    # on images of one flat colour, a checkerboard of +-4 levels added by the 'generator' is
    # 4 levels from each pixel's 3x3 mean, which is 4/9 level the other way: 32/9 levels
    for name in ("flat_a", "flat_b"):
        os.makedirs(tmp_path / name)
        Image.new("RGB", (12, 12), (90, 140, 30)).save(tmp_path / name / "0.png")  # (12: translate() pads none)
    board = ((torch.arange(12)[:, None] + torch.arange(12)[None]) % 2 * 2 - 1).double()

    class Checkered(torch.nn.Module):
        def forward(self, x):
            return x + board.to(x.dtype) * 8 / 255  # 4 levels of [0, 255] in [-1, 1]
    found = artefacts.speckle(Checkered(), [str(tmp_path / "flat_a" / "0.png")], str(tmp_path / "flat_b"),
                              3, nullcontext())
    assert found["speckle_input"] < 1e-6 and abs(found["speckle"] - 32 / 9 / 255) < 1e-6
    assert abs(found["speckle_interior"] - 32 / 9 / 255) < 1e-6  # no edge: all of it is interior
    ckpt = tmp_path / "G.pth"
    torch.save(GeneratorResNet((3, 0, 0), 1, ngf=8).state_dict(), ckpt)
    artefacts.main(["--checkpoint", str(ckpt), "--image_path", str(tmp_path / "a"), "--reference_dir",
                    str(tmp_path / "b"), "--window", "16", "--frames", "3", "--margin", "2", "--json",
                    str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results) == {"shimmer_1px", "shimmer_4px", "speckle", "speckle_input", "speckle_interior",
                            "speckle_interior_input"}
    assert results["speckle_input"] < 1e-6 and all(v >= 0 for v in results.values())
    assert "shimmer, pan of 1 px per frame" in capsys.readouterr().out


def test_interior_speckle_leaves_out_the_band_along_true_edges(tmp_path):
    # a grey image with a black line down column 10 (in A and B): the flat pixels of the
    # reference are those at least 2 columns from it (their 3x3 neighbourhood misses it), the
    # interior those more than EDGE_BAND columns from the last column that is not flat: 1 + 3 + 1 = 5 or more
    a = np.full((16, 24, 3), 200, np.uint8)  # (not white: +4 levels would clip)
    a[:, 10] = 0
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        Image.fromarray(a).save(tmp_path / name / "0.png")
    column = torch.arange(24)[None, :].expand(16, 24)
    board = ((torch.arange(16)[:, None] + torch.arange(24)[None]) % 2 * 2 - 1).double()

    class Checkered(torch.nn.Module):  # adds +-4 levels to the columns `near` marks
        def __init__(self, near):
            super().__init__()
            self.near = near

        def forward(self, x):
            return x + (board * self.near).to(x.dtype) * 8 / 255
    paths, ref = [str(tmp_path / "a" / "0.png")], str(tmp_path / "b")
    # dots within 3 columns of the line reach no interior pixel's 3x3 neighbourhood (5 or more away)
    near_edge = artefacts.speckle(Checkered(((column - 10).abs() <= 3).double()), paths, ref, 3, nullcontext())
    assert near_edge["speckle"] > 0.3 / 255 and near_edge["speckle_interior"] < 1e-6
    # dots everywhere: every interior pixel is 32/9 levels from its mean, as on a flat image
    everywhere = artefacts.speckle(Checkered(torch.ones(16, 24).double()), paths, ref, 3, nullcontext())
    assert abs(everywhere["speckle_interior"] - 32 / 9 / 255) < 1e-6
    assert everywhere["speckle_input"] < 1e-6 and everywhere["speckle_interior_input"] < 1e-6
    # which pixels are interior, counted directly: columns 5 or more from the line, of the (16-2) x (24-2) map
    mask = artefacts.interior(artefacts.flat_mask((artefacts.to_tensor(Image.fromarray(a)) + 1) / 2))
    cols = [j + 1 for j in range(22) if bool(mask[0, 0, :, j].all())]
    assert cols == [j for j in range(1, 23) if abs(j - 10) >= 5]
    assert not any(bool(mask[0, 0, :, j - 1].any()) for j in range(1, 23) if abs(j - 10) < 5)


@pytest.mark.parametrize("argv, flag", [(["--steps", "1,x"], "--steps"), (["--window", "4"], "--window"),
                                        (["--image_path", "nowhere"], "--image_path")])
def test_artefacts_bad_flags_are_one_line_errors_naming_the_flag(tmp_path, capsys, argv, flag):
    write_icons(tmp_path / "a", 1, seed=0)
    base = {"--checkpoint": str(tmp_path / "G.pth"), "--image_path": str(tmp_path / "a")}
    args = [a for k, v in base.items() if k not in argv for a in (k, v)] + argv
    with pytest.raises(SystemExit) as e:
        artefacts.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and flag in err[0]
