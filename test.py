"""
Translate images, animations and videos with a trained generator.

    python test.py --checkpoint saved_models/monet2photo/G_BA_100.pth --image_path photo.jpg
    python test.py --checkpoint latest_net_G.pth --image_path 'photos/*.jpg' --output_dir out
    python test.py --checkpoint G_AB_200.pth --image_path clip.mp4

The architecture (the seed's or the official one), the channels and the number of
residual blocks are read from the checkpoint. By default each output has its
input's exact size. Large images are translated in strips (--tile) with
whole-image InstanceNorm statistics, so memory is set by the strip, not the image.
--output_dir also gets an index.html showing every input beside its translation.
"""
import argparse
import glob
import math
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageSequence
from tqdm import tqdm

from datasets import IMG_EXTENSIONS, composite_on_white, list_images, load_image
from evaluate import pixel_errors, psnr
from models import generator_channels, load_generator, to_image, to_tensor, translate
from report import write_translations_page
from tiling import NotEnoughTempSpace, translate_tiled
from utils import HelpFormatter, add_device_args, check_writable, choose_precision, die, pick_device, print_lines_as_they_come, write_atomic

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
ANIMATION_EXTENSIONS = (".gif", ".webp")  # translated frame by frame when they hold several frames
AUTO_TILE_PIXELS = 2048 * 2048  # larger images are translated in strips unless --tile says otherwise
DEFAULT_TILE = 1024
# Pillow's guard against decompression bombs (a tiny file that claims a huge size), set high
# enough for any photo: strips bound the model's memory, but the decoded image itself is
# held whole, 3 bytes a pixel (600 MB at 200 megapixels), and its translation beside it.
DEFAULT_MAX_MEGAPIXELS = 200


