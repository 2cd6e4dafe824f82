"""
Translate images with a trained generator.

    python test.py --checkpoint saved_models/monet2photo/G_BA_100.pth --image_path photo.jpg
    python test.py --checkpoint latest_net_G.pth --image_path 'photos/*.jpg' --output_dir out

The architecture (the seed's or the official one), the channels and the number of
residual blocks are read from the checkpoint. By default each output has its
input's exact size.
"""
import argparse
import glob
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datasets import IMG_EXTENSIONS, list_images, load_image
from models import build_generator
from utils import die, load_checkpoint


def get_parser():
    p = argparse.ArgumentParser(description="Translate images with a CycleGAN generator.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", "--checkpoint_model", dest="checkpoint", required=True,
                   help="generator weights: a G_AB_<epoch>.pth / G_BA_<epoch>.pth, an official latest_net_G.pth, or a last.pt with --generator")
    p.add_argument("--image_path", required=True, help="an image, a folder of images, or a glob pattern (quote it)")
    p.add_argument("--output_dir", default="images/outputs", help="where translations are written, one PNG per input")
    p.add_argument("--generator", choices=("G_AB", "G_BA"), default=None, help="which generator to use from a full-state last.pt")
    p.add_argument("--img_height", type=int, default=None, help="resize inputs to this height (default: keep each image's size)")
    p.add_argument("--img_width", type=int, default=None, help="resize inputs to this width (default: keep each image's size)")
    p.add_argument("--side_by_side", action="store_true", help="write input | output side by side")
    p.add_argument("--reference_dir", default=None, help="folder of same-named ground-truth images: print MAE and PSNR")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="mixed precision inference (fp16: CUDA only)")
    return p


def find_inputs(image_path):
    if os.path.isdir(image_path):
        return list_images(image_path)
    if os.path.isfile(image_path):
        return [image_path]
    matches = sorted(p for p in glob.glob(image_path) if os.path.isfile(p) and p.lower().endswith(IMG_EXTENSIONS))
    if not matches:
        die(f"--image_path {image_path}: no such file or folder, and no images match it as a pattern")
    return matches


