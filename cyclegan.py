"""
Train CycleGAN (Zhu et al. 2017) on two unpaired folders of images.

    python cyclegan.py --dataset_name synthetic_day2night --img_height 64 --img_width 64
    python cyclegan.py --dataset_name monet2photo            # after data/download_cyclegan_dataset.sh

Samples go to images/<dataset>/, weights to saved_models/<dataset>/{G_AB,G_BA,D_A,D_B}_<epoch>.pth
(plain state_dicts, as the seed), and the full training state to saved_models/<dataset>/last.pt,
from which --resume continues exactly.
"""
import argparse
import csv
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from datasets import BUILTIN_DATASET, ImageDataset, UnpairedSampler, list_images, load_image, make_day2night, split_dirs, test_transforms, train_transforms
from models import Discriminator, GeneratorResNet, clean_state_dict, weights_init_normal
from utils import LambdaLR, ReplayBuffer, die, load_checkpoint, save_atomic

# Flags that may differ between a run and its --resume: they change neither the
# model nor the data order nor the optimisation.
RESUME_HARMLESS = {"resume", "sample_interval", "checkpoint_interval", "save_latest_interval", "log_interval",
                   "n_cpu", "device", "compile", "verify_data", "amp"}


def get_parser():
    p = argparse.ArgumentParser(description="Train CycleGAN.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # the seed's flags, with its defaults
    p.add_argument("--epoch", type=int, default=0, help="epoch to start training from: loads saved_models/<dataset>/*_<epoch>.pth when > 0")
    p.add_argument("--n_epochs", type=int, default=200, help="number of epochs of training")
    p.add_argument("--dataset_name", type=str, default="monet2photo", help=f"name of the dataset under data/ ('{BUILTIN_DATASET}' is generated on first use)")
    p.add_argument("--batch_size", type=int, default=1, help="size of the batches")
    p.add_argument("--lr", type=float, default=0.0002, help="adam: learning rate")
    p.add_argument("--b1", type=float, default=0.5, help="adam: decay of first order momentum of gradient")
    p.add_argument("--b2", type=float, default=0.999, help="adam: decay of second order momentum of gradient")
    p.add_argument("--decay_epoch", type=int, default=100, help="epoch from which to start lr decay")
    p.add_argument("--n_cpu", type=int, default=8, help="number of data loading workers (capped at the number of cores)")
    p.add_argument("--img_height", type=int, default=256, help="size of image height")
    p.add_argument("--img_width", type=int, default=256, help="size of image width")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="number of image channels")
    p.add_argument("--sample_interval", type=int, default=100, help="interval (in batches) between saving generator samples")
    p.add_argument("--checkpoint_interval", type=int, default=10, help="interval (in epochs) between saved weights; the last epoch is always saved; <= 0: only the last")
    p.add_argument("--n_residual_blocks", type=int, default=9, help="number of residual blocks in generator")
    p.add_argument("--lambda_cyc", type=float, default=10.0, help="cycle loss weight")
    p.add_argument("--lambda_id", type=float, default=5.0, help="identity loss weight")
    p.add_argument("--pool_size", type=int, default=50, help="size of the fake image replay buffers; 0 disables them")
    # additions
    p.add_argument("--data_root", type=str, default=None, help="dataset folder (default: data/<dataset_name>)")
    p.add_argument("--d_receptive_field", type=int, default=94, choices=(94, 70),
                   help="discriminator patch size: 94 is the seed's (4th conv stride 2), 70 the paper's PatchGAN")
    p.add_argument("--device", type=str, default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if present, else CPU")
    p.add_argument("--seed", type=int, default=None, help="random seed; the same seed, flags and data give bitwise identical weights (default: a random one, recorded in last.pt)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue exactly from a full-state checkpoint (default PATH: saved_models/<dataset>/last.pt)")
    p.add_argument("--save_latest_interval", type=int, default=500, help="interval (in batches) between saves of last.pt")
    p.add_argument("--log_interval", type=int, default=10, help="interval (in batches) between fetching losses for the log and progress line")
    p.add_argument("--amp", type=str, default="none", choices=("none", "bf16", "fp16"), help="mixed precision: bf16 on CPU (AMX) or CUDA, fp16 on CUDA only")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--verify_data", action="store_true", help="decode every training image before training and report all unreadable ones")
    return p


def explicit_flags(parser, argv):
    """The flags given on the command line (not left at their defaults)."""
    quiet = argparse.ArgumentParser(add_help=False)
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            kwargs = dict(dest=a.dest, default=argparse.SUPPRESS)
            if isinstance(a, argparse._StoreTrueAction):
                quiet.add_argument(*a.option_strings, action="store_true", **kwargs)
            else:
                quiet.add_argument(*a.option_strings, nargs=a.nargs, type=a.type, const=a.const, **kwargs)
    return vars(quiet.parse_known_args(argv)[0])


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
    order and with its loss averaging. Returns the losses as detached tensors
    (fetching them to the host is left to the caller, so nothing here syncs).

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

    out = dict(loss_D=loss_D, loss_G=loss_G, loss_GAN=loss_GAN, loss_cycle=loss_cycle, loss_identity=loss_identity,
               loss_D_A=loss_D_A, loss_D_B=loss_D_B)
    return {k: v.detach() for k, v in out.items()}


# -----------------------------------------------------------------------------
# Samples, state, logging

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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(nets):
    return all(bool(torch.isfinite(p).all()) for net in nets for p in net.parameters())


class ProgressLog:
    """A one-line progress bar on a terminal (a plain line every `log_interval`
    batches otherwise), and every batch's losses appended to a CSV file.
    Losses stay on the device until a flush, so logging costs no per-batch sync."""

    def __init__(self, csv_path, total, done, log_interval):
        self.total, self.start_done, self.log_interval = total, done, log_interval
        self.tty = sys.stdout.isatty()
        self.pending = []
        self.bad = None  # (iteration, loss name) of the first non-finite loss written
        self.t0 = None
        new = not os.path.exists(csv_path)
        os.makedirs(os.path.dirname(csv_path), exist_ok=True)
        self.file = open(csv_path, "a", newline="")
        self.csv = csv.writer(self.file)
        self.header = ["epoch", "batch", "iteration", "loss_D", "loss_G", "loss_GAN", "loss_cycle", "loss_identity", "loss_D_A", "loss_D_B", "lr", "time"]
        if new:
            self.csv.writerow(self.header)

    def add(self, epoch, batch, iteration, losses, lr):
        if self.t0 is None:  # time from the end of the first batch: compile and warm-up excluded
            self.t0, self.t0_iter = time.time(), iteration
        self.pending.append((epoch, batch, iteration, lr, torch.stack(list(losses.values()))))
        if len(self.pending) >= self.log_interval:
            self.flush()

    def flush(self):
        """Write pending rows; return (iteration, loss name) of the first non-finite loss written
        so far (also by an earlier flush, such as the one add() makes every log_interval), or None."""
        if not self.pending:
            return self.bad
        values = torch.stack([p[4] for p in self.pending]).float().cpu().tolist()
        names = self.header[3:10]
        now = time.time()
        for (epoch, batch, iteration, lr, _), v in zip(self.pending, values):
            self.csv.writerow([epoch, batch, iteration, *[f"{x:.6g}" for x in v], f"{lr:.6g}", f"{now:.3f}"])
            if self.bad is None and not all(math.isfinite(x) for x in v):
                self.bad = (iteration, names[next(i for i, x in enumerate(v) if not math.isfinite(x))])
        self.file.flush()
        epoch, batch, iteration = self.pending[-1][:3]
        self.pending = []
        done = iteration + 1
        rate = (now - self.t0) / max(1, done - self.t0_iter - 1) if done - self.t0_iter > 1 else float("nan")
        eta = rate * (self.total - done)
        frac = done / self.total
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        d, g, adv, cyc, idt = values[-1][:5]
        line = (f"[{bar}] {100 * frac:5.1f}% epoch {epoch} batch {batch} | D {d:.4f} G {g:.4f} adv {adv:.4f} cyc {cyc:.4f} "
                f"id {idt:.4f} | {1000 * rate:.0f} ms/it ETA {format_time(eta)}")
        if self.tty:
            print("\r" + line, end="", flush=True)
        else:
            print(line, flush=True)
        return self.bad

    def close(self):
        if self.tty:
            print()
        self.file.close()


def format_time(s):
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = get_parser()
    opt = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    model_dir = os.path.join("saved_models", opt.dataset_name)

    # ---- resume: the saved run's arguments win, except for harmless ones given now
    resume_state = None
    if opt.resume:
        path = os.path.join(model_dir, "last.pt") if opt.resume == "auto" else opt.resume
        if not os.path.exists(path):
            die(f"--resume: {path} does not exist; start a run first (it writes last.pt) or pass --resume PATH")
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
        model_dir = os.path.join("saved_models", opt.dataset_name)
    if opt.decay_epoch >= opt.n_epochs:
        die(f"--decay_epoch ({opt.decay_epoch}) must be smaller than --n_epochs ({opt.n_epochs}): "
            f"the learning rate decays linearly to 0 between them")
    if min(opt.img_height, opt.img_width) < 32:
        # the discriminator halves the size four times and InstanceNorm needs > 1 pixel left
        die(f"--img_height/--img_width must be at least 32, got {opt.img_height}x{opt.img_width}")
    if opt.epoch and resume_state is None and opt.epoch >= opt.n_epochs:
        die(f"--epoch {opt.epoch} is not below --n_epochs {opt.n_epochs}: nothing to train")
    if opt.seed is None:
        opt.seed = int.from_bytes(os.urandom(4), "little") >> 1

    # ---- device, precision, seeds
    if opt.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: no CUDA device is available; use --device cpu")
    device = torch.device("cuda" if opt.device == "cuda" or (opt.device == "auto" and torch.cuda.is_available()) else "cpu")
    if opt.amp == "fp16" and device.type != "cuda":
        die("--amp fp16 needs CUDA; on CPU use --amp bf16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opt.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if opt.amp == "fp16" else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # ---- distributed: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; each process trains on
    # its own shard of every epoch with its own replay buffers, and DDP averages the gradients.
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = 0, 1
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    master = rank == 0  # only rank 0 writes samples, logs and checkpoints
    random.seed(opt.seed)
    np.random.seed(opt.seed % 2**32)
    torch.manual_seed(opt.seed)

    # ---- data
    data_root = opt.data_root or os.path.join("data", opt.dataset_name)
    if opt.dataset_name == BUILTIN_DATASET and not os.path.exists(data_root):
        print(f"generating the built-in dataset in {data_root} ...")
        make_day2night(data_root)
    try:
        dataset = ImageDataset(data_root, train_transforms(opt.img_height, opt.img_width), unaligned=True, mode="train", channels=opt.channels)
    except FileNotFoundError as e:
        die(str(e))
    if opt.verify_data:
        verify_images(dataset.files_A + dataset.files_B, opt.channels)
    sampler = UnpairedSampler(dataset, seed=opt.seed, num_replicas=world_size, rank=rank)
    n_workers = min(opt.n_cpu, os.cpu_count() or 1)
    # (its own generator: the base seed it draws for every new iterator must not advance the
    # global RNG, whose state last.pt saves, differently in a resumed and an uninterrupted run)
    dataloader = DataLoader(dataset, batch_size=opt.batch_size, sampler=sampler, num_workers=n_workers,
                            pin_memory=device.type == "cuda", persistent_workers=n_workers > 0,
                            generator=torch.Generator().manual_seed(opt.seed), worker_init_fn=ignore_stop_signals)
    real_A_fixed, real_B_fixed = fixed_samples(data_root, opt, device)

    # ---- models and optimisation
    input_shape = (opt.channels, opt.img_height, opt.img_width)
    G_AB = GeneratorResNet(input_shape, opt.n_residual_blocks).to(device)
    G_BA = GeneratorResNet(input_shape, opt.n_residual_blocks).to(device)
    D_A = Discriminator(input_shape, opt.d_receptive_field).to(device)
    D_B = Discriminator(input_shape, opt.d_receptive_field).to(device)
    nets = {"G_AB": G_AB, "G_BA": G_BA, "D_A": D_A, "D_B": D_B}
    if opt.epoch > 0 and resume_state is None:
        for name, net in nets.items():  # the seed's resume from per-epoch weights
            state = load_checkpoint(os.path.join(model_dir, f"{name}_{opt.epoch}.pth"), map_location=device)
            try:
                net.load_state_dict(clean_state_dict(state))
            except RuntimeError as e:
                die(f"{model_dir}/{name}_{opt.epoch}.pth does not fit this model ({str(e).splitlines()[1].strip()}); "
                    f"check --n_residual_blocks, --channels and --d_receptive_field")
    else:
        for net in nets.values():
            net.apply(weights_init_normal)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer_G = torch.optim.Adam(list(G_AB.parameters()) + list(G_BA.parameters()), lr=opt.lr, betas=(opt.b1, opt.b2), **fused)
    optimizer_D_A = torch.optim.Adam(D_A.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2), **fused)
    optimizer_D_B = torch.optim.Adam(D_B.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2), **fused)
    optimizers = {"optimizer_G": optimizer_G, "optimizer_D_A": optimizer_D_A, "optimizer_D_B": optimizer_D_B}
    lr_lambda = LambdaLR(opt.n_epochs, opt.epoch, opt.decay_epoch).step
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=lr_lambda) for k, o in optimizers.items()}
    fake_A_buffer = ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * rank)
    fake_B_buffer = ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * rank + 1)

    start_epoch, start_batch = opt.epoch, 0
    if resume_state is not None:
        for name, net in nets.items():
            net.load_state_dict(resume_state[name])
        for name, o in optimizers.items():
            o.load_state_dict(resume_state[name])
        for name, s in schedulers.items():
            s.load_state_dict(resume_state["scheduler_" + name])
        buffers = resume_state["replay_buffers"]  # one (A, B) pair per process of the saved run
        start_epoch, start_batch = resume_state["epoch"], resume_state["batch"]
        if len(buffers) != world_size and start_batch != 0:
            die(f"--resume: last.pt was saved mid-epoch by {len(buffers)} process(es), and this run has {world_size}; "
                f"the rest of that epoch cannot be split the same way. Resume with {len(buffers)} process(es), "
                f"or from a last.pt saved at the end of an epoch")
        fake_A_buffer.load_state_dict(buffers[rank % len(buffers)][0], device)
        fake_B_buffer.load_state_dict(buffers[rank % len(buffers)][1], device)
        set_rng_state(resume_state["rng"])
        if master:
            print(f"resuming from {opt.resume if opt.resume != 'auto' else os.path.join(model_dir, 'last.pt')}: "
              f"epoch {start_epoch}, batch {start_batch}")

    step_nets = tuple(torch.compile(net) for net in nets.values()) if opt.compile else tuple(nets.values())
    if ddp:
        step_nets = tuple(DDP(net, device_ids=[device.index] if device.type == "cuda" else None) for net in step_nets)

    def check_weights(epoch, batch):
        broken = [name for name, net in nets.items() if not all_finite([net])]
        if broken:
            log.close()
            die(f"the weights of {', '.join(broken)} became non-finite by iteration {epoch * n_batches + batch - 1}; "
                f"not saving them (the last good state is {model_dir}/last.pt). "
                f"Try a lower --lr or --amp none")

    def save_last(epoch, batch):
        buffers = [(fake_A_buffer.state_dict(), fake_B_buffer.state_dict())]
        if ddp:  # every process's replay buffers, so a resume continues each of them
            buffers = [None] * world_size
            dist.all_gather_object(buffers, (fake_A_buffer.state_dict(), fake_B_buffer.state_dict()))
        if not master:
            return
        check_weights(epoch, batch)  # never replace a good last.pt with broken weights
        state = {"args": vars(opt), "epoch": epoch, "batch": batch, "rng": rng_state(), "replay_buffers": buffers}
        state.update({name: net.state_dict() for name, net in nets.items()})
        state.update({name: o.state_dict() for name, o in optimizers.items()})
        state.update({"scheduler_" + name: s.state_dict() for name, s in schedulers.items()})
        try:
            save_atomic(state, os.path.join(model_dir, "last.pt"))
        except (OSError, RuntimeError) as e:  # disk full, quota, file size limit, ... (torch reports some as RuntimeError)
            log.close()
            die(f"could not write {model_dir}/last.pt ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                f"the previous last.pt, if any, is intact: free some space, then continue with --resume")

    # SIGINT / SIGTERM: finish the batch in hand, save, and leave.
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        stop["signal"] = signum
        if master:
            print(f"\n{signal.Signals(signum).name} received: finishing this batch and saving {model_dir}/last.pt ...",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def stop_requested():
        # Under DDP every process must stop after the same batch, or the others would wait
        # forever in the next gradient all-reduce: agree on the flag (a tiny all-reduce).
        if not ddp:
            return stop["signal"] is not None
        flag = torch.tensor([0 if stop["signal"] is None else stop["signal"]], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop["signal"] = int(flag.item()) or None
        return stop["signal"] is not None

    n_batches = len(dataloader)
    log = None
    if master:
        if os.path.isdir(model_dir):  # temporary files of a save that was killed midway
            for f in os.listdir(model_dir):
                if f.startswith(".tmp-") and f.endswith(".pt"):
                    os.remove(os.path.join(model_dir, f))
        log = ProgressLog(os.path.join(model_dir, "log.csv"), opt.n_epochs * n_batches, start_epoch * n_batches + start_batch, opt.log_interval)
        print(f"training on {device} ({opt.amp if amp_dtype else 'fp32'}) x {world_size} process(es): {len(dataset.files_A)} A / "
              f"{len(dataset.files_B)} B images, {n_batches} batches of {opt.batch_size} per epoch and process, "
              f"epochs {start_epoch}..{opt.n_epochs - 1}, seed {opt.seed}")

    def check_finite():
        if log is None:
            return
        bad = log.flush()
        if bad is not None:
            log.close()
            die(f"{bad[1]} is not finite at iteration {bad[0]}; stopping without saving these weights "
                f"(the last good state is {model_dir}/last.pt). Try a lower --lr or --amp none")

    def interrupted(epoch, batch):
        check_finite()
        save_last(epoch, batch)
        if not master:
            sys.exit(128 + stop["signal"])
        log.close()
        print(f"saved {model_dir}/last.pt at epoch {epoch}, batch {batch}; continue with: "
              f"python cyclegan.py --dataset_name {opt.dataset_name} --resume", file=sys.stderr)
        sys.exit(128 + stop["signal"])

    # ----------
    #  Training
    # ----------
    for epoch in range(start_epoch, opt.n_epochs):
        sampler.set_epoch(epoch)
        first = start_batch if epoch == start_epoch else 0
        sampler.set_start(first * opt.batch_size)
        lr = optimizer_G.param_groups[0]["lr"]
        for i, batch in enumerate(dataloader, start=first):
            if stop_requested():
                interrupted(epoch, i)
            if any(batch["bad"]):
                dataset_bad_files(batch["bad"], dataset)
            real_A = batch["A"].to(device, non_blocking=True)
            real_B = batch["B"].to(device, non_blocking=True)
            losses = train_step(real_A, real_B, step_nets, tuple(optimizers.values()), (fake_A_buffer, fake_B_buffer),
                                opt.lambda_cyc, opt.lambda_id, autocast, scaler)
            batches_done = epoch * n_batches + i
            if master:
                log.add(epoch, i, batches_done, losses, lr)
                if log.bad is not None:  # found by add()'s periodic flush: stop now, not at the next save
                    check_finite()
            if master and batches_done % opt.sample_interval == 0:
                sample_images(f"images/{opt.dataset_name}/{batches_done}.png", real_A_fixed, real_B_fixed, G_AB, G_BA, autocast)
            if opt.save_latest_interval > 0 and (batches_done + 1) % opt.save_latest_interval == 0:
                check_finite()
                save_last(epoch, i + 1)
            if stop_requested():
                interrupted(epoch, i + 1)
        for s in schedulers.values():
            s.step()
        check_finite()
        # Weights are named by the number of epochs done, so --epoch N resumes after them.
        done = epoch + 1
        if master and (done == opt.n_epochs or (opt.checkpoint_interval > 0 and done % opt.checkpoint_interval == 0)):
            check_weights(done, 0)
            for name, net in nets.items():
                save_atomic(net.state_dict(), os.path.join(model_dir, f"{name}_{done}.pth"))
        save_last(done, 0)
    if ddp:
        dist.destroy_process_group()
    if master:
        log.close()
        print(f"done: weights in {model_dir}/, samples in images/{opt.dataset_name}/")


def ignore_stop_signals(worker_id):
    """In data-loading workers: SIGINT and SIGTERM sent to the whole process group (Ctrl-C,
    `kill -TERM -<pgid>`, SLURM, systemd) are for the main process, which finishes its batch,
    saves last.pt and then stops the workers. (PyTorch's own SIGTERM handler in a worker
    would kill it, and the main process would die of that with a traceback, unsaved.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def fixed_samples(data_root, opt, device, n=5):
    """The first n test images of each domain (train images if there is no test split)."""
    try:
        dir_A, dir_B = split_dirs(data_root, "test")
    except FileNotFoundError:
        dir_A, dir_B = split_dirs(data_root, "train")
    tf = test_transforms(opt.img_height, opt.img_width)
    out = []
    for folder in (dir_A, dir_B):
        imgs = []
        for path in list_images(folder):
            try:
                img = load_image(path, opt.channels)
            except Exception:
                continue
            for t in tf:
                img = t(img)
            imgs.append(img)
            if len(imgs) == n:
                break
        out.append(torch.stack(imgs).to(device))
    k = min(len(out[0]), len(out[1]))
    return out[0][:k], out[1][:k]


def verify_images(paths, channels):
    bad = []
    for path in paths:
        try:
            load_image(path, channels)
        except Exception as e:
            bad.append(f"{path} ({type(e).__name__}: {e})")
    if bad:
        die(f"{len(bad)} of {len(paths)} training images cannot be read; fix or remove them:\n  " + "\n  ".join(bad))
    print(f"verified {len(paths)} training images: all readable")


_seen_bad = set()


def dataset_bad_files(bad_lists, dataset, max_fraction=0.01):
    """Unreadable images were skipped and replaced; stop once more than
    max_fraction of the files (and more than 2) are unreadable."""
    for s in bad_lists:
        _seen_bad.update(p for p in s.split("\n") if p)
    limit = max(2, int(max_fraction * (len(dataset.files_A) + len(dataset.files_B))))
    if len(_seen_bad) > limit:
        die(f"{len(_seen_bad)} training images are unreadable (more than {limit}); run with --verify_data to list "
            f"them all, then fix or remove them:\n  " + "\n  ".join(sorted(_seen_bad)))


if __name__ == "__main__":
    main()
