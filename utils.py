"""
Small pieces of the training recipe: the fake-image replay buffer, the linear
learning-rate decay, the atomic, safe checkpoint I/O every script uses, the full
training state that --resume continues from, the stop signal, the run folder's lock, the
choice of device and precision, and output that reaches a log file line by line.
"""
import argparse
import os
import pickle
import platform
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import nullcontext

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist


class ReplayBuffer:
    """Shrivastava et al.'s image history: the discriminators see a mix of the
    newest fakes and fakes from up to `max_size` earlier steps, which keeps the
    generators from chasing a discriminator that only knows the latest fakes.

    Once full, each new image replaces a random stored one with probability 0.5,
    and the stored one is returned in its place. The buffer owns its random
    generator so that its draws can be saved and resumed exactly."""

    def __init__(self, max_size=50, seed=None):
        if max_size < 0:
            raise ValueError(f"ReplayBuffer max_size must be >= 0, got {max_size}")
        self.max_size = max_size  # 0: no buffer, the newest fakes pass straight through
        self.data = []
        self.rng = random.Random(seed)

    def push_and_pop(self, data):
        if self.max_size == 0:
            return data.detach()
        to_return = []
        for element in data.detach():
            # a copy: a view would keep the whole batch it was cut from alive (in memory and in last.pt)
            element = element.unsqueeze(0).clone()
            if len(self.data) < self.max_size:
                self.data.append(element)
                to_return.append(element)
            elif self.rng.uniform(0, 1) > 0.5:
                i = self.rng.randint(0, self.max_size - 1)
                to_return.append(self.data[i])
                self.data[i] = element
            else:
                to_return.append(element)
        return torch.cat(to_return)

    def state_dict(self):
        return {"max_size": self.max_size, "data": [d.cpu() for d in self.data], "rng": self.rng.getstate()}

    def load_state_dict(self, state, device="cpu"):
        self.max_size = state["max_size"]
        self.data = [d.to(device) for d in state["data"]]
        self.rng.setstate(_as_random_state(state["rng"]))


def _as_random_state(state):
    # random.getstate() is a tuple of (int, tuple, None); a round trip through
    # torch.save with weights_only=True turns the inner tuple into a list.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class LambdaLR:
    """Linear decay as the paper: the rate stays at its initial value until
    `decay_start_epoch`, then falls linearly to 0 at `n_epochs`. `offset` is the
    epoch training (re)starts from, so a resumed run continues the same curve."""

    def __init__(self, n_epochs, offset, decay_start_epoch):
        if decay_start_epoch >= n_epochs:
            raise ValueError(
                f"--decay_epoch ({decay_start_epoch}) must be smaller than --n_epochs ({n_epochs}): "
                f"the learning rate decays linearly to 0 between them"
            )
        self.n_epochs = n_epochs
        self.offset = offset
        self.decay_start_epoch = decay_start_epoch

    def step(self, epoch):
        return 1.0 - max(0, epoch + self.offset - self.decay_start_epoch) / (self.n_epochs - self.decay_start_epoch)


class BudgetLR:
    """The learning-rate factor of a run of `total` iterations (--budget), stepped once per
    iteration: a linear warm-up over the first `warmup` fraction, constant, then a linear
    decay to 0 over the last `decay` fraction. (The seed's LambdaLR is in epochs, and a short
    run never reaches its --decay_epoch.)"""

    def __init__(self, total, warmup=0.0, decay=0.5):
        self.total = total
        self.warmup_iters, self.decay_iters = round(warmup * total), round(decay * total)

    def step(self, iteration):
        factor = 1.0
        if self.warmup_iters > 0:
            factor = min(factor, (iteration + 1) / self.warmup_iters)
        if self.decay_iters > 0:
            factor = min(factor, (self.total - iteration) / self.decay_iters)
        return max(factor, 0.0)


