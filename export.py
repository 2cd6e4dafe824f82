"""
Export a trained generator for use outside this repository.

    python export.py --checkpoint saved_models/horse2zebra/G_AB_200.pth --format onnx --output g.onnx
    python export.py --checkpoint saved_models/horse2zebra/last.pt --generator G_BA --format pt2 --output g.pt2

The generator is captured with torch.export (torch.jit is deprecated in torch 2.14)
with a dynamic batch, height and width, and written either as ONNX (torch.onnx.export
with dynamo=True, for onnxruntime and other runtimes) or as torch.export's
ExportedProgram (.pt2, read back with torch.export.load). Height and width must be multiples of 4
(at least 8): the generator halves the size twice and doubles it twice. The contract
below is stored in the file (ONNX metadata_props, or cyclegan.json inside the .pt2).
"""
import argparse
import json
import os

import torch
from torch.export import Dim

from models import generator_channels, generator_config, generator_kind, load_generator
from utils import HelpFormatter, die, first_line, print_lines_as_they_come, write_atomic

# What a caller must do around the network; written into every exported file.
CONTRACT = {
    "input": "image: float32, NCHW, C = {channels} ({colour}), values in [-1, 1]: pixel / 127.5 - 1",
    "size": "height and width: any multiples of 4, at least 8 (the dims 4*h4, 4*w4); batch: any",
    "padding": "other sizes: pad right and bottom to the next multiple of 4 (at least 8) by reflection "
               "(by replication for images too small to reflect), run, crop the output back to the "
               "input's size (models.translate)",
    "output": "translated: float32, NCHW, C = {channels_out}, same height and width as image, in [-1, 1] (a tanh's; "
              "generators trained with --identity_start have none and can overshoot): "
              "pixel = round((y + 1) / 2 * 255), y clipped to [-1, 1] first",
}


def get_parser():
    p = argparse.ArgumentParser(description="Export a CycleGAN generator to ONNX or a torch.export program.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="generator weights: a G_AB_<epoch>.pth / G_BA_<epoch>.pth, an official latest_net_G.pth, "
                        "or a last.pt with --generator")
    p.add_argument("--generator", choices=("G_AB", "G_BA"), default=None,
                   help="which generator to export from a full-state last.pt")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx",
                   help="onnx: ONNX via torch.onnx.export(dynamo=True); "
                        "pt2: torch.export's ExportedProgram (torch.export.save)")
    p.add_argument("--output", default=None, help="file to write (default: the checkpoint's name with .onnx or .pt2)")
    return p


def example_and_shapes(G):
    """An example input and the dynamic shapes for torch.export: batch, height and
    width are free, with height and width declared as 4 * h4 and 4 * w4, the sizes the
    network maps to themselves; h4 >= 2 because the residual blocks' 1-pixel
    reflection padding needs at least 2 x 2 features (an 8 x 8 image)."""
    h4, w4 = Dim("h4", min=2), Dim("w4", min=2)
    # A batch of 2 in the example, so the batch dimension is not specialised to 1.
    example = torch.rand(2, generator_channels(G)[0], 64, 96) * 2 - 1
    return (example,), ({0: Dim("batch", min=1), 2: 4 * h4, 3: 4 * w4},)  # by position: forward(x)


def metadata(G, checkpoint, generator):
    arch, channels, channels_out, n_blocks = generator_config(G.state_dict())
    colour = "RGB" if channels == 3 else "grayscale" if channels == 1 else "channels"
    flags = [f"--{flag}" for flag, on in generator_kind(G.state_dict()).items() if on]
    kind = f" ({' '.join(flags)})" if flags else ""
    meta = {k: v.format(channels=channels, channels_out=channels_out, colour=colour) for k, v in CONTRACT.items()}
    meta.update({
        "architecture": f"{arch} ResNet generator{kind}, {n_blocks} residual block{'s' if n_blocks != 1 else ''}",
        "source": os.path.basename(checkpoint) + (f" [{generator}]" if generator else ""),
    })
    return meta


