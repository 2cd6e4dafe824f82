"""
Times a training step: cyclegan.py's (or, with --model cut|fastcut, cut.py's) own networks,
optimisers, replay buffers and step on random images, with nothing else (no data loading,
logging or saving).

    python bench.py                                   # 128x128, 9 blocks, batch 1, --amp auto, eager
    python bench.py --img_size 256 --amp bf16 --channels_last --compile
    python bench.py --amp none --profile              # and the top operators of one step
    python bench.py --amp none --rows default,bf16,bf16+channels_last,compile   # compare, with ratios
    python bench.py --img_size 64 --ngf 32 --n_residual_blocks 6 --d_receptive_field auto   # the Quality recipe's step
    python bench.py --img_size 64 --netD patch,projected --gan_mode hinge --diffaug color,translation,cutout
    python bench.py --img_size 64 --ngf 32 --n_residual_blocks 6 --d_receptive_field auto --model fastcut

It warms up (torch.compile compiles there), then times --iters steps, synchronising the
device around each, and prints their median (s/it), images/s and peak memory: on CUDA
torch.cuda.max_memory_allocated() of the timed steps, on the CPU the peak RSS of the whole
process (resource.getrusage), which includes start-up and so is only an upper bound.

--rows runs each configuration in a fresh process of this same command (so that each has
its own peak memory and compiled code) and prints a table with the speed-up against the
first row. A row is "default" (the flags given: --amp, --channels_last, --compile) or
options joined by "+" that replace those flags: a precision (fp32, bf16, fp16),
channels_last, compile (torch.compile's default mode) or cudagraphs (--compile
reduce-overhead, CUDA graphs, CUDA only). The table says which precision each row ran in.
The exit status is 1 if a row failed.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import cut
import cyclegan
import gan
import training
from augment import DIFFAUG_POLICIES
from models import GENERATOR_KIND_FLAGS
from utils import HelpFormatter, die, pick_device, pick_precision, precision_name, print_lines_as_they_come

ROW_OPTIONS = {"fp32": ["--amp", "none"], "bf16": ["--amp", "bf16"], "fp16": ["--amp", "fp16"],
               "channels_last": ["--channels_last"], "compile": ["--compile", "default"],
               "cudagraphs": ["--compile", "reduce-overhead"], "antialias": ["--antialias"],
               "antialias_up": ["--antialias_up"], "canonical_shift": ["--canonical_shift"]}


def get_parser():
    p = argparse.ArgumentParser(description="Time a training step.", formatter_class=HelpFormatter)
    p.add_argument("--model", default="cyclegan", choices=("cyclegan", "cut", "fastcut"),
                   help="whose step: cyclegan.py's, or cut.py's with --mode cut or fastcut")
    p.add_argument("--img_size", type=int, default=128, help="height and width of the random training images")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--n_residual_blocks", type=int, default=9)
    p.add_argument("--ngf", type=int, default=64, help="as cyclegan.py's --ngf")
    p.add_argument("--d_receptive_field", type=training.receptive_field_arg, default=94,
                   choices=training.RECEPTIVE_FIELD_CHOICES, help="as cyclegan.py's")
    p.add_argument("--netD", default="patch", choices=gan.NETDS, metavar="KIND", help="as cyclegan.py's")
    p.add_argument("--gan_mode", default="lsgan", choices=gan.GAN_MODES, help="as cyclegan.py's")
    p.add_argument("--diffaug", default="", metavar="POLICY", help="as cyclegan.py's (e.g. color,translation,cutout)")
    for flag in GENERATOR_KIND_FLAGS:
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                       help=f"as cyclegan.py's --{flag} (default: the script's own)")
    p.add_argument("--lambda_flat", type=float, default=0.0, help="as cut.py's (cut and fastcut)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"), help="as cyclegan.py's --amp")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=("default", "reduce-overhead"),
                   help="as cyclegan.py's --compile")
    p.add_argument("--channels_last", action="store_true", help="networks and images in channels_last memory format")
    p.add_argument("--iters", type=int, default=10, help="timed steps (their median is reported)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (compiled: at least 3, with CUDA graphs 5)")
    p.add_argument("--profile", action="store_true", help="also print the top operators (self time) of one more step")
    p.add_argument("--rows", default=None,
                   help="compare configurations, each in its own process: comma-separated rows, e.g. "
                        "default,bf16,bf16+channels_last,compile (see the top of bench.py)")
    return p


def check_flags(opt):
    for flag in ("img_size", "batch_size", "n_residual_blocks", "ngf", "iters"):
        if getattr(opt, flag) < 1:
            die(f"--{flag} must be at least 1, got {getattr(opt, flag)}")
    if opt.img_size % 4:
        die(f"--img_size must be a multiple of 4 (the generator downsamples twice), got {opt.img_size}")
    if opt.lambda_flat < 0 or (opt.lambda_flat and opt.model == "cyclegan"):
        die(f"--lambda_flat must be at least 0, and is cut.py's (--model cut or fastcut); got {opt.lambda_flat} "
            f"with --model {opt.model}")
    unknown = [p for p in opt.diffaug.split(",") if p and p not in DIFFAUG_POLICIES]
    if unknown:
        die(f"--diffaug: unknown policy {', '.join(unknown)}; choose from {', '.join(DIFFAUG_POLICIES)}")
    if opt.warmup < 0:
        die(f"--warmup must be at least 0, got {opt.warmup}")
    for row in (opt.rows.split(",") if opt.rows is not None else []):
        options = row.split("+")
        precisions = [o for o in options if o in ("fp32", "bf16", "fp16")]
        if row != "default" and (set(options) - set(ROW_OPTIONS) or len(precisions) > 1
                                 or len(set(options)) < len(options) or {"compile", "cudagraphs"} <= set(options)):
            die(f"--rows: {row!r} is not a row; use 'default' or options from {', '.join(ROW_OPTIONS)} joined by '+' "
                f"(one precision; compile or cudagraphs)")


def precision_label(amp, device):
    """What the step computes in, e.g. 'fp32' or 'bf16 (--amp auto)'."""
    name = precision_name(pick_precision(amp, device)[0])
    return f"{name} (--amp auto)" if amp == "auto" else name


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mib(device):
    """(peak MiB, what it is); NaN where there is no probe."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "max_memory_allocated of the timed steps"
    if device.type == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**20 if sys.platform == "darwin" else 2**10), "peak RSS of the whole process"
    return float("nan"), "no probe on this device"