def parse_budget(text):
    """--budget: ('seconds', s) for 90s, 45min, 1.5h; ('iterations', n) for a plain number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|min|m|h)?\s*", text or "")
    if not m or float(m.group(1)) <= 0 or (m.group(2) is None and not m.group(1).isdigit()):
        raise ValueError(f"{text!r} is neither a time (90s, 45min, 1.5h) nor a whole number of iterations")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        return "iterations", int(value)
    return "seconds", value * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]


def ema_decay(decay, iteration):
    """The decay of the average's update after `iteration` (0-based) steps: `decay`, held lower
    at first, min(decay, (1 + t) / (10 + t)) as TensorFlow's ExponentialMovingAverage with
    num_updates, so that a short run's average is not mostly its random (or identity) start:
    with 0.999 alone, 700 steps leave half the weight on the start; with the warm-up the
    average spans about the last ninth of the run until DECAY takes over (step 9000 for 0.999)."""
    return min(decay, (1 + iteration) / (10 + iteration))


@torch.no_grad()
def update_ema(ema, nets, decay):
    """ema <- decay * ema + (1 - decay) * weights, for each generator in `ema` ({name: copy})."""
    for name, ema_net in ema.items():
        for e, p in zip(ema_net.parameters(), nets[name].parameters()):
            e.lerp_(p.detach(), 1.0 - decay)


def die(msg):
    """Stop with one clear line instead of a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def first_line(e, limit=200):
    """The first line of an exception's message, cut to `limit` characters ('' if it has
    none): a library's multi-line message would otherwise break the one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else ""


def write_atomic(path, write, hint="the previous one, if any, is intact", required=True, passes=()):
    """The one way every script writes a file: write(f) fills a temporary file in the same
    folder (f is open in binary mode; f.name is its path, with the same extension, for
    writers that want a path), which is fsynced and renamed over `path`, so a crash or a
    full disk mid-write leaves the old file intact and no half file under the name.
    A failed write (full disk, quota, file size limit; torch reports some as RuntimeError)
    stops with one line naming the file, the space it needed and the space free, then
    `hint`; with required=False it prints that as a warning and returns False instead.
    Errors of the types in `passes` (and out of memory) are not write errors: they are raised."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; an output is an ordinary file
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:
        if isinstance(e, (torch.OutOfMemoryError, *passes)):
            raise
        written = os.path.getsize(tmp) if tmp and os.path.exists(tmp) else 0
        old = os.path.getsize(path) if os.path.isfile(path) else 0
        msg = write_failed(path, e, max(written, old), hint)
        if required:
            die(msg)
        print(f"warning: {msg}", file=sys.stderr)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return True


def write_failed(path, e, needed, hint):
    """The one line for a write that failed: the file, the error, the space needed and free."""
    try:
        free = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    size = f"{needed / 2**20:.1f} MiB" if needed >= 2**20 else f"{max(1, round(needed / 2**10))} KiB"
    return f"could not write {path} ({type(e).__name__}: {first}); it needs at least {size}, {free}; {hint}"


def save_atomic(obj, path, hint="the previous one, if any, is intact"):
    """torch.save through write_atomic."""
    return write_atomic(path, lambda f: torch.save(obj, f), hint)


def write_text_atomic(path, text):
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(folder, flag):
    """Stop with one line, before any work, when `folder` cannot be created or written:
    its nearest existing ancestor must be a writable folder (a read-only file system
    counts; a file in the way too, which fails even for root)."""
    folder = os.path.abspath(folder)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        die(f"{flag}: cannot write to {folder}: {existing} is a file, not a folder; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        die(f"{flag}: cannot write to {folder}: {existing} is not writable (read-only folder or file system); "
            f"choose another folder or make it writable")


def hold_run_folder(folder):
    """An advisory lock (flock) on folder/.lock, held while the returned file is open: two runs
    started at once with the same name would otherwise both pass the "this folder already holds
    a run" check and write into one folder. The kernel releases it when the process ends,
    however it ends, so a crash or SIGKILL leaves no stale lock. Another holder: one line naming
    it."""
    if fcntl is None:
        print(f"note: no fcntl on this platform: nothing stops a second run from writing into {folder} at the same time",
              file=sys.stderr)
        return nullcontext()
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(f)
        f.close()
        die(f"{folder} is in use by another run ({holder}); wait for it to end, or start this one with "
            f"another --dataset_name")
    f.seek(0)
    f.truncate()
    command = " ".join(["python"] + [os.path.basename(sys.argv[0])] + sys.argv[1:]) if sys.argv and sys.argv[0] else "python"
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command[:200]}\n")
    f.flush()
    HELD_LOCKS[:] = [held for held in HELD_LOCKS if not held.closed] + [f]
    return f


