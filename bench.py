"""
Benchmark of the CycleGAN training step (and inference), against the seed's step
done literally.

    python bench.py                          # 128x128, 9 blocks, batch 1, CPU or CUDA: every row
    python bench.py --img_size 256 --iters 3 --rows reference,default   # the paper's size: time and peak memory
    python bench.py --amp bf16 --channels_last   # reference, default and this one configuration
    python bench.py --rows reference,fp32,bf16 --no_profile   # rows of your choice, without the operator profiles
    python bench.py --quality                # short trainings on the built-in data: fp32 vs bf16
    python bench.py --nproc 2                # DDP: images/s with 1 and 2 processes, scaling efficiency
    python bench.py --equivalence --device cuda --compile reduce-overhead   # the step on CUDA, eager and
                                             # CUDA-graphed, against float64 on the CPU

It first prints what decides the precision on this machine: the CPU's model and flags
(avx512_bf16 / amx_bf16: native bf16), torch's view of the CPU, the GPU and its compute
capability, and what --amp auto picks. Rows: "reference" (the seed's step), "default"
(what `python cyclegan.py` does here, labelled with the precision --amp auto chose),
and options joined by "+": fp32 / bf16 / fp16, channels_last, compile or cudagraphs
(torch.compile mode reduce-overhead, CUDA only; skipped with a note elsewhere). A row
that is the same configuration as an earlier one (fp32 where auto chose fp32) runs once.

Every row runs in a fresh subprocess (so one row's memory and compiled code cannot
pollute another's): build the four networks as cyclegan.py does, count one step's
FLOPs with FlopCounterMode, warm up (torch.compile's compilation happens there and
is reported separately, never in the timings), then time --iters steps and report
their median. Peak memory is the training steps' own peak: on CPU the process's peak
RSS (VmHWM) after resetting it once warm-up is done, on CUDA max_memory_allocated.
Inference is test.py's translate() on one image of the same size with the row's
options. "cpu%" is the CPU time the row's process got over the wall time times its
threads: well under ~90% means other processes were competing for the cores and the
row's timings are inflated. The exit status is 1 if a row failed.
"""
import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


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

# A row is "reference" (the seed's step), "default" (what `python cyclegan.py` does on this
# machine: --amp auto, eager) or options joined by "+": one precision (fp32, bf16, fp16),
# channels_last, and compile (torch.compile's default mode) or cudagraphs (torch.compile
# mode="reduce-overhead", i.e. `cyclegan.py --compile reduce-overhead`: CUDA graphs, CUDA only).
OPTIONS = ("fp32", "bf16", "fp16", "channels_last", "compile", "cudagraphs")
PRECISIONS = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
BEST = "bf16"  # the fastest precision cyclegan.py offers on CPUs with native bf16 and on GPUs
DEFAULT_ROWS = ["reference", "default", "fp32", "bf16", "channels_last", "bf16+channels_last", "compile", "bf16+compile",
                "bf16+cudagraphs"]


def parse_row(row):
    """{'step': 'reference' or 'train_step', 'amp': 'auto', 'none', 'bf16' or 'fp16',
    'channels_last': bool, 'compile': None or torch.compile's mode}"""
    if row in ("reference", "default"):
        return {"step": "reference" if row == "reference" else "train_step", "amp": "none" if row == "reference" else "auto",
                "channels_last": False, "compile": None}
    opts = row.split("+")
    bad = [o for o in opts if o not in OPTIONS]
    precisions = [o for o in opts if o in PRECISIONS]
    if bad or len(set(opts)) != len(opts) or len(precisions) > 1 or {"compile", "cudagraphs"} <= set(opts):
        raise ValueError(f"row {row!r}: use 'reference', 'default' or options from {OPTIONS} joined by '+' "
                         f"(one precision; compile or cudagraphs)")
    mode = "reduce-overhead" if "cudagraphs" in opts else "default" if "compile" in opts else None
    return {"step": "train_step", "amp": PRECISIONS[precisions[0]] if precisions else "none",
            "channels_last": "channels_last" in opts, "compile": mode}


