"""bench.py runs and reports every row; the speed-ups it measures change no result.
(No timings are asserted: the machines that run these tests are shared.)"""
import copy
import os
import subprocess
import sys

import pytest
import torch

import bench
from models import GeneratorResNet, OfficialGenerator, weights_init_normal
from test import translate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rows_parse_into_configurations():
    assert bench.parse_row("reference")["step"] == "reference"
    assert bench.parse_row("default") == {"step": "default", "amp": "none", "channels_last": False, "compile": False}
    assert bench.parse_row("bf16+channels_last+compile") == {"step": "default", "amp": "bf16", "channels_last": True,
                                                             "compile": True}
    assert bench.row_from_options("bf16", False, True) == "bf16+compile"
    assert bench.row_from_options("none", False, False) == "default"
    for bad in ("bf16+fp16", "fast", "bf16+bf16"):
        with pytest.raises(ValueError):
            bench.parse_row(bad)


def test_bench_prints_a_row_per_configuration_with_ratios_to_the_reference():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--img_size", "32", "--n_residual_blocks", "1",
                        "--iters", "1", "--warmup", "0", "--rows", "default,bf16", "--device", "cpu", "--no_profile"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "hardware peak" in out and "matmul 2048^3 bfloat16" in out and "conv3x3" in out
    table = out[out.index("training step"):].splitlines()
    rows = {line.split()[0]: line.split() for line in table if line.split() and line.split()[0] in ("reference", "default", "bf16")}
    assert set(rows) == {"reference", "default", "bf16"}
    assert rows["reference"][4] == "1.00x"
    for cols in rows.values():
        s_it, img_s, tflops, _, peak_mib, heap_mib, infer_ms = cols[1:8]
        assert float(s_it) > 0 and float(img_s) > 0 and float(tflops) > 0 and float(peak_mib) > 0 and float(infer_ms) > 0
        assert float(heap_mib) > 0
    assert "roofline" in out


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
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--nproc", "2", "--img_size", "32",
                        "--n_residual_blocks", "1", "--iters", "2", "--warmup", "0", "--device", "cpu"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    one = float(next(l for l in lines if l.startswith("1 process(es):")).split()[2])
    two = float(next(l for l in lines if l.startswith("2 process(es):")).split()[2])
    eff = next(l for l in lines if l.startswith("scaling efficiency with 2 processes:"))
    assert one > 0 and two > 0
    assert abs(int(eff.split(":")[1].split("%")[0]) - 100 * two / (2 * one)) <= 0.02 * 100 * two / (2 * one) + 1  # printed rounding
