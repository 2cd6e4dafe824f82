"""
Train CUT or FastCUT (Park, Efros, Zhang and Zhu, "Contrastive Learning for Unpaired
Image-to-Image Translation", ECCV 2020) on two unpaired folders of images: one generator
A -> B, one discriminator, and no cycle. A patchwise contrastive loss (PatchNCE) keeps every
patch of the translation closer to the patch of the input at the same place than to the
input's other patches, so the content stays where it was while the GAN loss changes its look.

    python cut.py --dataset_name synthetic_day2night --img_height 64 --img_width 64
    python cut.py --dataset_name horse2zebra --mode fastcut
    torchrun --standalone --nproc_per_node=4 cut.py --dataset_name horse2zebra

It shares cyclegan.py's flags, data, --budget, evaluations, results page, --resume, signals
and DDP (the loop is training.py's, the GAN pieces gan.py's). It writes saved_models/<dataset>/G_AB_<epoch>.pth (A -> B,
for test.py, evaluate.py and export.py, as a CycleGAN generator), D_B_<epoch>.pth and
F_<epoch>.pth (the projection head), and its own last.pt.
"""
import argparse
import copy
import os
import sys
from contextlib import nullcontext

if __name__ == "__main__" and os.environ.get("RANK", "0") == "0" and not {"-h", "--help"} & set(sys.argv[1:]):
    # importing PyTorch takes seconds on a small CPU: a log file says at once that the run began
    print(f"cut.py: started (pid {os.getpid()}); importing PyTorch ...", flush=True)

import torch
import torch.nn.functional as F

import training
from augment import diff_augment
from gan import (ReplayBuffer, adam_options, backward_step, build_discriminator, flat_area_loss, gan_loss,
                 lr_schedulers, set_requires_grad, split_batch)
from models import GeneratorResNet, PatchProjection, efficientnet_lite0, weights_init_normal
from shifts import canonical_shift, flipped_shift
from training import Algorithm, add_training_args
from utils import HelpFormatter

# What train_step returns, in the order of log.csv's columns.
LOSS_NAMES = ("loss_D", "loss_G", "loss_GAN", "loss_NCE", "loss_NCE_Y", "loss_flat")

# --mode: the official defaults of each (FastCUT: a stronger NCE, no identity term, flip-equivariance)
MODES = {"cut": dict(lambda_NCE=1.0, nce_idt=True, flip_equivariance=False),
         "fastcut": dict(lambda_NCE=10.0, nce_idt=False, flip_equivariance=True)}


def get_parser():
    p = argparse.ArgumentParser(description="Train CUT or FastCUT.", formatter_class=HelpFormatter)
    add_training_args(p)  # cyclegan.py's flags, the levers, and what a run needs (training.py)
    p.set_defaults(antialias=True, antialias_up=True)  # CUT's generator: both anti-aliased, as the official
    g = p.add_argument_group("CUT")
    g.add_argument("--mode", default="cut", choices=tuple(MODES),
                   help="cut, or fastcut: the defaults of the flags below")
    g.add_argument("--lambda_GAN", type=float, default=1.0, help="GAN loss weight")
    g.add_argument("--lambda_NCE", type=float, default=None, help="PatchNCE loss weight (default: cut 1, fastcut 10)")
    g.add_argument("--nce_idt", action=argparse.BooleanOptionalAction, default=None,
                   help="also PatchNCE between real B and G(real B), the identity term "
                        "(default: on for cut, off for fastcut)")
    g.add_argument("--flip_equivariance", action=argparse.BooleanOptionalAction, default=None,
                   help="flip half the batches left-right before G and its features back before PatchNCE "
                        "(default: off for cut, on for fastcut)")
    g.add_argument("--lambda_flat", type=float, default=0.0,
                   help="weight of the flat-area loss: neighbouring pixels of the translation differ only where "
                        "the input's do (edge-aware smoothness), against dots and dither inside flat fills; for "
                        "tasks whose edges are the input's (drawings, icons), not ones that add texture; 0: off")
    g.add_argument("--num_patches", type=int, default=256, help="locations sampled per tapped layer for PatchNCE")
    g.add_argument("--nce_T", type=float, default=0.07, help="PatchNCE temperature")
    g.add_argument("--netF_nc", type=int, default=256, help="width of the projection head's MLP and of its output")
    g.add_argument("--pool_size", type=int, default=0,
                   help="size of the fake image replay buffer; 0 (CUT's default) disables it")
    return p


