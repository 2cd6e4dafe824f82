"""
Two artefacts a generator's translations can carry, measured on your own images.

    python artefacts.py --checkpoint saved_models/fluent_flat2hc/G_AB_40.pth --image_path data/fluent_flat2hc/testA \
        --reference_dir data/fluent_flat2hc/testB

Shimmer: a video that pans must not flicker. The test images are laid side by side into a
mosaic, a window (--window, 128 px) pans across it by --steps pixels per frame (1, and 4, the
generator's total stride), each frame is translated on its own as test.py translates a video
frame, and consecutive translations are compared after undoing the known motion, --margin
pixels inside the borders: the mean absolute difference of the 8-bit outputs, in [0, 1]. A
generator whose output does not depend on where the content sits on the pixel grid scores
0; the strided layers of the seed's generator alias, so a pan of 1 px scores far higher than
one of 4 (a whole step of its grid).

Speckle (with --reference_dir, a paired test split): the dotted pattern of strided
convolutions in areas that should be flat. The mean |output - its 3x3 mean| over the pixels
whose 3x3 neighbourhood in the true image is flat (within 1 level in every channel),
beside the same for the untranslated input. A stroke drawn a pixel or two from where the
true one runs counts there too, and on line art it is most of the figure (the true line art
thickened by one pixel scores about what a CUT generator does), so the same mean is also
given for the interior alone: the flat pixels more than EDGE_BAND pixels from anything that
is not flat in the true image, where only what the generator adds to a flat area counts.
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from datasets import list_images, load_image
from models import generator_channels, load_generator, to_levels, to_tensor, translate
from utils import (HelpFormatter, add_device_args, autocast_context, choose_precision, die, pick_device,
                   print_lines_as_they_come, write_text_atomic)


def get_parser():
    p = argparse.ArgumentParser(description="Shimmer under a pan, and speckle in flat areas, of a generator's "
                                            "translations.", formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="generator weights (G_AB_<epoch>.pth, latest_net_G.pth, ...)")
    p.add_argument("--generator", choices=("G_AB", "G_BA"), default=None, help="which generator of a last.pt")
    p.add_argument("--image_path", required=True, help="folder of images to translate (e.g. data/<name>/testA)")
    p.add_argument("--reference_dir", default=None,
                   help="the same images in the target domain, same file names (a paired test split): adds speckle")
    p.add_argument("--window", type=int, default=128, help="side of the panning window, in pixels")
    p.add_argument("--frames", type=int, default=32, help="frames of each pan")
    p.add_argument("--steps", default="1,4", help="pixels the window moves per frame, one pan each (comma-separated)")
    p.add_argument("--margin", type=int, default=8, help="pixels left out at every border of a frame")
    p.add_argument("--shift_average", action="store_true",
                   help="measure the translations test.py --shift_average makes (the mean over the 16 grid shifts)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    # fp32 by default: a measurement should not change with the CPU it runs on
    add_device_args(p, amp_default="none")
    return p


def mosaic(paths, height, width, channels):
    """The images side by side, row by row, each resized to the first one's size, repeated
    as needed to fill height x width: a (1, C, height, width) tensor in [-1, 1]."""
    first = load_image(paths[0], channels)
    cell_w, cell_h = first.size
    rows, cols = math.ceil(height / cell_h), math.ceil(width / cell_w)
    cells = [to_tensor(load_image(paths[k % len(paths)], channels).resize((cell_w, cell_h)))
             for k in range(rows * cols)]
    grid = torch.cat([torch.cat(cells[r * cols:(r + 1) * cols], dim=3) for r in range(rows)], dim=2)
    return grid[..., :height, :width]


@torch.no_grad()
def shimmer(G, scene, window, frames, step, margin, autocast, shift_average=False):
    """The mean |translation of frame k - translation of frame k-1, moved back by `step`|
    over the pan's frames, `margin` pixels inside the borders, in [0, 1]: frame k is the
    window x window crop of `scene` at column k * step."""
    previous, diffs = None, []
    for k in range(frames):
        frame = scene[..., :window, k * step:k * step + window]
        out = to_levels(translate(G, frame, autocast, shift_average)).float() / 255
        if previous is not None:  # the content moved `step` columns left
            now = out[..., margin:window - margin, margin:window - margin - step]
            before = previous[..., margin:window - margin, margin + step:window - margin]
            diffs.append((now - before).abs().mean())
        previous = out
    return float(torch.stack(diffs).mean())


EDGE_BAND = 3  # pixels along the true image's edges that interior speckle leaves out


def local_deviation(x):
    """|x - its 3x3 mean| at every pixel that has all its 8 neighbours ((1, C, H-2, W-2))."""
    return (x[..., 1:-1, 1:-1] - F.avg_pool2d(x, 3, stride=1)).abs()


def flat_mask(reference, levels=1):
    """Pixels (with all their neighbours) whose 3x3 neighbourhood in `reference` (in [0, 1])
    spans at most `levels` 8-bit levels in every channel: (1, 1, H-2, W-2)."""
    spread = F.max_pool2d(reference, 3, stride=1) + F.max_pool2d(-reference, 3, stride=1)
    return (spread.amax(dim=1, keepdim=True) <= (levels + 0.5) / 255).expand(-1, reference.size(1), -1, -1)


def interior(flat):
    """The pixels of a flat mask (N, C, h, w) more than EDGE_BAND pixels from any pixel outside it."""
    k = 2 * EDGE_BAND + 1
    return -F.max_pool2d(-flat.float(), k, stride=1, padding=EDGE_BAND) > 0.5


@torch.no_grad()
def speckle(G, paths, reference_dir, channels, autocast, device="cpu", shift_average=False):
    """The translations' speckle and the inputs', over all the pixels flat in the reference
    and over its interior alone: a dict of four means in [0, 1] (nan where no pixel counts)."""
    sums, counts = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for path in paths:
        ref_path = os.path.join(reference_dir, os.path.basename(path))
        if not os.path.isfile(ref_path):
            die(f"--reference_dir: {ref_path} is missing; it must hold the same file names as --image_path")
        x = to_tensor(load_image(path, channels))
        reference = to_tensor(load_image(ref_path, channels))
        if reference.shape != x.shape:
            die(f"--reference_dir: {ref_path} is {reference.shape[3]}x{reference.shape[2]}, {path} is "
                f"{x.shape[3]}x{x.shape[2]}; a paired split has images of the same size")
        out = to_levels(translate(G, x.to(device), autocast, shift_average)).float().cpu() / 255
        flat = flat_mask((reference + 1) / 2)
        inside = interior(flat)
        deviation_out, deviation_in = local_deviation(out), local_deviation((x + 1) / 2)
        for k, (deviation, mask) in enumerate([(deviation_out, flat), (deviation_in, flat),
                                               (deviation_out, inside), (deviation_in, inside)]):
            sums[k] += float(deviation[mask].sum())
            counts[k] += int(mask.sum())
    means = [float(s / c) if c else float("nan") for s, c in zip(sums, counts)]
    return dict(zip(("speckle", "speckle_input", "speckle_interior", "speckle_interior_input"), means))


def main(argv=None):
    opt = get_parser().parse_args(argv)
    steps = [int(s) for s in opt.steps.split(",") if s.strip().isdigit() and int(s) > 0]
    if not steps or len(steps) != len(opt.steps.split(",")):
        die(f"--steps must be positive whole numbers of pixels, comma-separated, got {opt.steps!r}")
    if opt.window < 8 or opt.frames < 2 or not 0 <= opt.margin < opt.window // 2 - max(steps):
        die("--window must be at least 8, --frames at least 2, and --margin at least 0 and small enough to leave "
            f"part of the window: got {opt.window}, {opt.frames}, {opt.margin}")
    if not os.path.isdir(opt.image_path) or not list_images(opt.image_path):
        die(f"--image_path {opt.image_path}: not a folder of images")
    paths = list_images(opt.image_path)
    device = pick_device(opt.device)
    G = load_generator(opt.checkpoint, opt.generator).to(device)
    channels = generator_channels(G)[0]
    autocast = autocast_context(device, choose_precision(opt.amp, device))
    scene = mosaic(paths, opt.window, opt.window + (opt.frames - 1) * max(steps), channels).to(device)
    results = {}
    for step in steps:
        results[f"shimmer_{step}px"] = shimmer(G, scene, opt.window, opt.frames, step, opt.margin, autocast,
                                               opt.shift_average)
        print(f"shimmer, pan of {step} px per frame: {results[f'shimmer_{step}px']:.4f}")
    if opt.reference_dir:
        results.update(speckle(G, paths, opt.reference_dir, channels, autocast, device, opt.shift_average))
        print(f"speckle in flat areas: {results['speckle']:.4f} (the inputs: {results['speckle_input']:.4f})")
        print(f"speckle in their interior, more than {EDGE_BAND} px from the true edges: "
              f"{results['speckle_interior']:.4f} (the inputs: {results['speckle_interior_input']:.4f})")
    if opt.json:
        write_text_atomic(opt.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    print_lines_as_they_come()
    main()
