"""
Unpaired image data: two folders of images, A and B, in either the seed's layout
(<root>/train/A) or the official download's (<root>/trainA). Knows nothing about
models; turns files into normalised tensors.
"""
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torchvision.transforms as transforms
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import Dataset, DistributedSampler, Sampler

from utils import current_umask, die

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")


def list_images(folder):
    """Sorted image files in `folder`: hidden files and non-images are skipped."""
    if not os.path.isdir(folder):
        return []
    names = sorted(f for f in os.listdir(folder) if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS))
    return [os.path.join(folder, f) for f in names if os.path.isfile(os.path.join(folder, f))]


def split_dirs(root, mode):
    """The A and B folders of split `mode`, seed layout first, then the official one."""
    candidates = [(os.path.join(root, mode, "A"), os.path.join(root, mode, "B")),
                  (os.path.join(root, mode + "A"), os.path.join(root, mode + "B"))]
    for dir_A, dir_B in candidates:
        if list_images(dir_A) and list_images(dir_B):
            return dir_A, dir_B
    looked = ", ".join(f"{a} + {b}" for a, b in candidates)
    name = os.path.basename(os.path.normpath(root))
    raise FileNotFoundError(
        f"no '{mode}' images for dataset '{name}': looked in {looked} and found no image files in both; "
        f"download a standard set with `sh data/download_cyclegan_dataset.sh {name}` "
        f"or put your own images in {root}/{mode}A and {root}/{mode}B"
    )


