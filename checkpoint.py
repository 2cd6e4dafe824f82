"""
Never losing a run: the run folder (saved_models/<name>/ and images/<name>/) and the lock a
run holds on it, the refusal to start over a saved run, the full training state that
last.pt holds and --resume continues from exactly (with the arguments a resume may change),
the per-epoch weights, and the stop signal that finishes a batch and saves before exiting.
"""
import argparse
import glob
import os
import random
import re
import signal
import socket
import sys
import time
from contextlib import nullcontext

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist

from gan import adam_options, as_random_state
from models import clean_state_dict, discriminator_kind, generator_kind, kind_flags
from utils import check_writable, die, load_checkpoint, save_atomic

# Flags that may differ between a run and its --resume: they change neither the model, nor
# the data order, nor the algorithm. A resumed run is bitwise the run it continues when it
# runs on the same kind of device in the same precision; --device and --amp change the
# arithmetic, so changing them continues the run, close to but not bitwise the same.
RESUME_HARMLESS = {"resume", "sample_interval", "checkpoint_interval", "save_latest_interval", "log_interval",
                   "n_cpu", "device", "compile", "verify_data", "amp", "eval_interval", "eval_n", "inception",
                   "tensorboard", "log_dir", "overwrite"}


# -----------------------------------------------------------------------------
# The run folder, and the lock a run holds on it

RUN_WEIGHTS = re.compile(r"(G_AB|G_BA|D_A|D_B|F)_\d+\.pth|best_(G_AB|G_BA)\.pth")


def run_files(opt):
    """The files of the run in saved_models/<dataset_name>/ and its sample grids in images/<dataset_name>/."""
    model_dir, images = os.path.join("saved_models", opt.dataset_name), os.path.join("images", opt.dataset_name)
    found = [os.path.join(model_dir, f) for f in sorted(os.listdir(model_dir))
             if f in ("last.pt", "log.csv", "eval.csv") or RUN_WEIGHTS.fullmatch(f)] if os.path.isdir(model_dir) else []
    grids = [os.path.join(images, f) for f in sorted(os.listdir(images)) if f.endswith(".png") and f[:-4].isdigit()
             or f in ("index.html", "losses.png", "fid.png")] if os.path.isdir(images) else []
    return found, grids


def refuse_existing_run(opt):
    """A fresh run never replaces a saved one: the same command run again (after a reboot, say)
    would otherwise wipe log.csv and last.pt. Checked by every process before anything is written."""
    model_dir = os.path.join("saved_models", opt.dataset_name)
    found, _ = run_files(opt)
    log = os.path.join(model_dir, "log.csv")
    if os.path.isfile(log):
        with open(log, newline="") as f:
            if sum(1 for _ in zip(range(2), f)) < 2:  # a header alone: a run that never logged a batch
                found.remove(log)
    found = [f for f in found if not f.endswith("eval.csv")]
    if not found:
        return
    what = ", ".join(os.path.basename(f) for f in found[:4]) + (", ..." if len(found) > 4 else "")
    last = os.path.join(model_dir, "last.pt")
    if os.path.isfile(last):
        try:
            saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
            what = f"last.pt: epoch {saved['epoch']}, batch {saved['batch']}"
        except Exception:
            pass
    die(f"{model_dir} already holds a run ({what}); continue it with --resume, start a separate one with another "
        f"--dataset_name (add --data_root to train on the same data), or pass --overwrite to replace it")


def check_output_folders(opt):
    """Every folder training writes to, writable, before any work starts."""
    check_writable(os.path.join("saved_models", opt.dataset_name), "--dataset_name")
    check_writable(os.path.join("images", opt.dataset_name), "--dataset_name")
    if opt.tensorboard:
        check_writable(opt.log_dir or os.path.join("runs", opt.dataset_name), "--log_dir")


def remove_old_run(opt):
    """--overwrite: the old run's files go before the new run writes its own."""
    found, grids = run_files(opt)
    for path in found + grids:
        os.remove(path)
    if found or grids:
        print(f"--overwrite: removed {len(found)} file(s) of the old run in saved_models/{opt.dataset_name}/ "
              f"and {len(grids)} in images/{opt.dataset_name}/")


def hold_run_folder(folder):
    """An advisory lock (flock) on folder/.lock, held while the returned file is open: two runs
    started at once with the same name would otherwise both pass the "this folder already holds
    a run" check and write into one folder. The kernel releases it when the process ends,
    however it ends, so a crash or SIGKILL leaves no stale lock. Another holder: one line naming
    it."""
    if fcntl is None:
        print(f"note: no fcntl on this platform: nothing stops a second run from writing into {folder} "
              f"at the same time", file=sys.stderr)
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
    command = (" ".join(["python"] + [os.path.basename(sys.argv[0])] + sys.argv[1:]) if sys.argv and sys.argv[0]
               else "python")
    f.write(f"pid {os.getpid()} on {socket.gethostname()} "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command[:200]}\n")
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


def clean_killed_saves(folder):
    """The temporary files write_atomic leaves behind when it is killed midway."""
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if f.startswith(".tmp-"):
                os.remove(os.path.join(folder, f))


# -----------------------------------------------------------------------------
# The full training state (last.pt), and resuming from it

def find_last_pt(opt, given):
    """The last.pt that --resume continues from: PATH, or that of --dataset_name, or the
    only one under saved_models/."""
    if opt.resume != "auto":
        return opt.resume
    if "dataset_name" in given:
        return os.path.join("saved_models", opt.dataset_name, "last.pt")
    found = sorted(glob.glob(os.path.join("saved_models", "*", "last.pt")))
    if len(found) == 1:
        return found[0]
    if not found:
        die("--resume: there is no saved_models/<dataset>/last.pt here; start a run first (it writes last.pt), "
            "or pass --dataset_name NAME or --resume PATH")
    die(f"--resume: several runs to continue ({', '.join(found)}); pass --dataset_name NAME or --resume PATH")


