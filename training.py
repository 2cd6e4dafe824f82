"""
What a training script here needs around its algorithm, in the order a run meets it: the run
folder, the devices and processes, the data, the budget, the GAN losses, and saving and
reporting. cyclegan.py holds the algorithm (its networks, its step, its loop); this holds what
any such script would need again, as plain functions.
"""
import math
import os
import random
import re
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from datasets import ImageDataset, NoReadableImage, UnpairedSampler, check_some_readable, train_transforms, verify_images
from report import (ResultsPage, TrainingLog, evaluate_generators, keep_eval_rows_until, record_evaluation, sample_images,
                    tensorboard_writer)
from synthetic import BUILTIN_DATASET, make_day2night
from utils import (autocast_context, check_finite_weights, check_writable, choose_precision, clean_killed_saves, die, parse_budget,
                   pick_device, save_atomic)


# -----------------------------------------------------------------------------
# The run folder: saved_models/<name>/ and images/<name>/

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
# Devices, processes, precision

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


def adam_options(device):
    # fused Adam on CUDA (one kernel for all parameters), the foreach one elsewhere
    return {"fused": True, "foreach": None} if device.type == "cuda" else {"fused": None, "foreach": True}


def networks_for_step(nets, opt, device, procs):
    """The networks as train_step calls them: compiled (--compile), then wrapped in DDP."""
    step_nets = dict(nets)
    if opt.compile:
        step_nets = {name: torch.compile(net, mode=None if opt.compile == "default" else opt.compile) for name, net in step_nets.items()}
    if procs.ddp:
        step_nets = {name: DDP(net, device_ids=[device.index] if device.type == "cuda" else None) for name, net in step_nets.items()}
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
# --budget: the run's length, in iterations

def total_iterations(opt, n_batches):
    return opt.budget_iters if opt.budget is not None else opt.n_epochs * n_batches


def n_evaluations(opt, iterations, n_batches):
    """Evaluations in a run of `iterations`: every --eval_interval epochs, and after the last."""
    if opt.eval_interval <= 0:
        return 0
    epochs = math.ceil(iterations / n_batches)
    return epochs // opt.eval_interval + (epochs % opt.eval_interval != 0)


def fit_budget(opt, n_batches, procs, started, measure_costs, evaluates):
    """Turn --budget into opt.budget_iters and opt.n_epochs, once, at the start of a run; they
    are saved with the arguments in last.pt, so a resumed run keeps them. A time budget is
    the wall time of the whole run, less what has been spent since `started`: iterations at
    the measured speed plus the evaluations --eval_interval asks for. Under torchrun rank 0's
    figure is everyone's. `measure_costs(seconds)`: the script's (seconds per iteration, seconds
    per evaluation), measured for about `seconds`; `evaluates`: whether the run evaluates."""
    kind, amount = parse_budget(opt.budget)
    if kind == "iterations":
        total = amount
    else:
        seconds = min(60, 0.02 * amount)
        if procs.master:
            print(f"--budget {opt.budget}: first measuring this machine's speed, about {seconds:.0f} s of training steps"
                  + (", then one evaluation of both generators (its first also takes the test images' FID features)"
                     if evaluates else "") + " ...")
        step_s, eval_s = measure_costs(seconds)
        left = amount - (time.time() - started)
        total = max(0, int(left / step_s))
        for _ in range(5):  # evaluations take time from iterations, and fewer iterations may need fewer evaluations
            total = max(0, int((left - n_evaluations(opt, total, n_batches) * eval_s) / step_s))
        if total < 1:
            die(f"--budget {opt.budget}: too short here for one iteration ({step_s:.2f} s) and the evaluations "
                f"({eval_s:.0f} s each); give more time, or a number of iterations")
        if procs.master:
            print(f"--budget {opt.budget}: {step_s:.3f} s per iteration" + (f" and {eval_s:.0f} s per evaluation" if eval_s else "")
                  + f" on this machine: {total} iterations ({total / n_batches:.1f} epochs)")
    if procs.ddp:
        total_t = torch.tensor([total], dtype=torch.int64)
        dist.broadcast(total_t, src=0, group=procs.group)
        total = int(total_t[0])
    opt.budget_iters, opt.n_epochs = total, math.ceil(total / n_batches)


# -----------------------------------------------------------------------------
# What every adversarial step needs

def set_requires_grad(nets, flag):
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