def load_image(path, channels=3):
    """Open any image the dataset accepts as 8-bit RGB (channels=3) or L (channels=1):
    EXIF orientation applied, 16-bit scaled down (not clipped), transparency
    composited on white, palette/CMYK/other modes converted."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit files: 65535 maps to 255. ('I' is how 16-bit PNGs open in older Pillow.)
        img = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.round(a * scale), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if channels == 1:
        return img.convert("L")
    if channels == 3:
        return img.convert("RGB")
    raise ValueError(f"--channels must be 1 or 3, got {channels}")


def to_tensor(img):
    """An 8-bit image as a (1, C, H, W) float tensor in [-1, 1], as the models see it."""
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return (a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1)).unsqueeze(0)


def to_levels(t):
    """[-1, 1] to 8-bit levels: (y + 1) / 2, rounded, no stretch."""
    return ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte()


def to_image(t):
    """A (1, C, H, W) tensor, in [-1, 1] or already 8-bit levels, as an image."""
    a = (t if t.dtype == torch.uint8 else to_levels(t))[0].permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


class ResizeCover:
    """Resize the shorter side to `size` (as transforms.Resize(size)), but never
    below (min_h, min_w), so a following crop of that size always fits, also
    when the crop is wider or taller than the resized image would be."""

    def __init__(self, size, min_h, min_w, interpolation=transforms.InterpolationMode.BICUBIC):
        self.size, self.min_h, self.min_w, self.interpolation = size, min_h, min_w, interpolation

    def __call__(self, img):
        w, h = img.size
        short = min(w, h)
        new_h, new_w = (int(self.size * h / short), int(self.size * w / short))
        if new_h >= self.min_h and new_w >= self.min_w:
            return TF.resize(img, self.size, self.interpolation)
        scale = max(self.min_h / h, self.min_w / w)
        return TF.resize(img, [max(self.min_h, math.ceil(h * scale)), max(self.min_w, math.ceil(w * scale))], self.interpolation)


def train_transforms(img_height, img_width):
    # The seed's augmentation: shorter side to 1.12x, random crop, random flip.
    return [
        ResizeCover(int(img_height * 1.12), img_height, img_width),
        transforms.RandomCrop((img_height, img_width)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.5,), (0.5,)),
    ]


def test_transforms(img_height, img_width):
    # Fixed views for sample grids: no randomness, so grids are comparable over time.
    return [
        ResizeCover(img_height, img_height, img_width),
        transforms.CenterCrop((img_height, img_width)),
        transforms.ToTensor(),
        transforms.Normalize((0.5,), (0.5,)),
    ]


class NoReadableImage(RuntimeError):
    """Not one file of a training folder can be decoded (check_some_readable says which)."""


class ImageDataset(Dataset):
    """Pairs of one A and one B image. With unaligned=True the B image is drawn at
    random, independently of A (the seed's behaviour).

    An int index uses the global RNGs as the seed did. UnpairedSampler instead
    passes (index_A, index_B, seed) tuples: then every random choice of the sample
    comes from `seed`, so a sample is the same whichever worker loads it and
    whenever it is loaded, which is what makes exact resume possible.

    A file that cannot be decoded is reported on stderr, recorded in the sample's
    "bad" list, and replaced by the next file of the same folder."""

    def __init__(self, root, transforms_=None, unaligned=False, mode="train", channels=3, warn=True):
        self.transform = transforms.Compose(transforms_ or [transforms.ToTensor()])
        self.unaligned = unaligned
        self.channels = channels
        self.warn = warn  # under DDP only rank 0 prints
        self.dir_A, self.dir_B = split_dirs(root, mode)
        self.files_A = list_images(self.dir_A)
        self.files_B = list_images(self.dir_B)

    def __len__(self):
        return max(len(self.files_A), len(self.files_B))

    def _load(self, files, i, bad):
        warnings = []  # printed once a readable file is found; a folder of none is one error line
        for k in range(len(files)):
            path = files[(i + k) % len(files)]
            try:
                img = load_image(path, self.channels)
            except Exception as e:
                bad.append(path)
                warnings.append(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})")
                continue
            if self.warn and warnings:
                print("\n".join(warnings), file=sys.stderr)
            return img
        raise NoReadableImage(f"no readable image among the {len(files)} files in {os.path.dirname(files[0])}")

    def __getitem__(self, index):
        bad = []
        if isinstance(index, tuple):
            i_A, i_B, seed = index
            img_A, img_B = self._load(self.files_A, i_A, bad), self._load(self.files_B, i_B, bad)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                item_A = self.transform(img_A)
                item_B = self.transform(img_B)
        else:
            import random  # the seed's global-RNG behaviour
            i_B = random.randint(0, len(self.files_B) - 1) if self.unaligned else index % len(self.files_B)
            item_A = self.transform(self._load(self.files_A, index % len(self.files_A), bad))
            item_B = self.transform(self._load(self.files_B, i_B, bad))
        return {"A": item_A, "B": item_B, "bad": "\n".join(bad)}


class UnpairedSampler(Sampler):
    """Data order for training: DistributedSampler's shuffled order of the A
    indices (one shard per process, a new permutation per epoch via set_epoch),
    and for each index a B index and an augmentation seed, all drawn from
    (seed, epoch). The whole epoch is a pure function of (seed, epoch), so a run
    resumed mid-epoch with set_start() sees exactly the batches it would have."""

    def __init__(self, dataset, seed=0, num_replicas=1, rank=0):
        self.n, self.n_A, self.n_B = len(dataset), len(dataset.files_A), len(dataset.files_B)
        self.unaligned = dataset.unaligned
        self.seed = seed
        self.order = DistributedSampler(range(self.n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def set_start(self, start):
        """Skip the first `start` samples of this process's share of the epoch."""
        self.start = start

    def __len__(self):
        return len(self.order) - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        index_B = torch.randint(self.n_B, (self.n,), generator=g).tolist()
        seeds = torch.randint(2**62, (self.n,), generator=g).tolist()
        for i in list(self.order)[self.start:]:
            yield (i % self.n_A, index_B[i] if self.unaligned else i % self.n_B, seeds[i])


class UnreadableFiles:
    """The unreadable training images met so far (each sample names the ones it skipped);
    training stops once more than `max_fraction` of the files, and more than 2, are bad."""

    def __init__(self, dataset, max_fraction=0.01):
        self.seen = set()
        self.limit = max(2, int(max_fraction * (len(dataset.files_A) + len(dataset.files_B))))

    def add(self, bad_lists):
        for s in bad_lists:
            self.seen.update(p for p in s.split("\n") if p)
        if len(self.seen) > self.limit:
            die(f"{len(self.seen)} training images are unreadable (more than {self.limit}); run with --verify_data to list "
                f"them all, then fix or remove them:\n  " + "\n  ".join(sorted(self.seen)))


def check_some_readable(dataset):
    """Stop with one line naming the training folder that has no readable image at all (after
    NoReadableImage: checking before training would load images outside the epoch's order)."""
    for folder, files in ((dataset.dir_A, dataset.files_A), (dataset.dir_B, dataset.files_B)):
        for path in files:
            try:
                load_image(path, dataset.channels)
                break
            except Exception:
                continue
        else:
            die(f"none of the {len(files)} training images in {folder} can be read; fix or replace them")


def verify_images(paths, channels):
    """Decode every file; stop with the list of all unreadable ones."""
    bad = []
    for path in paths:
        try:
            load_image(path, channels)
        except Exception as e:
            bad.append(f"{path} ({type(e).__name__}: {e})")
    if bad:
        die(f"{len(bad)} of {len(paths)} training images cannot be read; fix or remove them:\n  " + "\n  ".join(bad))
    print(f"verified {len(paths)} training images: all readable")


def fixed_samples(data_root, img_height, img_width, channels, n=5):
    """The first n readable test images of each domain (train images if there is no test
    split), center-cropped: the same views in every sample grid of a run."""
    try:
        dir_A, dir_B = split_dirs(data_root, "test")
    except FileNotFoundError:
        dir_A, dir_B = split_dirs(data_root, "train")
    tf = transforms.Compose(test_transforms(img_height, img_width))
    out = []
    for folder in (dir_A, dir_B):
        imgs = []
        for path in list_images(folder):
            try:
                imgs.append(tf(load_image(path, channels)))
            except Exception:
                continue
            if len(imgs) == n:
                break
        if not imgs:
            die(f"none of the {len(list_images(folder))} images in {folder} can be read (they give the sample grids); "
                f"fix or replace them")
        out.append(torch.stack(imgs))
    k = min(len(out[0]), len(out[1]))
    return out[0][:k], out[1][:k]


# -----------------------------------------------------------------------------
# The built-in dataset: procedural, unpaired "day -> night" landscapes that need no
# download. A scene (geometry) and a style (palette) come from separate RNGs, so the
# same scene can be rendered by day and by night; the night image is, region by
# region, a recolouring of the day image, which a small generator learns from
# unpaired samples within minutes, and the paired test scenes let it be scored.

BUILTIN_DATASET = "synthetic_day2night"

# Region labels.  Each label gets a (top, bottom) colour pair per style so that
# regions carry a vertical gradient (sky brightening to the horizon, hazy hills).
SKY, SUN, MTN0, MTN1, MTN2, GROUND, WATER, TRUNK, LEAVES, WALL, ROOF, WINDOW = range(12)
_DAY = np.array([
    [(.25, .50, .90), (.70, .85, 1.0)], [(1.0, .95, .65), (1.0, .95, .65)],
    [(.55, .65, .78), (.62, .72, .78)], [(.35, .55, .38), (.40, .58, .35)],
    [(.32, .46, .20), (.42, .40, .22)], [(.42, .72, .25), (.28, .55, .15)],
    [(.40, .65, .92), (.30, .50, .80)], [(.42, .26, .12), (.42, .26, .12)],
    [(.16, .48, .16), (.10, .35, .10)], [(.92, .86, .72), (.85, .80, .66)],
    [(.72, .26, .20), (.60, .20, .16)], [(.35, .50, .65), (.35, .50, .65)]])
# Night: dark, desaturated, blue-shifted; the only bright things are the moon and
# lit windows -- both located by geometry visible in the day image.
_NIGHT = np.array([
    [(.02, .03, .10), (.08, .12, .26)], [(.92, .93, .86), (.92, .93, .86)],
    [(.15, .18, .29), (.17, .20, .30)], [(.10, .12, .20), (.11, .13, .20)],
    [(.06, .08, .14), (.07, .08, .13)], [(.07, .10, .13), (.05, .08, .10)],
    [(.09, .13, .27), (.05, .08, .19)], [(.06, .05, .06), (.06, .05, .06)],
    [(.04, .07, .08), (.03, .05, .06)], [(.22, .22, .29), (.19, .19, .26)],
    [(.13, .09, .15), (.11, .08, .13)], [(1.0, .86, .42), (1.0, .80, .35)]])
_GLOW = {False: np.array([1.0, 1.0, .85]) * .35, True: np.array([.60, .65, .80]) * .15}


def _scene_labels(rng, s):
    """Label map (s x s) and sun position; all geometry comes from `rng` only."""
    y, x = np.mgrid[0:s, 0:s] / s
    lab = np.full((s, s), SKY, np.uint8)
    sun = (rng.uniform(.15, .85), rng.uniform(.10, .32), rng.uniform(.05, .08))
    lab[(x - sun[0]) ** 2 + (y - sun[1]) ** 2 < sun[2] ** 2] = SUN
    horizon = rng.uniform(.66, .76)

    def ridge(base, amp, nfreq):  # smooth random ridgeline: a few low-frequency sines
        f = rng.uniform(.5, 4.0, nfreq)[:, None]
        a = amp * rng.uniform(.3, 1, nfreq)[:, None] / f
        return base + (a * np.sin(2 * np.pi * f * x[0] + rng.uniform(0, 2 * np.pi, (nfreq, 1)))).sum(0)

    n = int(rng.integers(2, 4))
    for k, label in enumerate([MTN0, MTN1, MTN2][3 - n:]):  # far -> near, near overdraws
        top = ridge(horizon - rng.uniform(.18, .34) * (n - k) / n, .06, 4)
        lab[y > top[None, :]] = label
    ground = ridge(horizon, .015, 2)[None, :]
    lab[y > ground] = GROUND
    if rng.random() < .5:  # lake: flat ellipse just below the horizon
        cx, cy = rng.uniform(.2, .8), horizon + rng.uniform(.07, .14)
        rx, ry = rng.uniform(.15, .3), rng.uniform(.03, .06)
        lab[(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1) & (y > ground)] = WATER
    # Trees and houses, sorted by base so nearer objects overdraw farther ones;
    # size grows with distance below the horizon for a hint of perspective.
    objs = [(rng.uniform(horizon + .03, .97), rng.uniform(.05, .95), rng.random() < .25)
            for _ in range(int(rng.integers(2, 7)))]
    for base, cx, house in sorted(objs):
        sc = .5 + 2.5 * (base - horizon)
        if house:
            w, h = .10 * sc, .07 * sc
            lab[(abs(x - cx) < w / 2) & (y < base) & (y > base - h)] = WALL
            lab[(y <= base - h) & (abs(x - cx) < (y - (base - h - .6 * h)) / (.6 * h) * .6 * w)] = ROOF
            for wx in (cx - w / 4, cx + w / 4):
                lab[(abs(x - wx) < .015 * sc) & (abs(y - (base - h / 2)) < .015 * sc)] = WINDOW
        else:
            h, w = rng.uniform(.10, .18) * sc, rng.uniform(.03, .05) * sc
            lab[(abs(x - cx) < w / 5) & (y < base) & (y > base - h * .3)] = TRUNK
            crown = (y > base - h) & (y < base - h * .2)
            lab[crown & (abs(x - cx) < (y - (base - h)) / (.8 * h) * w)] = LEAVES
    return lab, y, x, sun


def render_scene(scene_rng_seed, size, night, palette_rng_seed):
    """Render one scene as a size x size x 3 uint8 image in the day or night style."""
    s = 2 * size  # render at 2x and box-downsample: cheap anti-aliasing
    lab, y, x, (sx, sy, _) = _scene_labels(np.random.default_rng(scene_rng_seed), s)
    prng = np.random.default_rng(palette_rng_seed)
    # Palette jitter (global brightness, per-channel tint, per-region brightness)
    # makes each style a distribution while keeping day and night far apart.
    pal = (_NIGHT if night else _DAY) * np.exp(prng.normal(0, .08))
    pal = pal * (1 + prng.normal(0, .04, 3)) * (1 + prng.normal(0, .06, (12, 1, 1)))
    pal += prng.normal(0, .01, (12, 1, 3))  # small absolute shift: dark night colours stay dark
    img = pal[lab, 0] + (pal[lab, 1] - pal[lab, 0]) * y[..., None]
    glow = np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / .02) * (lab == SKY)  # halo, sky only
    img += glow[..., None] * _GLOW[bool(night)]
    img = (np.clip(img, 0, 1) * 255 + .5).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BOX))