def save_onnx(G, meta, output):
    try:
        import onnx  # noqa: F401  (the exporter's own dependencies, checked up front for one clear line)
        import onnxscript  # noqa: F401
    except ImportError:
        die("--format onnx needs the onnx and onnxscript packages: pip install onnx onnxscript")
    # The dynamo exporter (torch 2.14's default) runs torch.export, then translates op by op:
    # ReflectionPad2d -> Pad(reflect), Upsample -> Resize(nearest), ConvTranspose2d ->
    # ConvTranspose, with the symbolic sizes kept in the graph's shapes.
    args, dynamic_shapes = example_and_shapes(G)
    with torch.no_grad():
        onnx_program = torch.onnx.export(G, args, dynamic_shapes=dynamic_shapes, input_names=["image"],
                                         output_names=["translated"], dynamo=True, verbose=False)
    for k, v in meta.items():
        onnx_program.model.metadata_props[k] = v
    onnx_program.model.doc_string = "CycleGAN generator. " + " | ".join(f"{k}: {v}" for k, v in meta.items())
    onnx_program.save(output)


def save_pt2(G, meta, output):
    args, dynamic_shapes = example_and_shapes(G)
    with torch.no_grad():
        ep = torch.export.export(G, args, dynamic_shapes=dynamic_shapes)
    torch.export.save(ep, output, extra_files={"cyclegan.json": json.dumps(meta, indent=1)})


def check(G, path, fmt, channels):
    """Run the written file on an input of another size than the traced one and
    compare with PyTorch: the largest difference in [-1, 1] units, or None when
    onnxruntime is not installed."""
    x = torch.rand(1, channels, 36, 20) * 2 - 1
    with torch.no_grad():
        y = G(x)
        if fmt == "pt2":
            y2 = torch.export.load(path).module()(x)
        else:
            try:
                import onnxruntime as ort
            except ImportError:
                return None
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            y2 = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    return (y - y2).abs().max().item()


def main(argv=None):
    opt = get_parser().parse_args(argv)
    output = opt.output or (os.path.splitext(opt.checkpoint)[0] + (f"_{opt.generator}" if opt.generator else "")
                            + "." + opt.format)
    if opt.format == "pt2" and not output.endswith(".pt2"):
        die(f"--output {output}: torch.export programs are saved as .pt2 files")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        die(f"--output {output}: folder {folder} does not exist")
    G = load_generator(opt.checkpoint, opt.generator)  # on the CPU: the file it writes runs on any device
    channels = generator_channels(G)[0]
    meta = metadata(G, opt.checkpoint, opt.generator)
    # Written and checked under a temporary name (f.name, with the same extension: torch.export
    # checks it), then renamed: a failed export never leaves a file under the name a deployment would load.
    diffs = []

    def write_and_check(f):
        try:
            (save_onnx if opt.format == "onnx" else save_pt2)(G, meta, f.name)
            diffs.append(check(G, f.name, opt.format, channels))
        except (SystemExit, OSError):
            raise
        except Exception as e:
            die(f"exporting {opt.checkpoint} to {opt.format} failed ({type(e).__name__}: {first_line(e, 300)})")
        # 1/255 of the [0, 1] image is 2/255 of the [-1, 1] output
        if diffs[0] is not None and diffs[0] > 2 / 255:
            die(f"the exported {opt.format} model does not reproduce {opt.checkpoint} "
                f"(max difference {diffs[0]:.3g} > 2/255); nothing written")

    write_atomic(output, write_and_check)
    diff = diffs[0]
    print(f"wrote {output} ({opt.format}, {os.path.getsize(output) / 2**20:.1f} MiB): "
          f"{meta['architecture']}, {channels} channels")
    print(f"  input  {meta['input']}\n  size   {meta['size']}\n  output {meta['output']}")
    if diff is None:
        print("  not run here: pip install onnxruntime to check it against PyTorch")
    else:
        print(f"  checked at 1x{channels}x36x20 against PyTorch: "
              f"max |difference| {diff:.2e} ({diff * 127.5:.4f} of an 8-bit level)")


if __name__ == "__main__":
    print_lines_as_they_come()
    main()