def flag_ranges(opt):
    return [("lambda_GAN", opt.lambda_GAN >= 0, "at least 0"),
            ("lambda_NCE", opt.lambda_NCE is None or opt.lambda_NCE >= 0, "at least 0"),
            ("lambda_flat", opt.lambda_flat >= 0, "at least 0"),
            ("num_patches", opt.num_patches >= 1, "at least 1"),
            ("nce_T", opt.nce_T > 0, "positive"),
            ("netF_nc", opt.netF_nc >= 1, "at least 1"),
            ("pool_size", opt.pool_size >= 0, "at least 0 (0 turns the replay buffer off)")]


def apply_mode(opt):
    """--mode's defaults for the flags not given (a resumed run's are filled in already)."""
    for flag, value in MODES[opt.mode].items():
        if getattr(opt, flag) is None:
            setattr(opt, flag, value)
    return opt


def parse_args(argv):
    opt, resume_state = training.parse_args(get_parser(), argv, flag_ranges, "CUT")
    return apply_mode(opt), resume_state


# -----------------------------------------------------------------------------
# The networks and their optimisers

def build_networks(opt, device):
    """G_AB (the seed's generator, initialised as cyclegan.py's), D_B (--netD), F (the
    projection head, sized by the features G's PatchNCE layers give), and with --ema G_AB's
    averaged copy."""
    input_shape = (opt.channels, opt.img_height, opt.img_width)
    G = GeneratorResNet(input_shape, opt.n_residual_blocks, opt.ngf, opt.identity_start, opt.antialias,
                        opt.antialias_up, opt.canonical_shift)
    nets = {"G_AB": G, "D_B": build_discriminator(opt, efficientnet_lite0() if "projected" in opt.netD else None)}
    for net in nets.values():
        net.apply(weights_init_normal)
    if G.identity_start:
        G.start_as_identity()
    with torch.no_grad():
        features = G(torch.zeros(1, *input_shape[:1], 32, 32), G.nce_layers(), encode_only=True)
    nets["F"] = PatchProjection([f.size(1) for f in features], opt.netF_nc)
    nets = {name: net.to(device) for name, net in nets.items()}
    ema = {"G_AB": copy.deepcopy(nets["G_AB"]).requires_grad_(False)} if opt.ema > 0 else {}
    return nets, ema


def build_optimizers(opt, nets, device):
    # (one Adam for G and F: Adam's update is per parameter, so this is the official two)
    adam = dict(lr=opt.lr, betas=(opt.b1, opt.b2), **adam_options(device))
    optimizers = {"optimizer_G": torch.optim.Adam(list(nets["G_AB"].parameters()) + list(nets["F"].parameters()),
                                                  **adam),
                  "optimizer_D": torch.optim.Adam(nets["D_B"].parameters(), **adam)}
    return optimizers, lr_schedulers(opt, optimizers)


def build_buffers(opt, rank):
    return {"fake_B": ReplayBuffer(opt.pool_size, seed=opt.seed + rank)}


# -----------------------------------------------------------------------------
# One training step

def patch_nce_loss(queries, keys, temperature=0.07):
    """PatchNCE of one layer, per image: queries and keys (B, P, d), L2-normalised, from the
    same P locations of the output and the input. Each query's positive is the key at its own
    location; the negatives are the other P - 1 keys of the same image. For each image, the
    mean over its P queries of the cross-entropy that picks the positive: (B,)."""
    logits = torch.bmm(queries, keys.detach().transpose(1, 2)) / temperature  # B, P, P; positives on the diagonal
    b, p, _ = logits.shape
    targets = torch.arange(p, device=logits.device).repeat(b)
    return F.cross_entropy(logits.reshape(b * p, p), targets, reduction="none").view(b, p).mean(1)


def nce_across_layers(G, F_head, source_features, target, layers, n_patches, temperature, flipped, shift=None):
    """The PatchNCE of every tapped layer between the source images' features (keys) and
    the target images' (queries, through G's encoder), averaged over the layers. `flipped`:
    the target was computed from the left-right flipped source, so its features are flipped
    back to line up with the source's. `shift`: where a --canonical_shift G placed the source
    images, so that the queries sit where the keys did. Per image: (B,)."""
    query_features = G(target, layers, encode_only=True, shift=shift)
    if flipped:
        query_features = [f.flip(3) for f in query_features]
    with torch.no_grad():  # the keys are constants of the loss (the official detaches them)
        keys, locations = F_head([f.detach() for f in source_features], n_patches)
    queries, _ = F_head(query_features, n_patches, locations)
    return sum(patch_nce_loss(q, k, temperature) for q, k in zip(queries, keys)) / len(layers)