HELD_LOCKS = []  # the run folders' lock files this process holds


def let_go_of_held_locks():
    """In a forked child (a data-loading worker): its copy of a lock's file descriptor would
    keep the run folder locked after a SIGKILLed parent, until the worker noticed and ended.
    The descriptor becomes /dev/null instead (closing it would let its number be reused under
    the file object's feet)."""
    for f in HELD_LOCKS:
        if not f.closed:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, f.fileno())
            os.close(null)
    HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=let_go_of_held_locks)


def lock_holder(f):
    """What the holder of a run folder's lock wrote of itself. It writes just after it locks, so
    a reader may come in between and see nothing, or the previous holder's words: it looks
    again for up to a second until it reads a process that is alive."""
    for _ in range(10):
        f.seek(0)
        text = f.read().strip()
        pid = re.match(r"pid (\d+) on (\S+)", text)
        if pid and (pid[2] != socket.gethostname() or process_alive(int(pid[1]))):
            return text
        time.sleep(0.1)
    return text or "a process that has not said which"


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def print_lines_as_they_come():
    """Every line a script prints reaches a file or pipe when it is printed: Python holds back
    about 8 KB of standard output that is not a terminal, so `nohup python cyclegan.py > log &`
    would show nothing for minutes."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def clean_killed_saves(folder):
    """The temporary files write_atomic leaves behind when it is killed midway."""
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if f.startswith(".tmp-"):
                os.remove(os.path.join(folder, f))


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True, and one clear line for every way it can
    fail: missing file, truncated file, or a pickle that wants to run code."""
    path = str(path)
    if not os.path.isfile(path):
        die(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        die(
            f"checkpoint {path} was refused: it needs arbitrary code to unpickle "
            f"(weights_only=True), so it is not a plain state_dict; re-save it as one "
            f"only if you trust its source ({first_line(e)})"
        )
    except Exception as e:  # truncated or not a torch file at all
        die(f"checkpoint {path} could not be read ({type(e).__name__}: {first_line(e)}); is it a complete .pth file?")


# -----------------------------------------------------------------------------
# The full training state (last.pt): everything --resume needs to continue exactly

def rng_state():
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": (version, list(internal), gauss),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(_as_random_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite_weights(nets, iteration, model_dir):
    """Stop before non-finite weights are written anywhere (over a good last.pt, or as a .pth);
    `iteration` is the last one done."""
    broken = [name for name, net in nets.items() if not all(bool(torch.isfinite(p).all()) for p in net.parameters())]
    if broken:
        die(f"the weights of {', '.join(broken)} became non-finite by iteration {iteration}; not saving them "
            f"(the last good state is {model_dir}/last.pt). Try a lower --lr or --amp none")


class TrainingState:
    """Everything --resume needs to continue a run exactly, under one name: the networks,
    their optimizers and learning-rate schedulers, the replay buffers, the GradScaler (fp16),
    the position (epoch, and batch within it, to continue from), the moving averages of the
    generators' weights (--ema; what is published as G_*.pth, while the raw weights go on
    training), and what the run carries beside them: the best FID of each generator so far
    (best_G_*.pth), and the device type
    and precision it trained in, which a resume is compared with, and the algorithm (a
    CycleGAN run is not continued as a CUT one). state_dict() is the content of last.pt (with
    the arguments and the RNG states); load_state_dict() restores it. Under DDP every process
    holds its own replay buffers: save() gathers them."""

    def __init__(self, opt, nets, optimizers, schedulers, buffers, scaler=None, device_type="cpu", precision="fp32", ema=None,
                 algorithm="CycleGAN"):
        self.opt, self.nets, self.optimizers, self.schedulers = opt, nets, optimizers, schedulers
        self.ema = ema or {}  # {"G_AB": averaged copy, "G_BA": ...}, or {} without --ema
        # {"fake_A": ReplayBuffer, "fake_B": ReplayBuffer} (CycleGAN), {"fake_B": ...} (CUT): saved in this order
        self.buffers, self.scaler = buffers, scaler
        self.algorithm = algorithm
        self.epoch, self.batch = opt.epoch, 0
        self.best_fid = {}
        self.device_type, self.precision = device_type, precision

    def published(self):
        """The networks as the run publishes them (G_*.pth, evaluations, sample grids):
        the averaged generators where --ema keeps them, the raw ones otherwise."""
        return {**self.nets, **self.ema}

    def buffer_states(self):
        return tuple(buffer.state_dict() for buffer in self.buffers.values())

    def state_dict(self, replay_buffers=None):
        """`replay_buffers`: the buffer states (fake_A, fake_B) of every process (DDP); by
        default this process's alone."""
        state = {"args": vars(self.opt), "algorithm": self.algorithm, "epoch": self.epoch, "batch": self.batch, "rng": rng_state(),
                 "replay_buffers": replay_buffers or [self.buffer_states()],
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "best_fid": self.best_fid, "device_type": self.device_type, "precision": self.precision}
        state.update({name: net.state_dict() for name, net in self.nets.items()})
        state.update({"ema_" + name: net.state_dict() for name, net in self.ema.items()})
        state.update({name: o.state_dict() for name, o in self.optimizers.items()})
        state.update({"scheduler_" + name: s.state_dict() for name, s in self.schedulers.items()})
        return state

    def load_state_dict(self, state, optimizer_options=None, rank=0, world_size=1, device="cpu"):
        """`optimizer_options` (fused/foreach) are those of the device in use now: a state saved
        on CUDA would otherwise carry fused=True into a CPU optimizer."""
        for name, net in self.nets.items():
            net.load_state_dict(state[name])
        for name, net in self.ema.items():
            net.load_state_dict(state["ema_" + name])
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])
            for group in o.param_groups:
                group.update(optimizer_options or {})
        for name, s in self.schedulers.items():
            s.load_state_dict(state["scheduler_" + name])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        saved_buffers = state["replay_buffers"]  # one tuple of buffer states per process of the saved run
        if len(saved_buffers) != world_size and state["batch"] != 0:
            die(f"--resume: last.pt was saved mid-epoch by {len(saved_buffers)} process(es), and this run has {world_size}; "
                f"the rest of that epoch cannot be split the same way. Resume with {len(saved_buffers)} process(es), "
                f"or from a last.pt saved at the end of an epoch")
        for buffer, saved in zip(self.buffers.values(), saved_buffers[rank % len(saved_buffers)], strict=True):  # round robin if fewer
            buffer.load_state_dict(saved, device)
        set_rng_state(state["rng"])
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.best_fid = dict(state.get("best_fid", {}))

    def save(self, path, group=None):
        """Write `path` (last.pt) atomically. Under DDP every process calls this (each hands
        over its replay buffers, over the CPU `group`) and rank 0 writes."""
        replay_buffers = None
        if dist.is_initialized():
            replay_buffers = [None] * dist.get_world_size()
            dist.all_gather_object(replay_buffers, self.buffer_states(), group=group)
            if dist.get_rank() != 0:
                return
        save_atomic(self.state_dict(replay_buffers), path,
                    "the previous one, if any, is intact: free some space, then continue with --resume")