def resume_arguments(opt, given, algorithm):
    """--resume: (the saved run's arguments, except the harmless ones given now, and the
    content of its last.pt). `given`: the flags on the command line; `algorithm`: the script's
    ("CycleGAN", "CUT"), which the last.pt must have been trained with."""
    path = find_last_pt(opt, given)
    if not os.path.exists(path):
        die(f"--resume: {path} does not exist; start a run first (it writes last.pt), "
            f"or pass --dataset_name NAME or --resume PATH")
    resume_state = load_checkpoint(path)
    if not isinstance(resume_state, dict) or "args" not in resume_state:
        die(f"--resume: {path} is not a full-state checkpoint (no 'args'); for per-epoch weight files use --epoch N")
    trained_with = resume_state.get("algorithm", "CycleGAN")
    if trained_with != algorithm:
        script = {"CycleGAN": "cyclegan.py", "CUT": "cut.py"}.get(trained_with, trained_with)
        die(f"--resume: {path} is a {trained_with} run; continue it with {script}")
    saved = dict(resume_state["args"])
    for flag, on in generator_kind(clean_state_dict(resume_state["G_AB"])).items():  # (a last.pt older than the flags)
        saved.setdefault(flag, on)
    diffs = [f"--{k} {saved.get(k)} -> {v}" for k, v in sorted(given.items())
             if k not in RESUME_HARMLESS and saved.get(k) != v]
    if diffs:
        die(f"--resume: {path} was trained with other arguments: {'; '.join(diffs)}. "
            f"Resume with the same ones, or start a new run")
    opt = argparse.Namespace(**{**vars(opt), **saved, **{k: v for k, v in given.items() if k in RESUME_HARMLESS}})
    opt.resume = path
    return opt, resume_state


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
    random.setstate(as_random_state(state["python"]))
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

    def __init__(self, opt, nets, optimizers, schedulers, buffers, scaler=None, device_type="cpu", precision="fp32",
                 ema=None, algorithm="CycleGAN"):
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
        state = {"args": vars(self.opt), "algorithm": self.algorithm, "epoch": self.epoch, "batch": self.batch,
                 "rng": rng_state(), "replay_buffers": replay_buffers or [self.buffer_states()],
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
            die(f"--resume: last.pt was saved mid-epoch by {len(saved_buffers)} process(es), "
                f"and this run has {world_size}; the rest of that epoch cannot be split the same way. "
                f"Resume with {len(saved_buffers)} process(es), or from a last.pt saved at the end of an epoch")
        # round robin if the saved run had fewer processes
        for buffer, saved in zip(self.buffers.values(), saved_buffers[rank % len(saved_buffers)], strict=True):
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


def save_last(state, report, model_dir, iteration, procs):
    """last.pt, to continue after `iteration` from state.epoch/batch, once the losses
    logged so far and the weights are known to be finite."""
    if procs.master:
        report.log.flush()
        check_finite_weights({**state.nets, **{"ema_" + k: v for k, v in state.ema.items()}}, iteration, model_dir)
    state.save(os.path.join(model_dir, "last.pt"), procs.group)


def save_epoch_weights(nets, model_dir, done):
    # named by the number of epochs done, so --epoch N resumes after them
    for name, net in nets.items():
        save_atomic(net.state_dict(), os.path.join(model_dir, f"{name}_{done}.pth"))


def load_epoch_weights(nets, model_dir, epoch, device, opt):
    """The seed's resume: --epoch N loads the per-epoch weights (optimizers start afresh)."""
    for name, net in nets.items():
        path = os.path.join(model_dir, f"{name}_{epoch}.pth")
        state = load_checkpoint(path, map_location=device)
        kind = discriminator_kind(state) if name.startswith("D") else None
        if kind is not None and kind != opt.netD:
            die(f"{path} is a --netD {kind} discriminator; this run asks for --netD {opt.netD}: pass --netD {kind}, "
                f"or start a new run")
        if name.startswith("G"):
            saved = generator_kind(state)
            asked = {flag: getattr(opt, flag) for flag in saved}
            if saved != asked:
                die(f"{path} is a generator of {kind_flags(saved)}; this run asks for {kind_flags(asked)}: "
                    f"pass {kind_flags(saved)}, or start a new run")
        try:
            net.load_state_dict(clean_state_dict(state))
        except RuntimeError as e:
            die(f"{path} does not fit this model ({str(e).splitlines()[1].strip()}); "
                f"check --n_residual_blocks, --channels and --d_receptive_field")


def restore(opt, resume_state, state, device, procs, model_dir):
    """Where state starts: a saved run's position and state (--resume), or the seed's
    per-epoch weights (--epoch N), or nothing."""
    if resume_state is None:
        if opt.epoch > 0:
            load_epoch_weights(state.nets, model_dir, opt.epoch, device, opt)
            for name, ema in state.ema.items():  # (G_*.pth hold what the run published)
                ema.load_state_dict(state.nets[name].state_dict())
        return
    state.load_state_dict(resume_state, adam_options(device), procs.rank, procs.world_size, device)
    if procs.master:
        print(f"resuming from {opt.resume}: epoch {state.epoch}, batch {state.batch}")
        was = resume_state.get("device_type"), resume_state.get("precision")
        now = state.device_type, state.precision
        if was[0] is not None and was != now:
            print(f"note: last.pt was trained on {was[0]} in {was[1]}, this run is on {now[0]} in {now[1]}: "
                  f"it continues the run, but not bitwise as an uninterrupted run would", file=sys.stderr)


# -----------------------------------------------------------------------------
# Stopping on a signal, saved

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