GAN_MODES = ("lsgan", "hinge", "vanilla")


def gan_loss(pred, target_is_real, mode="lsgan", for_discriminator=True):
    """The GAN loss of D's output (patch logits) against "real" or "fake". A list of outputs
    (several discriminators judging, --netD patch,projected): the mean of their losses."""
    if isinstance(pred, list):
        return sum(gan_loss(p, target_is_real, mode, for_discriminator) for p in pred) / len(pred)
    if mode == "lsgan":  # least squares against an all-ones or all-zeros map of D's output shape
        target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
        return F.mse_loss(pred, target)
    if mode == "vanilla":  # the original GAN's cross-entropy, on logits (G's is the non-saturating one)
        return F.binary_cross_entropy_with_logits(pred, torch.full_like(pred, float(target_is_real)))
    # hinge: D is done with a real logit above 1 and a fake one below -1; G raises its fakes' logits
    if not for_discriminator:
        return -pred.mean()
    return F.relu(1 - pred).mean() if target_is_real else F.relu(1 + pred).mean()


def split_batch(pred, n):
    """D's output on [real, fake] as (on real, on fake), also for a list of outputs."""
    if isinstance(pred, list):
        return [p[:n] for p in pred], [p[n:] for p in pred]
    return pred.split(n)


def backward_step(loss, optimizer, scaler):
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)


# -----------------------------------------------------------------------------
# Saving, and what rank 0 reports

def every(interval, count):
    """True every `interval` counts; never when interval <= 0."""
    return interval > 0 and count % interval == 0


def save_last(training, report, model_dir, iteration, procs):
    """last.pt, to continue after `iteration` from training.epoch/batch, once the losses
    logged so far and the weights are known to be finite."""
    if procs.master:
        report.log.flush()
        check_finite_weights({**training.nets, **{"ema_" + k: v for k, v in training.ema.items()}}, iteration, model_dir)
    training.save(os.path.join(model_dir, "last.pt"), procs.group)


def save_epoch_weights(nets, model_dir, done):
    # named by the number of epochs done, so --epoch N resumes after them
    for name, net in nets.items():
        save_atomic(net.state_dict(), os.path.join(model_dir, f"{name}_{done}.pth"))


def start_report(opt, device, dataset, n_batches, training, model_dir, procs, evaluator):
    """What rank 0 writes beside the weights: log.csv and the progress line, the results
    page, TensorBoard, and the FID `evaluator` (None where not asked for). Other ranks: None."""
    if not procs.master:
        return None
    done = training.epoch * n_batches + training.batch
    report = SimpleNamespace(evaluator=evaluator, writer=tensorboard_writer(opt) if opt.tensorboard else None)
    clean_killed_saves(model_dir)
    if opt.overwrite and not opt.resume and opt.epoch == 0:
        remove_old_run(opt)
    report.log = TrainingLog(os.path.join(model_dir, "log.csv"), total_iterations(opt, n_batches), done, opt.log_interval, model_dir,
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
    if opt.budget is None:  # (--budget's schedule steps every iteration)
        for scheduler in training.schedulers.values():
            scheduler.step()
    last_iteration = min(done * n_batches, total_iterations(opt, n_batches)) - 1
    # (under torchrun the other processes wait for rank 0 in these saves' gather)
    save_last(training, report, model_dir, last_iteration, procs)
    if procs.master and (done == opt.n_epochs or every(opt.checkpoint_interval, done)):
        save_epoch_weights(training.published(), model_dir, done)
    if opt.eval_interval > 0 and (done == opt.n_epochs or every(opt.eval_interval, done)):
        if procs.master:
            published = training.published()
            results = evaluate_generators(report.evaluator, published, device)
            record_evaluation(results, done, last_iteration, published, model_dir, training.best_fid, report.writer)
        save_last(training, report, model_dir, last_iteration, procs)
    if procs.master:
        report.page.update(replot=True)


def stop_after_signal(training, report, model_dir, iteration, procs, signum):
    save_last(training, report, model_dir, iteration, procs)
    if procs.master:
        report.log.close()
        print(f"saved {model_dir}/last.pt at epoch {training.epoch}, batch {training.batch}; continue with: "
              f"python {os.path.basename(sys.argv[0]) or 'cyclegan.py'} --dataset_name {training.opt.dataset_name} --resume", file=sys.stderr)
    if procs.ddp:
        dist.destroy_process_group()
    sys.exit(128 + signum)

