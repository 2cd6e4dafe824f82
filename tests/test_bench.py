"""bench.py: the rows it runs and how it labels them, the hardware report beside its table,
the table's ratios against the printed timings, the equivalence check's power to catch a
wrong step, and that the speed-ups it measures change no result.
(No timings are asserted: the machines that run these tests are shared.)"""
import copy
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import bench
import utils
from models import GeneratorResNet, OfficialGenerator, translate, weights_init_normal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def cpu_flags():
    """This machine's CPU flags, read here from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def bench_run(*args, timeout=900):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    return r


def test_rows_parse_into_configurations():
    assert bench.parse_row("reference") == {"step": "reference", "amp": "none", "channels_last": False, "compile": None}
    assert bench.parse_row("default") == {"step": "train_step", "amp": "auto", "channels_last": False, "compile": None}
    assert bench.parse_row("fp32") == {"step": "train_step", "amp": "none", "channels_last": False, "compile": None}
    assert bench.parse_row("bf16+channels_last+compile") == {"step": "train_step", "amp": "bf16", "channels_last": True,
                                                             "compile": "default"}
    assert bench.parse_row("bf16+cudagraphs")["compile"] == "reduce-overhead"
    assert bench.row_from_options("bf16", False, "default") == "bf16+compile"
    assert bench.row_from_options("bf16", False, "reduce-overhead") == "bf16+cudagraphs"
    assert bench.row_from_options("none", True, None) == "fp32+channels_last"
    for bad in ("bf16+fp16", "fast", "bf16+bf16", "compile+cudagraphs"):
        with pytest.raises(ValueError):
            bench.parse_row(bad)


def test_default_row_resolves_to_what_amp_auto_picks_on_this_machine():
    cpu = torch.device("cpu")
    auto = {None: "none", torch.bfloat16: "bf16"}[utils.pick_precision("auto", cpu)[0]]
    assert bench.resolve(bench.parse_row("default"), cpu)["amp"] == auto
    assert bench.row_label("default", cpu) == f"default({'fp32' if auto == 'none' else auto})"
    # the configuration `default` stands for is run once, under its own name, right after the reference
    same = "fp32" if auto == "none" else "bf16"
    rows, notes = bench.plan_rows([same, "channels_last", "default", "bf16+cudagraphs"], cpu)
    assert rows == ["reference", "default", "channels_last"]
    assert any(n.startswith(f"{same}: the same configuration as default(") for n in notes)
    assert any(n.startswith("bf16+cudagraphs: skipped: CUDA graphs") for n in notes)


def test_bf16_rows_are_left_out_by_default_where_the_cpu_emulates_bf16():
    """Emulated bf16 runs at ~1% of fp32's rate: the default table would take hours."""
    cpu = torch.device("cpu")
    rows, notes = bench.plan_rows(bench.DEFAULT_ROWS, cpu, explicit=False)
    if cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        assert "bf16" in rows and "bf16+compile" in rows
    else:
        assert not [r for r in rows if "bf16" in r]
        assert any(n.startswith("bf16, bf16+channels_last, bf16+compile, bf16+cudagraphs: skipped: this CPU has no "
                                "native bf16") for n in notes)
    # asked for by name, they run anyway
    assert "bf16" in bench.plan_rows(["bf16"], cpu, explicit=True)[0]