def resolve(cfg, device):
    """The row's configuration with --amp auto replaced by what utils.pick_precision picks here."""
    from utils import pick_precision

    if cfg["amp"] != "auto":
        return cfg
    dtype, _ = pick_precision("auto", device)
    return dict(cfg, amp={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "none"))


def precision_name(amp):
    return "fp32" if amp == "none" else amp


def row_label(row, device):
    """The row's name in the table; the default row says which precision --amp auto chose here."""
    return f"default({precision_name(resolve(parse_row(row), device)['amp'])})" if row == "default" else row


def row_from_options(amp, channels_last, compile_mode):
    """The row of bench.py's --amp (none, bf16, fp16), --channels_last and --compile [MODE]."""
    opts = [precision_name(amp)] + (["channels_last"] if channels_last else [])
    opts += ["cudagraphs"] if compile_mode == "reduce-overhead" else ["compile"] if compile_mode else []
    return "+".join(opts)


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


def build(opt, cfg, device, dtype=torch.float32, pool_size=50):
    """The four networks, optimisers and replay buffers, as cyclegan.py builds them
    (the reference row: the seed's plain Adam), and a batch of inputs. The weights are
    drawn on the CPU, so every device and dtype starts from the same ones."""
    from cyclegan import adam_options
    from models import Discriminator, GeneratorResNet, weights_init_normal
    from utils import ReplayBuffer

    torch.manual_seed(0)
    shape = (3, opt.img_size, opt.img_size)
    nets = [GeneratorResNet(shape, opt.n_residual_blocks), GeneratorResNet(shape, opt.n_residual_blocks),
            Discriminator(shape), Discriminator(shape)]
    for net in nets:
        net.apply(weights_init_normal)
        net.to(device, dtype)
        if cfg["channels_last"]:
            net.to(memory_format=torch.channels_last)
    G_AB, G_BA, D_A, D_B = nets
    adam = dict(lr=2e-4, betas=(0.5, 0.999))
    if cfg["step"] == "train_step":  # cyclegan.py's choice
        adam.update(adam_options(device))
    optimizers = (torch.optim.Adam(list(G_AB.parameters()) + list(G_BA.parameters()), **adam),
                  torch.optim.Adam(D_A.parameters(), **adam), torch.optim.Adam(D_B.parameters(), **adam))
    buffers = (ReplayBuffer(pool_size, seed=1), ReplayBuffer(pool_size, seed=2))
    g = torch.Generator().manual_seed(1)
    real_A = (torch.rand(opt.batch_size, *shape, generator=g) * 2 - 1).to(device, dtype)
    real_B = (torch.rand(opt.batch_size, *shape, generator=g) * 2 - 1).to(device, dtype)
    if cfg["channels_last"]:
        real_A = real_A.contiguous(memory_format=torch.channels_last)
        real_B = real_B.contiguous(memory_format=torch.channels_last)
    return nets, optimizers, buffers, real_A, real_B


def amp_dtype(amp):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def make_step(cfg, nets, optimizers, buffers, real_A, real_B, device):
    """One training step of the (resolved) row, as a function of nothing."""
    from cyclegan import train_step
    from utils import autocast_context

    if cfg["step"] == "reference":
        return lambda: reference_step(real_A, real_B, nets, optimizers, buffers)
    autocast = autocast_context(device, amp_dtype(cfg["amp"]))
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16" else None
    return lambda: train_step(real_A, real_B, nets, optimizers, buffers, 10.0, 5.0, autocast, scaler)


def count_flops(step):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def compile_nets(nets, mode):
    # as cyclegan.py --compile [MODE] does: each network on its own, so the replay buffers,
    # the losses and the optimisers stay outside the compiled (and CUDA-graphed) regions
    return [torch.compile(net, mode=None if mode == "default" else mode) for net in nets]


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


def warmup_steps(cfg, warmup):
    # compiled rows (re)compile in their first steps for each input shape (n and 2n images)
    # and each requires_grad state of the discriminators' weights; CUDA graphs then need a
    # warm-up run and a recording run of each graph before they replay
    return max(warmup, {None: 0, "default": 3, "reduce-overhead": 5}[cfg["compile"]])


