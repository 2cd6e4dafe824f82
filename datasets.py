"""
Unpaired image data: two folders of images, A and B, in either the seed's layout
(<root>/train/A) or the official download's (<root>/trainA). Knows nothing about
models; turns files into normalised tensors.
"""
import math
import os
import sys

import numpy as np
import torch
import torchvision.transforms as transforms
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import Dataset, DistributedSampler, Sampler

from utils import die

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


def composite_on_white(img):
    """Transparency (an alpha channel, or a palette's transparent colour) composited on
    white; an image without any is returned as it is."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img


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
    img = composite_on_white(img)
    if channels == 1:
        return img.convert("L")
    if channels == 3:
        return img.convert("RGB")
    raise ValueError(f"--channels must be 1 or 3, got {channels}")


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
        return TF.resize(img, [max(self.min_h, math.ceil(h * scale)), max(self.min_w, math.ceil(w * scale))],
                         self.interpolation)


def train_transforms(img_height, img_width, load_size=None):
    # The seed's augmentation: shorter side to 1.12x (or load_size), random crop, random flip.
    return [
        ResizeCover(load_size or int(img_height * 1.12), img_height, img_width),
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
            die(f"{len(self.seen)} training images are unreadable (more than {self.limit}); "
                f"run with --verify_data to list "
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
