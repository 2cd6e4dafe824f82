"""
The adversarial pieces both training algorithms' steps are written with (cyclegan.py and
cut.py import them): the GAN losses and their modes, the discriminators of --netD, Adam's
options and the learning-rate schedules, the backward step (with fp16's GradScaler), the
replay buffer of earlier fakes, and the moving average of the generators' weights.
"""
import random

import torch
import torch.nn.functional as F

from budget import budget_schedule
from models import Discriminator, Discriminators, ProjectedDiscriminator, receptive_field_for

GAN_MODES = ("lsgan", "hinge", "vanilla")
NETDS = ("patch", "projected", "patch,projected")  # --netD, shown as KIND: argparse would print {patch,projected,...}


# -----------------------------------------------------------------------------
# Losses

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


# flat_area_loss: a step between neighbouring pixels of the input of more than FLAT_LEVELS
# (3 8-bit levels, in [-1, 1]) lets the output step there, and up to FLAT_REACH pixels away:
# line art draws its strokes beside the colour edges it traces, not on them. On Fluent's test
# pairs the true line art scores 0.019 against the flat input (0.163 with no reach); with 3 % of its
# channel values inverted, 0.140.
FLAT_LEVELS = 3 * 2 / 255
FLAT_REACH = 2


def flat_area_loss(output, guide):
    """Edge-aware smoothness (Godard et al., CVPR 2017), away from the guide's edges: the mean
    |difference| of neighbouring output pixels (mean over channels), each weighted by
    exp(-d / FLAT_LEVELS), d the largest |difference| of the guide's pixel pairs along the same
    axis within FLAT_REACH pixels (and over its channels). Dots inside an area the input has
    flat cost; steps near the input's edges are free. output, guide: (B, C, H, W) in [-1, 1]."""
    loss = 0
    for dim in (2, 3):
        d_out = output.diff(dim=dim).abs().mean(1, keepdim=True)
        d_in = F.max_pool2d(guide.diff(dim=dim).abs().amax(1, keepdim=True), 2 * FLAT_REACH + 1, stride=1,
                            padding=FLAT_REACH)
        loss = loss + (d_out * torch.exp(-d_in / FLAT_LEVELS)).mean()
    return loss


def split_batch(pred, n):
    """D's output on [real, fake] as (on real, on fake), also for a list of outputs."""
    if isinstance(pred, list):
        return [p[:n] for p in pred], [p[n:] for p in pred]
    return pred.split(n)


def set_requires_grad(nets, flag):
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def backward_step(loss, optimizer, scaler):
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)


# -----------------------------------------------------------------------------
# Discriminators

def d_receptive_field(opt):
    return (receptive_field_for(opt.img_height, opt.img_width) if opt.d_receptive_field == "auto"
            else opt.d_receptive_field)


def build_discriminator(opt, backbone):
    """--netD: one discriminator, or several that judge the same images. `backbone`: the
    frozen EfficientNet-Lite0 of --netD projected, shared by every discriminator of a run."""
    input_shape = (opt.channels, opt.img_height, opt.img_width)
    judges = {kind: Discriminator(input_shape, d_receptive_field(opt)) if kind == "patch"
              else ProjectedDiscriminator(backbone=backbone)
              for kind in opt.netD.split(",")}
    return Discriminators(judges) if len(judges) > 1 else judges[opt.netD]


# -----------------------------------------------------------------------------
# Optimisers and learning rates

def adam_options(device):
    # fused Adam on CUDA (one kernel for all parameters), the foreach one elsewhere
    return {"fused": True, "foreach": None} if device.type == "cuda" else {"fused": None, "foreach": True}


