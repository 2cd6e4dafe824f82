"""
Translate images, animations and videos with a trained generator.

    python test.py --checkpoint saved_models/monet2photo/G_BA_100.pth --image_path photo.jpg
    python test.py --checkpoint latest_net_G.pth --image_path 'photos/*.jpg' --output_dir out
    python test.py --checkpoint G_AB_200.pth --image_path clip.mp4

The architecture (the seed's or the official one), the channels and the number of
residual blocks are read from the checkpoint. By default each output has its
input's exact size. Memory stays within --max_memory: video and animation frames are read,
translated and written one batch at a time, as many frames at once as fit, and an image or
frame too large for it is translated in strips (--tile) with whole-image InstanceNorm
statistics, so memory is set by the strip, not the image nor the frame count.
--output_dir also gets an index.html showing every input beside its translation.
"""
import argparse
import glob
import io
import math
import os
import re
import shutil
import struct
import sys
import time
import warnings
import zlib
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageSequence
from tqdm import tqdm

from datasets import IMG_EXTENSIONS, composite_on_white, list_images, load_image
from evaluate import pixel_errors, psnr
from models import generator_channels, load_generator, to_image, to_tensor, translate
from report import write_translations_page
from shifts import grid_shift_average
from tiling import NotEnoughTempSpace, peak_bytes, translate_tiled
from utils import (HelpFormatter, add_device_args, check_writable, choose_precision, die, pick_device,
                   print_lines_as_they_come, write_atomic)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
ANIMATION_EXTENSIONS = (".gif", ".webp", ".png")  # translated frame by frame when they hold several frames (APNG)
# What translating may hold at once beyond the program and the weights (--max_memory), where the CPU
# computes: with PyTorch and a 9-block generator, about 1.6 GB at the peak, which fits beside a
# browser on an 8 GB laptop (docs/speed.md). On CUDA: half the GPU memory free at the start.
DEFAULT_MAX_MEMORY_MIB = 1024
# Pillow's guard against decompression bombs (a tiny file that claims a huge size), set high
# enough for any photo: strips bound the model's memory, but the decoded image itself is
# held whole, 3 bytes a pixel (600 MB at 200 megapixels), and its translation beside it.
DEFAULT_MAX_MEGAPIXELS = 200


def get_parser():
    p = argparse.ArgumentParser(description="Translate images, animations and videos with a CycleGAN generator.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", "--checkpoint_model", dest="checkpoint", required=True,
                   help="generator weights: a G_AB_<epoch>.pth / G_BA_<epoch>.pth, an official latest_net_G.pth, "
                        "or a last.pt with --generator")
    p.add_argument("--image_path", required=True,
                   help="an image, a video, an animated GIF/WebP, a folder of them, or a glob pattern (quote it)")
    p.add_argument("--output_dir", default="images/outputs",
                   help="where translations are written (PNG per image, MP4 per video, GIF/WebP per animation), "
                        "with an index.html")
    p.add_argument("--generator", choices=("G_AB", "G_BA"), default=None,
                   help="which generator to use from a full-state last.pt")
    p.add_argument("--img_height", type=int, default=None,
                   help="resize inputs to this height (default: keep each image's size)")
    p.add_argument("--img_width", type=int, default=None,
                   help="resize inputs to this width (default: keep each image's size)")
    p.add_argument("--side_by_side", action="store_true", help="write input | output side by side")
    p.add_argument("--reference_dir", default=None, help="folder of same-named ground-truth images: print MAE and PSNR")
    p.add_argument("--max_memory", default=None,
                   help=f"memory that translating may take beyond the program and the weights, in MiB (or 4GiB, "
                        f"512MiB): how many frames go through at once, and which inputs go in strips and how large; "
                        f"default: {DEFAULT_MAX_MEMORY_MIB} MiB, on CUDA half the GPU memory free at the start")
    p.add_argument("--tile", type=int, default=None,
                   help="translate in strips of about N x N pixels (exact whole-image InstanceNorm statistics); "
                        "0: never; default: what does not fit --max_memory in one piece, in the largest strips that do")
    p.add_argument("--batch_size", type=int, default=4,
                   help="video and animation frames translated at once, at most: fewer where --max_memory holds fewer")
    p.add_argument("--shift_average", action="store_true",
                   help="translate each input at the 16 offsets of the generator's 4-px grid and average: a video "
                        "that pans no longer shimmers, in 16x the time; stills come out softer (docs/quality.md)")
    p.add_argument("--max_megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                   help="refuse (skip) images larger than this: a small file can claim a size "
                        "that would exhaust the memory")
    add_device_args(p)
    return p


