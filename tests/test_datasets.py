"""Tests for datasets.py: folder layouts, file filtering, image decoding,
transforms, unreadable files, the deterministic sampler and the built-in
synthetic dataset. All data is tiny and written under tmp_path."""

import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader

from datasets import ImageDataset, UnpairedSampler, list_images, load_image, split_dirs, train_transforms
from synthetic import make_day2night, render_scene

BICUBIC = T.InterpolationMode.BICUBIC


# ----------------------------------------------------------------------------- helpers

def solid(path, colour, size=(12, 12), mode="RGB", **save_kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, colour).save(path, **save_kw)
    return path


def noise(path, seed, size=(20, 20)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_split(folder_A, folder_B, n_A, n_B, colour_A=(0, 0, 0), colour_B=(255, 255, 255)):
    for i in range(n_A):
        solid(os.path.join(folder_A, f"{i:04d}.png"), colour_A)
    for i in range(n_B):
        solid(os.path.join(folder_B, f"{i:04d}.png"), colour_B)


def make_noise_dataset(root, n_A=6, n_B=4, size=(20, 20)):
    for i in range(n_A):
        noise(os.path.join(root, "trainA", f"{i:04d}.png"), seed=i, size=size)
    for i in range(n_B):
        noise(os.path.join(root, "trainB", f"{i:04d}.png"), seed=100 + i, size=size)


def pixels(path, channels=3):
    return np.asarray(load_image(path, channels))


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("layout", ["seed", "official"])
def test_both_layouts_load_with_len_max_and_normalised_tensors_of_crop_shape(tmp_path, layout, mode):
    root = str(tmp_path / "ds")
    if layout == "seed":
        dir_A, dir_B = os.path.join(root, mode, "A"), os.path.join(root, mode, "B")
    else:
        dir_A, dir_B = os.path.join(root, mode + "A"), os.path.join(root, mode + "B")
    make_split(dir_A, dir_B, n_A=3, n_B=5)  # A black, B white

    assert split_dirs(root, mode) == (dir_A, dir_B)
    ds = ImageDataset(root, transforms_=train_transforms(8, 10), unaligned=True, mode=mode)
    assert len(ds) == 5
    for i in range(len(ds)):
        item = ds[i]
        for key, value in (("A", -1.0), ("B", 1.0)):
            x = item[key]
            assert x.dtype == torch.float32
            assert x.shape == (3, 8, 10)
            # black maps to exactly -1 and white to exactly +1: normalised to [-1, 1]
            assert torch.all(x == value), key
        assert item["bad"] == ""


def test_len_is_max_when_A_is_the_larger_folder(tmp_path):
    root = str(tmp_path / "ds")
    make_split(os.path.join(root, "trainA"), os.path.join(root, "trainB"), n_A=4, n_B=2)
    assert len(ImageDataset(root)) == 4


# ----------------------------------------------------------------------------- file filtering

EXT_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF",
               "webp": "WEBP", "ppm": "PPM", "gif": "GIF"}