def get_parser():
    p = argparse.ArgumentParser(description="Translate images, animations and videos with a CycleGAN generator.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", "--checkpoint_model", dest="checkpoint", required=True,
                   help="generator weights: a G_AB_<epoch>.pth / G_BA_<epoch>.pth, an official latest_net_G.pth, or a last.pt with --generator")
    p.add_argument("--image_path", required=True,
                   help="an image, a video, an animated GIF/WebP, a folder of them, or a glob pattern (quote it)")
    p.add_argument("--output_dir", default="images/outputs",
                   help="where translations are written (PNG per image, MP4 per video, GIF/WebP per animation), with an index.html")
    p.add_argument("--generator", choices=("G_AB", "G_BA"), default=None, help="which generator to use from a full-state last.pt")
    p.add_argument("--img_height", type=int, default=None, help="resize inputs to this height (default: keep each image's size)")
    p.add_argument("--img_width", type=int, default=None, help="resize inputs to this width (default: keep each image's size)")
    p.add_argument("--side_by_side", action="store_true", help="write input | output side by side")
    p.add_argument("--reference_dir", default=None, help="folder of same-named ground-truth images: print MAE and PSNR")
    p.add_argument("--tile", type=int, default=None,
                   help=f"translate in strips of about N x N pixels (exact whole-image InstanceNorm statistics); "
                        f"0: never; default: only images above {AUTO_TILE_PIXELS / 1e6:.1f} megapixels, with --tile {DEFAULT_TILE}")
    p.add_argument("--batch_size", type=int, default=4, help="video and animation frames translated at once")
    p.add_argument("--max_megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                   help="refuse (skip) images larger than this: a small file can claim a size that would exhaust the memory")
    add_device_args(p)
    return p


def parse_args(argv):
    opt = get_parser().parse_args(argv)
    if (opt.img_height is None) != (opt.img_width is None):
        die("give both --img_height and --img_width to resize, or neither to keep each image's size")
    if opt.img_height is not None and min(opt.img_height, opt.img_width) < 1:
        die(f"--img_height {opt.img_height} --img_width {opt.img_width}: both must be at least 1")
    if opt.tile is not None and opt.tile < 0:
        die(f"--tile {opt.tile}: give a strip size in pixels (e.g. {DEFAULT_TILE}), or 0 to never translate in strips")
    if opt.batch_size < 1:
        die(f"--batch_size {opt.batch_size}: must be at least 1")
    if not opt.max_megapixels > 0:
        die(f"--max_megapixels {opt.max_megapixels}: must be positive")
    check_writable(opt.output_dir, "--output_dir")
    return opt


def main(argv=None):
    opt = parse_args(argv)
    device = pick_device(opt.device)
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
        die(f"--image_path {opt.image_path}: no image or video files there ({', '.join(IMG_EXTENSIONS + VIDEO_EXTENSIONS)})")
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
            die(f"out of memory translating {path}: translate in strips with --tile {DEFAULT_TILE // 2} "
                f"(or smaller){' or a smaller --batch_size' if kind != 'image' else ''}")
        rows.append(row)
        if len(paths) > 1:
            print(f"[{k + 1}/{len(paths)}] {path} -> {os.path.join(opt.output_dir, row['output'])}", flush=True)
    write_translations_page(opt.output_dir, rows, failed, opt.reference_dir)
    n_ok = len(rows)
    print(f"translated {n_ok} input{'s' if n_ok != 1 else ''} into {opt.output_dir} "
          f"({1000 * (time.time() - t0) / max(1, n_ok):.0f} ms/input); results page {os.path.join(opt.output_dir, 'index.html')}")
    if opt.reference_dir:
        if scores:
            s = np.array(scores)
            print(f"against {opt.reference_dir} ({len(scores)} images): "
                  f"translation MAE {s[:, 0].mean():.4f} PSNR {psnr(s[:, 1].mean()):.2f} dB | "
                  f"identity baseline MAE {s[:, 2].mean():.4f} PSNR {psnr(s[:, 3].mean()):.2f} dB")
        else:
            print(f"warning: no same-named images of matching size in {opt.reference_dir}; nothing scored", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(paths)} inputs could not be translated: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


# -----------------------------------------------------------------------------
# One input at a time: read, translate, write, and what the results page shows of it

def find_inputs(image_path):
    wanted = IMG_EXTENSIONS + VIDEO_EXTENSIONS
    if os.path.isdir(image_path):
        videos = [os.path.join(image_path, f) for f in os.listdir(image_path)
                  if not f.startswith(".") and f.lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(os.path.join(image_path, f))]
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
                    os.path.join(opt.output_dir, "inputs", stem + (".png" if kind == "image" else os.path.splitext(path)[1].lower())),
                    os.path.join(opt.output_dir, "references", stem + ".png")]
    inputs = {os.path.realpath(p): p for p in paths + (list_images(opt.reference_dir) if opt.reference_dir else [])}
    clash = next((o for o in outputs if os.path.realpath(o) in inputs), None)
    if clash is not None:
        die(f"--output_dir {opt.output_dir}: writing {clash} would overwrite the input {inputs[os.path.realpath(clash)]}; "
            f"choose another --output_dir")


class Unreadable(Exception):
    """An input that cannot be decoded: named on stderr and skipped, the others translated."""


def translate_image_file(G, path, stem, opt, channels):
    """Translate one still image; returns its results-page row and its score (or None)."""
    try:
        img = prepare(load_image(path, channels), opt)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise Unreadable(f"{e} Above --max_megapixels {opt.max_megapixels:g}: pass a larger one if you trust this file") from e
    except Exception as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from e
    tiling_note(path, img.width, img.height, opt)
    out = translate_one(G, img, opt)
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


def tiling_note(path, w, h, opt):
    """Say so when an input is translated in strips without --tile asking for it."""
    if opt.tile is None and strip_rows_for(None, h, w) is not None:
        print(f"note: {path} is {w}x{h}, above {AUTO_TILE_PIXELS / 1e6:.1f} megapixels: translating it in strips of "
              f"about {DEFAULT_TILE}x{DEFAULT_TILE} pixels with whole-image statistics (--tile N sets the size, "
              f"--tile 0 translates in one piece)", file=sys.stderr)


def translate_one(G, img, opt):
    """The translation of one PIL image (already in the model's channels and size)."""
    p = next(G.parameters())
    rows = strip_rows_for(opt.tile, img.height, img.width)
    if rows is None:
        return to_image(translate(G, to_tensor(img).to(p.device, p.dtype)))
    levels = torch.from_numpy(np.array(img))  # in strips: the image stays 8-bit, 1 byte a value
    levels = levels[None, None] if levels.ndim == 2 else levels.permute(2, 0, 1)[None]
    return to_image(translate_tiled(G, levels.to(p.device), rows))


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
        print(f"warning: {refs[0]} is {ref.size[0]}x{ref.size[1]}, the output {out.size[0]}x{out.size[1]}; not scored", file=sys.stderr)
        return None, ref
    return pixel_errors(ref, out, img), ref


