"""CUT and FastCUT (cut.py, issue 27): PatchNCE against a direct computation, the sampled
locations shared by input and output, the identity and flip-equivariance terms against a
reference computed here from the paper's definitions, a tiny run that learns and whose
G_AB_N.pth test.py translates, and the same exact resume after SIGKILL as cyclegan.py."""
import copy
import math
import os
import signal
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cut
from conftest import assert_bitwise_equal, fp32, load, make_data, run_cli, start_cli, wait_for_iteration
from gan import FLAT_LEVELS, FLAT_REACH, flat_area_loss
from models import GeneratorResNet, PatchProjection, load_generator

TINY = ["--dataset_name", "tiny", "--img_height", "32", "--img_width", "32", "--n_residual_blocks", "1", "--n_cpu", "0",
        "--seed", "3", "--sample_interval", "1000"]


def run(cwd, *args, script="cut.py", timeout=300):
    return run_cli(script, *fp32(args), cwd=cwd, timeout=timeout)


def direct_patch_nce(q, k, T):
    """-log softmax of the positive among one image's keys, patch by patch, in float64."""
    losses = []
    for b in range(q.shape[0]):
        per_patch = []
        for i in range(q.shape[1]):
            logits = [float(q[b, i] @ k[b, j]) / T for j in range(k.shape[1])]
            top = max(logits)
            per_patch.append(-(logits[i] - top - math.log(sum(math.exp(x - top) for x in logits))))
        losses.append(sum(per_patch) / len(per_patch))
    return torch.tensor(losses, dtype=torch.float64)


def test_patch_nce_is_the_cross_entropy_of_each_patch_against_its_own_location():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 7, 5, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(2, 7, 5, generator=g), dim=-1)
    assert torch.allclose(cut.patch_nce_loss(q, k, 0.07).double(), direct_patch_nce(q, k, 0.07), rtol=1e-5, atol=1e-5)
    # the positive is the key at the query's own location: aligned features give the smallest
    # loss, the same features one location off a large one
    e = torch.eye(6).expand(2, 6, 6)
    aligned, shifted = cut.patch_nce_loss(e, e, 0.5), cut.patch_nce_loss(e, e.roll(1, dims=1), 0.5)
    assert torch.allclose(aligned, torch.full((2,), math.log(1 + 5 * math.exp(-2))), rtol=1e-5)  # -log(e^2 / (e^2 + 5))
    assert torch.allclose(shifted, torch.full((2,), math.log(math.exp(2) + 5)), rtol=1e-5)  # -log(e^0 / (e^2 + 5))
    # the negatives come from the same image only: another image's keys change nothing
    k2 = k.clone()
    k2[1] = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    assert torch.allclose(cut.patch_nce_loss(q, k2, 0.07)[0], cut.patch_nce_loss(q, k, 0.07)[0], rtol=1e-6, atol=0)
    assert not torch.allclose(cut.patch_nce_loss(q, k2, 0.07)[1], cut.patch_nce_loss(q, k, 0.07)[1])


def test_the_projection_samples_the_same_locations_for_input_and_output():
    torch.manual_seed(0)
    head = PatchProjection([3, 8], dim=16)
    features = [torch.randn(2, 3, 6, 6), torch.randn(2, 8, 3, 3)]
    keys, where = head(features, n_patches=20)
    assert [w.tolist() for w in where] == [sorted(set(w.tolist()), key=w.tolist().index) for w in where]  # no repeats
    assert [len(w) for w in where] == [20, 9]  # at most H*W
    assert all(k.shape == (2, len(w), 16) for k, w in zip(keys, where))
    assert all(torch.allclose(k.norm(dim=-1), torch.ones(())) for k in keys)
    queries, where_again = head(features, n_patches=20, locations=where)  # the same maps at the given locations
    assert all(torch.equal(a, b) for a, b in zip(where, where_again))
    assert all(torch.equal(q, k) for q, k in zip(queries, keys))
    # each projected row is the MLP of the feature at its location, for every image alike
    flat = features[0].flatten(2).transpose(1, 2)
    for b in range(2):
        for row, loc in enumerate(where[0].tolist()):
            expected = torch.nn.functional.normalize(head.mlps[0](flat[b, loc]), dim=0)
            assert torch.allclose(keys[0][b, row], expected, atol=1e-6)