def parse_args(argv):
    opt = get_parser().parse_args(argv)
    if (opt.img_height is None) != (opt.img_width is None):
        die("give both --img_height and --img_width to resize, or neither to keep each image's size")
    if opt.img_height is not None and min(opt.img_height, opt.img_width) < 1:
        die(f"--img_height {opt.img_height} --img_width {opt.img_width}: both must be at least 1")
    if opt.tile is not None and opt.tile < 0:
        die(f"--tile {opt.tile}: give a strip size in pixels (e.g. 1024), or 0 to never translate in strips")
    if opt.batch_size < 1:
        die(f"--batch_size {opt.batch_size}: must be at least 1")
    if opt.max_memory is not None:
        opt.max_memory = parse_memory(opt.max_memory)
    if not opt.max_megapixels > 0:
        die(f"--max_megapixels {opt.max_megapixels}: must be positive")
    check_writable(opt.output_dir, "--output_dir")
    return opt


def parse_memory(text):
    """--max_memory in bytes: a number of MiB, or with a unit (4GiB, 4G, 512MiB, 64KiB, 1000B)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(b|k|kib|m|mib|g|gib)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) < 1:
        die(f"--max_memory {text}: give the memory in MiB (e.g. {DEFAULT_MAX_MEMORY_MIB}) or with a unit (4GiB)")
    return int(float(m.group(1)) * 2 ** {"b": 0, "k": 10, "m": 20, "g": 30}[(m.group(2) or "m")[0].lower()])


def default_max_memory(device):
    """--max_memory's default in bytes: on CUDA half the GPU memory free now, elsewhere (the CPU,
    and Apple's MPS, which shares the computer's memory) DEFAULT_MAX_MEMORY_MIB."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return DEFAULT_MAX_MEMORY_MIB * 2**20


def main(argv=None):
    opt = parse_args(argv)
    device = pick_device(opt.device)
    if opt.max_memory is None:
        opt.max_memory = default_max_memory(device)
    dtype = choose_precision(opt.amp, device)
    # Casting the weights once to a 16-bit dtype gives the same outputs as autocast, bit for
    # bit, for these generators (every layer computes in that dtype under autocast anyway;
    # padding only copies values), without autocast's casts at every call (see bench.py).
    G = load_generator(opt.checkpoint, opt.generator).to(device, dtype or torch.float32)
    channels = generator_channels(G)[0]

    # above the limit Pillow warns and above twice that it refuses: refuse from the limit on
    Image.MAX_IMAGE_PIXELS = int(opt.max_megapixels * 1e6)
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    paths = find_inputs(opt.image_path)
    if not paths:
        die(f"--image_path {opt.image_path}: no image or video files there "
            f"({', '.join(IMG_EXTENSIONS + VIDEO_EXTENSIONS)})")
    stems, kinds = output_stems(paths), [input_kind(p) for p in paths]
    refuse_writing_over_inputs(paths, stems, kinds, opt)
    os.makedirs(opt.output_dir, exist_ok=True)
    failed, scores, rows = [], [], []
    t0 = time.time()
    for k, (path, stem, kind) in enumerate(zip(paths, stems, kinds)):
        try:
            if kind == "image":
                row, s = translate_image_file(G, path, stem, opt, channels)
                scores += [s] if s is not None else []
            else:
                row = translate_frames_file(G, path, stem, kind, opt, channels)
        except (Unreadable, NotEnoughTempSpace) as e:
            print(f"error: {'cannot read ' if isinstance(e, Unreadable) else ''}{path} ({e}); skipped", file=sys.stderr)
            failed.append(path)
            continue
        except torch.OutOfMemoryError:
            die(f"out of memory translating {path}: give a smaller --max_memory than {opt.max_memory / 2**20:.0f} MiB "
                f"(or a smaller --tile)")
        rows.append(row)
        if len(paths) > 1:
            print(f"[{k + 1}/{len(paths)}] {path} -> {os.path.join(opt.output_dir, row['output'])}", flush=True)
    write_translations_page(opt.output_dir, rows, failed, opt.reference_dir)
    n_ok = len(rows)
    print(f"translated {n_ok} input{'s' if n_ok != 1 else ''} into {opt.output_dir} "
          f"({1000 * (time.time() - t0) / max(1, n_ok):.0f} ms/input); "
          f"results page {os.path.join(opt.output_dir, 'index.html')}")
    if opt.reference_dir:
        if scores:
            s = np.array(scores)
            print(f"against {opt.reference_dir} ({len(scores)} images): "
                  f"translation MAE {s[:, 0].mean():.4f} PSNR {psnr(s[:, 1].mean()):.2f} dB | "
                  f"identity baseline MAE {s[:, 2].mean():.4f} PSNR {psnr(s[:, 3].mean()):.2f} dB")
        else:
            print(f"warning: no same-named images of matching size in {opt.reference_dir}; nothing scored",
                  file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(paths)} inputs could not be translated: {', '.join(failed)}",
              file=sys.stderr)
        sys.exit(1)