def strip_rows_for(tile, h, w):
    """Image rows per strip for --tile (None: automatic), or None to translate in one piece."""
    if tile == 0 or (tile is None and h * w <= AUTO_TILE_PIXELS):
        return None
    return max(1, math.ceil((tile or DEFAULT_TILE) ** 2 / w))


# -----------------------------------------------------------------------------
# Videos (PyAV, optional) and animated GIF/WebP (Pillow): every frame goes through the
# same translation as an image, --batch_size frames at a time.

def import_av():
    try:
        import av
    except ImportError:
        die("translating videos needs PyAV: pip install av")
    return av


def translate_frames_file(G, path, stem, kind, opt, channels):
    """Translate a video (written as MP4, H.264) or an animated GIF/WebP (written in its own
    format with the same frame durations and loop); returns its results-page row."""
    ext = output_ext(path, kind)
    n = []
    write_atomic(os.path.join(opt.output_dir, stem + ext),  # streamed into a temporary file (f.name), renamed once complete
                 lambda f: n.append((translate_video if kind == "video" else translate_animation)(G, path, f.name, opt, channels)),
                 passes=(NotEnoughTempSpace,))
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


def translate_video(G, path, out_path, opt, channels):
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
                  f"(ffmpeg -i OUT.mp4 -i {path} -map 0:v -map 1:a -c copy WITH_AUDIO.mp4 adds it back)", file=sys.stderr)
        frames = (model_frame(prepare(f.to_image(), opt), channels) for f in decoded(src, stream))
        with av.open(out_path, "w", format="mp4") as dst:
            out = None
            n = 0
            for f, y in tqdm(translate_batches(G, frames, opt), total=stream.frames or None, unit="frame",
                             desc=os.path.basename(path), file=sys.stderr):
                if out is None:
                    tiling_note(path, f.width, f.height, opt)
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


def translate_animation(G, path, out_path, opt, channels):
    try:
        with Image.open(path) as im:
            fmt, info = im.format, dict(im.info)
            frames, durations = [], []
            for frame in ImageSequence.Iterator(im):
                frame.load()  # WebP sets a frame's duration when it is loaded, GIF when it is seeked to
                durations.append(frame.info.get("duration", 100))
                frames.append(model_frame(prepare(frame.copy(), opt), channels))
    except Exception as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from e
    tiling_note(path, frames[0].width, frames[0].height, opt)
    outs = [y for _, y in tqdm(translate_batches(G, frames, opt), total=len(frames), unit="frame",
                               desc=os.path.basename(path), file=sys.stderr)]
    kw = {"loop": info["loop"]} if "loop" in info else {}  # no loop entry: play once, as the input
    if fmt == "WEBP":
        kw["lossless"] = True
    outs[0].save(out_path, format=fmt, save_all=True, append_images=outs[1:], duration=durations, **kw)
    return len(outs)


def model_frame(frame, channels):
    """A decoded frame in the model's channels, transparency composited on white as load_image does."""
    return composite_on_white(frame).convert("L" if channels == 1 else "RGB")


def translate_batches(G, frames, opt):
    """Translate an iterable of PIL frames, yielding (input, output) pairs in order."""
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == opt.batch_size:
            yield from translate_batch(G, batch, opt)
            batch = []
    yield from translate_batch(G, batch, opt)


def translate_batch(G, batch, opt):
    if not batch:
        return
    if strip_rows_for(opt.tile, batch[0].height, batch[0].width) is not None:  # large frames: one by one, in strips
        outs = [translate_one(G, f, opt) for f in batch]
    else:
        p = next(G.parameters())
        y = translate(G, torch.cat([to_tensor(f) for f in batch]).to(p.device, p.dtype))
        outs = [to_image(y[i:i + 1]) for i in range(len(batch))]
    for f, out in zip(batch, outs):
        yield f, (side_by_side(f, out) if opt.side_by_side else out)


# -----------------------------------------------------------------------------
# The results page: output_dir/index.html, rewritten after each run

if __name__ == "__main__":
    print_lines_as_they_come()
    main()