def output_names(paths):
    """One PNG name per input, named after it; inputs that share a stem (a.jpg,
    a.png) keep their extension in the name so no output overwrites another."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    names, used = [], set()
    for p, s in zip(paths, stems):
        base = os.path.basename(p).replace(".", "_") if stems.count(s) > 1 else s
        name, k = base, 1
        while name.lower() in used:  # same file name in two folders (a glob), or a.jpg + a_jpg.png
            k += 1
            name = f"{base}_{k}"
        used.add(name.lower())
        names.append(name + ".png")
    return names


def to_tensor(img):
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return (a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1)).unsqueeze(0)


def to_image(t):
    """[-1, 1] tensor (1, C, H, W) to an 8-bit image: (y + 1) / 2, rounded, no stretch."""
    a = ((t[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


@torch.no_grad()
def translate(G, x, autocast=nullcontext()):
    """G(x) at x's exact size: the generator downsamples twice, so pad to a multiple
    of 4 (by reflection, where the image is large enough), translate, crop back."""
    h, w = x.shape[-2:]
    H, W = max(8, math.ceil(h / 4) * 4), max(8, math.ceil(w / 4) * 4)
    mode = "reflect" if H - h < h and W - w < w else "replicate"
    xp = F.pad(x, (0, W - w, 0, H - h), mode=mode) if (H, W) != (h, w) else x
    with autocast:
        y = G(xp)
    return y[..., :h, :w].float()


def psnr(mae_mse):
    return 10 * math.log10(1.0 / mae_mse) if mae_mse > 0 else float("inf")


def main(argv=None):
    opt = get_parser().parse_args(argv)
    if (opt.img_height is None) != (opt.img_width is None):
        die("give both --img_height and --img_width to resize, or neither to keep each image's size")
    if opt.img_height is not None and min(opt.img_height, opt.img_width) < 1:
        die(f"--img_height {opt.img_height} --img_width {opt.img_width}: both must be at least 1")
    if opt.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: no CUDA device is available; use --device cpu")
    device = torch.device("cuda" if opt.device == "cuda" or (opt.device == "auto" and torch.cuda.is_available()) else "cpu")
    if opt.amp == "fp16" and device.type != "cuda":
        die("--amp fp16 needs CUDA; on CPU use --amp bf16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opt.amp)
    # Under autocast every layer of these generators computes in amp_dtype anyway (the
    # padding, which CPU autocast does in fp32, only copies values), so casting the
    # weights and the input once gives the same outputs bit for bit, without autocast's
    # casts at every call (~10% faster on CPU; see bench.py).
    dtype = amp_dtype or torch.float32

    state = load_checkpoint(opt.checkpoint, map_location="cpu")
    if isinstance(state, dict) and "G_AB" in state and "G_BA" in state:  # a full-state last.pt
        if opt.generator is None:
            die(f"{opt.checkpoint} holds both generators: add --generator G_AB (A->B) or --generator G_BA (B->A)")
        state = state[opt.generator]
    try:
        G = build_generator(state).to(device, dtype).eval()
    except (ValueError, RuntimeError, KeyError, AttributeError) as e:
        die(f"{opt.checkpoint} is not a CycleGAN generator checkpoint ({str(e).splitlines()[0][:200]})")
    channels = G.model[1].in_channels

    paths = find_inputs(opt.image_path)
    if not paths:
        die(f"--image_path {opt.image_path}: no image files there ({', '.join(IMG_EXTENSIONS)})")
    os.makedirs(opt.output_dir, exist_ok=True)
    names = output_names(paths)
    failed, scores = [], []
    t0 = time.time()
    for k, (path, name) in enumerate(zip(paths, names)):
        try:
            img = load_image(path, channels)
        except Exception as e:
            print(f"error: cannot read {path} ({type(e).__name__}: {e}); skipped", file=sys.stderr)
            failed.append(path)
            continue
        if opt.img_height is not None:
            img = img.resize((opt.img_width, opt.img_height), Image.BICUBIC)
        x = to_tensor(img).to(device, dtype)
        out = to_image(translate(G, x))
        if opt.side_by_side:
            both = Image.new(out.mode, (img.width + out.width, out.height))
            both.paste(img, (0, 0))
            both.paste(out, (img.width, 0))
            both.save(os.path.join(opt.output_dir, name))
        else:
            out.save(os.path.join(opt.output_dir, name))
        if opt.reference_dir:
            s = score(path, img, out, opt.reference_dir, channels)
            if s is not None:
                scores.append(s)
        if len(paths) > 1:
            print(f"[{k + 1}/{len(paths)}] {path} -> {os.path.join(opt.output_dir, name)}", flush=True)
    n_ok = len(paths) - len(failed)
    print(f"translated {n_ok} image{'s' if n_ok != 1 else ''} into {opt.output_dir} "
          f"({1000 * (time.time() - t0) / max(1, n_ok):.0f} ms/image)")
    if opt.reference_dir:
        if scores:
            s = np.array(scores)
            print(f"against {opt.reference_dir} ({len(scores)} images): "
                  f"translation MAE {s[:, 0].mean():.4f} PSNR {psnr(s[:, 1].mean()):.2f} dB | "
                  f"identity baseline MAE {s[:, 2].mean():.4f} PSNR {psnr(s[:, 3].mean()):.2f} dB")
        else:
            print(f"warning: no same-named images of matching size in {opt.reference_dir}; nothing scored", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(paths)} images could not be read: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def score(path, img, out, reference_dir, channels):
    """(MAE, MSE) of the translation and of the untranslated input against the
    same-named reference image, in [0, 1] units."""
    stem = os.path.splitext(os.path.basename(path))[0]
    refs = [p for p in list_images(reference_dir) if os.path.splitext(os.path.basename(p))[0] == stem]
    if not refs:
        return None
    ref = load_image(refs[0], channels)
    if ref.size != out.size:
        print(f"warning: {refs[0]} is {ref.size[0]}x{ref.size[1]}, the output {out.size[0]}x{out.size[1]}; not scored", file=sys.stderr)
        return None
    r, o, i = (np.asarray(a, dtype=np.float64) / 255.0 for a in (ref, out, img))
    return [np.abs(o - r).mean(), ((o - r) ** 2).mean(), np.abs(i - r).mean(), ((i - r) ** 2).mean()]


if __name__ == "__main__":
    main()