def build_step(opt, device):
    """One training step as cyclegan.py (or cut.py) runs it with these flags, as a function of nothing."""
    if opt.model == "cyclegan":
        script, train_opt = cyclegan, cyclegan.get_parser().parse_args([])  # its defaults: lr, betas, losses, pool size
    else:
        script, train_opt = cut, cut.apply_mode(cut.get_parser().parse_args(["--mode", opt.model]))
    train_opt.img_height = train_opt.img_width = opt.img_size
    train_opt.n_residual_blocks, train_opt.amp, train_opt.compile = opt.n_residual_blocks, opt.amp, opt.compile
    train_opt.ngf, train_opt.d_receptive_field = opt.ngf, opt.d_receptive_field
    train_opt.netD, train_opt.gan_mode, train_opt.diffaug = opt.netD, opt.gan_mode, opt.diffaug
    train_opt.lambda_flat = opt.lambda_flat
    for flag in GENERATOR_KIND_FLAGS:
        if getattr(opt, flag) is None:
            setattr(opt, flag, getattr(train_opt, flag))  # (for the description)
        setattr(train_opt, flag, getattr(opt, flag))
    procs = training.Processes()  # one process, which prints
    torch.manual_seed(0)
    nets, _ = script.build_networks(train_opt, device)
    memory_format = torch.channels_last if opt.channels_last else torch.contiguous_format
    for net in nets.values():
        net.to(memory_format=memory_format)
    optimizers, _ = script.build_optimizers(train_opt, nets, device)
    buffers = script.build_buffers(argparse.Namespace(**{**vars(train_opt), "seed": 1}), 0)
    _, autocast, scaler = training.setup_precision(train_opt, device, procs)
    step_nets = training.networks_for_step(nets, train_opt, device, procs)
    real_A, real_B = ((torch.rand(opt.batch_size, 3, opt.img_size, opt.img_size) * 2 - 1)
                      .to(device, memory_format=memory_format) for _ in range(2))
    return lambda: script.step(train_opt, real_A, real_B, step_nets, optimizers, buffers, autocast, scaler)