def make_day2night(root, n_train=400, n_test=40, size=64, seed=0):
    """Write root/{trainA,trainB,testA,testB}/NNNN.png (A = day, B = night).

    Scene ids are split into disjoint ranges so trainA and trainB never share a
    scene (genuinely unpaired); testA/x.png and testB/x.png show the same scene.
    """
    root = os.fspath(root).rstrip("/\\")
    if os.path.exists(root):
        raise FileExistsError(root)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    # A private temporary folder, renamed into place once complete: an interrupted run
    # leaves no half dataset, and processes generating at once (torchrun on a shared file
    # system) cannot trip over each other; the first rename wins.
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    try:
        jobs = [("trainA", i, i, False) for i in range(n_train)]
        jobs += [("trainB", i, n_train + i, True) for i in range(n_train)]
        jobs += [(d, i, 2 * n_train + i, d == "testB") for d in ("testA", "testB") for i in range(n_test)]
        for d in ("trainA", "trainB", "testA", "testB"):
            os.makedirs(os.path.join(tmp, d))
        for d, i, scene, night in jobs:
            img = render_scene([seed, 0, scene], size, night, [seed, 1, scene, int(night)])
            Image.fromarray(img).save(os.path.join(tmp, d, f"{i:04d}.png"))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isdir(root):  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