def test_the_generator_taps_the_official_layers_and_encodes_only_as_far_as_needed():
    G = GeneratorResNet((3, 32, 32), 6, ngf=8)
    assert G.nce_layers() == [0, 4, 7, 10, 14]
    assert GeneratorResNet((3, 32, 32), 2, ngf=8).nce_layers() == [0, 4, 7, 10, 11]
    x = torch.randn(2, 3, 32, 32)
    features = G(x, G.nce_layers(), encode_only=True)
    assert [tuple(f.shape[1:]) for f in features] == [(3, 38, 38), (16, 16, 16), (32, 8, 8), (32, 8, 8), (32, 8, 8)]
    out, same = G(x, G.nce_layers())
    assert torch.equal(out, G(x)) and all(torch.equal(a, b) for a, b in zip(same, features))
    # the taps are the layers' own outputs (the padded input first)
    assert torch.equal(features[0], torch.nn.functional.pad(x, (3, 3, 3, 3), mode="reflect"))
    assert torch.equal(features[1], G.model[4](G.model[:4](x)))


def direct_flat_area_loss(output, guide):
    """flat_area_loss of one image (C, H, W numpy arrays) by loops over its pixel pairs."""
    c, h, w = output.shape
    total = 0.0
    for dy, dx in ((1, 0), (0, 1)):
        pairs_h, pairs_w = h - dy, w - dx
        step_in = np.abs(guide[:, dy:, dx:] - guide[:, :pairs_h, :pairs_w]).max(0)
        terms = []
        for i in range(pairs_h):
            for j in range(pairs_w):
                near = step_in[max(0, i - FLAT_REACH):i + FLAT_REACH + 1, max(0, j - FLAT_REACH):j + FLAT_REACH + 1]
                step_out = np.abs(output[:, i + dy, j + dx] - output[:, i, j]).mean()
                terms.append(step_out * math.exp(-near.max() / FLAT_LEVELS))
        total += sum(terms) / len(terms)
    return total


def test_the_flat_area_loss_against_loops_and_what_it_charges():
    g = torch.Generator().manual_seed(0)
    output, guide = torch.rand(2, 2, 3, 9, 11, generator=g, dtype=torch.float64) * 2 - 1
    guide[:, :, :, :5] = -0.5  # a flat area, so that weights near 1 are checked too
    want = np.mean([direct_flat_area_loss(o.numpy(), gd.numpy()) for o, gd in zip(output, guide)])
    assert flat_area_loss(output, guide).item() == pytest.approx(want, rel=1e-12)
    # a guide with one vertical edge (between columns 9 and 10): an output step on it, or up to
    # FLAT_REACH pixels beside it, is nearly free; a single dot far from it costs
    guide = torch.full((1, 3, 20, 20), -1.0, dtype=torch.float64)
    guide[..., 10:] = 1.0
    for column in range(10 - FLAT_REACH, 11 + FLAT_REACH):
        step = torch.full_like(guide, -1.0)
        step[..., column:] = 1.0
        assert flat_area_loss(step, guide).item() < 1e-20, column
    dot = guide.clone()
    dot[..., 5, 3] = 1.0  # along each axis 2 of the 20 x 19 pairs step by 2, with weight 1
    assert flat_area_loss(dot, guide).item() == pytest.approx(2 * (2 * 2 / (20 * 19)), rel=1e-12)
    assert flat_area_loss(guide, guide).item() < 1e-20


def tiny_opt(*args):
    opt = cut.apply_mode(cut.get_parser().parse_args(["--img_height", "32", "--img_width", "32",
                                                      "--n_residual_blocks", "2",
                                                      "--ngf", "8", "--num_patches", "6", *args]))
    opt.seed = 0
    return opt


def reference_nce(nets, opt, real_A, real_B, flipped, locations):
    """loss_NCE and loss_NCE_Y as the paper and the official code define them, from a copy of
    the networks before the step: keys from G's encoder on the real images, queries from
    G's encoder on their translations (flipped back when the input was flipped), the same
    locations for both, lambda_NCE times the mean over layers of direct_patch_nce."""
    G, F_head = nets["G_AB"], nets["F"]
    layers = G.nce_layers()

    def term(source):
        target = G(source.flip(3) if flipped else source)
        q_feats = G(target, layers, encode_only=True)
        q_feats = [f.flip(3) for f in q_feats] if flipped else q_feats
        k_feats = G(source, layers, encode_only=True)
        keys, _ = F_head(k_feats, opt.num_patches, locations)
        queries, _ = F_head(q_feats, opt.num_patches, locations)
        per_layer = [direct_patch_nce(q.detach(), k.detach(), opt.nce_T).mean() for q, k in zip(queries, keys)]
        return opt.lambda_NCE * sum(per_layer) / len(layers)

    return term(real_A), term(real_B) if opt.nce_idt else torch.zeros(())