class LambdaLR:
    """Linear decay as the paper: the rate stays at its initial value until
    `decay_start_epoch`, then falls linearly to 0 at `n_epochs`. `offset` is the
    epoch training (re)starts from, so a resumed run continues the same curve."""

    def __init__(self, n_epochs, offset, decay_start_epoch):
        if decay_start_epoch >= n_epochs:
            raise ValueError(
                f"--decay_epoch ({decay_start_epoch}) must be smaller than --n_epochs ({n_epochs}): "
                f"the learning rate decays linearly to 0 between them"
            )
        self.n_epochs = n_epochs
        self.offset = offset
        self.decay_start_epoch = decay_start_epoch

    def step(self, epoch):
        return 1.0 - max(0, epoch + self.offset - self.decay_start_epoch) / (self.n_epochs - self.decay_start_epoch)


def lr_schedulers(opt, optimizers):
    """The seed's linear decay from --decay_epoch, stepped every epoch; with --budget, the
    warm-up and decay over the run's iterations (budget.BudgetLR, with a time budget's
    replans), stepped every iteration."""
    if opt.budget is not None:
        lr_lambda = budget_schedule(opt).step
    else:
        lr_lambda = LambdaLR(opt.n_epochs, opt.epoch, opt.decay_epoch).step
    return {name: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=lr_lambda) for name, o in optimizers.items()}


# -----------------------------------------------------------------------------
# The replay buffer of earlier fakes

class ReplayBuffer:
    """Shrivastava et al.'s image history: the discriminators see a mix of the
    newest fakes and fakes from up to `max_size` earlier steps, which keeps the
    generators from chasing a discriminator that only knows the latest fakes.

    Once full, each new image replaces a random stored one with probability 0.5,
    and the stored one is returned in its place. The buffer owns its random
    generator so that its draws can be saved and resumed exactly."""

    def __init__(self, max_size=50, seed=None):
        if max_size < 0:
            raise ValueError(f"ReplayBuffer max_size must be >= 0, got {max_size}")
        self.max_size = max_size  # 0: no buffer, the newest fakes pass straight through
        self.data = []
        self.rng = random.Random(seed)

    def push_and_pop(self, data):
        if self.max_size == 0:
            return data.detach()
        to_return = []
        for element in data.detach():
            # a copy: a view would keep the whole batch it was cut from alive (in memory and in last.pt)
            element = element.unsqueeze(0).clone()
            if len(self.data) < self.max_size:
                self.data.append(element)
                to_return.append(element)
            elif self.rng.uniform(0, 1) > 0.5:
                i = self.rng.randint(0, self.max_size - 1)
                to_return.append(self.data[i])
                self.data[i] = element
            else:
                to_return.append(element)
        return torch.cat(to_return)

    def state_dict(self):
        return {"max_size": self.max_size, "data": [d.cpu() for d in self.data], "rng": self.rng.getstate()}

    def load_state_dict(self, state, device="cpu"):
        self.max_size = state["max_size"]
        self.data = [d.to(device) for d in state["data"]]
        self.rng.setstate(as_random_state(state["rng"]))


def as_random_state(state):
    # random.getstate() is a tuple of (int, tuple, None); a round trip through
    # torch.save with weights_only=True turns the inner tuple into a list.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


# -----------------------------------------------------------------------------
# The moving average of the generators' weights (--ema)

def ema_decay(decay, iteration):
    """The decay of the average's update after `iteration` (0-based) steps: `decay`, held lower
    at first, min(decay, (1 + t) / (10 + t)) as TensorFlow's ExponentialMovingAverage with
    num_updates, so that a short run's average is not mostly its random (or identity) start:
    with 0.999 alone, 700 steps leave half the weight on the start; with the warm-up the
    average spans about the last ninth of the run until DECAY takes over (step 9000 for 0.999)."""
    return min(decay, (1 + iteration) / (10 + iteration))


@torch.no_grad()
def update_ema(ema, nets, decay):
    """ema <- decay * ema + (1 - decay) * weights, for each generator in `ema` ({name: copy})."""
    for name, ema_net in ema.items():
        for e, p in zip(ema_net.parameters(), nets[name].parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
