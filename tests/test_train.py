import copy
import csv
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fp32, make_buffers, make_data, make_nets, make_opts, run_cli
from cyclegan import train_step
from models import Discriminator, GeneratorResNet
from reference import reference_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch_size,rf", [(1, 94), (2, 70)])
def test_batched_step_equals_seed_reference_step_in_float64(batch_size, rf):
    """Stacking inputs along the batch changes nothing mathematically (InstanceNorm is
    per sample): three steps of the fast path and of the seed's literal step give
    the same losses and the same updated weights, buffers included."""
    nets_ref = make_nets(rf=rf, dtype=torch.float64)
    nets_new = copy.deepcopy(nets_ref)
    opts_ref, opts_new = make_opts(nets_ref), make_opts(nets_new)
    bufs_ref = make_buffers(2, 1, 2)
    bufs_new = make_buffers(2, 1, 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3 if batch_size == 1 else 2):  # the last step draws from full buffers
        real_A = torch.rand(batch_size, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
        real_B = torch.rand(batch_size, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
        loss_ref = reference_step(real_A, real_B, nets_ref, opts_ref, bufs_ref)
        loss_new = train_step(real_A, real_B, nets_new, opts_new, bufs_new)
        for k in loss_ref:
            torch.testing.assert_close(loss_new[k], loss_ref[k].detach(), rtol=1e-10, atol=1e-12, msg=k)
    # Every parameter whose gradient is not identically zero matches. The bias of a conv
    # followed by InstanceNorm is not among them: the norm subtracts it again, so its true
    # gradient is 0 and what autograd returns is rounding noise (~1e-17) whose sign depends
    # on the CPU's kernels; Adam normalises that noise to a step of +-lr. Such a bias has no
    # effect on any output, so the networks' outputs are compared too.
    for a, b in zip(nets_ref.values(), nets_new.values()):
        cancelled = biases_cancelled_by_instance_norm(a)
        assert cancelled  # (the exclusion is real, and only these)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            if name not in cancelled:
                torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-10, msg=name)
    probe = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        for a, b in zip(nets_ref.values(), nets_new.values()):
            torch.testing.assert_close(b(probe), a(probe), rtol=1e-9, atol=1e-10)


def biases_cancelled_by_instance_norm(net):
    """Names of the conv biases that an InstanceNorm (without affine) right after removes."""
    names = []
    for prefix, module in net.named_modules():
        if isinstance(module, torch.nn.Sequential):
            for (i, a), (_, b) in zip(list(module.named_children()), list(module.named_children())[1:]):
                if isinstance(a, torch.nn.Conv2d) and isinstance(b, torch.nn.InstanceNorm2d) and not b.affine:
                    names.append(f"{prefix}.{i}.bias".lstrip("."))
    return set(names)


def test_discriminators_get_no_gradients_from_the_generator_update():
    """The generator loss grades the fakes with D_A and D_B; their weights must not
    collect gradients there (wasted work, and a DDP error under torchrun)."""
    nets = make_nets()
    opts = make_opts(nets)
    grads_at_G_step = []
    opts["optimizer_G"].register_step_pre_hook(
        lambda *_: grads_at_G_step.append([p.grad for D in (nets["D_A"], nets["D_B"]) for p in D.parameters()]))
    train_step(torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1, nets, opts,
               make_buffers())
    assert len(grads_at_G_step) == 1 and all(g is None for g in grads_at_G_step[0])
    # and they are trainable again for their own update, which did step them
    assert all(p.requires_grad and p.grad is not None for D in (nets["D_A"], nets["D_B"]) for p in D.parameters())


def test_batched_step_matches_reference_in_float32():
    nets_ref = make_nets()
    nets_new = copy.deepcopy(nets_ref)
    opts_ref, opts_new = make_opts(nets_ref), make_opts(nets_new)
    real_A, real_B = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    loss_ref = reference_step(real_A, real_B, nets_ref, opts_ref, make_buffers(50, 1, 2))
    loss_new = train_step(real_A, real_B, nets_new, opts_new, make_buffers(50, 1, 2))
    for k in loss_ref:
        torch.testing.assert_close(loss_new[k], loss_ref[k].detach(), rtol=1e-4, atol=1e-5)
    # Compare what the networks compute, not every weight: a conv bias followed by
    # InstanceNorm has a gradient that is 0 up to rounding, which Adam scales up to a
    # step of about lr in either direction; such a bias has no effect on any output.
    probe = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for a, b in zip(nets_ref.values(), nets_new.values()):
            torch.testing.assert_close(b(probe), a(probe), rtol=1e-3, atol=1e-4)


def test_train_step_returns_detached_losses_and_updates_every_network():
    nets = make_nets()
    before = [copy.deepcopy(n.state_dict()) for n in nets.values()]
    losses = train_step(torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1, nets, make_opts(nets),
                        make_buffers())
    assert set(losses) >= {"loss_D", "loss_G", "loss_GAN", "loss_cycle", "loss_identity"}
    assert all(not v.requires_grad and v.ndim == 0 for v in losses.values())
    for net, old in zip(nets.values(), before):
        assert any(not torch.equal(p, old[k]) for k, p in net.state_dict().items())


def test_bf16_autocast_step_runs_on_cpu_and_stays_close():
    nets32 = make_nets()
    nets16 = copy.deepcopy(nets32)
    real_A, real_B = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    l32 = train_step(real_A, real_B, nets32, make_opts(nets32), make_buffers())
    l16 = train_step(real_A, real_B, nets16, make_opts(nets16), make_buffers(),
                     autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    for k in ("loss_G", "loss_cycle", "loss_identity"):
        assert l16[k].dtype == torch.float32
        torch.testing.assert_close(l16[k], l32[k], rtol=0.05, atol=0.01)


def _grads(nets):
    return [p.grad.clone() for net in nets.values() for p in net.parameters() if p.grad is not None]


def test_grad_scaler_path_steps_with_unscaled_gradients():
    """The --amp fp16 path (a GradScaler) in fp32 arithmetic: the losses are scaled by 2**16
    before backward and the gradients unscaled before Adam, so the gradients Adam saw and
    the step equal those of the plain path (Adam alone would hide a missing unscale: it is
    nearly invariant to the gradients' scale, so the gradients are compared too)."""
    plain = make_nets()
    scaled = copy.deepcopy(plain)
    real_A, real_B = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    l_plain = train_step(real_A, real_B, plain, make_opts(plain), make_buffers())
    l_scaled = train_step(real_A, real_B, scaled, make_opts(scaled), make_buffers(), scaler=scaler)
    for k in l_plain:
        torch.testing.assert_close(l_scaled[k], l_plain[k], rtol=1e-6, atol=1e-7)
    g_plain, g_scaled = _grads(plain), _grads(scaled)
    assert len(g_plain) == len(g_scaled) > 0
    for a, b in zip(g_scaled, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert scaler.get_scale() == 2.0**16  # no overflow, so no back-off
    with torch.no_grad():  # the steps themselves, seen through the outputs
        torch.testing.assert_close(scaled["G_AB"](real_A), plain["G_AB"](real_A), rtol=1e-5, atol=1e-5)


def test_fp16_autocast_with_grad_scaler_trains_on_the_cpu_where_torch_allows_it():
    nets32 = make_nets()
    nets16 = copy.deepcopy(nets32)
    real_A, real_B = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    l32 = train_step(real_A, real_B, nets32, make_opts(nets32), make_buffers())
    try:
        l16 = train_step(real_A, real_B, nets16, make_opts(nets16), make_buffers(),
                         autocast=torch.autocast("cpu", dtype=torch.float16), scaler=torch.amp.GradScaler("cpu"))
    except RuntimeError as e:  # an fp16 kernel this torch build lacks on the CPU
        pytest.skip(f"fp16 autocast on the CPU is not supported by this torch: {str(e).splitlines()[0]}")
    for k in ("loss_G", "loss_cycle", "loss_identity"):
        assert l16[k].dtype == torch.float32
        torch.testing.assert_close(l16[k], l32[k], rtol=0.05, atol=0.01)
    assert all(torch.isfinite(p).all() for net in nets16.values() for p in net.parameters())


# -----------------------------------------------------------------------------
# The command line

@pytest.fixture
def tiny_data(tmp_path):
    make_data(tmp_path / "data" / "tiny", n_A=4, n_test=2, size=(36, 39))
    return tmp_path


def run(cwd, *args, script="cyclegan.py", timeout=300):
    return run_cli(script, *fp32(args), cwd=cwd, timeout=timeout)


def grids(folder):
    """The sample grids (<iteration>.png) in an images/<dataset> folder, in iteration order."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((f for f in names if f[:-4].isdigit() and f.endswith(".png")), key=lambda f: int(f[:-4]))


TINY = ["--dataset_name", "tiny", "--img_height", "32", "--img_width", "32", "--n_residual_blocks", "1",
        "--n_cpu", "0", "--seed", "0"]


def test_cli_trains_and_writes_seed_format_checkpoints_samples_and_log(tiny_data):
    os.makedirs(tiny_data / "saved_models" / "tiny")
    (tiny_data / "saved_models" / "tiny" / ".tmp-killed.pt").write_bytes(b"half a checkpoint")
    r = run(tiny_data, *TINY, "--n_epochs", "3", "--decay_epoch", "1", "--checkpoint_interval", "2",
            "--sample_interval", "5")
    assert r.returncode == 0, r.stderr
    models = tiny_data / "saved_models" / "tiny"
    # every `checkpoint_interval` epochs and the last one, named by epochs done
    for name in ("G_AB", "G_BA", "D_A", "D_B"):
        assert (models / f"{name}_2.pth").exists() and (models / f"{name}_3.pth").exists()
        assert not (models / f"{name}_1.pth").exists()
    state = torch.load(models / "G_BA_3.pth", weights_only=True)
    G = GeneratorResNet((3, 32, 32), 1)
    G.load_state_dict(state, strict=True)  # a plain state_dict in the seed's layout
    D = Discriminator((3, 32, 32))
    D.load_state_dict(torch.load(models / "D_A_3.pth", weights_only=True), strict=True)
    # samples every 5 batches: 4 rows (real_A, fake_B, real_B, fake_A) of the 2 test images
    assert grids(tiny_data / "images" / "tiny") == ["0.png", "5.png", "10.png"]
    grid = Image.open(tiny_data / "images" / "tiny" / "0.png")
    assert grid.size == (2 + 2 * (32 + 2), 2 + 4 * (32 + 2))
    assert not (models / ".tmp-killed.pt").exists()  # a save killed midway leaves nothing behind
    # one log row per batch
    rows = list(csv.DictReader(open(models / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(12))
    assert float(rows[-1]["lr"]) == pytest.approx(2e-4 * 0.5)  # epoch 2 of 3, decay from epoch 1
    assert all(np.isfinite(float(r["loss_G"])) for r in rows)


def test_sample_grid_shows_fixed_test_images_denormalised_not_stretched_and_seed_style_epoch_resume(
        tiny_data, main_in_process):
    r = run(tiny_data, *TINY, "--n_epochs", "2", "--decay_epoch", "1", "--sample_interval", "4")
    assert r.returncode == 0, r.stderr
    grid = np.asarray(Image.open(tiny_data / "images" / "tiny" / "0.png")).astype(int)
    # first row = testA images center-cropped (no random crop or flip): 36x39 -> resize 32x34 -> center crop 32x32
    from datasets import load_image, test_transforms
    x = load_image(tiny_data / "data" / "tiny" / "testA" / "000.png")
    for t in test_transforms(32, 32):
        x = t(x)
    expected = ((x + 1) / 2 * 255).permute(1, 2, 0).numpy()
    assert np.abs(grid[2:34, 2:34] - expected).max() <= 1
    # the two samples at different iterations show the same real images
    grid2 = np.asarray(Image.open(tiny_data / "images" / "tiny" / "4.png")).astype(int)
    assert np.array_equal(grid[:36], grid2[:36])

    # the seed's resume, --epoch N, from that run's per-epoch weights
    r = run(tiny_data, *TINY, "--n_epochs", "3", "--decay_epoch", "1", "--epoch", "2")
    assert r.returncode == 0, r.stderr
    assert (tiny_data / "saved_models" / "tiny" / "G_AB_3.pth").exists()
    rows = list(csv.DictReader(open(tiny_data / "saved_models" / "tiny" / "log.csv")))
    assert rows[-1]["epoch"] == "2"
    # epoch 2 of 3 with the decay from epoch 1: the paper's linear decay gives lr x (1 - (2 - 1) / (3 - 1))
    assert [float(r["lr"]) for r in rows if r["epoch"] == "2"] == [pytest.approx(2e-4 * 0.5)] * 4
    # the log holds the first run's epochs 0 and 1, then the new epoch 2, each once
    assert [int(r["iteration"]) for r in rows] == list(range(12))
    # a missing epoch file is one clear line
    code, _, err = main_in_process(tiny_data, *TINY, "--n_epochs", "9", "--decay_epoch", "1", "--epoch", "7")
    assert code == 2 and "G_AB_7.pth does not exist" in err


@pytest.mark.parametrize("args,expected", [
    (["--n_epochs", "5", "--decay_epoch", "5"], "--decay_epoch (5) must be smaller than --n_epochs (5)"),
    (["--img_height", "16"], "--img_height/--img_width must be at least 32"),
    (["--img_width", "62"], "--img_height/--img_width must be multiples of 4"),
    (["--dataset_name", "nope"], "sh data/download_cyclegan_dataset.sh nope"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--batch_size", "-2"], "--batch_size must be at least 1, got -2"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--pool_size", "-1"], "--pool_size must be at least 0"),
    (["--b2", "1"], "--b2 must be in [0, 1), got 1.0"),
    (["--n_epochs", "0"], "--n_epochs must be at least 1, got 0"),
    (["--log_interval", "0"], "--log_interval must be at least 1, got 0"),
    (["--seed", "-3"], "--seed must be between 0 and 2**32 - 1, got -3"),
    (["--n_cpu", "-1"], "--n_cpu must be at least 0, got -1"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--amp", "fp16", "--device", "cpu"], "error: --"),
])
def test_bad_arguments_give_one_clear_line_naming_the_flag(tmp_path, monkeypatch, capsys, args, expected):
    # in this process (main() is what the command line runs; a subprocess each would only add
    # the imports' time): exit code 2 and exactly one line on stderr, nothing on stdout
    from cyclegan import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]


def test_a_bad_argument_on_the_command_line_is_one_line_without_a_traceback(tmp_path):
    r = run(tmp_path, "--batch_size", "0")
    assert r.returncode == 2 and r.stderr == "error: --batch_size must be at least 1, got 0\n"


def test_seed_defaults_are_kept():
    """The tutorial's flags with the tutorial's defaults (the seed's own values, checked
    one by one), except checkpoint_interval: the seed's -1 saved nothing."""
    from cyclegan import get_parser
    opt = get_parser().parse_args([])
    seed = dict(epoch=0, n_epochs=200, dataset_name="monet2photo", batch_size=1, lr=0.0002, b1=0.5, b2=0.999,
                decay_epoch=100, n_cpu=8, img_height=256, img_width=256, channels=3, sample_interval=100,
                n_residual_blocks=9, lambda_cyc=10.0, lambda_id=5.0)
    assert {k: getattr(opt, k) for k in seed} == seed
    assert opt.checkpoint_interval == 10


def test_sample_interval_zero_means_no_samples_and_training_still_runs(tiny_data):
    r = run(tiny_data, *TINY, "--n_epochs", "1", "--decay_epoch", "0", "--sample_interval", "0")
    assert r.returncode == 0, r.stderr
    assert grids(tiny_data / "images" / "tiny") == []
    assert (tiny_data / "saved_models" / "tiny" / "G_AB_1.pth").exists()


def test_grayscale_training_works_with_one_channel(tiny_data):
    r = run(tiny_data, *TINY, "--n_epochs", "1", "--decay_epoch", "0", "--channels", "1")
    assert r.returncode == 0, r.stderr
    state = torch.load(tiny_data / "saved_models" / "tiny" / "G_AB_1.pth", weights_only=True)
    assert state["model.1.weight"].shape == (64, 1, 7, 7) and state["model.20.weight"].shape == (1, 64, 7, 7)


# -----------------------------------------------------------------------------
# It learns: the README's first command, shrunk

def test_short_run_on_builtin_dataset_translates_better_than_identity(tmp_path):
    """A short CPU run on a tiny built-in dataset: G_AB's day->night translations of
    the paired test scenes are much closer to the night ground truth than the
    untranslated inputs are (the identity baseline)."""
    from synthetic import make_day2night
    # 80 iterations: the MAE ratio is about 0.15-0.2 here (0.1 after 180), far below the bound
    make_day2night(tmp_path / "data" / "synthetic_day2night", n_train=40, n_test=8, size=32, seed=3)
    r = run(tmp_path, "--dataset_name", "synthetic_day2night", "--img_height", "32", "--img_width", "32",
            "--n_residual_blocks", "1", "--n_epochs", "2", "--decay_epoch", "1", "--n_cpu", "0", "--seed", "0",
            "--sample_interval", "1000", timeout=1500)
    assert r.returncode == 0, r.stderr
    r = run(tmp_path, "--checkpoint", "saved_models/synthetic_day2night/G_AB_2.pth",
            "--image_path", "data/synthetic_day2night/testA", "--reference_dir", "data/synthetic_day2night/testB",
            "--output_dir", "out", script="test.py")
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if "translation MAE" in l)
    mae = float(line.split("translation MAE ")[1].split()[0])
    baseline = float(line.split("identity baseline MAE ")[1].split()[0])
    assert baseline > 0.3
    assert mae < 0.4 * baseline, line


def test_non_finite_loss_stops_at_the_next_log_flush_not_at_the_end_of_the_epoch(tiny_data):
    r = run(tiny_data, *TINY, "--n_epochs", "2", "--decay_epoch", "1", "--lr", "1e20", "--log_interval", "2",
            "--save_latest_interval", "0")
    assert r.returncode != 0 and "is not finite at iteration" in r.stderr and "Traceback" not in r.stderr
    rows = list(csv.DictReader(open(tiny_data / "saved_models" / "tiny" / "log.csv")))
    assert len(rows) == 2  # the flush after 2 batches found it; the epoch has 4


# -----------------------------------------------------------------------------
# More of the command line

def test_compile_trains_a_few_iterations_and_saves_plain_state_dicts(tiny_data):
    """--compile in a real run: the saved weights are the seed's plain layout (no _orig_mod.)."""
    for split in ("trainA", "trainB"):  # 2 images per domain: 2 compiled iterations
        for f in sorted(os.listdir(tiny_data / "data" / "tiny" / split))[2:]:
            os.remove(tiny_data / "data" / "tiny" / split / f)
    r = run(tiny_data, *TINY, "--n_epochs", "1", "--decay_epoch", "0", "--compile", "--sample_interval", "1",
            timeout=900)
    assert r.returncode == 0, r.stderr
    state = torch.load(tiny_data / "saved_models" / "tiny" / "G_AB_1.pth", weights_only=True)
    GeneratorResNet((3, 32, 32), 1).load_state_dict(state, strict=True)
    rows = list(csv.DictReader(open(tiny_data / "saved_models" / "tiny" / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [0, 1] and all(np.isfinite(float(r["loss_G"])) for r in rows)
    assert grids(tiny_data / "images" / "tiny") == ["0.png", "1.png"]


def test_resume_without_dataset_name_finds_the_only_run_or_asks_for_it(tiny_data, main_in_process):
    code, _, err = main_in_process(tiny_data, "--resume")
    assert code == 2 and "--dataset_name" in err
    assert run(tiny_data, *TINY, "--n_epochs", "1", "--decay_epoch", "0").returncode == 0
    r = run(tiny_data, "--resume", "--n_cpu", "0")  # the only last.pt under saved_models/
    assert r.returncode == 0, r.stderr
    assert "resuming from saved_models/tiny/last.pt: epoch 1, batch 0" in r.stdout
    os.makedirs(tiny_data / "saved_models" / "other")
    shutil.copy(tiny_data / "saved_models" / "tiny" / "last.pt", tiny_data / "saved_models" / "other" / "last.pt")
    code, _, err = main_in_process(tiny_data, "--resume")
    assert code == 2 and "--dataset_name" in err and "saved_models/other/last.pt" in err


def test_resume_in_another_precision_says_it_is_a_continuation_not_bitwise(tiny_data):
    assert run(tiny_data, *TINY, "--n_epochs", "2", "--decay_epoch", "0", "--amp", "none").returncode == 0
    path = tiny_data / "saved_models" / "tiny" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert (state["device_type"], state["precision"]) == ("cpu", "fp32")
    state["precision"], state["epoch"] = "bf16", 1  # as if trained with --amp bf16
    torch.save(state, path)
    r = run(tiny_data, "--dataset_name", "tiny", "--resume", "--amp", "none")
    assert r.returncode == 0, r.stderr
    assert "trained on cpu in bf16, this run is on cpu in fp32" in r.stderr and "not bitwise" in r.stderr
    r = run(tiny_data, "--dataset_name", "tiny", "--resume", "--amp", "none")  # the same precision: no note
    assert r.returncode == 0 and "not bitwise" not in r.stderr


def test_explicit_flags_are_the_ones_given_even_when_equal_to_the_default():
    import cyclegan
    argv = ["--lr", "0.0002", "--verify_data", "--compile", "--resume", "--n_epochs=3", "--amp", "none"]
    given = cyclegan.explicit_flags(argv, vars(cyclegan.get_parser().parse_args(argv)))
    assert given == {"lr": 0.0002, "verify_data": True, "compile": "default", "resume": "auto", "n_epochs": 3,
                     "amp": "none"}