def run_row(opt, row):
    """One row, in this (fresh) process: returns a dict of measurements."""
    from models import translate
    device = torch.device(opt.device)
    cfg = resolve(parse_row(row), device)
    nets, optimizers, buffers, real_A, real_B = build(opt, cfg, device)
    eager_nets = nets
    # FLOPs of one step (eager: the same arithmetic as the compiled step); it is also
    # the first warm-up step of the eager rows.
    flops = count_flops(make_step(cfg, eager_nets, optimizers, buffers, real_A, real_B, device))
    if cfg["compile"]:
        nets = compile_nets(nets, cfg["compile"])
    step = make_step(cfg, nets, optimizers, buffers, real_A, real_B, device)
    warm = time_calls(step, warmup_steps(cfg, opt.warmup), device)

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
    dtype = amp_dtype(cfg["amp"]) or torch.float32
    G = eager_nets[0].eval().to(dtype)
    x = real_A[:1].to(dtype)
    G_inf = compile_nets([G], cfg["compile"])[0] if cfg["compile"] else G
    n_warm = 3 if cfg["compile"] else 2
    t = time.perf_counter()
    for _ in range(n_warm):
        translate(G_inf, x)
    sync(device)
    inf_warm = time.perf_counter() - t
    inf_times = time_calls(lambda: translate(G_inf, x), max(3, opt.iters), device)
    inf_ms = 1000 * median(inf_times)
    if cfg["compile"]:
        compile_s += max(0.0, inf_warm - n_warm * inf_ms / 1000)
    return {"row": row, "label": row_label(row, device), "amp": cfg["amp"], "s_it": s_it, "times": times, "flops": flops,
            "peak_mem_mib": peak_mem, "peak_alloc_mib": peak_alloc, "compile_s": compile_s, "inf_ms": inf_ms,
            "cpu_share": cpu_share, "load": os.getloadavg()[0], "threads": torch.get_num_threads()}