def test_bench_prints_the_hardware_and_a_row_per_configuration_with_ratios_that_match_its_timings():
    r = bench_run("--img_size", "32", "--n_residual_blocks", "1", "--iters", "1", "--warmup", "0",
                  "--rows", "fp32,default,bf16+cudagraphs", "--device", "cpu", "--no_profile")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout

    # what decides the precision here, checked against /proc/cpuinfo read by this test
    flags = cpu_flags()
    if flags:
        shown = re.search(r"^CPU flags: (.*?)  \(", out, re.M).group(1).split()
        assert shown == [f if f in flags else f"-{f}" for f in bench.PRECISION_FLAGS]
    assert re.search(r"^torch's view: CPU capability \w+, oneDNN bf16 supported: (True|False)", out, re.M)
    native = bool(flags & {"avx512_bf16", "amx_bf16"})  # the rule: native bf16 instructions only
    picked = re.search(r"--amp auto .* picks here, on cpu: (\w+)", out).group(1)
    assert picked == ("bf16" if native else "fp32")
    assert re.search(r"^  matmul \d+\^3 bfloat16 +\d", out, re.M) and re.search(r"^  conv3x3 256ch .* float32 NCHW +\d", out, re.M)

    table = out[out.index("training step"):].splitlines()
    header = next(line for line in table if line.startswith("row"))
    assert header.split()[1:4] == ["s/it", "img/s", "TFLOP/s"] and "peak RSS MiB" in header
    body = table[table.index(header) + 2:]
    body = body[:body.index("")] if "" in body else body
    rows = {line.split()[0]: line.split() for line in body}
    # fp32 is the default configuration where auto picks fp32: measured once, as the default
    assert set(rows) == {"reference", f"default({picked})"} | ({"fp32"} if picked == "bf16" else set())
    if picked == "fp32":
        assert "\nfp32: the same configuration as default(fp32), measured once" in out
    assert "\nbf16+cudagraphs: skipped: CUDA graphs" in out
    ref_s = float(rows["reference"][1])
    for cols in rows.values():
        s_it, img_s, tflops, vs_ref, peak_mib, heap_mib, infer_ms = cols[1:8]
        s_it = float(s_it)
        # the printed s/it has 4 significant digits and the ratios 2 decimals
        assert abs(float(vs_ref.rstrip("x")) - ref_s / s_it) <= 0.005 + 2e-3 * ref_s / s_it
        assert abs(float(img_s) - 1 / s_it) <= 0.005 + 2e-3 / s_it
        assert float(tflops) > 0 and float(peak_mib) > 0 and float(heap_mib) > 0 and float(infer_ms) > 0
    assert rows["reference"][4] == "1.00x"
    assert "roofline" in out


def test_a_bad_row_is_one_line_naming_the_flag():
    r = bench_run("--rows", "reference,fast", "--device", "cpu", timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --rows: row 'fast'")


def test_equivalence_check_passes_fp32_and_catches_a_step_that_sees_last_steps_fakes(monkeypatch):
    """The CPU's fp32 step is within the fp32 tolerances of float64; a step whose
    discriminators get the previous step's fakes (what an overwritten CUDA-graph output
    would give them) is far outside them."""
    opt = SimpleNamespace(img_size=32, n_residual_blocks=1, batch_size=1, equivalence_steps=2)
    cpu = torch.device("cpu")
    ref = bench.run_steps(opt, cpu, torch.float64)
    loss_err, grad_err = bench.errors(bench.run_steps(opt, cpu, states=ref[0]), ref)
    assert loss_err <= bench.FP32_TOL[0] and grad_err <= bench.FP32_TOL[1]

    last = {}

    def one_step_late(buffer, fakes):
        out = last.get(id(buffer), fakes.detach())
        last[id(buffer)] = fakes.detach().clone()
        return out

    monkeypatch.setattr(utils.ReplayBuffer, "push_and_pop", one_step_late)
    loss_err, grad_err = bench.errors(bench.run_steps(opt, cpu, states=ref[0]), ref)
    assert loss_err > 100 * bench.FP32_TOL[0] and grad_err > bench.FP32_TOL[1]


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


def test_bench_multiprocess_mode_reports_images_per_second_and_scaling_efficiency():
    r = bench_run("--nproc", "2", "--img_size", "32", "--n_residual_blocks", "1", "--iters", "2", "--warmup", "0",
                  "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    one = float(next(l for l in lines if l.startswith("1 process(es):")).split()[2])
    two = float(next(l for l in lines if l.startswith("2 process(es):")).split()[2])
    eff = next(l for l in lines if l.startswith("scaling efficiency with 2 processes:"))
    assert one > 0 and two > 0
    assert abs(int(eff.split(":")[1].split("%")[0]) - 100 * two / (2 * one)) <= 0.02 * 100 * two / (2 * one) + 1  # printed rounding
