"""Tests of models.py: the seed-compatible generator and discriminator layouts, the
grayscale padding fix, output shapes, the official generator and its checkpoints,
weight initialisation and build_generator's error path.

Each reference the networks are checked against is written independently of models.py:
a literal re-statement of the seed's (tutorial's) generator and discriminator, and
functional (torch.nn.functional) forwards of the official ResnetGenerator (in conftest.py,
shared with test_translate.py) and of the paper's 70x70 PatchGAN that read weights by key.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import official_reference_forward
from models import (
    Discriminator,
    GeneratorResNet,
    OfficialGenerator,
    build_generator,
    clean_state_dict,
    generator_config,
    receptive_field_for,
    weights_init_normal,
)


# -----------------------------------------------------------------------------
# References

class SeedResidualBlock(nn.Module):
    """The seed's ResidualBlock, as in the tutorial."""

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


class SeedGeneratorResNet(nn.Module):
    """The seed's GeneratorResNet, as in the tutorial, including its
    ReflectionPad2d(channels) (equal to the right padding, 3, only for RGB)."""

    def __init__(self, input_shape, num_residual_blocks):
        super().__init__()
        channels = input_shape[0]
        out_features = 64
        model = [
            nn.ReflectionPad2d(channels),
            nn.Conv2d(channels, out_features, 7),
            nn.InstanceNorm2d(out_features),
            nn.ReLU(inplace=True),
        ]
        in_features = out_features
        for _ in range(2):
            out_features *= 2
            model += [
                nn.Conv2d(in_features, out_features, 3, stride=2, padding=1),
                nn.InstanceNorm2d(out_features),
                nn.ReLU(inplace=True),
            ]
            in_features = out_features
        for _ in range(num_residual_blocks):
            model += [SeedResidualBlock(out_features)]
        for _ in range(2):
            out_features //= 2
            model += [
                nn.Upsample(scale_factor=2),
                nn.Conv2d(in_features, out_features, 3, stride=1, padding=1),
                nn.InstanceNorm2d(out_features),
                nn.ReLU(inplace=True),
            ]
            in_features = out_features
        model += [nn.ReflectionPad2d(channels), nn.Conv2d(out_features, channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)


class SeedDiscriminator(nn.Module):
    """The seed's Discriminator, as in the tutorial."""

    def __init__(self, input_shape):
        super().__init__()
        channels, height, width = input_shape
        self.output_shape = (1, height // 2**4, width // 2**4)

        def discriminator_block(in_filters, out_filters, normalize=True):
            layers = [nn.Conv2d(in_filters, out_filters, 4, stride=2, padding=1)]
            if normalize:
                layers.append(nn.InstanceNorm2d(out_filters))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.model = nn.Sequential(
            *discriminator_block(channels, 64, normalize=False),
            *discriminator_block(64, 128),
            *discriminator_block(128, 256),
            *discriminator_block(256, 512),
            nn.ZeroPad2d((1, 0, 1, 0)),
            nn.Conv2d(512, 1, 4, padding=1),
        )

    def forward(self, img):
        return self.model(img)


def patchgan70_reference_forward(sd, x):
    """The paper's 70x70 PatchGAN (C64-C128-C256-C512, the last of them stride 1,
    then a 1-channel conv; all 4x4 with zero padding 1), functional, by key."""
    h = F.leaky_relu(F.conv2d(x, sd["model.0.weight"], sd["model.0.bias"], stride=2, padding=1), 0.2)
    for key, stride in (("model.2", 2), ("model.5", 2), ("model.8", 1)):
        h = F.conv2d(h, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=stride, padding=1)
        h = F.leaky_relu(F.instance_norm(h, eps=1e-5), 0.2)
    return F.conv2d(h, sd["model.12.weight"], sd["model.12.bias"], padding=1)


def layout(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def seeded(factory, seed=0):
    torch.manual_seed(seed)
    return factory()


def rand_input(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


@torch.no_grad()
def run(net, x):
    return net.eval()(x)


@pytest.fixture(scope="module")
def official9():
    return seeded(lambda: OfficialGenerator(3, 3, 64, 9))


# -----------------------------------------------------------------------------
# 1. The seed's state_dict layout

def res_blocks(indices, name, shape):
    return {f"model.{i}.{name}.{j}.{p}": (shape if p == "weight" else shape[:1])
            for i in indices for j in (1, 5) for p in ("weight", "bias")}


def test_seed_generator_9_blocks_has_exactly_the_seed_state_dict_keys_and_shapes():
    expected = {
        "model.1.weight": [64, 3, 7, 7], "model.1.bias": [64],
        "model.4.weight": [128, 64, 3, 3], "model.4.bias": [128],
        "model.7.weight": [256, 128, 3, 3], "model.7.bias": [256],
        **res_blocks(range(10, 19), "block", [256, 256, 3, 3]),
        "model.20.weight": [128, 256, 3, 3], "model.20.bias": [128],
        "model.24.weight": [64, 128, 3, 3], "model.24.bias": [64],
        "model.28.weight": [3, 64, 7, 7], "model.28.bias": [3],
    }
    assert len(expected) == 48
    assert layout(GeneratorResNet((3, 256, 256), 9)) == expected


def test_seed_generator_6_blocks_shifts_later_indices_to_17_21_25():
    expected = {
        "model.1.weight": [64, 3, 7, 7], "model.1.bias": [64],
        "model.4.weight": [128, 64, 3, 3], "model.4.bias": [128],
        "model.7.weight": [256, 128, 3, 3], "model.7.bias": [256],
        **res_blocks(range(10, 16), "block", [256, 256, 3, 3]),
        "model.17.weight": [128, 256, 3, 3], "model.17.bias": [128],
        "model.21.weight": [64, 128, 3, 3], "model.21.bias": [64],
        "model.25.weight": [3, 64, 7, 7], "model.25.bias": [3],
    }
    assert layout(GeneratorResNet((3, 256, 256), 6)) == expected


@pytest.mark.parametrize("receptive_field", [94, 70])
def test_discriminator_has_the_seed_keys_and_shapes_for_both_receptive_fields(receptive_field):
    expected = {
        "model.0.weight": [64, 3, 4, 4], "model.0.bias": [64],
        "model.2.weight": [128, 64, 4, 4], "model.2.bias": [128],
        "model.5.weight": [256, 128, 4, 4], "model.5.bias": [256],
        "model.8.weight": [512, 256, 4, 4], "model.8.bias": [512],
        "model.12.weight": [1, 512, 4, 4], "model.12.bias": [1],
    }
    assert layout(Discriminator((3, 256, 256), receptive_field)) == expected


def test_discriminator_rejects_receptive_fields_it_cannot_build():
    for receptive_field in (50, 0, "auto"):  # ("auto" is cyclegan.py's to resolve, from the crop)
        with pytest.raises(ValueError):
            Discriminator((3, 256, 256), receptive_field)


# -----------------------------------------------------------------------------
# 2. Checkpoints made by the seed's code load strictly and translate the same

@pytest.mark.parametrize("n_blocks", [9, 6])
def test_seed_generator_state_dict_loads_strict_and_gives_identical_rgb_outputs(n_blocks):
    ref = seeded(lambda: SeedGeneratorResNet((3, 256, 256), n_blocks))
    ref.apply(weights_init_normal)
    ours = GeneratorResNet((3, 256, 256), n_blocks)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = rand_input(2, 3, 32, 24)
    torch.testing.assert_close(run(ours, x), run(ref, x), rtol=0, atol=0)


def test_seed_discriminator_state_dict_loads_strict_and_gives_identical_outputs():
    ref = seeded(lambda: SeedDiscriminator((3, 128, 96)))
    ours = Discriminator((3, 128, 96))  # default receptive_field=94 is the seed's network
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.output_shape == ref.output_shape
    x = rand_input(2, 3, 128, 96)
    torch.testing.assert_close(run(ours, x), run(ref, x), rtol=0, atol=0)


def test_discriminator_70_matches_functional_paper_patchgan():
    D = seeded(lambda: Discriminator((3, 96, 80), receptive_field=70))
    x = rand_input(1, 3, 96, 80)
    y = run(D, x)
    assert y.shape == (1, *D.output_shape) == (1, 1, 10, 8)
    torch.testing.assert_close(y, patchgan70_reference_forward(D.state_dict(), x))


def official_patchgan_reference_forward(sd, x, n_layers):
    """The official NLayerDiscriminator with instance norm: C64, then n_layers - 1 stride-2
    convs and one stride-1 conv, each of twice the width (at most 512), then a 1-channel
    conv; all 4x4 with zero padding 1. Functional, over the weights in key order."""
    weights = [k[:-len(".weight")] for k in sd if k.endswith(".weight")]
    assert len(weights) == n_layers + 2
    h = F.leaky_relu(F.conv2d(x, sd[weights[0] + ".weight"], sd[weights[0] + ".bias"], stride=2, padding=1), 0.2)
    for k, key in enumerate(weights[1:-1], start=1):
        h = F.conv2d(h, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=2 if k < n_layers else 1, padding=1)
        assert h.shape[1] == 64 * min(2 ** k, 8)
        h = F.leaky_relu(F.instance_norm(h, eps=1e-5), 0.2)
    return F.conv2d(h, sd[weights[-1] + ".weight"], sd[weights[-1] + ".bias"], padding=1)


@pytest.mark.parametrize("receptive_field, n_layers", [(70, 3), (34, 2), (16, 1)])
def test_small_discriminators_are_the_official_patchgan_with_fewer_layers(receptive_field, n_layers):
    D = seeded(lambda: Discriminator((3, 64, 48), receptive_field))
    x = rand_input(1, 3, 64, 48)
    torch.testing.assert_close(run(D, x), official_patchgan_reference_forward(D.state_dict(), x, n_layers))


def test_auto_receptive_field_is_the_one_closest_to_the_papers_share_of_the_crop():
    for h, w in [(64, 64), (128, 128), (256, 256), (32, 48), (512, 256), (96, 96)]:
        shares = {rf: abs(rf / min(h, w) - 70 / 256) for rf in (16, 34, 70)}
        assert receptive_field_for(h, w) == min(shares, key=shares.get)
    assert (receptive_field_for(64, 64), receptive_field_for(256, 256)) == (16, 70)


# -----------------------------------------------------------------------------
# 2b. Levers for small budgets: the generator's width and its identity start

def test_generator_width_scales_every_layer_and_loads_back_at_its_width():
    G = seeded(lambda: GeneratorResNet((3, 32, 32), 2, ngf=16))
    widths = {k: v[0] for k, v in layout(G).items() if k.endswith(".weight")}
    assert widths["model.1.weight"] == 16 and widths["model.4.weight"] == 32 and widths["model.7.weight"] == 64
    assert all(w == 64 for k, w in widths.items() if ".block." in k)
    assert (widths["model.13.weight"], widths["model.17.weight"], widths["model.21.weight"]) == (32, 16, 3)
    loaded = build_generator(G.state_dict())
    x = rand_input(1, 3, 32, 32)
    torch.testing.assert_close(run(loaded, x), run(G, x), rtol=0, atol=0)


def test_identity_start_generator_is_exactly_the_identity_before_training_and_adds_its_output_after():
    G = seeded(lambda: GeneratorResNet((3, 32, 32), 2, ngf=16, identity_start=True))
    G.apply(weights_init_normal)
    x = rand_input(2, 3, 32, 28)
    assert not torch.equal(run(G, x), x)  # the seed's init alone is not the identity...
    G.start_as_identity()
    assert torch.equal(run(G, x), x)  # ...the zeroed last layer with the global skip is
    # after training has moved the last layer: the input plus the network's (untanhed) output
    with torch.no_grad():
        G.model[-2].weight.normal_(0, 0.02)
    body = torch.nn.Sequential(*list(G.model)[:-1])  # everything up to the last conv, no tanh
    torch.testing.assert_close(run(G, x), x + run(body, x), rtol=0, atol=0)
    # the same keys as the seed's generator, plus the marker, so that loading rebuilds the skip
    plain = GeneratorResNet((3, 32, 32), 2, ngf=16)
    assert set(G.state_dict()) - set(plain.state_dict()) == {"global_skip"}
    loaded = build_generator(G.state_dict())
    assert loaded.identity_start and not build_generator(plain.state_dict()).identity_start
    torch.testing.assert_close(run(loaded, x), run(G, x), rtol=0, atol=0)


# -----------------------------------------------------------------------------
# 3. The channel-padding fix

def test_grayscale_generator_preserves_size_where_seed_version_shrinks_by_8():
    ours = seeded(lambda: GeneratorResNet((1, 64, 48), 2))
    seed = seeded(lambda: SeedGeneratorResNet((1, 64, 48), 2))
    x = rand_input(1, 1, 64, 48)
    assert run(ours, x).shape == (1, 1, 64, 48)
    assert run(seed, x).shape == (1, 1, 56, 40)  # the seed's bug: ReflectionPad2d(1) before each 7x7 conv


def test_grayscale_generator_keeps_the_seed_layout_so_seed_grayscale_checkpoints_load():
    seed = SeedGeneratorResNet((1, 64, 64), 3)
    ours = GeneratorResNet((1, 64, 64), 3)
    assert layout(ours) == layout(seed)
    assert layout(ours)["model.1.weight"] == [64, 1, 7, 7]
    assert layout(ours)["model.22.weight"] == [1, 64, 7, 7]
    ours.load_state_dict(seed.state_dict(), strict=True)


# -----------------------------------------------------------------------------
# 4. Output shapes. The generators downsample twice, so an H x W input comes back as
# 4*ceil(H/4) x 4*ceil(W/4), in the seed's and the official code alike; test.py's
# translate() pads each image to a multiple of 4 and crops the output back.

GENERATORS = {
    "seed": lambda: GeneratorResNet((3, 256, 256), 2),
    "official": lambda: OfficialGenerator(3, 3, 64, 2),
    "seed_reference": lambda: SeedGeneratorResNet((3, 256, 256), 2),
    "antialiased": lambda: GeneratorResNet((3, 256, 256), 2, antialias=True, antialias_up=True),
}


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@pytest.mark.parametrize("size, out_size", [
    ((68, 92), (68, 92)),
    ((67, 91), (68, 92)),
    ((65, 70), (68, 72)),
    ((33, 29), (36, 32)),
])
def test_generator_output_is_input_size_rounded_up_to_multiple_of_4(kind, size, out_size):
    G = seeded(GENERATORS[kind])
    assert run(G, rand_input(1, 3, *size)).shape == (1, 3, *out_size)


@pytest.mark.parametrize("receptive_field, size, out", [
    (94, (256, 256), (16, 16)),
    (94, (128, 64), (8, 4)),
    (94, (67, 91), (4, 5)),
    (70, (256, 256), (30, 30)),
    (70, (128, 64), (14, 6)),
    (34, (64, 64), (14, 14)),
    (16, (64, 32), (30, 14)),
])
def test_discriminator_output_shape_attribute_matches_actual_output(receptive_field, size, out):
    D = seeded(lambda: Discriminator((3, *size), receptive_field))
    assert D.output_shape == (1, *out)
    assert run(D, rand_input(1, 3, *size)).shape == (1, 1, *out)


def empirical_receptive_field(D, size=128):
    """Height and width of the input region that one central output depends on:
    the nonzero extent of the gradient of that output w.r.t. the input. InstanceNorm
    couples every position to every other, so it is removed (the receptive field is
    a property of the convolutions), and with positive weights and input nothing
    inside the field can cancel to zero."""
    D = copy.deepcopy(D)
    for i, m in enumerate(D.model):
        if isinstance(m, nn.InstanceNorm2d):
            D.model[i] = nn.Identity()
    for m in D.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
            nn.init.zeros_(m.bias)
    x = torch.ones(1, 3, size, size, requires_grad=True)
    y = D(x)
    y[0, 0, y.shape[2] // 2, y.shape[3] // 2].backward()
    nz = x.grad[0].abs().sum(0) > 0
    rows, cols = nz.any(1).nonzero().flatten(), nz.any(0).nonzero().flatten()
    # The field lies inside the image (not cut by the border) and is a full rectangle.
    assert rows.min() > 0 and rows.max() < size - 1 and cols.min() > 0 and cols.max() < size - 1
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    assert int(nz.sum()) == h * w
    return h, w


@pytest.mark.parametrize("receptive_field", [70, 94, 34, 16])
def test_discriminator_empirical_receptive_field_is_its_name(receptive_field):
    D = Discriminator((3, 128, 128), receptive_field)
    assert empirical_receptive_field(D) == (receptive_field, receptive_field)


def test_seed_discriminator_receptive_field_is_94_not_70():
    assert empirical_receptive_field(SeedDiscriminator((3, 128, 128))) == (94, 94)


# -----------------------------------------------------------------------------
# 5. The official generator and its checkpoints

def official_expected_layout(n_blocks):
    up = 10 + n_blocks
    return {
        "model.1.weight": [64, 3, 7, 7], "model.1.bias": [64],
        "model.4.weight": [128, 64, 3, 3], "model.4.bias": [128],
        "model.7.weight": [256, 128, 3, 3], "model.7.bias": [256],
        **res_blocks(range(10, up), "conv_block", [256, 256, 3, 3]),
        f"model.{up}.weight": [256, 128, 3, 3], f"model.{up}.bias": [128],  # ConvTranspose2d: (in, out, k, k)
        f"model.{up + 3}.weight": [128, 64, 3, 3], f"model.{up + 3}.bias": [64],
        f"model.{up + 7}.weight": [3, 64, 7, 7], f"model.{up + 7}.bias": [3],
    }


def test_official_generator_9_blocks_has_the_official_keys_and_shapes(official9):
    expected = official_expected_layout(9)
    assert {"model.19.weight", "model.22.weight", "model.26.weight", "model.18.conv_block.5.bias"} <= set(expected)
    assert layout(official9) == expected
    assert isinstance(official9.model[19], nn.ConvTranspose2d) and isinstance(official9.model[22], nn.ConvTranspose2d)


def test_official_generator_6_blocks_has_keys_up_to_model_23():
    expected = official_expected_layout(6)
    assert {"model.16.weight", "model.19.weight", "model.23.weight", "model.15.conv_block.1.weight"} <= set(expected)
    assert layout(OfficialGenerator(3, 3, 64, 6)) == expected


def official_instance_norm_prefixes(n_blocks):
    """Where the official code has its InstanceNorm layers (9 blocks: 2, 5, 8,
    10..18.conv_block.{2,6}, 20, 23)."""
    up = 10 + n_blocks
    return (["model.2", "model.5", "model.8"]
            + [f"model.{i}.conv_block.{j}" for i in range(10, up) for j in (2, 6)]
            + [f"model.{up + 1}", f"model.{up + 4}"])


def old_release_state_dict(G, n_blocks, with_num_batches_tracked=True):
    """G's weights plus InstanceNorm running stats for every InstanceNorm layer, as
    checkpoints saved by torch < 0.4 (running_mean/var) or with
    track_running_stats=True (also num_batches_tracked) carry. The values are not
    trivial, so a loader that used them would change the output."""
    g = torch.Generator().manual_seed(2)
    sd = dict(G.state_dict())
    widths = {"model.2": 64, "model.5": 128, f"model.{n_blocks + 14}": 64, f"model.{n_blocks + 11}": 128}
    for p in official_instance_norm_prefixes(n_blocks):
        c = widths.get(p, 256)
        sd[f"{p}.running_mean"] = torch.randn(c, generator=g)
        sd[f"{p}.running_var"] = torch.rand(c, generator=g) + 0.5
        if with_num_batches_tracked:
            sd[f"{p}.num_batches_tracked"] = torch.tensor(1234)
    return sd


@pytest.mark.parametrize("with_num_batches_tracked", [True, False], ids=["num_batches_tracked", "torch03_style"])
def test_official_checkpoint_with_running_stats_translates_like_reference(
        tmp_path, official9, with_num_batches_tracked):
    sd = old_release_state_dict(official9, 9, with_num_batches_tracked)
    assert {"model.2.running_mean", "model.10.conv_block.2.running_var", "model.18.conv_block.6.running_mean",
            "model.20.running_var", "model.23.running_mean"} <= set(sd)
    assert ("model.10.conv_block.6.num_batches_tracked" in sd) == with_num_batches_tracked
    path = tmp_path / "latest_net_G.pth"
    torch.save(sd, path)
    loaded = torch.load(path, weights_only=True)
    assert not hasattr(loaded, "_metadata")

    G = build_generator(loaded)
    assert isinstance(G, OfficialGenerator)
    x = rand_input(1, 3, 32, 24)
    torch.testing.assert_close(run(G, x), official_reference_forward(loaded, x))


def test_official_checkpoint_with_running_stats_does_not_load_without_cleaning(official9):
    with pytest.raises(RuntimeError):
        OfficialGenerator(3, 3, 64, 9).load_state_dict(old_release_state_dict(official9, 9), strict=True)


def test_official_6_block_generator_translates_like_reference_at_odd_size():
    G = seeded(lambda: OfficialGenerator(3, 3, 64, 6))
    sd = old_release_state_dict(G, 6)
    x = rand_input(1, 3, 29, 38)
    y = run(build_generator(sd), x)
    assert y.shape == (1, 3, 32, 40)
    torch.testing.assert_close(y, official_reference_forward(sd, x))


@pytest.mark.parametrize("factory, expected", [
    (lambda: OfficialGenerator(3, 3, 64, 9), ("official", 3, 3, 9)),
    (lambda: OfficialGenerator(3, 3, 64, 6), ("official", 3, 3, 6)),
    (lambda: OfficialGenerator(1, 3, 64, 4), ("official", 1, 3, 4)),
    (lambda: GeneratorResNet((3, 256, 256), 9), ("seed", 3, 3, 9)),
    (lambda: GeneratorResNet((1, 256, 256), 4), ("seed", 1, 1, 4)),
], ids=["official9", "official6", "official1to3", "seed9", "seed_gray4"])
def test_generator_config_reads_arch_channels_and_blocks_and_build_generator_rebuilds_it(factory, expected):
    sd = seeded(factory).state_dict()
    assert generator_config(sd) == expected
    G = build_generator(sd)
    assert isinstance(G, OfficialGenerator if expected[0] == "official" else GeneratorResNet)
    assert layout(G) == {k: list(v.shape) for k, v in sd.items()}
    assert all(torch.equal(v, sd[k]) for k, v in G.state_dict().items())


def test_generator_config_ignores_running_stat_keys(official9):
    assert generator_config(old_release_state_dict(official9, 9)) == ("official", 3, 3, 9)


def test_clean_state_dict_strips_module_and_orig_mod_prefixes():
    G = GeneratorResNet((3, 256, 256), 1)
    plain = G.state_dict()
    data_parallel = nn.DataParallel(G).state_dict()
    assert next(iter(data_parallel)) == "module.model.1.weight"
    # torch.compile's wrapper keeps the network as `_orig_mod` (written out here,
    # as importing the compiler takes seconds).
    wrapped = {
        "DataParallel": data_parallel,
        "compile": {f"_orig_mod.{k}": v for k, v in plain.items()},
        "DataParallel(compile)": {f"module._orig_mod.{k}": v for k, v in plain.items()},
        "compile(DataParallel)": {f"_orig_mod.{k}": v for k, v in data_parallel.items()},
    }
    for name, sd in wrapped.items():
        cleaned = clean_state_dict(sd)
        assert list(cleaned) == list(plain), name
        assert all(torch.equal(cleaned[k], plain[k]) for k in plain), name


def test_clean_state_dict_drops_instance_norm_running_stats_only(official9):
    sd = old_release_state_dict(official9, 9)
    cleaned = clean_state_dict(sd)
    assert set(cleaned) == set(official9.state_dict())
    assert len(sd) - len(cleaned) == 3 * len(official_instance_norm_prefixes(9)) == 3 * 23


def test_build_generator_loads_a_data_parallel_official_checkpoint(tmp_path, official9):
    sd = {f"module.{k}": v for k, v in old_release_state_dict(official9, 9).items()}
    torch.save(sd, tmp_path / "G.pth")
    G = build_generator(torch.load(tmp_path / "G.pth", weights_only=True))
    x = rand_input(1, 3, 32, 32)
    torch.testing.assert_close(run(G, x), run(official9, x), rtol=0, atol=0)


# -----------------------------------------------------------------------------
# 6. Initialisation

@pytest.mark.parametrize("factory", [
    lambda: GeneratorResNet((3, 256, 256), 2),
    lambda: OfficialGenerator(3, 3, 64, 2),
    lambda: Discriminator((3, 256, 256)),
], ids=["seed_G", "official_G", "D"])
def test_weights_init_normal_gives_conv_weights_std_002_mean_0_and_zero_biases(factory):
    net = seeded(factory)
    net.apply(weights_init_normal)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == len([k for k in net.state_dict() if k.endswith(".weight")])
    for m in convs:
        # Smallest layer: 3*64*7*7 = 9408 weights, so the sample std is 0.02 +- 1.5e-4;
        # PyTorch's default init would give 0.012 or more.
        assert abs(m.weight.std().item() - 0.02) < 0.001, m
        assert abs(m.weight.mean().item()) < 0.001, m
        assert torch.count_nonzero(m.bias) == 0, m
    # The biggest layer (>= 500k weights): std within 2e-4 (the sampling error is < 2e-5).
    big = max((m.weight for m in convs), key=lambda w: w.numel())
    assert big.numel() >= 500_000
    assert abs(big.std().item() - 0.02) < 2e-4
    assert abs(big.mean().item()) < 1e-4


# -----------------------------------------------------------------------------
# 7. Errors

@pytest.mark.parametrize("state_dict", [
    {"weight": torch.zeros(3)},
    {},
    {"model.1.weight": torch.zeros(64, 3, 7, 7), "model.1.bias": torch.zeros(64)},
], ids=["garbage", "empty", "no_residual_blocks"])
def test_build_generator_on_a_dict_without_residual_keys_raises_value_error(state_dict):
    with pytest.raises(ValueError):
        build_generator(state_dict)


def test_build_generator_on_a_discriminator_state_dict_raises_value_error():
    with pytest.raises(ValueError):
        build_generator(Discriminator((3, 256, 256)).state_dict())


def test_build_generator_on_a_seed_layout_with_different_in_and_out_channels_raises_value_error():
    sd = GeneratorResNet((3, 256, 256), 1).state_dict()
    sd["model.20.weight"] = torch.zeros(1, 64, 7, 7)  # 1 block: the output conv is model.20
    sd["model.20.bias"] = torch.zeros(1)
    with pytest.raises(ValueError):
        build_generator(sd)

