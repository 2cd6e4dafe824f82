"""
Train CycleGAN (Zhu et al. 2017) on two unpaired folders of images.

    python cyclegan.py --dataset_name synthetic_day2night --img_height 64 --img_width 64
    python cyclegan.py --dataset_name monet2photo            # after data/download_cyclegan_dataset.sh
    torchrun --standalone --nproc_per_node=4 cyclegan.py --dataset_name horse2zebra

Samples go to images/<dataset>/, weights to saved_models/<dataset>/{G_AB,G_BA,D_A,D_B}_<epoch>.pth
(plain state_dicts, as the seed), and the full training state to saved_models/<dataset>/last.pt,
from which --resume continues exactly. This file is the algorithm (its arguments, networks and
step); training.py has the loop that cut.py shares, gan.py the GAN pieces the step is
written with.
"""
import argparse
import copy
import os
import sys
from contextlib import nullcontext

if __name__ == "__main__" and os.environ.get("RANK", "0") == "0" and not {"-h", "--help"} & set(sys.argv[1:]):
    # importing PyTorch takes seconds on a small CPU: a log file says at once that the run began
    print(f"cyclegan.py: started (pid {os.getpid()}); importing PyTorch ...", flush=True)

import torch
import torch.nn.functional as F

import training
from augment import diff_augment
from gan import (ReplayBuffer, adam_options, backward_step, build_discriminator, gan_loss, lr_schedulers,
                 set_requires_grad, split_batch)
from models import GeneratorResNet, efficientnet_lite0, weights_init_normal
from training import Algorithm, add_training_args
from utils import HelpFormatter

# What train_step returns, in the order of log.csv's columns.
LOSS_NAMES = ("loss_D", "loss_G", "loss_GAN", "loss_cycle", "loss_identity", "loss_D_A", "loss_D_B")


def get_parser():
    p = argparse.ArgumentParser(description="Train CycleGAN.", formatter_class=HelpFormatter)
    add_training_args(p)  # the seed's flags, the levers, and what a run needs (training.py)
    g = p.add_argument_group("CycleGAN")
    g.add_argument("--lambda_cyc", type=float, default=10.0, help="cycle loss weight")
    g.add_argument("--lambda_id", type=float, default=5.0, help="identity loss weight")
    g.add_argument("--pool_size", type=int, default=50, help="size of the fake image replay buffers; 0 disables them")
    return p


def flag_ranges(opt):
    return [("lambda_cyc", opt.lambda_cyc >= 0, "at least 0"),
            ("lambda_id", opt.lambda_id >= 0, "at least 0"),
            ("pool_size", opt.pool_size >= 0, "at least 0 (0 turns the replay buffers off)")]


def parse_args(argv):
    return training.parse_args(get_parser(), argv, flag_ranges, "CycleGAN")


def explicit_flags(argv, dests):
    return training.explicit_flags(get_parser(), argv, dests)


# -----------------------------------------------------------------------------
# The networks and their optimisers

def build_networks(opt, device):
    """The four networks, initialised as the seed does (then, with --identity_start, the
    generators made the identity), and with --ema the generators' averaged copies."""
    input_shape = (opt.channels, opt.img_height, opt.img_width)
    nets = {name: GeneratorResNet(input_shape, opt.n_residual_blocks, opt.ngf, opt.identity_start, opt.antialias,
                                  opt.antialias_up, opt.canonical_shift)
            for name in ("G_AB", "G_BA")}
    backbone = efficientnet_lite0() if "projected" in opt.netD else None  # frozen: D_A and D_B share it
    nets.update({name: build_discriminator(opt, backbone) for name in ("D_A", "D_B")})
    for name, net in nets.items():
        net.apply(weights_init_normal)
        if name.startswith("G") and net.identity_start:
            net.start_as_identity()
    nets = {name: net.to(device) for name, net in nets.items()}
    ema = {name: copy.deepcopy(nets[name]).requires_grad_(False) for name in ("G_AB", "G_BA")} if opt.ema > 0 else {}
    return nets, ema


def build_optimizers(opt, nets, device):
    adam = dict(lr=opt.lr, betas=(opt.b1, opt.b2), **adam_options(device))
    generators = list(nets["G_AB"].parameters()) + list(nets["G_BA"].parameters())
    optimizers = {"optimizer_G": torch.optim.Adam(generators, **adam),
                  "optimizer_D_A": torch.optim.Adam(nets["D_A"].parameters(), **adam),
                  "optimizer_D_B": torch.optim.Adam(nets["D_B"].parameters(), **adam)}
    return optimizers, lr_schedulers(opt, optimizers)


def build_buffers(opt, rank):
    """The replay buffers of earlier fakes the discriminators also see (one pair per process)."""
    return {"fake_A": ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * rank),
            "fake_B": ReplayBuffer(opt.pool_size, seed=opt.seed + 2 * rank + 1)}


# -----------------------------------------------------------------------------
# One training step

def train_step(real_A, real_B, nets, optimizers, buffers, lambda_cyc=10.0, lambda_id=5.0, autocast=nullcontext(),
               scaler=None, diffaug="", gan_mode="lsgan"):
    """One CycleGAN iteration: the generators, then D_A, then D_B, in the seed's
    order and with its loss averaging. Returns the losses (LOSS_NAMES) as detached
    tensors: fetching them to the host is left to the caller, so nothing here syncs.
    `diffaug`: the DiffAugment policy applied to everything the discriminators see;
    `gan_mode`: GAN_MODES.

    nets: {"G_AB", "G_BA", "D_A", "D_B"}; optimizers: {"optimizer_G", "optimizer_D_A",
    "optimizer_D_B"}; buffers: {"fake_A", "fake_B"} (ReplayBuffers of earlier fakes)."""
    G_AB, G_BA, D_A, D_B = nets["G_AB"], nets["G_BA"], nets["D_A"], nets["D_B"]
    optimizer_G, optimizer_D_A, optimizer_D_B = (optimizers[name] for name in ("optimizer_G", "optimizer_D_A",
                                                                                 "optimizer_D_B"))
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


def step(opt, real_A, real_B, nets, optimizers, buffers, autocast, scaler):
    """train_step with this run's arguments: the step the loop in training.py calls."""
    return train_step(real_A, real_B, nets, optimizers, buffers, opt.lambda_cyc, opt.lambda_id, autocast, scaler,
                      opt.diffaug, opt.gan_mode)


# -----------------------------------------------------------------------------

CYCLEGAN = Algorithm(name="CycleGAN", build_networks=build_networks, build_optimizers=build_optimizers,
                     build_buffers=build_buffers, step=step, loss_names=LOSS_NAMES)


def main(argv=None):
    training.main(parse_args, CYCLEGAN, argv)


if __name__ == "__main__":
    training.run_as_script(main)