def train_step(real_A, real_B, nets, optimizers, buffers, lambda_GAN=1.0, lambda_NCE=1.0, nce_idt=True,
               flip_equivariance=False, num_patches=256, nce_T=0.07, autocast=nullcontext(), scaler=None, diffaug="",
               gan_mode="lsgan", lambda_flat=0.0):
    """One CUT iteration in the official order: G translates (with the identity images of B
    when nce_idt), D learns on real B and the new fakes, then G and F learn from D's grade
    and PatchNCE. Returns the losses (LOSS_NAMES) as detached tensors.

    nets: {"G_AB", "D_B", "F"}; optimizers: {"optimizer_G" (G and F), "optimizer_D"};
    buffers: {"fake_B"} (a ReplayBuffer, which passes the fakes through at --pool_size 0)."""
    G, D, F_head = nets["G_AB"], nets["D_B"], nets["F"]
    optimizer_G, optimizer_D = optimizers["optimizer_G"], optimizers["optimizer_D"]
    bare_G = getattr(G, "module", G)
    layers = getattr(bare_G, "_orig_mod", bare_G).nce_layers()
    n = real_A.size(0)

    real = torch.cat([real_A, real_B]) if nce_idt else real_A
    flipped = flip_equivariance and bool(torch.rand(()) < 0.5)  # (the global RNG, which last.pt saves)
    source = real.flip(3) if flipped else real
    shift = canonical_shift(source) if getattr(bare_G, "_orig_mod", bare_G).canonical_shift else None
    with autocast:
        fake, features = G(source, layers, shift=shift)
    fake_B = fake[:n]  # (and fake[n:], with nce_idt: G(real B), which should stay real B)

    # ----------------------------------------------
    #  Train the discriminator, on real B and fakes
    # ----------------------------------------------
    fake_ = buffers["fake_B"].push_and_pop(fake_B.detach().to(real_B.dtype))
    optimizer_D.zero_grad(set_to_none=True)
    with autocast:
        pred_real, pred_fake = split_batch(D(diff_augment(torch.cat([real_B, fake_]), diffaug, pairs=2)), n)
        loss_D = (gan_loss(pred_real, True, gan_mode) + gan_loss(pred_fake, False, gan_mode)) / 2
    backward_step(loss_D, optimizer_D, scaler)

    # -----------------------------
    #  Train the generator and F
    # -----------------------------
    # D only grades the fakes here; under DDP its bare module is called (no gradients expected)
    set_requires_grad((D,), False)
    grade = getattr(D, "module", D)
    optimizer_G.zero_grad(set_to_none=True)
    with autocast:
        loss_GAN = lambda_GAN * gan_loss(grade(diff_augment(fake_B, diffaug)), True, gan_mode, for_discriminator=False)
        if flipped:  # the keys are the features of the unflipped input
            with torch.no_grad():
                features = bare_G(real, layers, encode_only=True, shift=None if shift is None else flipped_shift(shift))
        # one pass for both terms: the translations against real A, the identities against real B
        nce = lambda_NCE * nce_across_layers(G, F_head, features, fake, layers, num_patches, nce_T, flipped,
                                             shift)
        loss_NCE = nce[:n].mean()
        loss_NCE_Y = nce[n:].mean() if nce_idt else torch.zeros_like(loss_NCE)
        # (on the flipped input too: both are flipped alike)
        loss_flat = lambda_flat * flat_area_loss(fake_B, source[:n]) if lambda_flat else torch.zeros_like(loss_NCE)
        loss_G = loss_GAN + ((loss_NCE + loss_NCE_Y) / 2 if nce_idt else loss_NCE) + loss_flat
    backward_step(loss_G, optimizer_G, scaler)
    set_requires_grad((D,), True)
    if scaler is not None:
        scaler.update()

    losses = (loss_D, loss_G, loss_GAN, loss_NCE, loss_NCE_Y, loss_flat)
    return {name: loss.detach() for name, loss in zip(LOSS_NAMES, losses)}


def step(opt, real_A, real_B, nets, optimizers, buffers, autocast, scaler):
    """train_step with this run's arguments: the step the loop in training.py calls."""
    return train_step(real_A, real_B, nets, optimizers, buffers, opt.lambda_GAN, opt.lambda_NCE, opt.nce_idt,
                      opt.flip_equivariance, opt.num_patches, opt.nce_T, autocast, scaler, opt.diffaug, opt.gan_mode,
                      opt.lambda_flat)


# -----------------------------------------------------------------------------

CUT = Algorithm(name="CUT", build_networks=build_networks, build_optimizers=build_optimizers,
                build_buffers=build_buffers, step=step, loss_names=LOSS_NAMES)


def main(argv=None):
    training.main(parse_args, CUT, argv)


if __name__ == "__main__":
    training.run_as_script(main)
