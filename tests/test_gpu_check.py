"""scripts/gpu_check.sh: its dry mode runs the GPU check's whole sequence on the CPU at tiny
sizes and passes; a check that cannot run or fails makes the exit status non-zero; the
log goes to $OUT. (The dry run is one of this suite's slow tests: about two minutes on an
idle 2-core machine, since it starts ten Python processes.)"""
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


@pytest.fixture
def short_tmp():
    """A TMPDIR with a short path: the data loader's worker passes tensors through a Unix socket
    made there, whose path may not exceed 107 characters, which pytest's tmp_path can."""
    work = tempfile.mkdtemp(prefix="gpu-check-test-")
    yield pathlib.Path(work)
    shutil.rmtree(work, ignore_errors=True)


def run_check(tmp_path, work, timeout=1500, **env):
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                       env=dict(os.environ, OUT=str(out), TMPDIR=str(work), **env))
    return r, out, work


def test_dry_run_passes_every_check_and_writes_its_log_to_OUT(tmp_path, short_tmp):
    r, out, work = run_check(tmp_path, short_tmp, DRY="1")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    passed = {l.split(" (")[0][5:] for l in lines if l.startswith("PASS ")}
    assert {"env", "equivalence", "train fp32", "sigterm + resume", "test.py", "speed table"} <= passed
    assert not [l for l in lines if l.startswith("FAIL")]
    skipped = {l.split(":")[0][5:] for l in lines if l.startswith("SKIP ")}
    assert {"ddp", "compiled trainings"} <= skipped and ("evaluate.py" in passed | skipped)
    assert lines[-1] == "gpu_check: all checks passed"
    # the interruption came in the middle of the run, and the resumed run went on from there
    n, total = map(int, re.search(r"^interrupted after (\d+) of (\d+) iterations", r.stdout, re.M).groups())
    assert 0 < n < total
    assert re.search(r"^resuming from .*last\.pt: epoch \d+, batch \d+", r.stdout, re.M)
    # the equivalence test ran the CPU's fp32 step (the CUDA ones are skipped without a GPU),
    # and the speed table has its two rows, both in the fp32 the check names
    assert re.search(r"cpu fp32: losses \S+ \(tol 1e-04\), gradients", r.stdout)
    assert re.search(r"\b2 passed, 4 skipped\b" if not torch.cuda.is_available() else r"\b6 passed\b", r.stdout)
    assert re.search(r"^default +fp32 +\d", r.stdout, re.M) and re.search(r"^channels_last +fp32 +\d", r.stdout, re.M)
    assert (out / "gpu_check.log").read_text() == r.stdout
    assert not [f for f in os.listdir(work) if f.startswith("gpu-check.")]  # its work folder is removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_real_check_fails_at_once(tmp_path, short_tmp):
    r, out, _ = run_check(tmp_path, short_tmp, timeout=300)
    assert r.returncode == 1
    assert re.search(r"^FAIL env \(exit 1", r.stdout, re.M) and "no CUDA device" in r.stdout
    assert "---- equivalence" not in r.stdout  # nothing else ran
    assert (out / "gpu_check.log").read_text() == r.stdout


def test_checks_that_the_time_budget_leaves_no_room_for_fail(tmp_path, short_tmp):
    r, _, _ = run_check(tmp_path, short_tmp, timeout=120, DRY="1", BUDGET="3")
    assert r.returncode == 1
    assert re.search(r"^FAIL env: not run, the 3 s budget is spent", r.stdout, re.M)