def flip_drawn(seed):
    torch.manual_seed(seed)
    return bool(torch.rand(()) < 0.5)


@pytest.mark.parametrize("mode,extra,want_flip", [("cut", [], False), ("fastcut", [], True), ("fastcut", [], False),
                                                   ("cut", ["--flip_equivariance"], True),
                                                   ("fastcut", ["--lambda_flat", "3"], True)])
def test_the_step_trains_the_papers_patch_nce_terms(mode, extra, want_flip):
    """FastCUT's flip-equivariance (G sees a flipped batch; its features are flipped back
    before they meet the unflipped input's) and CUT's identity term (real B against
    G(real B)) against reference_nce, with the step's random draws replayed."""
    opt = tiny_opt("--mode", mode, *extra)
    torch.manual_seed(1)
    real_A, real_B = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    if opt.lambda_flat:  # flat 8 x 8 blocks: the flat-area loss weighs nothing in noise
        real_A = F.interpolate(real_A[..., ::8, ::8], scale_factor=8, mode="nearest")
    nets, _ = cut.build_networks(opt, torch.device("cpu"))
    optimizers, _ = cut.build_optimizers(opt, nets, torch.device("cpu"))
    before = copy.deepcopy(nets)
    seed = next(s for s in range(100) if not opt.flip_equivariance or flip_drawn(s) == want_flip)
    torch.manual_seed(seed)
    flipped = opt.flip_equivariance and bool(torch.rand(()) < 0.5)
    assert flipped == want_flip
    sizes = [f.shape[2] * f.shape[3] for f in before["G_AB"](real_A, before["G_AB"].nce_layers(), encode_only=True)]
    locations = [torch.randperm(n)[:opt.num_patches] for n in sizes]
    torch.manual_seed(seed)
    losses = cut.step(opt, real_A, real_B, nets, optimizers, cut.build_buffers(opt, 0), nullcontext(), None)
    want_nce, want_nce_Y = reference_nce(before, opt, real_A, real_B, flipped, locations)
    assert losses["loss_NCE"].item() == pytest.approx(want_nce.item(), rel=1e-4)
    assert losses["loss_NCE_Y"].item() == pytest.approx(want_nce_Y.item(), rel=1e-4)
    assert (losses["loss_NCE_Y"].item() > 0) == opt.nce_idt
    if flipped:  # (the check has teeth: without flipping the features back, the loss is another)
        unflipped = reference_nce(before, opt, real_A, real_B, False, locations)[0]
        assert abs(unflipped.item() - want_nce.item()) > 1e-3
    # --lambda_flat: the translation of real A (by G before the step, of the flipped A when G saw
    # that) against the A it translated
    source = real_A.flip(3) if flipped else real_A
    want_flat = opt.lambda_flat * direct_flat_area_loss(before["G_AB"](source)[0].detach().numpy(), source[0].numpy())
    assert losses["loss_flat"].item() == pytest.approx(want_flat, rel=1e-4, abs=1e-12)
    assert (want_flat > 1e-3) == (opt.lambda_flat > 0)
    want_G = losses["loss_GAN"] + ((losses["loss_NCE"] + losses["loss_NCE_Y"]) / 2 if opt.nce_idt
                                   else losses["loss_NCE"]) + losses["loss_flat"]
    assert losses["loss_G"].item() == pytest.approx(want_G.item(), rel=1e-6)
    # G and F learned from it, D from its own loss; nothing is left with requires_grad off
    for name in ("G_AB", "F", "D_B"):
        assert any(not torch.equal(a, b) for a, b in zip(nets[name].parameters(), before[name].parameters())), name
        assert all(p.requires_grad for p in nets[name].parameters())


# -----------------------------------------------------------------------------
# the command line

@pytest.fixture
def tiny_data(tmp_path):
    make_data(tmp_path / "data" / "tiny", n_A=6, n_test=2, size=(36, 39))
    return tmp_path