def test_only_image_files_count_hidden_text_and_subfolders_ignored(tmp_path):
    root = tmp_path / "ds"
    a, b = root / "trainA", root / "trainB"
    make_split(str(a), str(b), n_A=2, n_B=2)
    for folder in (a, b):
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1 junk")
        (folder / "._0000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
        (folder / ".hidden.png").write_bytes(b"not a png")
        (folder / "notes.txt").write_text("not an image")
        (folder / "sub").mkdir()
        solid(str(folder / "sub" / "inside.png"), (1, 2, 3))
        (folder / "dir.png").mkdir()  # a folder whose name looks like an image
    assert [os.path.basename(p) for p in list_images(str(a))] == ["0000.png", "0001.png"]
    ds = ImageDataset(str(root))
    assert len(ds) == 2
    assert all(ds[i]["bad"] == "" for i in range(len(ds)))


def test_every_image_extension_in_any_case_is_accepted_and_decodes(tmp_path):
    root = tmp_path / "ds"
    names = []
    for k, (ext, fmt) in enumerate(sorted(EXT_FORMATS.items())):
        for variant in (ext, ext.upper(), ext.capitalize()):
            name = f"{k:02d}_{variant}.{variant}"
            solid(str(root / "trainA" / name), (255, 0, 0), format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
            names.append(name)
    solid(str(root / "trainB" / "x.png"), (0, 0, 255))
    assert sorted(os.path.basename(p) for p in list_images(str(root / "trainA"))) == sorted(names)
    ds = ImageDataset(str(root))
    assert len(ds) == len(names) == 27
    for i in range(len(ds)):
        item = ds[i]
        assert item["bad"] == ""
        r, g, b = item["A"][:, 0, 0].tolist()
        assert r > 0.9 and g < 0.1 and b < 0.1  # red, after JPEG tolerance


# ----------------------------------------------------------------------------- missing data

@pytest.mark.parametrize("case", ["missing", "empty_A", "only_junk_in_B"])
def test_missing_or_empty_folder_raises_filenotfound_naming_both_paths_and_download_command(tmp_path, case):
    root = tmp_path / "horse2zebra"
    if case != "missing":
        make_split(str(root / "trainA"), str(root / "trainB"), n_A=2, n_B=2)
        if case == "empty_A":
            for f in (root / "trainA").iterdir():
                f.unlink()
        else:
            for f in (root / "trainB").iterdir():
                f.unlink()
            (root / "trainB" / "readme.txt").write_text("no images")
    with pytest.raises(FileNotFoundError) as info:
        ImageDataset(str(root), mode="train")
    msg = str(info.value)
    assert os.path.join(str(root), "train", "A") in msg
    assert os.path.join(str(root), "trainA") in msg
    assert "sh data/download_cyclegan_dataset.sh horse2zebra" in msg


# ----------------------------------------------------------------------------- load_image

def test_load_image_grayscale_L_is_replicated_to_rgb(tmp_path):
    img = Image.new("L", (2, 1))
    img.putdata([0, 200])
    img.save(tmp_path / "l.png")
    p = pixels(tmp_path / "l.png")
    assert p.shape == (1, 2, 3)
    assert p.tolist() == [[[0, 0, 0], [200, 200, 200]]]


def test_load_image_rgb_with_one_channel_gives_L(tmp_path):
    img = Image.new("RGB", (3, 1))
    img.putdata([(255, 0, 0), (0, 255, 0), (10, 20, 30)])
    img.save(tmp_path / "rgb.png")
    out = load_image(tmp_path / "rgb.png", channels=1)
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[76, 150, 18]]  # ITU-R 601-2 luma, as PIL's convert("L")


def test_load_image_rejects_other_channel_counts(tmp_path):
    solid(str(tmp_path / "x.png"), (1, 2, 3))
    with pytest.raises(ValueError, match="channels"):
        load_image(tmp_path / "x.png", channels=2)


def test_load_image_palette_P_maps_indices_to_colours(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert pixels(tmp_path / "p.png").tolist() == [[[10, 20, 30], [200, 100, 50], [0, 0, 255]]]


def test_load_image_palette_with_transparency_composites_transparent_index_on_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.putdata([0, 1])
    img.save(tmp_path / "pt.png", transparency=0)
    with Image.open(tmp_path / "pt.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    assert pixels(tmp_path / "pt.png").tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_load_image_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    img.save(tmp_path / "rgba.png")
    p = pixels(tmp_path / "rgba.png")
    assert p[0, 0].tolist() == [255, 255, 255]  # fully transparent red -> white, not red
    assert p[0, 1].tolist() == [0, 0, 255]      # opaque stays
    assert p[0, 2].tolist() in ([127, 127, 127], [128, 128, 128])  # half black over white
    # blue luma 0.114*255
    assert np.asarray(load_image(tmp_path / "rgba.png", channels=1)).tolist() == [[255, 29, p[0, 2, 0]]]


def test_load_image_LA_is_composited_on_white(tmp_path):
    img = Image.new("LA", (2, 1))
    img.putdata([(0, 0), (100, 255)])
    img.save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    assert pixels(tmp_path / "la.png").tolist() == [[[255, 255, 255], [100, 100, 100]]]


def test_load_image_16bit_grayscale_is_scaled_by_257_and_rounded_not_clipped(tmp_path):
    a = np.array([[65535, 32896, 1000, 0, 385]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode in ("I;16", "I")  # really a 16-bit file
    p = pixels(tmp_path / "g16.png")
    assert p[..., 0].tolist() == [[255, 128, 4, 0, 1]]  # 1000/257 = 3.89 -> 4; 385/257 = 1.498 -> 1
    assert (p[..., 0] == p[..., 1]).all() and (p[..., 0] == p[..., 2]).all()
    assert pixels(tmp_path / "g16.png", channels=1).tolist() == [[255, 128, 4, 0, 1]]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_load_image_cmyk_converts_to_rgb(tmp_path, fmt):
    path = tmp_path / ("c.jpg" if fmt == "JPEG" else "c.tif")
    img = Image.new("CMYK", (8, 8))
    img.paste((0, 255, 255, 0), (0, 0, 4, 8))  # red
    img.paste((0, 0, 0, 0), (4, 0, 8, 8))      # white
    img.save(path, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB"
    p = np.asarray(out).astype(int)
    tol = 2 if fmt == "JPEG" else 0
    assert np.abs(p[:, 0] - [255, 0, 0]).max() <= tol
    assert np.abs(p[:, 7] - [255, 255, 255]).max() <= tol


def test_load_image_1bit_becomes_0_or_255(tmp_path):
    img = Image.new("1", (2, 1))
    img.putdata([0, 1])
    img.save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert pixels(tmp_path / "b.png").tolist() == [[[0, 0, 0], [255, 255, 255]]]


@pytest.mark.parametrize("orientation,top", [(6, "red"), (8, "blue")])
def test_load_image_applies_exif_orientation(tmp_path, orientation, top):
    img = Image.new("RGB", (20, 10), (255, 0, 0))  # stored: left half red, right half blue
    img.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "o.jpg")
    assert out.size == (10, 20)  # (w, h): transposed
    p = np.asarray(out).astype(int)
    red, blue = [255, 0, 0], [0, 0, 255]
    # 6: rotate 90 clockwise to display, the stored left edge becomes the top; 8: the opposite
    expect_top, expect_bottom = (red, blue) if top == "red" else (blue, red)
    assert np.abs(p[2, 5] - expect_top).max() <= 8
    assert np.abs(p[17, 5] - expect_bottom).max() <= 8


def test_load_image_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(tmp_path / "a.gif") as check:
        assert check.n_frames == 2
    p = pixels(tmp_path / "a.gif")
    assert (p == [255, 0, 0]).all()


def test_load_image_webp_lossless_exact(tmp_path):
    img = Image.new("RGB", (2, 1))
    img.putdata([(12, 34, 56), (200, 150, 100)])
    img.save(tmp_path / "w.webp", lossless=True)
    assert pixels(tmp_path / "w.webp").tolist() == [[[12, 34, 56], [200, 150, 100]]]


# ----------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("h,w", [(32, 64), (64, 32)])
def test_train_transforms_crop_wider_or_taller_than_resized_square_image_works(h, w):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    torch.manual_seed(0)
    x = T.Compose(train_transforms(h, w))(img)
    assert x.shape == (3, h, w)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("size", [(40, 40), (40, 30), (30, 44)])
def test_train_transforms_on_image_that_fits_equals_seed_resize_bicubic(size):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    h = w = 24
    ours = train_transforms(h, w)
    resized = ours[0](img)
    reference = T.Resize(int(h * 1.12), BICUBIC)(img)
    assert resized.size == reference.size and min(resized.size) == 26
    assert np.array_equal(np.asarray(resized), np.asarray(reference))

    seed_pipeline = T.Compose([T.Resize(int(h * 1.12), BICUBIC), T.RandomCrop((h, w)), T.RandomHorizontalFlip(),
                               T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    for s in range(4):
        torch.manual_seed(s)
        a = T.Compose(ours)(img)
        torch.manual_seed(s)
        b = seed_pipeline(img)
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- unreadable files

def test_unreadable_files_are_skipped_for_the_next_readable_one_and_reported(tmp_path, capsys):
    root = tmp_path / "ds"
    a = root / "trainA"
    solid(str(a / "0000.png"), (255, 0, 0))
    (a / "0001.png").write_bytes(b"")  # zero bytes
    noise(str(a / "0002.jpg"), seed=0, size=(32, 32))
    data = (a / "0002.jpg").read_bytes()
    (a / "0002.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    solid(str(a / "0003.png"), (0, 255, 0))
    solid(str(root / "trainB" / "0000.png"), (0, 0, 255))
    ds = ImageDataset(str(root))
    assert len(ds) == 4

    item = ds[(1, 0, 123)]
    assert item["bad"].split("\n") == [str(a / "0001.png"), str(a / "0002.jpg")]
    assert item["A"][:, 0, 0].tolist() == [0.0, 1.0, 0.0]  # 0003, green
    assert str(a / "0001.png") in capsys.readouterr().err

    item = ds[2]  # int index path: 0002 is bad, 0003 is next
    assert item["bad"] == str(a / "0002.jpg")
    assert item["A"][:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert ds[0]["bad"] == "" and ds[3]["bad"] == ""


# ----------------------------------------------------------------------------- sampler

@pytest.fixture
def noise_ds(tmp_path):
    root = str(tmp_path / "ds")
    make_noise_dataset(root, n_A=6, n_B=4)
    return ImageDataset(root, transforms_=train_transforms(12, 12), unaligned=True)


def test_sampler_yields_index_A_index_B_seed_tuples(noise_ds):
    s = UnpairedSampler(noise_ds, seed=0)
    items = list(s)
    assert len(items) == len(s) == 6
    for t in items:
        assert isinstance(t, tuple) and len(t) == 3 and all(isinstance(v, int) for v in t)
        assert 0 <= t[0] < 6 and 0 <= t[1] < 4
    assert len({t[2] for t in items}) == 6  # distinct augmentation seeds


def test_sampler_same_seed_and_epoch_gives_identical_list_and_epochs_differ(noise_ds):
    def order(seed, epoch):
        s = UnpairedSampler(noise_ds, seed=seed)
        s.set_epoch(epoch)
        return list(s)
    assert order(5, 3) == order(5, 3)
    assert order(5, 3) != order(5, 4)
    assert [t[0] for t in order(5, 3)] != [t[0] for t in order(5, 4)]  # the A order itself changes
    assert order(5, 3) != order(6, 3)


def test_sampler_draws_new_B_partners_and_augmentation_seeds_each_epoch(noise_ds):
    def draws(epoch):
        s = UnpairedSampler(noise_ds, seed=5)
        s.set_epoch(epoch)
        return {a: (b, seed) for a, b, seed in s}
    e0, e1 = draws(0), draws(1)
    assert sorted(e0) == sorted(e1) == list(range(6))
    assert all(e0[a][1] != e1[a][1] for a in e0)  # a fresh crop/flip for every image
    assert [e0[a][0] for a in range(6)] != [e1[a][0] for a in range(6)]  # fresh B partners


def test_sampler_covers_every_index_once_per_epoch(noise_ds):
    s = UnpairedSampler(noise_ds, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        assert sorted(t[0] for t in s) == list(range(6))


@pytest.mark.parametrize("k", [0, 1, 4, 6])
def test_sampler_set_start_yields_exactly_the_tail(noise_ds, k):
    s = UnpairedSampler(noise_ds, seed=2)
    s.set_epoch(7)
    full = list(s)
    s.set_start(k)
    assert list(s) == full[k:]
    assert len(s) == 6 - k


def test_sampler_two_replicas_have_disjoint_A_indices_covering_all(noise_ds):
    shards = []
    for rank in (0, 1):
        s = UnpairedSampler(noise_ds, seed=3, num_replicas=2, rank=rank)
        s.set_epoch(2)
        shards.append([t[0] for t in s])
    assert len(shards[0]) == len(shards[1]) == 3
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(6))


def test_dataset_tuple_index_is_deterministic_and_leaves_global_rng_alone(noise_ds):
    t = (2, 3, 987654321)
    first = noise_ds[t]
    torch.rand(100)  # consume the global RNG in between
    state = torch.get_rng_state()
    second = noise_ds[t]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first["A"], second["A"]) and torch.equal(first["B"], second["B"])
    # the seed really drives the augmentation: some other seed crops/flips differently
    assert any(not torch.equal(noise_ds[(2, 3, s)]["A"], first["A"]) for s in range(5))


def test_dataloader_zero_and_two_workers_give_bitwise_identical_batches(noise_ds):
    def batches(workers):
        s = UnpairedSampler(noise_ds, seed=4)
        s.set_epoch(1)
        loader = DataLoader(noise_ds, batch_size=2, sampler=s, num_workers=workers)
        return [(b["A"], b["B"]) for b in loader]
    b0, b2 = batches(0), batches(2)
    assert len(b0) == len(b2) == 3
    for (a0, bb0), (a2, bb2) in zip(b0, b2):
        assert torch.equal(a0, a2) and torch.equal(bb0, bb2)


# ----------------------------------------------------------------------------- built-in dataset

def read_dir(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def as_array(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def day2night(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin") / "d2n"
    make_day2night(root, n_train=6, n_test=3, size=16, seed=0)
    return root


def test_make_day2night_writes_the_four_folders_and_no_tmp(day2night):
    names6 = [f"{i:04d}.png" for i in range(6)]
    names3 = [f"{i:04d}.png" for i in range(3)]
    assert sorted(os.listdir(day2night)) == ["testA", "testB", "trainA", "trainB"]
    assert sorted(os.listdir(day2night / "trainA")) == names6
    assert sorted(os.listdir(day2night / "trainB")) == names6
    assert sorted(os.listdir(day2night / "testA")) == names3
    assert sorted(os.listdir(day2night / "testB")) == names3
    assert os.listdir(day2night.parent) == ["d2n"]  # no d2n.tmp left behind
    img = Image.open(day2night / "trainA" / "0000.png")
    assert img.size == (16, 16) and img.mode == "RGB"
    ds = ImageDataset(str(day2night), mode="test")
    assert len(ds) == 3


def test_make_day2night_is_deterministic_in_seed(day2night, tmp_path):
    make_day2night(tmp_path / "same", n_train=6, n_test=3, size=16, seed=0)
    make_day2night(tmp_path / "other", n_train=6, n_test=3, size=16, seed=1)
    for d in ("trainA", "trainB", "testA", "testB"):
        assert read_dir(tmp_path / "same" / d) == read_dir(day2night / d)
        assert read_dir(tmp_path / "other" / d) != read_dir(day2night / d)


def test_make_day2night_refuses_existing_root(tmp_path):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_day2night(tmp_path / "exists", n_train=2, n_test=1, size=16)
    assert os.listdir(tmp_path / "exists") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["exists"]


def test_make_day2night_day_images_are_much_brighter_than_night(day2night):
    day = [as_array(day2night / d / f).mean() for d in ("trainA", "testA") for f in os.listdir(day2night / d)]
    night = [as_array(day2night / d / f).mean() for d in ("trainB", "testB") for f in os.listdir(day2night / d)]
    assert min(day) > 2 * max(night)


def scene_id(img, night, candidates, seed=0, size=16):
    """The scene id whose day (or night) render is `img`, or None."""
    hits = [s for s in candidates
            if np.array_equal(render_scene([seed, 0, s], size, night, [seed, 1, s, int(night)]), img)]
    assert len(hits) <= 1
    return hits[0] if hits else None


def test_make_day2night_test_pairs_share_geometry_and_train_scenes_are_disjoint(day2night):
    candidates = range(20)
    # testA/i and testB/i are the day and night renders of one scene: same geometry, other palette
    for f in os.listdir(day2night / "testA"):
        day, night = as_array(day2night / "testA" / f), as_array(day2night / "testB" / f)
        s = scene_id(day, False, candidates)
        assert s is not None
        assert np.array_equal(render_scene([0, 0, s], 16, True, [0, 1, s, 1]), night)
        assert not np.array_equal(day, night)
    # every trainA image is the day render of some scene; no trainB image is the night
    # render of any of those scenes (and each trainB image is the night render of another scene)
    scenes_A = {scene_id(as_array(day2night / "trainA" / f), False, candidates)
                for f in os.listdir(day2night / "trainA")}
    assert None not in scenes_A and len(scenes_A) == 6
    night_of_A = [render_scene([0, 0, s], 16, True, [0, 1, s, 1]) for s in scenes_A]
    scenes_B = set()
    for f in os.listdir(day2night / "trainB"):
        img = as_array(day2night / "trainB" / f)
        assert not any(np.array_equal(img, n) for n in night_of_A)
        scenes_B.add(scene_id(img, True, candidates))
    assert None not in scenes_B and len(scenes_B) == 6
    assert not scenes_A & scenes_B



def _generate(root, barrier, results):
    barrier.wait()  # both start at once
    try:
        make_day2night(root, n_train=30, n_test=4, size=16, seed=0)
        results.put("made")
    except FileExistsError as e:
        results.put("refused at the start" if e.args == (str(root),) else f"crashed: {e!r}")
    except Exception as e:
        results.put(f"crashed: {e!r}")


def test_make_day2night_run_by_two_processes_at_once_gives_one_complete_dataset(tmp_path):
    """torchrun on machines sharing a file system: several processes may generate the
    built-in dataset at the same moment. None may crash or leave a partial dataset."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    root, barrier, results = tmp_path / "d2n", ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_generate, args=(root, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert "made" in outcomes and all(o in ("made", "refused at the start") for o in outcomes), outcomes
    assert {d: len(os.listdir(root / d)) for d in ("trainA", "trainB", "testA", "testB")} == \
        {"trainA": 30, "trainB": 30, "testA": 4, "testB": 4}
    assert os.listdir(tmp_path) == ["d2n"]  # no temporary folder left


def test_load_size_of_the_crop_trains_at_the_images_own_scale(tmp_path, monkeypatch):
    """--load_size equal to the crop: an image of that size reaches the model unresampled
    (as it is or mirrored, the seed's random flip), where the seed's 1.12x zoom changes it;
    the flag goes from the command line to the training set."""
    import cyclegan
    import training
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for domain in ("trainA", "trainB"):
        os.makedirs(tmp_path / "data" / "one" / domain)
        Image.fromarray(pixels).save(tmp_path / "data" / "one" / domain / "x.png")
    as_is = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    monkeypatch.chdir(tmp_path)  # (the run's folders are checked where it runs)
    opt, _ = cyclegan.parse_args(["--dataset_name", "one", "--data_root", str(tmp_path / "data" / "one"),
                                  "--img_height", "32", "--img_width", "32", "--load_size", "32", "--seed", "0",
                                  "--n_cpu", "0", "--amp", "none"])
    assert opt.load_size == 32
    procs = training.Processes()
    dataset = training.build_data(opt, torch.device("cpu"), procs)[1]
    seen = [dataset[0]["A"] for _ in range(8)]
    for x in seen:
        assert torch.allclose(x, as_is, atol=1e-6) or torch.allclose(x, as_is.flip(-1), atol=1e-6)
    zoomed = T.Compose(train_transforms(32, 32))(Image.fromarray(pixels))
    assert not torch.allclose(zoomed, as_is, atol=0.05) and not torch.allclose(zoomed, as_is.flip(-1), atol=0.05)