class StopSignal:
    """Ctrl-C or SIGTERM: finish the batch in hand, save last.pt, exit with 128 + the signal
    number; a second Ctrl-C exits at once. Under DDP every process must stop after the same
    batch, or the others would wait forever in the next gradient all-reduce: agreed() takes
    the maximum of all processes' flags, once per batch, with an all-reduce of a CPU tensor
    over a gloo `group`, so stopping costs no device synchronisation."""

    def __init__(self, message=None, group=None):
        # received: this process's signal; signum: the one all processes agreed on. (Kept apart,
        # because a signal handled while agreed() waits in its all-reduce, whose flag went out
        # without it, would otherwise be overwritten by that all-reduce's result and lost.)
        self.received, self.signum, self.message, self.group = None, None, message, group
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.received = signum
        if self.message:
            print(f"\n{signal.Signals(signum).name} received: {self.message}", file=sys.stderr, flush=True)

    def agreed(self):
        flag = torch.tensor([self.received or 0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flag[0]) or None
        return self.signum is not None


# -----------------------------------------------------------------------------
# Device and precision, chosen once at start-up by both cyclegan.py and test.py

PRECISIONS = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --amp's names of autocast dtypes


def precision_name(dtype):
    """'bf16' or 'fp16' for an autocast dtype, 'fp32' for None (no autocast)."""
    return next((name for name, d in PRECISIONS.items() if d is not None and d == dtype), "fp32")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where the help text already says it or there
    is none to show (argparse would print "(default: None)" after "(default: data/<name>)")."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_device_args(parser, amp_default="auto", amp_note=""):
    """--device and --amp, the same flags in every script that computes."""
    parser.add_argument("--device", type=str, default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="auto: CUDA, else Apple's MPS, else the CPU")
    parser.add_argument("--amp", type=str, default=amp_default, choices=("auto", *PRECISIONS),
                        help="precision: auto picks bf16 where the hardware computes it natively (CUDA compute capability "
                             ">= 8.0, CPUs with AVX512_BF16 or AMX), else fp32; none: fp32, the seed's numerics; "
                             "fp16: GPUs only" + amp_note)


def choose_precision(amp, device, warn=True):
    """pick_precision's dtype for --amp, with its warning, if any, on stderr (warn: this
    process is the one that prints)."""
    dtype, warning = pick_precision(amp, device)
    if warning and warn:
        print(warning, file=sys.stderr)
    return dtype


def pick_device(name="auto"):
    """The torch.device for --device: 'auto' takes CUDA, then Apple's MPS, then the CPU."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        die("--device cuda: no CUDA device is available; use --device cpu (or auto)")
    if name == "mps" and not mps:
        die("--device mps: Apple's Metal (MPS) backend is not available here; use --device cpu (or auto)")
    return torch.device(name)


def cpu_info(path="/proc/cpuinfo"):
    """(model name, set of instruction-set flags) of this machine's CPU, from
    /proc/cpuinfo on Linux; elsewhere the flags are unknown (empty)."""
    name, flags = None, set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86, aarch64
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "CPU", flags


# x86 instructions that compute in bf16 natively. Without them oneDNN still accepts
# bf16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() may say True on any AVX-512 CPU)
# but emulates it through fp32 conversions, which made a training step ~4x slower
# than fp32 on a Xeon with AVX-512 but no AVX512_BF16/AMX.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def pick_precision(amp, device, cpu_flags=None, cuda_capability=None):
    """(dtype or None for fp32, warning or None) for --amp auto|none|bf16|fp16.

    auto picks bf16 only where the hardware computes it natively and fast: a CUDA GPU of
    compute capability >= 8.0 (Ampere and later), or a CPU with AVX512_BF16 or AMX-BF16;
    everything else (MPS included) trains in fp32, the seed's numerics. An explicit
    choice is obeyed, with a warning where it is likely slower than fp32."""
    if device.type == "cuda" and cuda_capability is None:
        cuda_capability = torch.cuda.get_device_capability(device)
    if device.type == "cpu" and cpu_flags is None:
        cpu_flags = cpu_info()[1]
    native_bf16 = (cuda_capability is not None and cuda_capability >= (8, 0)) if device.type == "cuda" else \
        bool(set(NATIVE_BF16_FLAGS) & set(cpu_flags)) if device.type == "cpu" else False
    if amp == "none":
        return None, None
    if amp == "auto":
        return (torch.bfloat16 if native_bf16 else None), None
    if amp == "fp16":
        if device.type == "cpu":
            die("--amp fp16 needs a GPU (CUDA or MPS); on the CPU use --amp bf16 or auto")
        return torch.float16, None
    if amp == "bf16":
        if device.type == "cpu" and not native_bf16:
            return torch.bfloat16, (f"warning: --amp bf16: this CPU has no native bf16 instructions "
                                    f"({' or '.join(NATIVE_BF16_FLAGS)}), so bf16 is emulated and likely several times "
                                    f"slower than fp32; --amp auto picks what is fast here")
        if device.type == "cuda" and not native_bf16:
            return torch.bfloat16, (f"warning: --amp bf16: this GPU (compute capability {cuda_capability[0]}."
                                    f"{cuda_capability[1]}) has no fast bf16; --amp fp16 or auto is likely faster")
        return torch.bfloat16, None
    raise ValueError(f"--amp must be auto, none, bf16 or fp16, got {amp!r}")


def autocast_context(device, dtype):
    """The one mixed-precision context used around forward passes (nanoGPT's `ctx`)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