def log_rows(cwd):
    import csv
    with open(os.path.join(cwd, "saved_models", "tiny", "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_a_tiny_cut_run_learns_and_test_py_translates_with_its_generator(tiny_data):
    r = run(tiny_data, *TINY, "--n_epochs", "6", "--decay_epoch", "3", "--num_patches", "32",
            "--checkpoint_interval", "3")
    assert r.returncode == 0, r.stderr
    models = tiny_data / "saved_models" / "tiny"
    assert {f"{n}_{e}.pth" for n in ("G_AB", "D_B", "F") for e in (3, 6)} <= set(os.listdir(models))
    assert not any(f.startswith(("G_BA", "D_A")) for f in os.listdir(models))
    rows = log_rows(tiny_data)
    assert list(rows[0])[3:9] == list(cut.LOSS_NAMES) and len(rows) == 36
    nce = np.array([float(r["loss_NCE"]) for r in rows])
    assert nce[-6:].mean() < nce[:6].mean() - 0.5, nce  # PatchNCE is learned
    # test.py translates with G_AB_6.pth as with a CycleGAN generator
    src = tiny_data / "data" / "tiny" / "testA"
    r = run_cli("test.py", "--checkpoint", models / "G_AB_6.pth", "--image_path", src,
                "--output_dir", tiny_data / "out", "--amp", "none", cwd=tiny_data)
    assert r.returncode == 0, r.stderr
    for name in os.listdir(src):
        with Image.open(src / name) as a, Image.open(tiny_data / "out" / (os.path.splitext(name)[0] + ".png")) as b:
            assert a.size == b.size
    # a run's last.pt holds G_AB alone, which is the one used
    G = load_generator(str(models / "last.pt"))
    assert torch.equal(G.state_dict()["model.1.weight"],
                       torch.load(models / "G_AB_6.pth", weights_only=True)["model.1.weight"])


def test_resume_refuses_the_other_algorithms_run_in_one_line(tiny_data):
    assert run(tiny_data, *TINY, "--n_epochs", "1", "--decay_epoch", "0").returncode == 0
    r = run(tiny_data, "--dataset_name", "tiny", "--resume", script="cyclegan.py")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --resume:")
    assert "is a CUT run; continue it with cut.py" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flag,value", [("--num_patches", "0"), ("--nce_T", "0"), ("--lambda_NCE", "-1"),
                                        ("--netF_nc", "0"), ("--lambda_flat", "-1")])
def test_bad_cut_flags_give_one_line(tiny_data, flag, value):
    r = run(tiny_data, *TINY, flag, value)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and flag in r.stderr, r.stderr


def test_sigkill_then_resume_of_a_cut_run_is_bitwise_identical(tmp_path):
    """FastCUT's flips, the identity term, a replay buffer and --ema: all resume exactly."""
    ref, cwd = tmp_path / "ref", tmp_path / "run"
    flags = [*TINY, "--n_epochs", "2", "--decay_epoch", "0", "--mode", "fastcut", "--nce_idt", "--pool_size", "3",
             "--ema", "0.9", "--num_patches", "16"]
    for d in (ref, cwd):
        make_data(d / "data" / "tiny", n_A=4)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(cwd / "killed.out", "w") as out, open(cwd / "killed.err", "w") as err:
        proc = start_cli("cut.py", *fp32(flags + ["--log_interval", "1", "--save_latest_interval", "2"]),
                         cwd=cwd, env=env, stdout=out, stderr=err)
    wait_for_iteration(proc, str(cwd), "killed", 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = load(cwd / "saved_models" / "tiny" / "last.pt")
    assert 0 < saved["epoch"] * 4 + saved["batch"] < 8, "killed after the end; nothing was tested"
    assert saved["algorithm"] == "CUT" and "ema_G_AB" in saved
    r = run(cwd, "--dataset_name", "tiny", "--resume")
    assert r.returncode == 0, r.stderr
    assert run(ref, *flags).returncode == 0  # the uninterrupted run
    mine, theirs = cwd / "saved_models" / "tiny", ref / "saved_models" / "tiny"
    pth = sorted(f for f in os.listdir(theirs) if f.endswith(".pth"))
    assert pth == sorted(f for f in os.listdir(mine) if f.endswith(".pth")) and "F_2.pth" in pth
    for f in pth + ["last.pt"]:
        a, b = load(mine / f), load(theirs / f)
        if f == "last.pt":
            a.pop("args"), b.pop("args")
        assert_bitwise_equal(a, b, f)
