"""
Small general helpers every script uses: one-line errors, the one atomic write (and safe
checkpoint loading), output that reaches a log file line by line, and the choice of device
and precision.
"""
import argparse
import os
import pickle
import platform
import shutil
import sys
import tempfile
from contextlib import nullcontext

import torch


# -----------------------------------------------------------------------------
# Errors

def die(msg):
    """Stop with one clear line instead of a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def first_line(e, limit=200):
    """The first line of an exception's message, cut to `limit` characters ('' if it has
    none): a library's multi-line message would otherwise break the one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else ""


# -----------------------------------------------------------------------------
# Files: atomic writes, safe loading

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


def print_lines_as_they_come():
    """Every line a script prints reaches a file or pipe when it is printed: Python holds back
    about 8 KB of standard output that is not a terminal, so `nohup python cyclegan.py > log &`
    would show nothing for minutes."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


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
                        help="precision: auto picks bf16 where the hardware computes it natively "
                             "(CUDA compute capability "
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