# -----------------------------------------------------------------------------
# One input at a time: read, translate, write, and what the results page shows of it

def find_inputs(image_path):
    wanted = IMG_EXTENSIONS + VIDEO_EXTENSIONS
    if os.path.isdir(image_path):
        videos = [os.path.join(image_path, f) for f in os.listdir(image_path)
                  if not f.startswith(".") and f.lower().endswith(VIDEO_EXTENSIONS)
                  and os.path.isfile(os.path.join(image_path, f))]
        return sorted(list_images(image_path) + videos)
    if os.path.isfile(image_path):
        return [image_path]
    matches = sorted(p for p in glob.glob(image_path) if os.path.isfile(p) and p.lower().endswith(wanted))
    if not matches:
        die(f"--image_path {image_path}: no such file or folder, and no images or videos match it as a pattern")
    return matches


def input_kind(path):
    """'video', 'animation' (a GIF/WebP with several frames) or 'image'."""
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in ANIMATION_EXTENSIONS:
        try:
            with Image.open(path) as im:
                if getattr(im, "n_frames", 1) > 1:
                    return "animation"
        except Exception:
            pass  # unreadable: the image path names it
    return "image"


def output_stems(paths):
    """One output name (without extension) per input, named after it; inputs that share
    a stem (a.jpg, a.png) keep their extension in the name so no output overwrites another."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    names, used = [], set()
    for p, s in zip(paths, stems):
        base = os.path.basename(p).replace(".", "_") if stems.count(s) > 1 else s
        name, k = base, 1
        while name.lower() in used:  # same file name in two folders (a glob), or a.jpg + a_jpg.png
            k += 1
            name = f"{base}_{k}"
        used.add(name.lower())
        names.append(name)
    return names


def output_ext(path, kind):
    return ".png" if kind == "image" else ".mp4" if kind == "video" else os.path.splitext(path)[1].lower()


def refuse_writing_over_inputs(paths, stems, kinds, opt):
    """Stop before translating anything when a file this run writes (a translation, the
    results page, its copies of inputs and references) is one of the inputs or references."""
    outputs = [os.path.join(opt.output_dir, "index.html")]
    for path, stem, kind in zip(paths, stems, kinds):
        outputs += [os.path.join(opt.output_dir, stem + output_ext(path, kind)),
                    os.path.join(opt.output_dir, "inputs",
                                 stem + (".png" if kind == "image" else os.path.splitext(path)[1].lower())),
                    os.path.join(opt.output_dir, "references", stem + ".png")]
    inputs = {os.path.realpath(p): p for p in paths + (list_images(opt.reference_dir) if opt.reference_dir else [])}
    clash = next((o for o in outputs if os.path.realpath(o) in inputs), None)
    if clash is not None:
        die(f"--output_dir {opt.output_dir}: writing {clash} would overwrite the input "
            f"{inputs[os.path.realpath(clash)]}; choose another --output_dir")


class Unreadable(Exception):
    """An input that cannot be decoded: named on stderr and skipped, the others translated."""


def translate_image_file(G, path, stem, opt, channels):
    """Translate one still image; returns its results-page row and its score (or None)."""
    try:
        img = prepare(load_image(path, channels), opt)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise Unreadable(f"{e} Above --max_megapixels {opt.max_megapixels:g}: "
                         f"pass a larger one if you trust this file") from e
    except Exception as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from e
    _, rows = plan(G, channels, img.height, img.width, opt)
    plan_note(path, img.width, img.height, 1, rows, opt)
    out = translate_one(G, img, rows, opt.shift_average)
    save_png(side_by_side(img, out) if opt.side_by_side else out, os.path.join(opt.output_dir, stem + ".png"))
    row = {"kind": "image", "output": stem + ".png", "input": save_page_input(img, stem, opt.output_dir)}
    s = None
    if opt.reference_dir:
        s, ref = score(path, img, out, opt.reference_dir, channels)
        if ref is not None:
            row["reference"] = os.path.join("references", stem + ".png")
            save_png(ref, os.path.join(opt.output_dir, row["reference"]))
        row["score"] = s
    return row, s


def prepare(img, opt):
    return img.resize((opt.img_width, opt.img_height), Image.BICUBIC) if opt.img_height is not None else img


def memory_needed(G, channels, h, w, rows=None, shift_average=False):
    """Bytes that translating one h x w input takes at once, in one piece (rows None) or in
    strips: the network's tensors (tiling.peak_bytes) and the frame in flight besides (8-bit in
    and out, float in and out, and the batch's copy of its input); --shift_average adds the
    rolled input and the sum and rolled output in float, or in strips a 16-bit sum."""
    out_channels = generator_channels(G)[1]
    extra = 0
    if shift_average:
        extra = (channels + 2 * out_channels) * h * w * 4 if rows is None else (channels + 3 * out_channels) * h * w
    return peak_bytes(G, (channels, h, w), rows) + (channels + out_channels) * h * w * 9 + extra


def plan(G, channels, h, w, opt):
    """(frames at once, image rows per strip or None for one piece) for inputs of h x w, so
    that translating them takes at most --max_memory: as many frames as --batch_size asks and
    the memory holds, in one piece where one frame fits, else one at a time in the largest
    strips that fit. --tile N asks for strips of about N x N pixels, --tile 0 for one piece."""
    if opt.tile:
        return 1, max(1, math.ceil(opt.tile**2 / w))
    whole = memory_needed(G, channels, h, w, shift_average=opt.shift_average)
    if opt.tile == 0 or whole <= opt.max_memory:
        return max(1, min(opt.batch_size, opt.max_memory // whole)), None
    lo, hi = 1, h  # the largest strips that fit, by bisection (the need grows with the rows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        fits = memory_needed(G, channels, h, w, mid, opt.shift_average) <= opt.max_memory
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return 1, lo


def plan_note(path, w, h, batch, rows, opt, frames=False):
    """Say so when the memory bound, not a flag, puts an input in strips or frames in smaller batches."""
    bound = f"--max_memory {opt.max_memory / 2**20:.0f} MiB"
    if opt.tile is None and rows is not None:
        tqdm.write(f"note: {path} is {w}x{h}: translating {'each frame' if frames else 'it'} in strips of {rows} rows "
                   f"with whole-image statistics to stay within {bound} (--max_memory sets the bound, --tile N the "
                   f"strip size, --tile 0 translates in one piece)", file=sys.stderr)  # above a progress bar, if any
    elif frames and rows is None and batch < opt.batch_size:
        tqdm.write(f"note: {path} is {w}x{h}: translating {batch} frame{'s' if batch > 1 else ''} at a time, not "
                   f"--batch_size {opt.batch_size}, to stay within {bound}", file=sys.stderr)


def translate_one(G, img, rows, shift_average=False):
    """The translation of one PIL image (already in the model's channels and size), in one
    piece (rows None) or in strips of `rows` rows; averaged over the grid's shifts if asked."""
    p = next(G.parameters())
    if rows is None:
        return to_image(translate(G, to_tensor(img).to(p.device, p.dtype), shift_average=shift_average))
    levels = torch.from_numpy(np.array(img))  # in strips: the image stays 8-bit, 1 byte a value
    levels = (levels[None, None] if levels.ndim == 2 else levels.permute(2, 0, 1)[None]).to(p.device)
    if shift_average:
        return to_image(grid_shift_average(partial(translate_tiled, G, strip_rows=rows), levels))
    return to_image(translate_tiled(G, levels, rows))


def save_png(img, path):
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def side_by_side(img, out):
    both = Image.new(out.mode, (img.width + out.width, out.height))
    both.paste(img, (0, 0))
    both.paste(out, (img.width, 0))
    return both


def save_page_input(img, stem, output_dir):
    """The image the model saw (after EXIF rotation, conversion, --img_height/width), as a
    PNG under output_dir/inputs/, so the results page works wherever the inputs were."""
    rel = os.path.join("inputs", stem + ".png")
    save_png(img, os.path.join(output_dir, rel))
    return rel


def score(path, img, out, reference_dir, channels):
    """((MAE, MSE) of the translation and of the untranslated input against the
    same-named reference image, in [0, 1] units, or None; the reference or None)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    refs = [p for p in list_images(reference_dir) if os.path.splitext(os.path.basename(p))[0] == stem]
    if not refs:
        return None, None
    ref = load_image(refs[0], channels)
    if ref.size != out.size:
        print(f"warning: {refs[0]} is {ref.size[0]}x{ref.size[1]}, the output {out.size[0]}x{out.size[1]}; not scored",
              file=sys.stderr)
        return None, ref
    return pixel_errors(ref, out, img), ref


# -----------------------------------------------------------------------------
# Videos (PyAV, optional) and animated GIF/WebP/PNG (Pillow), as a stream: frames are read,
# translated and written a batch at a time, so memory is set by the batch, not the frame count.
# Every frame goes through the same translation as an image.

def import_av():
    try:
        import av
    except ImportError:
        die("translating videos needs PyAV: pip install av")
    return av


def translate_frames_file(G, path, stem, kind, opt, channels):
    """Translate a video (written as MP4, H.264) or an animated GIF/WebP/PNG (written in its own
    format with the same frame durations and loop); returns its results-page row."""
    ext = output_ext(path, kind)
    n, translate_file = [], translate_video if kind == "video" else translate_animation
    write_atomic(os.path.join(opt.output_dir, stem + ext),  # streamed into a temporary file, renamed once complete
                 lambda f: n.append(translate_file(G, path, f, opt, channels)), passes=(NotEnoughTempSpace,))
    n = n[0]
    row = {"kind": kind, "output": stem + ext, "frames": n,
           "input": os.path.join("inputs", stem + os.path.splitext(path)[1].lower())}
    os.makedirs(os.path.join(opt.output_dir, "inputs"), exist_ok=True)
    link_or_copy(path, os.path.join(opt.output_dir, row["input"]))
    return row


def link_or_copy(src, dst):
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        write_atomic(dst, lambda f: copy_into(src, f))


def copy_into(src, f):
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f)


def translate_video(G, path, f, opt, channels):
    av = import_av()
    try:
        src = av.open(path)
    except Exception as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from e
    with src:
        if not src.streams.video:
            raise Unreadable("no video stream")
        stream = src.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or 25
        if src.streams.audio:
            print(f"note: {path} has an audio track; the translation is video only "
                  f"(ffmpeg -i OUT.mp4 -i {path} -map 0:v -map 1:a -c copy WITH_AUDIO.mp4 adds it back)",
                  file=sys.stderr)
        frames = ((model_frame(prepare(frame.to_image(), opt), channels), None) for frame in decoded(src, stream))
        with av.open(f.name, "w", format="mp4") as dst:
            out = None
            n = 0
            for _, y, _ in tqdm(translate_stream(G, frames, opt, channels, path), total=stream.frames or None,
                                unit="frame", desc=os.path.basename(path), file=sys.stderr):
                if out is None:
                    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
                    out = dst.add_stream(codec, rate=rate)
                    out.width, out.height = y.width, y.height
                    # 4:2:0 halves the colour resolution and needs even sizes; odd sizes keep 4:4:4
                    out.pix_fmt = "yuv420p" if y.width % 2 == 0 and y.height % 2 == 0 else "yuv444p"
                    if codec == "libx264":
                        out.options = {"crf": "17"}
                frame = av.VideoFrame.from_image(y.convert("RGB"))
                frame.pts = n
                dst.mux(out.encode(frame))
                n += 1
            if out is None:
                raise Unreadable("no frames decoded")
            dst.mux(out.encode(None))
    return n


def decoded(src, stream):
    """The stream's frames; a decoding error names the file instead of a traceback."""
    try:
        yield from src.decode(stream)
    except Exception as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from e


def translate_animation(G, path, f, opt, channels):
    try:
        im = Image.open(path)
    except Exception as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from e
    with im:
        writer = {"GIF": GifWriter, "WEBP": WebPWriter, "PNG": PngWriter}.get(im.format)
        if writer is None:
            raise Unreadable(f"a {im.format} animation: only GIF, WebP and PNG animations are translated")
        # an APNG may hold a still image for viewers without animation first, which is not a frame
        skip = 1 if im.format == "PNG" and im.info.get("default_image") else 0
        n = im.n_frames - skip
        writer = writer(f, n, im.info.get("loop"))  # no loop entry: a GIF plays once, as the input
        for _, y, duration in tqdm(translate_stream(G, animation_frames(im, opt, channels, skip), opt, channels, path),
                                   total=n, unit="frame", desc=os.path.basename(path), file=sys.stderr):
            writer.add(y, duration)
        writer.close()
    return writer.n


def animation_frames(im, opt, channels, skip=0):
    """(frame, duration in ms) of an open animation, decoded one at a time (the decoder keeps
    one canvas); a decoding error names the file instead of a traceback."""
    try:
        for k, frame in enumerate(ImageSequence.Iterator(im)):
            frame.load()  # WebP sets a frame's duration when it is loaded, GIF when it is seeked to
            if k >= skip:
                yield model_frame(prepare(frame.copy(), opt), channels), frame.info.get("duration", 100)
    except Exception as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from e


def model_frame(frame, channels):
    """A decoded frame in the model's channels, transparency composited on white as load_image does."""
    return composite_on_white(frame).convert("L" if channels == 1 else "RGB")


def translate_stream(G, frames, opt, channels, path):
    """Translate (frame, extra) pairs as they come, yielding (frame, translation, extra) in
    order: as many frames at once as plan() allows for their size, so that memory is bounded
    by --max_memory whatever the number of frames or --batch_size."""
    batch, size, batch_size, rows = [], None, 1, None
    for frame, extra in frames:
        if frame.size != size:  # the first frame, or a video that changes size: plan for it
            yield from translate_batch(G, batch, rows, opt)
            batch, size = [], frame.size
            batch_size, rows = plan(G, channels, frame.height, frame.width, opt)
            plan_note(path, frame.width, frame.height, batch_size, rows, opt, frames=True)
        batch.append((frame, extra))
        if len(batch) == batch_size:
            yield from translate_batch(G, batch, rows, opt)
            batch = []
    yield from translate_batch(G, batch, rows, opt)


def translate_batch(G, batch, rows, opt):
    """(frame, translation, extra) for a batch of (frame, extra): all at once in one piece, or
    one by one in strips of `rows` rows."""
    if not batch:
        return
    if rows is not None:
        outs = [translate_one(G, frame, rows, opt.shift_average) for frame, _ in batch]
    else:
        p = next(G.parameters())
        y = translate(G, torch.cat([to_tensor(frame) for frame, _ in batch]).to(p.device, p.dtype),
                      shift_average=opt.shift_average)
        outs = [to_image(y[i:i + 1]) for i in range(len(batch))]
    for (frame, extra), out in zip(batch, outs):
        yield frame, (side_by_side(frame, out) if opt.side_by_side else out), extra


# Animation writers: Pillow's save_all holds every frame until it writes (GIF and PNG, to
# compare each with the one before; WebP lists them), so each frame is saved alone by Pillow,
# quantized or compressed exactly as save_all would, and its data joined into the file here,
# whose containers are simple: the frames decode to save_all's pixels (tests/test_video.py).

class GifWriter:
    """GIF89a: header, logical screen and global colour table, then blocks: extensions (0x21,
    label) and images (0x2C, descriptor, local colour table, LZW data), each ending in an empty
    sub-block; a trailer (0x3B). A frame's own palette becomes its local colour table."""

    def __init__(self, f, frames, loop):
        self.f, self.loop, self.n = f, loop, 0

    def add(self, img, duration):
        buf = io.BytesIO()
        loop = {"loop": self.loop} if self.n == 0 and self.loop is not None else {}  # in the header: the first frame's
        img.save(buf, format="GIF", duration=duration, **loop)
        b = buf.getvalue()
        table = 3 * 2 ** ((b[10] & 7) + 1) if b[10] & 0x80 else 0
        p = 13 + table
        if self.n == 0:
            self.f.write(b"GIF89a" + b[6:p])  # 89a whatever the first frame needs: later frames carry durations
        while b[p] != 0x3B:
            start = p
            if b[p] == 0x2C:  # descriptor, its colour table if any, the LZW code size
                p += 10 + (3 * 2 ** ((b[p + 9] & 7) + 1) if b[p + 9] & 0x80 else 0) + 1
            else:
                p += 2
            while b[p]:
                p += b[p] + 1
            p += 1
            block = b[start:p]
            if self.n and block[0] == 0x2C and not block[9] & 0x80 and table:
                block = block[:9] + bytes([block[9] | 0x80 | b[10] & 7]) + b[13:13 + table] + block[10:]
            if self.n == 0 or block[0] == 0x2C or block[1] == 0xF9:  # later frames: their image and its duration
                self.f.write(block)
        self.n += 1

    def close(self):
        self.f.write(b";")


def riff_chunk(tag, data):
    return tag + struct.pack("<I", len(data)) + data + b"\0" * (len(data) & 1)


class WebPWriter:
    """Animated WebP (RIFF): VP8X (canvas size, animation flag), ANIM (background, loop), then
    one ANMF a frame (offset, size, duration, no blending) holding the frame's image chunks,
    lossless; the RIFF size is written at the end."""

    def __init__(self, f, frames, loop):
        self.f, self.loop, self.n = f, loop or 0, 0  # Pillow's default: loop forever

    def add(self, img, duration):
        buf = io.BytesIO()
        img.save(buf, format="WEBP", lossless=True)
        b, p, image = buf.getvalue(), 12, b""
        while p < len(b):
            n = struct.unpack("<I", b[p + 4:p + 8])[0]
            if b[p:p + 4] in (b"ALPH", b"VP8 ", b"VP8L"):
                image += b[p:p + 8 + n + (n & 1)]
            p += 8 + n + (n & 1)
        size = (img.width - 1).to_bytes(3, "little") + (img.height - 1).to_bytes(3, "little")
        if self.n == 0:
            self.f.write(b"RIFF\0\0\0\0WEBP" + riff_chunk(b"VP8X", b"\x02\0\0\0" + size)
                         + riff_chunk(b"ANIM", b"\0\0\0\0" + struct.pack("<H", self.loop)))
        self.f.write(riff_chunk(b"ANMF", bytes(6) + size + round(duration).to_bytes(3, "little") + b"\x02" + image))
        self.n += 1

    def close(self):
        end = self.f.tell()
        self.f.seek(4)
        self.f.write(struct.pack("<I", end - 8))
        self.f.seek(end)


def png_chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


class PngWriter:
    """APNG: signature, IHDR, acTL (frame count, plays), then per frame an fcTL (size, delay,
    no blending) and its image data: IDAT chunks for the first frame, fdAT after; IEND."""

    def __init__(self, f, frames, loop):
        self.f, self.frames, self.loop, self.n, self.seq = f, frames, loop or 0, 0, 0

    def add(self, img, duration):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        b, p, chunks = buf.getvalue(), 8, []
        while p < len(b):
            n, tag = struct.unpack(">I4s", b[p:p + 8])
            chunks.append((tag, b[p + 8:p + 8 + n]))
            p += 12 + n
        if self.n == 0:
            self.f.write(b[:8] + png_chunk(b"IHDR", dict(chunks)[b"IHDR"])
                         + png_chunk(b"acTL", struct.pack(">II", self.frames, self.loop)))
        delay = (round(duration), 1000) if duration < 65535 else (min(65535, round(duration / 10)), 100)
        self.f.write(png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", self.seq, img.width, img.height, 0, 0, *delay, 0, 0)))
        self.seq += 1
        for tag, data in chunks:
            if tag == b"IDAT" and self.n == 0:
                self.f.write(png_chunk(b"IDAT", data))
            elif tag == b"IDAT":
                self.f.write(png_chunk(b"fdAT", struct.pack(">I", self.seq) + data))
                self.seq += 1
        self.n += 1

    def close(self):
        if self.n != self.frames:
            raise Unreadable(f"{self.n} frames decoded, the file says {self.frames}")
        self.f.write(png_chunk(b"IEND", b""))


# -----------------------------------------------------------------------------
# The results page: output_dir/index.html, rewritten after each run

if __name__ == "__main__":
    print_lines_as_they_come()
    main()
