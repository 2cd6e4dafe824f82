"""
Small pieces of the training recipe: the fake-image replay buffer, the linear
learning-rate decay, the atomic, safe checkpoint I/O every script uses, the full
training state that --resume continues from, the stop signal, and the choice of
device and precision.
"""
import os
import pickle
import platform
import random
import signal
import sys
import tempfile
from contextlib import nullcontext

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


def die(msg):
    """Stop with one clear line instead of a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def first_line(e, limit=200):
    """The first line of an exception's message, cut to `limit` characters ('' if it has
    none): a library's multi-line message would otherwise break the one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else ""


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync it, then rename it
    over `path`: a crash or a full disk mid-save leaves the old file intact."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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


def save_training_state(path, opt, epoch, batch, nets, optimizers, schedulers, buffers, scaler=None, extra=None, group=None):
    """Write `path` (last.pt) atomically: networks, optimizers, schedulers, the replay buffers
    of every process, the GradScaler, (epoch, batch) to continue from, the RNG states and the
    arguments. Under DDP every process calls this (each hands over its replay buffers, over
    the CPU `group`) and rank 0 writes. `extra` holds anything else to carry over (the best FID)."""
    fake_A_buffer, fake_B_buffer = buffers
    all_buffers = [(fake_A_buffer.state_dict(), fake_B_buffer.state_dict())]
    if dist.is_initialized():
        all_buffers = [None] * dist.get_world_size()
        dist.all_gather_object(all_buffers, (fake_A_buffer.state_dict(), fake_B_buffer.state_dict()), group=group)
        if dist.get_rank() != 0:
            return
    state = {"args": vars(opt), "epoch": epoch, "batch": batch, "rng": rng_state(), "replay_buffers": all_buffers,
             "scaler": scaler.state_dict() if scaler is not None else None, **(extra or {})}
    state.update({name: net.state_dict() for name, net in nets.items()})
    state.update({name: o.state_dict() for name, o in optimizers.items()})
    state.update({"scheduler_" + name: s.state_dict() for name, s in schedulers.items()})
    try:
        save_atomic(state, path)
    except (OSError, RuntimeError) as e:  # disk full, quota, file size limit, ... (torch reports some as RuntimeError)
        die(f"could not write {path} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
            f"the previous one, if any, is intact: free some space, then continue with --resume")


def load_training_state(state, nets, optimizers, schedulers, buffers, scaler=None, optimizer_options=None,
                        rank=0, world_size=1, device="cpu"):
    """Restore what save_training_state wrote; returns (epoch, batch) to continue from.
    `optimizer_options` (fused/foreach) are those of the device in use now: a state saved on
    CUDA would otherwise carry fused=True into a CPU optimizer."""
    for name, net in nets.items():
        net.load_state_dict(state[name])
    for name, o in optimizers.items():
        o.load_state_dict(state[name])
        for group in o.param_groups:
            group.update(optimizer_options or {})
    for name, s in schedulers.items():
        s.load_state_dict(state["scheduler_" + name])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    saved_buffers = state["replay_buffers"]  # one (A, B) pair per process of the saved run
    epoch, batch = state["epoch"], state["batch"]
    if len(saved_buffers) != world_size and batch != 0:
        die(f"--resume: last.pt was saved mid-epoch by {len(saved_buffers)} process(es), and this run has {world_size}; "
            f"the rest of that epoch cannot be split the same way. Resume with {len(saved_buffers)} process(es), "
            f"or from a last.pt saved at the end of an epoch")
    for buffer, buffer_state in zip(buffers, saved_buffers[rank % len(saved_buffers)]):  # round robin if fewer
        buffer.load_state_dict(buffer_state, device)
    set_rng_state(state["rng"])
    return epoch, batch


class StopSignal:
    """Ctrl-C or SIGTERM: finish the batch in hand, save last.pt, exit with 128 + the signal
    number; a second Ctrl-C exits at once. Under DDP every process must stop after the same
    batch, or the others would wait forever in the next gradient all-reduce: agreed() takes
    the maximum of all processes' flags, once per batch, with an all-reduce of a CPU tensor
    over a gloo `group`, so stopping costs no device synchronisation."""

    def __init__(self, message=None, group=None):
        self.signum, self.message, self.group = None, message, group
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signum = signum
        if self.message:
            print(f"\n{signal.Signals(signum).name} received: {self.message}", file=sys.stderr, flush=True)

    def agreed(self):
        if dist.is_initialized():
            flag = torch.tensor([self.signum or 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            self.signum = int(flag[0]) or None
        return self.signum is not None


# -----------------------------------------------------------------------------
# Device and precision, chosen once at start-up by both cyclegan.py and test.py

PRECISIONS = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --amp's names of autocast dtypes


def precision_name(dtype):
    """'bf16' or 'fp16' for an autocast dtype, 'fp32' for None (no autocast)."""
    return next((name for name, d in PRECISIONS.items() if d is not None and d == dtype), "fp32")


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


def cpu_info():
    """(model name, set of instruction-set flags) of this machine's CPU, from
    /proc/cpuinfo on Linux; elsewhere the flags are unknown (empty)."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
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
