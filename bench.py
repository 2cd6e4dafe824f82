"""
Benchmark of the CycleGAN training step (and inference), against the seed's step
done literally.

    python bench.py                          # 128x128, 9 blocks, batch 1, CPU or CUDA: every row
    python bench.py --img_size 256 --iters 3
    python bench.py --amp bf16 --channels_last   # reference, default and this one configuration
    python bench.py --rows reference,bf16 --no_profile   # two rows, without the operator profiles
    python bench.py --quality                # short trainings on the built-in data: fp32 vs the best option
    python bench.py --nproc 2                # DDP: images/s with 1 and 2 processes, scaling efficiency

Every row runs in a fresh subprocess (so one row's memory and compiled code cannot
pollute another's): build the four networks as cyclegan.py does, count one step's
FLOPs with FlopCounterMode, warm up (torch.compile's compilation happens there and
is reported separately, never in the timings), then time --iters steps and report
their median. Peak memory is the training steps' own peak: on CPU the process's peak
RSS (VmHWM) after resetting it once warm-up is done, on CUDA max_memory_allocated.
Inference is test.py's translate() on one image of the same size with the row's
options. "cpu%" is the CPU time the row's process got over the wall time times its
threads: well under ~90% means other processes were competing for the cores and the
row's timings are inflated.
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def reference_step(real_A, real_B, nets, optimizers, buffers, lambda_cyc=10.0, lambda_id=5.0):
    """The seed's iteration, literally: six separate generator calls, separate
    discriminator calls on real and fake, discriminator gradients computed (and
    discarded) during the generator update, fp32, eager."""
    G_AB, G_BA, D_A, D_B = nets
    optimizer_G, optimizer_D_A, optimizer_D_B = optimizers
    fake_A_buffer, fake_B_buffer = buffers
    G_AB.train()
    G_BA.train()
    optimizer_G.zero_grad()
    loss_id_A = F.l1_loss(G_BA(real_A), real_A)
    loss_id_B = F.l1_loss(G_AB(real_B), real_B)
    loss_identity = (loss_id_A + loss_id_B) / 2
    fake_B = G_AB(real_A)
    pred = D_B(fake_B)
    loss_GAN_AB = F.mse_loss(pred, torch.ones_like(pred))
    fake_A = G_BA(real_B)
    pred = D_A(fake_A)
    loss_GAN_BA = F.mse_loss(pred, torch.ones_like(pred))
    loss_GAN = (loss_GAN_AB + loss_GAN_BA) / 2
    recov_A = G_BA(fake_B)
    loss_cycle_A = F.l1_loss(recov_A, real_A)
    recov_B = G_AB(fake_A)
    loss_cycle_B = F.l1_loss(recov_B, real_B)
    loss_cycle = (loss_cycle_A + loss_cycle_B) / 2
    loss_G = loss_GAN + lambda_cyc * loss_cycle + lambda_id * loss_identity
    loss_G.backward()
    optimizer_G.step()

    optimizer_D_A.zero_grad()
    pred = D_A(real_A)
    loss_real = F.mse_loss(pred, torch.ones_like(pred))
    fake_A_ = fake_A_buffer.push_and_pop(fake_A)
    pred = D_A(fake_A_.detach())
    loss_fake = F.mse_loss(pred, torch.zeros_like(pred))
    loss_D_A = (loss_real + loss_fake) / 2
    loss_D_A.backward()
    optimizer_D_A.step()

    optimizer_D_B.zero_grad()
    pred = D_B(real_B)
    loss_real = F.mse_loss(pred, torch.ones_like(pred))
    fake_B_ = fake_B_buffer.push_and_pop(fake_B)
    pred = D_B(fake_B_.detach())
    loss_fake = F.mse_loss(pred, torch.zeros_like(pred))
    loss_D_B = (loss_real + loss_fake) / 2
    loss_D_B.backward()
    optimizer_D_B.step()
    loss_D = (loss_D_A + loss_D_B) / 2
    return dict(loss_D=loss_D, loss_G=loss_G, loss_GAN=loss_GAN, loss_cycle=loss_cycle, loss_identity=loss_identity,
                loss_D_A=loss_D_A, loss_D_B=loss_D_B)


# -----------------------------------------------------------------------------
# Rows

# A row is "reference", "default" (cyclegan.train_step, fp32, eager) or options joined
# by "+": bf16 / fp16 (autocast), channels_last, compile.
OPTIONS = ("bf16", "fp16", "channels_last", "compile")
BEST = "bf16"  # the fastest configuration cyclegan.py offers on this repo's CPU and GPUs
DEFAULT_ROWS = ["reference", "default", "bf16", "channels_last", "bf16+channels_last", "compile", "bf16+compile"]


def parse_row(row):
    if row in ("reference", "default"):
        return {"step": row, "amp": "none", "channels_last": False, "compile": False}
    opts = row.split("+")
    bad = [o for o in opts if o not in OPTIONS]
    if bad or len(set(opts)) != len(opts) or ("bf16" in opts and "fp16" in opts):
        raise ValueError(f"row {row!r}: use 'reference', 'default' or options from {OPTIONS} joined by '+'")
    amp = "bf16" if "bf16" in opts else "fp16" if "fp16" in opts else "none"
    return {"step": "default", "amp": amp, "channels_last": "channels_last" in opts, "compile": "compile" in opts}


def row_from_options(amp, channels_last, compile_):
    opts = ([amp] if amp != "none" else []) + (["channels_last"] if channels_last else []) + (["compile"] if compile_ else [])
    return "+".join(opts) or "default"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_seconds():
    t = os.times()
    return t.user + t.system


def reset_peak_rss():
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AllocSampler:
    """The peak of glibc's in-use heap bytes (mallinfo2), sampled every millisecond in a
    thread while a step runs: the tensors' own peak, which peak RSS overstates by
    whatever the allocator has freed but kept mapped. None where there is no glibc."""

    def __init__(self):
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallinfo2.restype = MallInfo2
        except (OSError, AttributeError):
            self.libc = None
        self.threading = threading

    def in_use(self):
        m = self.libc.mallinfo2()
        return (m.uordblks + m.hblkhd) / 2**20

    def peak_during(self, fn):
        if self.libc is None:
            fn()
            return None
        peak, done = [self.in_use()], self.threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], self.in_use())
                time.sleep(0.001)

        t = self.threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            fn()
        finally:
            done.set()
            t.join()
        return max(peak[0], self.in_use())


def build(opt, cfg, device):
    """The four networks, optimisers and replay buffers, as cyclegan.py builds them
    (the reference row: the seed's plain Adam), and a batch of inputs."""
    from models import Discriminator, GeneratorResNet, weights_init_normal
    from utils import ReplayBuffer

    torch.manual_seed(0)
    shape = (3, opt.img_size, opt.img_size)
    nets = [GeneratorResNet(shape, opt.n_residual_blocks), GeneratorResNet(shape, opt.n_residual_blocks),
            Discriminator(shape), Discriminator(shape)]
    for net in nets:
        net.apply(weights_init_normal)
        net.to(device)
        if cfg["channels_last"]:
            net.to(memory_format=torch.channels_last)
    G_AB, G_BA, D_A, D_B = nets
    adam = dict(lr=2e-4, betas=(0.5, 0.999))
    if cfg["step"] == "default":  # cyclegan.py's choice
        adam.update({"fused": True} if device.type == "cuda" else {"foreach": True})
    optimizers = (torch.optim.Adam(list(G_AB.parameters()) + list(G_BA.parameters()), **adam),
                  torch.optim.Adam(D_A.parameters(), **adam), torch.optim.Adam(D_B.parameters(), **adam))
    buffers = (ReplayBuffer(seed=1), ReplayBuffer(seed=2))
    g = torch.Generator().manual_seed(1)
    real_A = (torch.rand(opt.batch_size, *shape, generator=g) * 2 - 1).to(device)
    real_B = (torch.rand(opt.batch_size, *shape, generator=g) * 2 - 1).to(device)
    if cfg["channels_last"]:
        real_A = real_A.contiguous(memory_format=torch.channels_last)
        real_B = real_B.contiguous(memory_format=torch.channels_last)
    return nets, optimizers, buffers, real_A, real_B


def make_step(cfg, nets, optimizers, buffers, real_A, real_B, device):
    from cyclegan import train_step

    if cfg["step"] == "reference":
        return lambda: reference_step(real_A, real_B, nets, optimizers, buffers)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"])
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16" else None
    return lambda: train_step(real_A, real_B, nets, optimizers, buffers, 10.0, 5.0, autocast, scaler)


def count_flops(step):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def compile_nets(nets):
    # as cyclegan.py --compile does
    return [torch.compile(net) for net in nets]


def time_calls(fn, n, device):
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def median(xs):
    xs = sorted(xs)
    k = len(xs)
    return xs[k // 2] if k % 2 else (xs[k // 2 - 1] + xs[k // 2]) / 2


def run_row(opt, row):
    """One row, in this (fresh) process: returns a dict of measurements."""
    from test import translate

    cfg = parse_row(row)
    device = torch.device(opt.device)
    nets, optimizers, buffers, real_A, real_B = build(opt, cfg, device)
    eager_nets = nets
    # FLOPs of one step (eager: the same arithmetic as the compiled step); it is also
    # the first warm-up step of the eager rows.
    flops = count_flops(make_step(cfg, eager_nets, optimizers, buffers, real_A, real_B, device))
    if cfg["compile"]:
        nets = compile_nets(nets)
    step = make_step(cfg, nets, optimizers, buffers, real_A, real_B, device)
    # compile: the first steps (re)compile for each input shape (n and 2n images) and
    # each requires_grad state of the discriminators' weights
    warm = time_calls(step, max(opt.warmup, 3) if cfg["compile"] else opt.warmup, device)

    # ---- timed training steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_peak_rss()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    times = time_calls(step, opt.iters, device)
    cpu_share = (cpu_seconds() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_reserved() / 2**20
        peak_alloc = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mem = peak_rss_mib() if rss_reset else float("nan")
        # one more step, with the heap sampled (kept out of the timings)
        peak_alloc = AllocSampler().peak_during(step)
        peak_alloc = float("nan") if peak_alloc is None else peak_alloc
    s_it = median(times)
    compile_s = max(0.0, sum(warm) - len(warm) * s_it) if cfg["compile"] else 0.0

    # ---- inference as test.py does it: with --amp, the generator and the image are cast
    # to that dtype once (the same outputs as autocast, without its per-call weight casts)
    del optimizers, buffers, step
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"], torch.float32)
    G = eager_nets[0].eval().to(dtype)
    x = real_A[:1].to(dtype)
    G_inf = torch.compile(G) if cfg["compile"] else G
    t = time.perf_counter()
    for _ in range(2):
        translate(G_inf, x)
    sync(device)
    inf_warm = time.perf_counter() - t
    inf_times = time_calls(lambda: translate(G_inf, x), max(3, opt.iters), device)
    inf_ms = 1000 * median(inf_times)
    if cfg["compile"]:
        compile_s += max(0.0, inf_warm - 2 * inf_ms / 1000)
    return {"row": row, "s_it": s_it, "times": times, "flops": flops, "peak_mem_mib": peak_mem, "peak_alloc_mib": peak_alloc,
            "compile_s": compile_s, "inf_ms": inf_ms, "cpu_share": cpu_share, "load": os.getloadavg()[0],
            "threads": torch.get_num_threads()}


def profile_row(opt, row, top=15):
    """The top operators (self time) of one warm step of `row`."""
    from torch.profiler import ProfilerActivity, profile

    cfg = parse_row(row)
    device = torch.device(opt.device)
    nets, optimizers, buffers, real_A, real_B = build(opt, cfg, device)
    if cfg["compile"]:
        nets = compile_nets(nets)
    step = make_step(cfg, nets, optimizers, buffers, real_A, real_B, device)
    for _ in range(max(1, opt.warmup)):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr, 0) for e in events)
    conv = sum(getattr(e, attr, 0) for e in events if "conv" in e.key and "backward" in e.key or e.key in
               ("aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_slow_conv2d_forward"))
    return (events.table(sort_by=key, row_limit=top, max_name_column_width=48)
            + f"\nconvolutions (forward and backward): {100 * conv / max(total, 1):.0f}% of the step's operator time")


# -----------------------------------------------------------------------------
# The hardware's peak

def hardware_peak(device, dtypes):
    """GFLOP/s of a large matmul and of a 3x3 256->256 convolution at the residual
    blocks' size (NCHW and channels_last), each dtype."""
    n = 4096 if device.type == "cuda" else 2048
    out = []

    def best_of(fn, flop, reps=5):
        fn()
        return flop / median(time_calls(fn, reps, device)) / 1e9

    with torch.no_grad():
        for dt in dtypes:
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            out.append((f"matmul {n}^3 {str(dt)[6:]}", best_of(lambda: a @ b, 2 * n**3)))
        hw = 64
        for dt in dtypes:
            for cl in (False, True):
                x = torch.randn(2, 256, hw + 2, hw + 2, device=device, dtype=dt)
                w = torch.randn(256, 256, 3, 3, device=device, dtype=dt)
                if cl:
                    x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
                flop = 2 * 2 * 256 * 256 * 9 * hw * hw
                out.append((f"conv3x3 256ch {hw}x{hw} {str(dt)[6:]} {'channels_last' if cl else 'NCHW'}",
                            best_of(lambda: F.conv2d(x, w), flop)))
    return out


# -----------------------------------------------------------------------------
# Quality parity

def quality(opt, rows):
    """Train on the built-in day->night data for a fixed budget with each row's
    options (cyclegan.py, same seeds), translate testA with G_AB (test.py, fp32) and
    print the mean absolute error against the paired testB."""
    from datasets import make_day2night

    root = os.path.dirname(os.path.abspath(__file__))
    tmp = tempfile.mkdtemp(prefix="cyclegan-quality-")
    try:
        data = os.path.join(tmp, "data")
        make_day2night(data, n_train=opt.quality_train, n_test=opt.quality_test, size=64, seed=0)
        print(f"quality: built-in day2night 64x64, {opt.quality_train} train / {opt.quality_test} paired test images, "
              f"{opt.n_residual_blocks} blocks, {opt.quality_epochs} epochs (= {opt.quality_epochs * opt.quality_train} "
              f"iterations), seeds {list(range(opt.quality_seeds))}")
        print(f"{'row':28s} {'seed':>4s} {'test MAE':>9s} {'identity MAE':>13s} {'train s':>8s}")
        results = {}
        for row in rows:
            cfg = parse_row(row)
            if cfg["step"] == "reference" or cfg["channels_last"]:
                raise SystemExit(f"--quality_rows: {row} is not a cyclegan.py configuration")
            flags = (["--amp", cfg["amp"]] if cfg["amp"] != "none" else []) + (["--compile"] if cfg["compile"] else [])
            for seed in range(opt.quality_seeds):
                work = os.path.join(tmp, f"{row}-{seed}")
                os.makedirs(work)
                t = time.time()
                r = subprocess.run([sys.executable, os.path.join(root, "cyclegan.py"), "--dataset_name", "q", "--data_root", data,
                                    "--img_height", "64", "--img_width", "64", "--n_residual_blocks", str(opt.n_residual_blocks),
                                    "--n_epochs", str(opt.quality_epochs), "--decay_epoch", str(opt.quality_epochs // 2),
                                    "--n_cpu", "0", "--seed", str(seed), "--sample_interval", "1000000",
                                    "--device", opt.device.split(":")[0], *flags], cwd=work, capture_output=True, text=True)
                train_s = time.time() - t
                if r.returncode != 0:
                    raise SystemExit(f"quality run {row} seed {seed} failed:\n{r.stderr[-3000:]}")
                r = subprocess.run([sys.executable, os.path.join(root, "test.py"), "--checkpoint",
                                    os.path.join("saved_models", "q", f"G_AB_{opt.quality_epochs}.pth"),
                                    "--image_path", os.path.join(data, "testA"), "--reference_dir", os.path.join(data, "testB"),
                                    "--output_dir", "out", "--device", opt.device.split(":")[0]],
                                   cwd=work, capture_output=True, text=True)
                m = re.search(r"translation MAE ([0-9.]+).*identity baseline MAE ([0-9.]+)", r.stdout)
                if r.returncode != 0 or not m:
                    raise SystemExit(f"quality test {row} seed {seed} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
                mae, base = float(m.group(1)), float(m.group(2))
                results.setdefault(row, []).append(mae)
                print(f"{row:28s} {seed:4d} {mae:9.4f} {base:13.4f} {train_s:8.0f}", flush=True)
        ref = sum(results[rows[0]]) / len(results[rows[0]])
        for row in rows:
            mean = sum(results[row]) / len(results[row])
            print(f"{row:28s} mean test MAE {mean:.4f} ({100 * (mean / ref - 1):+.1f}% vs {rows[0]})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ddp_worker(opt):
    """One process of a torchrun launch: the default step under DDP, each process with
    its own batch; rank 0 prints the images/s of all processes together."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device(opt.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = parse_row("default")
    nets, optimizers, buffers, real_A, real_B = build(opt, cfg, device)
    ddp_nets = [DDP(n, device_ids=[device.index] if device.type == "cuda" else None) for n in nets]
    step = make_step(cfg, ddp_nets, optimizers, buffers, real_A, real_B, device)
    time_calls(step, opt.warmup + 1, device)
    dist.barrier()
    t = time.perf_counter()
    time_calls(step, opt.iters, device)
    dist.barrier()
    seconds = time.perf_counter() - t
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print("BENCH_RESULT " + json.dumps({"nproc": world, "img_s": world * opt.batch_size * opt.iters / seconds}), flush=True)
    dist.destroy_process_group()


def scaling(opt):
    """images/s of the default step with 1 and with --nproc processes (torchrun, DDP),
    and the scaling efficiency: images/s(N) / (N x images/s(1))."""
    results = {}
    for n in (1, opt.nproc):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), os.path.abspath(__file__),
               "--_worker", "ddp", "--img_size", str(opt.img_size), "--n_residual_blocks", str(opt.n_residual_blocks),
               "--batch_size", str(opt.batch_size), "--device", opt.device.split(":")[0], "--iters", str(opt.iters),
               "--warmup", str(opt.warmup)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in r.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
        if r.returncode != 0 or line is None:
            raise SystemExit(f"{n}-process run failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        results[n] = json.loads(line[len("BENCH_RESULT "):])["img_s"]
        print(f"{n} process(es): {results[n]:.3f} images/s", flush=True)
    eff = results[opt.nproc] / (opt.nproc * results[1])
    print(f"scaling efficiency with {opt.nproc} processes: {100 * eff:.0f}% "
          f"(images/s {results[opt.nproc]:.3f} / ({opt.nproc} x {results[1]:.3f}); {opt.img_size}x{opt.img_size}, "
          f"{opt.n_residual_blocks} blocks, batch {opt.batch_size} per process, {opt.device})")


# -----------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(description="Benchmark the CycleGAN training step and inference.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--img_size", type=int, default=128)
    p.add_argument("--n_residual_blocks", type=int, default=9)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per row (their median is reported)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed iterations per row after the FLOP-counting one (at least 3 for compiled rows: compilation happens there)")
    p.add_argument("--amp", default=None, choices=("none", "bf16", "fp16"), help="bench reference, default and this configuration only")
    p.add_argument("--compile", action="store_true", help="(with --amp / --channels_last) the configuration is compiled")
    p.add_argument("--channels_last", action="store_true", help="(with --amp / --compile) the configuration uses channels_last")
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default: {','.join(DEFAULT_ROWS)})")
    p.add_argument("--no_profile", action="store_true", help="skip the top operators of one step of the reference and the fastest row")
    p.add_argument("--no_peak", action="store_true", help="skip the hardware peak measurement")
    p.add_argument("--warm_compile_cache", action="store_true",
                   help="let compiled rows use torch.compile's on-disk cache (default: an empty one, so 'compile s' is a first run's)")
    p.add_argument("--quality", action="store_true", help=f"quality parity instead: short trainings in fp32 and with {BEST}")
    p.add_argument("--quality_rows", default=f"default,{BEST}")
    p.add_argument("--quality_train", type=int, default=100, help="--quality: training images per domain")
    p.add_argument("--quality_test", type=int, default=20, help="--quality: paired test images")
    p.add_argument("--quality_epochs", type=int, default=3)
    p.add_argument("--quality_seeds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=None, help="multi-process mode: images/s of DDP with 1 and N processes, and the scaling efficiency")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    opt = get_parser().parse_args(argv)
    if opt.device == "auto":
        opt.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(opt.device)
    if opt._worker == "ddp":
        ddp_worker(opt)
        return
    if opt.nproc:
        scaling(opt)
        return
    if opt._worker:
        if opt._worker.startswith("profile:"):
            print(profile_row(opt, opt._worker[8:]))
            return
        print("BENCH_RESULT " + json.dumps(run_row(opt, opt._worker)), flush=True)
        return
    if opt.quality:
        if opt.n_residual_blocks == 9 and "--n_residual_blocks" not in (argv if argv is not None else sys.argv):
            opt.n_residual_blocks = 3  # a short budget; pass --n_residual_blocks to change
        quality(opt, opt.quality_rows.split(","))
        return

    if opt.rows:
        rows = opt.rows.split(",")
    elif opt.amp is not None or opt.compile or opt.channels_last:
        rows = ["reference", "default", row_from_options(opt.amp or "none", opt.channels_last, opt.compile)]
    else:
        rows = DEFAULT_ROWS
    if "reference" not in rows:
        rows = ["reference"] + rows
    rows = list(dict.fromkeys(rows))
    for row in rows:
        parse_row(row)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"torch {torch.__version__} on {name}, {torch.get_num_threads()} threads; "
          f"{opt.img_size}x{opt.img_size}, {opt.n_residual_blocks} residual blocks, batch {opt.batch_size}; "
          f"median of {opt.iters} steps after {opt.warmup + 1} warm-up steps; load average {os.getloadavg()[0]:.2f}")
    peaks = {}
    if not opt.no_peak:
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
        print("\nhardware peak (measured):")
        for what, gflops in hardware_peak(device, dtypes):
            peaks[what] = gflops
            print(f"  {what:44s} {gflops:8.1f} GFLOP/s")

    results = []
    base_args = [f"--img_size={opt.img_size}", f"--n_residual_blocks={opt.n_residual_blocks}", f"--batch_size={opt.batch_size}",
                 f"--device={opt.device}", f"--iters={opt.iters}", f"--warmup={opt.warmup}"]
    here = os.path.abspath(__file__)
    print()
    for row in rows:
        print(f"running {row} ...", end=" ", flush=True)
        env, cache = None, None
        if parse_row(row)["compile"] and not opt.warm_compile_cache:
            # an empty inductor cache: the compile time of a first run, not of a cache hit
            cache = tempfile.mkdtemp(prefix="bench-inductor-")
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        try:
            r = subprocess.run([sys.executable, here, *base_args, f"--_worker={row}"], capture_output=True, text=True, env=env)
        finally:
            if cache:
                shutil.rmtree(cache, ignore_errors=True)
        line = next((l for l in r.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
        if r.returncode != 0 or line is None:
            print(f"failed:\n{r.stderr[-3000:]}")
            continue
        res = json.loads(line[len("BENCH_RESULT "):])
        print(f"{res['s_it']:.3f} s/it (steps: {', '.join(f'{t:.2f}' for t in res['times'])}; load {res['load']:.2f})", flush=True)
        results.append(res)
    if not results:
        raise SystemExit("no row ran")
    print_table(results, opt, peaks)

    if not opt.no_profile:
        fastest = min(results, key=lambda r: r["s_it"])["row"]
        for row in dict.fromkeys(["reference", fastest]):
            print(f"\ntop operators of one {row} step ({opt.img_size}x{opt.img_size}):")
            r = subprocess.run([sys.executable, here, *base_args, f"--_worker=profile:{row}"], capture_output=True, text=True)
            print(r.stdout if r.returncode == 0 else f"failed:\n{r.stderr[-3000:]}")


def print_table(results, opt, peaks):
    ref = next((r for r in results if r["row"] == "reference"), results[0])
    cuda = opt.device.startswith("cuda")
    mem1, mem2 = ("reserved", "allocated") if cuda else ("peak RSS", "peak heap")
    head = (f"{'row':26s} {'s/it':>7s} {'img/s':>6s} {'TFLOP/s':>7s} {'vs ref':>6s} {mem1 + ' MiB':>13s} {mem2 + ' MiB':>14s} "
            f"{'infer ms':>9s} {'vs ref':>6s} {'compile s':>9s} {'cpu%':>5s}")
    flops = ", ".join(dict.fromkeys(f"{r['flops'] / 1e12:.3f} {r['row']}" for r in results if r["row"] in ("reference", "default")))
    print(f"\ntraining step, TFLOP per iteration: {flops} (the reference also computes the discriminators' weight "
          f"gradients in the generator update)")
    if cuda:
        print("memory: max_memory_reserved / max_memory_allocated of the timed steps")
    else:
        print("memory: peak RSS (VmHWM) of the timed steps; peak heap: glibc's in-use bytes sampled every 1 ms during one "
              "more step (the tensors' own peak, without what the allocator freed but kept)")
    print("inference: test.py's translate() of one image of this size, with the row's options (--amp: weights cast once)")
    print(head)
    print("-" * len(head))
    for r in results:
        tflops = r["flops"] / r["s_it"] / 1e12
        print(f"{r['row']:26s} {r['s_it']:7.3f} {opt.batch_size / r['s_it']:6.2f} {tflops:7.3f} {ref['s_it'] / r['s_it']:5.2f}x "
              f"{r['peak_mem_mib']:13.0f} {r['peak_alloc_mib']:14.0f} {r['inf_ms']:9.1f} {ref['inf_ms'] / r['inf_ms']:5.2f}x "
              f"{r['compile_s']:9.1f} {100 * r['cpu_share']:4.0f}%")
    conv = {k: v for k, v in peaks.items() if k.startswith("conv")}
    if conv:
        best = min(results, key=lambda r: r["s_it"])
        f32 = max(v for k, v in conv.items() if "float32" in k)
        low = max((v for k, v in conv.items() if "float32" not in k), default=f32)
        best_peak = low if parse_row(best["row"])["amp"] != "none" else f32
        print(f"\nroofline: convolutions are ~all of the step's FLOPs (see the profiles below). At the best measured "
              f"conv rate a step of {ref['flops'] / 1e12:.3f} TFLOP takes at least {ref['flops'] / f32 / 1e9:.2f} s in fp32 "
              f"and {ref['flops'] / low / 1e9:.2f} s in 16 bits: at most {ref['s_it'] * low * 1e9 / ref['flops']:.2f}x the "
              f"reference, which runs at {100 * ref['flops'] / ref['s_it'] / 1e9 / f32:.0f}% of the fp32 conv rate. "
              f"Fastest row ({best['row']}, {ref['s_it'] / best['s_it']:.2f}x): "
              f"{100 * best['flops'] / best['s_it'] / 1e9 / best_peak:.0f}% of its precision's conv rate.")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


if __name__ == "__main__":
    main()