def profile_row(opt, row, top=15):
    """The top operators (self time) of one warm step of `row`."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(opt.device)
    cfg = resolve(parse_row(row), device)
    nets, optimizers, buffers, real_A, real_B = build(opt, cfg, device)
    if cfg["compile"]:
        nets = compile_nets(nets, cfg["compile"])
    step = make_step(cfg, nets, optimizers, buffers, real_A, real_B, device)
    for _ in range(max(1, warmup_steps(cfg, opt.warmup))):
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
# What decides the precision here

# x86 flags that decide how fast each precision is (aarch64's where the machine is one)
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
PRECISION_FLAGS_ARM = ("asimd", "sve", "bf16", "i8mm")


def describe_hardware(device):
    """Lines saying what decides the precision here: the CPU's model and instruction-set
    flags, torch's own view of the CPU, the GPU and its compute capability, and what
    --amp auto (utils.pick_precision) picks on this device."""
    import platform

    from utils import NATIVE_BF16_FLAGS, cpu_info, pick_precision

    name, flags = cpu_info()
    wanted = PRECISION_FLAGS_ARM if platform.machine() in ("aarch64", "arm64") else PRECISION_FLAGS
    shown = " ".join(f if f in flags else f"-{f}" for f in wanted) if flags else "unknown (no /proc/cpuinfo)"
    try:
        onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        onednn_bf16 = "?"
    lines = [f"CPU: {name}; {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads",
             f"CPU flags: {shown}  ('-': absent)",
             f"torch's view: CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 supported: {onednn_bf16} "
             f"(without {' or '.join(NATIVE_BF16_FLAGS)} that bf16 is emulated, slower than fp32)"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.device_count()} GPU(s)")
        why = "bf16 needs compute capability >= 8.0"
    else:
        native = [f for f in NATIVE_BF16_FLAGS if f in flags]
        why = f"native bf16: {', '.join(native)}" if native else f"no {' or '.join(NATIVE_BF16_FLAGS)}: bf16 would be emulated"
    dtype, _ = pick_precision("auto", device)
    lines.append(f"--amp auto (cyclegan.py's and test.py's default) picks here, on {device.type}: "
                 f"{precision_name({torch.bfloat16: 'bf16'}.get(dtype, 'none'))} ({why})")
    return lines


# -----------------------------------------------------------------------------
# The same steps on another device, in another precision, compiled

# (losses, gradients): the relative errors against float64 a step may have (see equivalence())
FP32_TOL = (1e-4, 0.2)
BF16_TOL = (5e-2, 1.0)


def conv_tf32():
    """Whether cuDNN computes fp32 convolutions in TF32 (PyTorch's default on GPUs that have it)."""
    if hasattr(torch.backends.cudnn, "conv"):
        return torch.backends.cudnn.conv.fp32_precision == "tf32"
    return torch.backends.cudnn.allow_tf32


def set_conv_tf32(on):
    """cuDNN's fp32 convolutions in TF32 (PyTorch's default) or in full fp32."""
    if hasattr(torch.backends.cudnn, "conv"):
        torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = on


def training_state(nets, optimizers, buffers):
    return copy.deepcopy(([n.state_dict() for n in nets], [o.state_dict() for o in optimizers],
                          [b.state_dict() for b in buffers]))


def load_training_state(state, nets, optimizers, buffers, device, dtype):
    """Copy a state into the networks in place (compiled code and CUDA graphs keep their
    tensors); Adam's state and the buffers' images are cast to this run's dtype."""
    state = copy.deepcopy(state)
    for net, s in zip(nets, state[0]):
        net.load_state_dict(s)
    for optimizer, s in zip(optimizers, state[1]):
        optimizer.load_state_dict(s)
    for buffer, s in zip(buffers, state[2]):
        buffer.load_state_dict(dict(s, data=[d.to(dtype) for d in s["data"]]), device)


def run_steps(opt, device, dtype=torch.float32, amp="none", compile_mode=None, tf32=False, states=None):
    """opt.equivalence_steps training steps from build()'s weights and inputs, with replay
    buffers of one image. With `states` (the training state before each step of another
    run), every step starts from that run's state. Returns (the training state before each
    step, the losses of each step [steps, 7], each step's gradients: a list of 4 vectors),
    as float64 on the CPU."""
    if device.type == "cuda":
        set_conv_tf32(tf32)
        torch.backends.cudnn.benchmark = True  # as cyclegan.py: cuDNN picks its fastest algorithms
    cfg = {"step": "train_step", "amp": amp, "channels_last": False, "compile": compile_mode}
    nets, optimizers, buffers, real_A, real_B = build(opt, cfg, device, dtype, pool_size=1)
    step = make_step(cfg, compile_nets(nets, compile_mode) if compile_mode else nets, optimizers, buffers, real_A, real_B, device)
    before, losses, grads = [], [], []
    for k in range(opt.equivalence_steps):
        if states is not None:
            load_training_state(states[k], nets, optimizers, buffers, device, dtype)
        else:
            before.append(training_state(nets, optimizers, buffers))
        losses.append(torch.stack(list(step().values())).double().cpu())
        grads.append([torch.cat([p.grad.flatten() for p in net.parameters()]).double().cpu() for net in nets])
    return before, torch.stack(losses), grads


def errors(run, ref):
    """(largest relative difference of the losses, largest relative L2 difference of a
    network's gradient), over all steps"""
    (_, la, ga), (_, lb, gb) = run, ref
    grad_err = max(float((a - b).norm() / b.norm()) for sa, sb in zip(ga, gb) for a, b in zip(sa, sb))
    return float(((la - lb).abs() / lb.abs().clamp_min(1e-3)).max()), grad_err


def equivalence(opt):
    """A few training steps on --device, eager and (with --compile MODE) compiled, against
    the same steps in float64 on the CPU, from the same weights and inputs; PASS or FAIL
    per variant, and exit status 1 if any failed.

    Every step starts from the float64 run's training state before that step (weights,
    Adam's moments, replay buffers), copied in place, and is compared on its seven losses
    and the four networks' gradients. (Free-running runs would not do: Adam's first steps
    move each weight by about +-lr whatever the gradient's size, so rounding-level
    differences grow to several percent within four GAN steps, even between fp32 and
    float64 on one CPU.) The replay buffers hold one image, so the discriminators also see
    stored fakes. With CUDA graphs the first steps warm up and record, the later ones
    replay: a graph whose inputs or outputs went stale would show.

    Tolerances (losses, gradients), relative to float64. Losses, fp32: they are smooth
    functions of the weights, and fp32 on a CPU is ~2e-6 off; other fp32 kernels (cuDNN's
    algorithms, Inductor's fused code) sum in other orders, so 1e-4 leaves ~50x that. The
    gradients are not smooth: ReLU's derivative and an L1 loss's are steps, and an
    activation or pixel within rounding of the step flips its contribution, which then
    reaches every layer below. Measured on a CPU at 32x32 (3 steps, 6 states): relative
    changes of 1e-6 to the weights change even float64 gradients by up to 1.2e-2, and fp32
    is up to 4.7e-2 off float64. fp32 gradients: 0.2, while a network fed a wrong image (a
    stale CUDA-graph output) or a wrong backward pass is off by ~1. bf16 keeps 8
    significant bits: losses ~1e-2 off, gradients 10-40% (cosine 0.9-0.99 to float64):
    (5e-2, 1.0) is a sanity bound (a gradient of 0 is off by 1). CUDA's default fp32
    convolutions use TF32 (inputs rounded to 11 significant bits, fp32 sums): each error
    must be at most bf16 autocast's on the same GPU."""
    device = torch.device(opt.device)
    mode = opt.compile
    print(f"equivalence: {opt.equivalence_steps} training steps, {opt.img_size}x{opt.img_size}, {opt.n_residual_blocks} "
          f"residual blocks, batch {opt.batch_size}, replay buffers of 1 image, each step from the float64 run's state; "
          f"errors against float64 on the CPU (losses: largest relative difference; gradients: largest relative L2 "
          f"difference of a network's gradient)")
    t = time.perf_counter()
    ref = run_steps(opt, torch.device("cpu"), torch.float64)
    print(f"  float64 on the CPU: {time.perf_counter() - t:.1f} s")
    variants = [("cpu fp32", dict(device=torch.device("cpu")), FP32_TOL)]
    if device.type == "cuda":
        variants += [(f"{device} fp32 (TF32 off)", dict(device=device), FP32_TOL),
                     (f"{device} bf16 autocast", dict(device=device, amp="bf16"), BF16_TOL),
                     (f"{device} fp32, TF32 convolutions (PyTorch's default)", dict(device=device, tf32=True), "bf16")]
    if mode:
        variants.append((f"{device} fp32 compiled, mode {mode}" + (" (TF32 off)" if device.type == "cuda" else ""),
                         dict(device=device, compile_mode=mode), FP32_TOL))
    failed, found = [], {}
    print(f"  {'variant':54s} {'losses':>8s} {'(tol)':>8s} {'gradients':>9s} {'(tol)':>8s}")
    for name, kwargs, tol in variants:
        t = time.perf_counter()
        try:
            found[name] = run_steps(opt, states=ref[0], **kwargs)
        except Exception as e:  # a variant that cannot run is a failure; the others still run
            print(f"  {name:54s} FAIL ({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})")
            failed.append(name)
            continue
        err = errors(found[name], ref)
        if tol == "bf16":  # TF32: bounded by bf16 autocast on the same device
            bf16 = f"{device} bf16 autocast"
            tol = errors(found[bf16], ref) if bf16 in found else BF16_TOL
        ok = err[0] <= tol[0] and err[1] <= tol[1]
        failed += [] if ok else [name]
        print(f"  {name:54s} {err[0]:8.1e} {tol[0]:8.1e} {err[1]:9.1e} {tol[1]:8.1e}  {'PASS' if ok else 'FAIL'}  "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
    compiled = [n for n in found if "compiled" in n]
    eager = f"{device} fp32 (TF32 off)" if device.type == "cuda" else "cpu fp32"
    if compiled and eager in found:
        err_loss, err_grad = errors(found[compiled[0]], found[eager])
        print(f"  compiled vs eager on {device}, directly: losses {err_loss:.1e}, gradients {err_grad:.1e}")
    print(f"equivalence: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
    if failed:
        sys.exit(1)


# -----------------------------------------------------------------------------
# The hardware's peak

def emulated_bf16(device):
    """True on a CPU without native bf16 instructions: bf16 runs there, emulated, many
    times slower than fp32 (utils.pick_precision warns about an explicit --amp bf16)."""
    from utils import pick_precision

    return device.type == "cpu" and pick_precision("bf16", device)[1] is not None


def hardware_peak(device, dtypes):
    """GFLOP/s of a large matmul and of a 3x3 256->256 convolution at the residual
    blocks' size (NCHW and channels_last), each dtype. Where bf16 is emulated the sizes
    are small (it runs at ~1% of fp32's rate there: seconds, not minutes)."""
    out = []

    def best_of(fn, flop, reps=5):
        t = time_calls(fn, 1, device)[0]
        if t < 0.5:  # the first call warms up; time the next ones
            t = median(time_calls(fn, reps, device))
        return flop / t / 1e9

    with torch.no_grad():
        for dt in dtypes:
            small = dt != torch.float32 and emulated_bf16(device)
            n = 4096 if device.type == "cuda" else 512 if small else 2048
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            out.append((f"matmul {n}^3 {str(dt)[6:]}", best_of(lambda: a @ b, 2 * n**3)))
        for dt in dtypes:
            hw = 8 if dt != torch.float32 and emulated_bf16(device) else 64
            for cl in (False, True):
                x = torch.randn(2, 256, hw + 2, hw + 2, device=device, dtype=dt)
                w = torch.randn(256, 256, 3, 3, device=device, dtype=dt)
                if cl:
                    x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
                flop = 2 * 2 * 256 * 256 * 9 * hw * hw
                tf32 = " (TF32)" if device.type == "cuda" and dt == torch.float32 and conv_tf32() else ""
                out.append((f"conv3x3 256ch {hw}x{hw} {str(dt)[6:]}{tf32} {'channels_last' if cl else 'NCHW'}",
                            best_of(lambda: F.conv2d(x, w), flop)))
    return out


# -----------------------------------------------------------------------------
# Quality parity

def quality(opt, rows):
    """Train on the built-in day->night data for a fixed budget with each row's
    options (cyclegan.py, same seeds), translate testA with G_AB (test.py --amp none) and
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
            flags = (["--amp", cfg["amp"]] if cfg["amp"] != "auto" else []) + \
                (["--compile", cfg["compile"]] if cfg["compile"] else [])
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
                                    "--output_dir", "out", "--device", opt.device.split(":")[0], "--amp", "none"],
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
    cfg = resolve(parse_row("default"), device)
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
    """images/s of the default step (--amp auto) with 1 and with --nproc processes (torchrun, DDP),
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
          f"{opt.n_residual_blocks} blocks, batch {opt.batch_size} per process, {opt.device}, "
          f"{row_label('default', torch.device(opt.device))})")


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
                   help="untimed iterations per row after the FLOP-counting one (at least 3 for compiled rows, 5 with "
                        "CUDA graphs: compilation and graph recording happen there)")
    p.add_argument("--amp", default=None, choices=("auto", "none", "bf16", "fp16"),
                   help="bench reference, default and this configuration only")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=("default", "reduce-overhead"),
                   help="(with --amp / --channels_last) the configuration is compiled; reduce-overhead: with CUDA graphs "
                        "(--equivalence: also check the step compiled in this mode)")
    p.add_argument("--channels_last", action="store_true", help="(with --amp / --compile) the configuration uses channels_last")
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default: {','.join(DEFAULT_ROWS)})")
    p.add_argument("--no_profile", action="store_true", help="skip the top operators of one step of the reference and the fastest row")
    p.add_argument("--no_peak", action="store_true", help="skip the hardware peak measurement")
    p.add_argument("--warm_compile_cache", action="store_true",
                   help="let compiled rows use torch.compile's on-disk cache (default: an empty one, so 'compile s' is a first run's)")
    p.add_argument("--quality", action="store_true", help=f"quality parity instead: short trainings in fp32 and with {BEST}")
    p.add_argument("--quality_rows", default=f"fp32,{BEST}")
    p.add_argument("--quality_train", type=int, default=100, help="--quality: training images per domain")
    p.add_argument("--quality_test", type=int, default=20, help="--quality: paired test images")
    p.add_argument("--quality_epochs", type=int, default=3)
    p.add_argument("--quality_seeds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=None, help="multi-process mode: images/s of DDP with 1 and N processes, and the scaling efficiency")
    p.add_argument("--equivalence", action="store_true",
                   help="instead of timing: the step on --device (and compiled, with --compile MODE) against float64 on the CPU")
    p.add_argument("--equivalence_steps", type=int, default=4)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def plan_rows(rows, device, explicit=True):
    """The rows to run, each configuration once (reference, default, then the others in
    their order); and notes on the rows left out (the same configuration as an earlier
    row; CUDA graphs off CUDA; unless asked for by name, bf16 where it is emulated)."""
    from utils import die

    run, seen, notes = [], {}, []
    if not explicit and emulated_bf16(device):
        slow = [r for r in rows if "bf16" in r.split("+")]
        rows = [r for r in rows if r not in slow]
        if slow:
            notes.append(f"{', '.join(slow)}: skipped: this CPU has no native bf16 (avx512_bf16, amx_bf16), so bf16 is "
                         f"emulated, many times slower than fp32 (see the hardware peak); --rows {slow[0]} runs it anyway")
    # the seed's step first, then the configuration `python cyclegan.py` runs, then the rest
    for row in dict.fromkeys(["reference"] + [r for r in rows if r == "default"] + rows):
        try:
            cfg = resolve(parse_row(row), device)
        except ValueError as e:
            die(f"--rows: {e}")
        key = tuple(sorted(cfg.items()))
        if cfg["compile"] == "reduce-overhead" and device.type != "cuda":
            notes.append(f"{row}: skipped: CUDA graphs (torch.compile mode reduce-overhead) need a CUDA device; on the "
                         f"CPU `cyclegan.py --compile reduce-overhead` runs as plain --compile (the 'compile' rows)")
        elif key in seen:
            notes.append(f"{row}: the same configuration as {seen[key]}, measured once")
        else:
            seen[key] = row_label(row, device)
            run.append(row)
    return run, notes


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
    if opt.equivalence:
        print("\n".join(describe_hardware(device)))
        equivalence(opt)
        return
    if opt.quality:
        if opt.n_residual_blocks == 9 and "--n_residual_blocks" not in (argv if argv is not None else sys.argv):
            opt.n_residual_blocks = 3  # a short budget; pass --n_residual_blocks to change
        quality(opt, opt.quality_rows.split(","))
        return

    if opt.rows:
        rows = opt.rows.split(",")
    elif opt.amp is not None or opt.compile or opt.channels_last:
        amp = resolve({"amp": opt.amp or "auto"}, device)["amp"]
        rows = ["default", row_from_options(amp, opt.channels_last, opt.compile)]
    else:
        rows = DEFAULT_ROWS
    rows, notes = plan_rows(rows, device, explicit=opt.rows is not None or opt.amp is not None)

    print(f"torch {torch.__version__}; {opt.img_size}x{opt.img_size}, {opt.n_residual_blocks} residual blocks, batch "
          f"{opt.batch_size}; median of {opt.iters} steps after {opt.warmup + 1} warm-up steps (compiled rows: more); "
          f"load average {os.getloadavg()[0]:.2f}")
    print("\n".join(describe_hardware(device)))
    peaks = {}
    if not opt.no_peak:
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
        print("\nhardware peak (measured):")
        for what, gflops in hardware_peak(device, dtypes):
            peaks[what] = gflops
            print(f"  {what:44s} {gflops:8.1f} GFLOP/s")

    results, failed = [], []
    base_args = [f"--img_size={opt.img_size}", f"--n_residual_blocks={opt.n_residual_blocks}", f"--batch_size={opt.batch_size}",
                 f"--device={opt.device}", f"--iters={opt.iters}", f"--warmup={opt.warmup}"]
    here = os.path.abspath(__file__)
    print()
    for note in notes:
        print(note)
    for row in rows:
        print(f"running {row_label(row, device)} ...", end=" ", flush=True)
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
            failed.append(row)
            continue
        res = json.loads(line[len("BENCH_RESULT "):])
        print(f"{res['s_it']:#.4g} s/it (steps: {', '.join(f'{t:#.4g}' for t in res['times'])}; load {res['load']:.2f})", flush=True)
        results.append(res)
    if not results:
        raise SystemExit("no row ran")
    print_table(results, opt, peaks)

    if not opt.no_profile:
        fastest = min(results, key=lambda r: r["s_it"])["row"]
        for row in dict.fromkeys(["reference", fastest]):
            print(f"\ntop operators of one {row_label(row, device)} step ({opt.img_size}x{opt.img_size}):")
            r = subprocess.run([sys.executable, here, *base_args, f"--_worker=profile:{row}"], capture_output=True, text=True)
            print(r.stdout if r.returncode == 0 else f"failed:\n{r.stderr[-3000:]}")
    if failed:
        print(f"\nfailed rows: {', '.join(failed)}")
        sys.exit(1)


def print_table(results, opt, peaks):
    ref = next((r for r in results if r["row"] == "reference"), results[0])
    cuda = opt.device.startswith("cuda")
    mem1, mem2 = ("reserved", "allocated") if cuda else ("peak RSS", "peak heap")
    head = (f"{'row':30s} {'s/it':>8s} {'img/s':>6s} {'TFLOP/s':>7s} {'vs ref':>6s} {mem1 + ' MiB':>13s} {mem2 + ' MiB':>14s} "
            f"{'infer ms':>9s} {'vs ref':>6s} {'compile s':>9s} {'cpu%':>5s}")
    flops = ", ".join(dict.fromkeys(f"{r['flops'] / 1e12:.3f} {r['label']}" for r in results
                                    if r["row"] in ("reference", "default", "fp32")))
    print(f"\ntraining step, TFLOP per iteration: {flops} (the reference also computes the discriminators' weight "
          f"gradients in the generator update)")
    if cuda:
        print("memory: max_memory_reserved / max_memory_allocated of the timed steps")
        if conv_tf32():
            print("fp32 rows: cuDNN computes their convolutions in TF32 (PyTorch's default; see --equivalence)")
    else:
        print("memory: peak RSS (VmHWM) of the timed steps; peak heap: glibc's in-use bytes sampled every 1 ms during one "
              "more step (the tensors' own peak, without what the allocator freed but kept)")
    print("inference: test.py's translate() of one image of this size, with the row's options (--amp: weights cast once)")
    print("default(...): what `python cyclegan.py` does here (--amp auto, eager), with the precision auto chose")
    print(head)
    print("-" * len(head))
    for r in results:
        tflops = r["flops"] / r["s_it"] / 1e12
        print(f"{r['label']:30s} {r['s_it']:#8.4g} {opt.batch_size / r['s_it']:6.2f} {tflops:7.3f} {ref['s_it'] / r['s_it']:5.2f}x "
              f"{r['peak_mem_mib']:13.0f} {r['peak_alloc_mib']:14.0f} {r['inf_ms']:9.1f} {ref['inf_ms'] / r['inf_ms']:5.2f}x "
              f"{r['compile_s']:9.1f} {100 * r['cpu_share']:4.0f}%")
    conv = {k: v for k, v in peaks.items() if k.startswith("conv")}
    if conv:
        best = min(results, key=lambda r: r["s_it"])
        f32 = max(v for k, v in conv.items() if "float32" in k)
        low = max((v for k, v in conv.items() if "float32" not in k), default=f32)
        best_peak = low if best["amp"] != "none" else f32
        print(f"\nroofline: convolutions are ~all of the step's FLOPs (see the profiles below). At the best measured "
              f"conv rate a step of {ref['flops'] / 1e12:.3f} TFLOP takes at least {ref['flops'] / f32 / 1e9:.2f} s in fp32 "
              f"and {ref['flops'] / low / 1e9:.2f} s in 16 bits: at most {ref['s_it'] * max(f32, low) * 1e9 / ref['flops']:.2f}x "
              f"the reference, which runs at {100 * ref['flops'] / ref['s_it'] / 1e9 / f32:.0f}% of the fp32 conv rate. "
              f"Fastest row ({best['label']}, {ref['s_it'] / best['s_it']:.2f}x): "
              f"{100 * best['flops'] / best['s_it'] / 1e9 / best_peak:.0f}% of its precision's conv rate.")


if __name__ == "__main__":
    main()