def time_steps(step, n, device):
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def profile_step(step, device, top=15):
    """The top operators (self time) of one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48)


def step_description(opt):
    """'cyclegan, 1 residual blocks, ngf 64, D patch 94, lsgan' (and the anti-aliased layers and the
    DiffAugment policy, when on)."""
    blurs = [name for name, on in (("down", opt.antialias), ("up", opt.antialias_up)) if on]
    return (f"{opt.model}, {opt.n_residual_blocks} residual blocks, ngf {opt.ngf}, "
            f"D {opt.netD.replace('patch', f'patch {opt.d_receptive_field}')}, {opt.gan_mode}"
            + (f", anti-aliased {' and '.join(blurs)}" if blurs else "")
            + (", canonical shift" if opt.canonical_shift else "")
            + (f", flat-area loss {opt.lambda_flat:g}" if opt.lambda_flat else "")
            + (f", diffaug {opt.diffaug}" if opt.diffaug else ""))


def bench(opt, device):
    """Times one configuration and prints its result line (the one `--rows` reads)."""
    step = build_step(opt, device)  # (first: it settles the script's defaults the description names)
    print(f"bench: {opt.img_size}x{opt.img_size}, {step_description(opt)}, batch {opt.batch_size}, "
          f"{device}, {precision_label(opt.amp, device)}, {f'compiled ({opt.compile})' if opt.compile else 'eager'}, "
          f"{'channels_last' if opt.channels_last else 'NCHW'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # compiled networks recompile in their first steps for each input shape (n and 2n images)
    # and each requires_grad state of the discriminators; CUDA graphs then record before replaying
    warmup = max(opt.warmup, {None: 0, "default": 3, "reduce-overhead": 5}[opt.compile])
    t = time.perf_counter()
    time_steps(step, warmup, device)
    print(f"warm-up: {warmup} steps, {time.perf_counter() - t:.1f} s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, opt.iters, device)
    s_it = statistics.median(times)
    peak, what = peak_memory_mib(device)
    print(f"steps (s): {' '.join(f'{t:.4g}' for t in times)}")
    print(f"median {s_it:.6g} s/it, {opt.batch_size / s_it:.6g} images/s, peak memory {peak:.0f} MiB ({what})",
          flush=True)
    if opt.profile:
        print(f"\ntop operators of one step:\n{profile_step(step, device)}")
    return s_it


def row_argv(opt, row):
    """This command for one row: the flags given, with the row's options in place of the default's."""
    argv = [f"--model={opt.model}", f"--img_size={opt.img_size}", f"--batch_size={opt.batch_size}",
            f"--n_residual_blocks={opt.n_residual_blocks}", f"--ngf={opt.ngf}",
            f"--d_receptive_field={opt.d_receptive_field}",
            f"--netD={opt.netD}", f"--gan_mode={opt.gan_mode}", f"--diffaug={opt.diffaug}",
            f"--device={opt.device}", f"--iters={opt.iters}",
            f"--warmup={opt.warmup}"] + (["--profile"] if opt.profile else [])
    argv += [f"--lambda_flat={opt.lambda_flat}"] if opt.lambda_flat else []
    options = [] if row == "default" else row.split("+")
    for flag in GENERATOR_KIND_FLAGS:  # a row's option replaces the flag given
        on = True if flag in options else getattr(opt, flag)
        argv += [] if on is None else [f"--{'' if on else 'no-'}{flag}"]
    amp = next((ROW_OPTIONS[o][1] for o in options if o in ("fp32", "bf16", "fp16")), opt.amp)
    compile_mode = next((ROW_OPTIONS[o][1] for o in options if o in ("compile", "cudagraphs")), opt.compile)
    argv += [f"--amp={amp}"] + ([f"--compile={compile_mode}"] if compile_mode else [])
    return argv + (["--channels_last"] if opt.channels_last or "channels_last" in options else []), amp


def compare(opt, device):
    """Each row in its own process; a table of s/it, images/s, speed-up and peak memory."""
    results, failed = [], []
    for row in opt.rows.split(","):
        argv, amp = row_argv(opt, row)
        print(f"---- {row}: bench.py {' '.join(argv)}", flush=True)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
        print(r.stdout + r.stderr, end="", flush=True)
        line = next((l for l in r.stdout.splitlines() if l.startswith("median ")), None)
        if r.returncode != 0 or line is None:
            failed.append(row)
            continue
        words = line.replace(",", "").split()  # median S s/it IMG images/s peak memory MIB MiB (...)
        results.append((row, precision_label(amp, device), float(words[1]), float(words[3]), float(words[7])))
    if results:
        memory = "peak MiB (max allocated)" if device.type == "cuda" else "peak MiB (process RSS)"
        print(f"\n{'row':28s} {'precision':18s} {'s/it':>9s} {'images/s':>9s} {'speed-up':>8s} {memory:>24s}")
        for row, precision, s_it, img_s, peak in results:
            print(f"{row:28s} {precision:18s} {s_it:9.4g} {img_s:9.4g} {results[0][2] / s_it:7.2f}x {peak:24.0f}")
        print(f"({opt.img_size}x{opt.img_size}, {step_description(opt)}, "
              f"batch {opt.batch_size}, {device}; "
              f"median of {opt.iters} steps; speed-up against {results[0][0]})")
    if failed:
        print(f"failed rows: {', '.join(failed)}")
        sys.exit(1)


def main(argv=None):
    opt = get_parser().parse_args(argv)
    check_flags(opt)
    device = pick_device(opt.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as cyclegan.py
    if opt.rows is not None:
        compare(opt, device)
    else:
        bench(opt, device)


if __name__ == "__main__":
    print_lines_as_they_come()
    main()
