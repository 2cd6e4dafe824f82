"""The levers for short runs and small images (README, "Quality"), each checked for its
math against an independent computation: the moving average of the generators' weights,
DiffAugment, the learning-rate schedule of --budget and --budget itself, and what a run
with them writes. (The identity start, the generator's width and the smaller
discriminators are checked in test_models.py; exact resume with every lever on in
test_resume.py.) With every lever off the seed's behaviour is what the equivalence and
seed-compatibility tests check, unchanged."""
import argparse
import math
import os

import pytest
import torch

import augment
import budget
import cyclegan
import gan
import models
import training
import utils
from conftest import fp32, load, make_data, make_buffers, make_nets, make_opts, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "cyclegan.py")
TINY = ["--dataset_name", "tiny", "--img_height", "32", "--img_width", "32", "--n_residual_blocks", "1", "--ngf", "8",
        "--n_cpu", "0", "--seed", "3", "--sample_interval", "1000"]


# -----------------------------------------------------------------------------
# EMA of the generators' weights

def test_ema_update_is_the_closed_form_of_its_recursion():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    ema = torch.nn.Linear(3, 2).double()
    e0 = [p.detach().clone() for p in ema.parameters()]
    decay = 0.9
    # fixed weights: after k updates the average is decay^k e0 + (1 - decay^k) w
    for _ in range(7):
        gan.update_ema({"G": ema}, {"G": net}, decay)
    for e, start, w in zip(ema.parameters(), e0, net.parameters()):
        torch.testing.assert_close(e, decay ** 7 * start + (1 - decay ** 7) * w, rtol=1e-12, atol=1e-12)
    # moving weights: sum_k (1 - decay) decay^(n-1-k) w_k + decay^n e_0
    e_start = [p.detach().clone() for p in ema.parameters()]
    history = []
    for k in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * (k + 1))
        history.append([p.detach().clone() for p in net.parameters()])
        gan.update_ema({"G": ema}, {"G": net}, decay)
    for j, e in enumerate(ema.parameters()):
        expected = decay ** 5 * e_start[j] + sum((1 - decay) * decay ** (4 - k) * history[k][j] for k in range(5))
        torch.testing.assert_close(e, expected, rtol=1e-12, atol=1e-12)


def test_ema_warm_up_leaves_a_short_run_little_of_its_start():
    # fixed weights w, the decays of steps 0..n-1: the start keeps prod_t min(d, (1+t)/(10+t)),
    # which while the warm-up holds is 9! n! / (n + 9)!
    torch.manual_seed(0)
    net, ema = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    e0 = [p.detach().clone() for p in ema.parameters()]
    n = 30
    for t in range(n):
        gan.update_ema({"G": ema}, {"G": net}, gan.ema_decay(0.999, t))
    share = math.factorial(9) * math.factorial(n) / math.factorial(n + 9)
    for e, start, w in zip(ema.parameters(), e0, net.parameters()):
        torch.testing.assert_close(e, share * start + (1 - share) * w, rtol=1e-12, atol=1e-12)
    assert gan.ema_decay(0.999, 0) == pytest.approx(0.1) and gan.ema_decay(0.999, 10**6) == 0.999
    # 700 steps: the warm-up leaves the start next to nothing where 0.999 alone leaves half;
    # until about step 9000 the average spans the last ninth or so of the run
    kept = math.prod(gan.ema_decay(0.999, t) for t in range(700))
    assert kept < 1e-6 and 0.999 ** 700 > 0.4
    assert gan.ema_decay(0.999, 8000) < 0.999 == gan.ema_decay(0.999, 9000)


def test_a_run_with_ema_publishes_the_average_and_keeps_both_in_last_pt(tmp_path, capsys):
    make_data(tmp_path / "data" / "tiny", n_test=2)
    r = run_cli(SCRIPT, *fp32([*TINY, "--n_epochs", "1", "--decay_epoch", "0", "--ema", "0.5"]), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    models_dir = tmp_path / "saved_models" / "tiny"
    last = load(models_dir / "last.pt")
    for g in ("G_AB", "G_BA"):
        published = load(models_dir / f"{g}_1.pth")
        assert set(published) == set(last["ema_" + g]) == set(last[g])
        assert all(torch.equal(published[k], last["ema_" + g][k]) for k in published)
        assert not all(torch.equal(published[k], last[g][k]) for k in published)  # the raw weights differ
    assert all(torch.equal(v, last["D_A"][k]) for k, v in load(models_dir / "D_A_1.pth").items())  # D is not averaged

    # test.py, given last.pt, uses the average too, and says so
    G = models.load_generator(str(models_dir / "last.pt"), "G_AB")
    assert "moving average" in capsys.readouterr().err
    assert all(torch.equal(v, last["ema_G_AB"][k]) for k, v in G.state_dict().items())


# -----------------------------------------------------------------------------
# DiffAugment

def shifted(x, dy, dx):
    """x moved by (dy, dx) with zeros shifted in: out[i, j] = x[i + dy, j + dx] where inside."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[..., i, j] = x[..., i + dy, j + dx]
    return out


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_diffaugment_gives_real_and_fake_image_k_the_same_draw(policy):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 12) * 2 - 1
    y = augment.diff_augment(torch.cat([x, x]), policy, pairs=2)
    assert torch.equal(y[:3], y[3:])
    assert not torch.equal(y[:3], x)
    # and different images of a batch get different draws
    z = augment.diff_augment(torch.cat([x[:1]] * 3), policy)
    assert not (torch.equal(z[0], z[1]) and torch.equal(z[1], z[2]))


def test_diffaugment_translation_is_a_shift_of_at_most_an_eighth_with_zeros_shifted_in():
    torch.manual_seed(1)
    x = torch.rand(6, 3, 16, 16) + 0.5  # no zeros of its own
    y = augment.diff_augment(x, "translation")
    for k in range(6):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(shifted(x[k], dy, dx), y[k])]
        assert len(matches) == 1, k


def test_diffaugment_cutout_zeroes_one_square_of_half_the_size_at_most():
    torch.manual_seed(2)
    x = torch.rand(8, 3, 16, 16) + 0.5
    y = augment.diff_augment(x, "cutout")
    for k in range(8):
        zero = (y[k] == 0).all(0)
        assert torch.equal(y[k][:, ~zero], x[k][:, ~zero])  # the rest is untouched
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 0 < len(rows) <= 8 and 0 < len(cols) <= 8 and int(zero.sum()) == len(rows) * len(cols)  # one rectangle
        assert ((len(rows) == 8 or rows.min() == 0 or rows.max() == 15)
                and (len(cols) == 8 or cols.min() == 0 or cols.max() == 15))


def test_diffaugment_color_is_the_papers_brightness_saturation_contrast():
    torch.manual_seed(3)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    torch.manual_seed(5)
    y = augment.diff_augment(x, "color")
    torch.manual_seed(5)  # the same draws, in the paper code's order
    b, s, c = (torch.rand(4, 1, 1, 1, dtype=torch.float64) for _ in range(3))
    e = x + (b - 0.5)
    e = (e - e.mean(1, keepdim=True)) * (2 * s) + e.mean(1, keepdim=True)
    e = (e - e.mean([1, 2, 3], keepdim=True)) * (c + 0.5) + e.mean([1, 2, 3], keepdim=True)
    torch.testing.assert_close(y, e, rtol=1e-12, atol=1e-12)


def test_diffaugment_lets_gradients_through_to_the_generator():
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    augment.diff_augment(x, "color,translation,cutout").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_train_step_shows_the_discriminators_only_augmented_images():
    """With cutout, every image either D sees (the G step's fakes and the D step's reals and
    fakes) has a zeroed square; uniform random images in (0, 1] never have one."""
    torch.manual_seed(0)
    nets = make_nets()
    seen = []
    for name in ("D_A", "D_B"):
        nets[name].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    real_A, real_B = 1 - torch.rand(2, 3, 32, 32), 1 - torch.rand(2, 3, 32, 32)
    cyclegan.train_step(real_A, real_B, nets, make_opts(nets), make_buffers(), diffaug="cutout")
    assert len(seen) == 4 and [len(x) for x in seen] == [2, 2, 4, 4]  # G step: D_B, D_A on fakes; D step: real+fake
    for batch in seen:
        assert all(bool((img == 0).all(0).any()) for img in batch)
    cyclegan.train_step(real_A, real_B, nets, make_opts(nets), make_buffers(), diffaug="")
    plain = seen[4:]  # (the hooks are still on) without --diffaug the real images reach D untouched
    assert torch.equal(plain[2][:2], real_A) and torch.equal(plain[3][:2], real_B)


# -----------------------------------------------------------------------------
# --budget and its learning-rate schedule

def test_budget_schedule_warms_up_holds_and_decays_linearly_to_zero():
    total, lr = 20, 1.0
    f = budget.BudgetLR(total, warmup=0.1, decay=0.5).step
    expected = [min(1.0, (k + 1) / 2, (total - k) / 10) for k in range(total)]
    assert [f(k) for k in range(total)] == pytest.approx(expected)
    assert f(0) == 0.5 and f(1) == 1.0 and f(9) == 1.0 and f(10) == 1.0 and f(19) == pytest.approx(0.1)
    assert [budget.BudgetLR(8, 0, 0).step(k) for k in range(8)] == [1.0] * 8  # no decay: constant
    # as the optimizers see it, stepped once per iteration
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected)


@pytest.mark.parametrize("text, parsed", [("90s", ("seconds", 90)), ("45min", ("seconds", 2700)),
                                          ("1.5h", ("seconds", 5400)), ("2m", ("seconds", 120)),
                                          ("5000", ("iterations", 5000))])
def test_budget_reads_times_and_iteration_counts(text, parsed):
    assert budget.parse_budget(text) == parsed


@pytest.mark.parametrize("args, message", [
    (["--budget", "ten"], "--budget 'ten' is neither a time"),
    (["--budget", "2.5"], "whole number of iterations"),
    (["--budget", "100", "--n_epochs", "3"], "leave out --n_epochs"),
    (["--budget", "100", "--warmup", "0.6", "--decay_fraction", "0.5"], "overlap"),
    (["--diffaug", "color,zoom"], "--diffaug: unknown policy zoom"),
    (["--ema", "1"], "--ema must be in [0, 1)"),
    (["--ngf", "0"], "--ngf must be at least 1"),
    (["--load_size", "0"], "--load_size must be at least 1"),
])
def test_bad_lever_flags_give_one_line(tmp_path, main_in_process, args, message):
    code, _, err = main_in_process(tmp_path, *TINY, *args)
    assert code == 2 and message in err and "Traceback" not in err


def logged(models_dir):
    with open(models_dir / "log.csv") as f:
        return [int(line.split(",")[2]) for line in f.read().splitlines()[1:]]


def test_an_iteration_budget_ends_mid_epoch_with_the_final_saves_and_the_lr_at_zero(tmp_path):
    make_data(tmp_path / "data" / "tiny", n_test=1)  # 4 batches per epoch: 7 iterations end inside epoch 1
    r = run_cli(SCRIPT, *fp32([*TINY, "--budget", "7", "--decay_fraction", "0.5", "--log_interval", "1"]), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    models_dir = tmp_path / "saved_models" / "tiny"
    assert logged(models_dir) == list(range(7))
    last = load(models_dir / "last.pt")
    assert ((last["epoch"], last["batch"]) == (2, 0) and last["args"]["budget_iters"] == 7
            and last["args"]["n_epochs"] == 2)
    assert {f"{n}_2.pth" for n in ("G_AB", "G_BA", "D_A", "D_B")} <= set(os.listdir(models_dir))
    # the schedule stepped once per iteration: after 7 of 7 the rate has reached 0
    assert last["optimizer_G"]["param_groups"][0]["lr"] == pytest.approx(0.0)
    with open(models_dir / "log.csv") as f:
        header, *rows = [line.split(",") for line in f.read().splitlines()]
    lrs = [float(row[header.index("lr")]) for row in rows]
    assert lrs == pytest.approx([2e-4 * min(1.0, (7 - k) / round(0.5 * 7)) for k in range(7)])


def test_a_time_budget_is_turned_into_iterations_and_recorded(tmp_path):
    """(40 s of the process's life, its import of PyTorch included, which takes seconds, more on a loaded machine.)"""
    make_data(tmp_path / "data" / "tiny", n_test=1)
    r = run_cli(SCRIPT, *fp32([*TINY, "--budget", "40s", "--log_interval", "1"]), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--budget 40s:" in r.stdout and "s per iteration" in r.stdout
    models_dir = tmp_path / "saved_models" / "tiny"
    last = load(models_dir / "last.pt")
    total, plans = last["args"]["budget_iters"], last["args"]["budget_plans"]
    # the first plan is printed, and the run's last lines say how the budget was spent: the iterations planned
    # again from the run's own speed (log.csv has every replan; a line says so where the end moved by 1 % or more)
    assert total >= 1 and f"on this machine: {plans[0][1]} iterations (" in r.stdout
    assert f"for {total} iterations, {plans[0][1]} at the start; planned again {len(plans) - 1} times" in \
        [line for line in r.stdout.splitlines() if line.startswith("--budget 40s: used ")][-1]
    assert logged(models_dir) == list(range(total)) and plans[-1][1] == total
    assert last["epoch"] * 4 + last["batch"] == 4 * last["args"]["n_epochs"]
    with open(models_dir / "log.csv") as f:
        header, *rows = [line.split(",") for line in f.read().splitlines()]
    assert [(int(row[2]) + 1, int(row[-1])) for row in rows if row[-1]] == [tuple(p[:2]) for p in plans[1:]]


def made_up_clock(monkeypatch, clock):
    """budget's clock (seconds since the run began, by iterations done) replaced by `clock`."""
    monkeypatch.setattr(budget, "simulated_clock", lambda: clock)


def test_a_time_budget_is_planned_again_from_the_runs_own_speed(monkeypatch):
    """A replan on a made-up clock: 10 s before the loop, then 100 iterations in 10 s, of
    which one evaluation (every 2 epochs of 30 batches) took 5: 0.05 s per iteration (measured
    from the end of the first). The most iterations whose steps and evaluations fit the 40 s
    left, by brute force. (The replan after iteration 100 is the first, 10 % of 1000 planned.)"""
    monkeypatch.setattr(budget, "REPLAN_EVERY", 0.1)
    made_up_clock(monkeypatch, lambda done: {0: 10.0, 1: 10.05, 100: 20.0}[done])
    opt = argparse.Namespace(budget="60s", budget_iters=1000, n_epochs=34, warmup=0.0, decay_fraction=0.5,
                             eval_interval=2, budget_eval_s=5.0, budget_plans=[[0, 1000, 0.03, 50.0]])
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, budget.BudgetLR(1000, 0.0, 0.5).step)
    procs = argparse.Namespace(ddp=False, master=False)
    planner = budget.Planner(opt, 30, procs, started=0.0, done=0, resumed=False)
    for done in range(1, 101):
        planner.after(done, {"optimizer_G": scheduler}, None)

    def fits(more):
        # every second epoch and after the last, less the one done
        evaluations = math.ceil(math.ceil((100 + more) / 30) / 2) - 1
        return more * 0.05 + evaluations * 5.0 <= 40.0
    expected = 100 + max(more for more in range(2000) if fits(more))
    assert opt.budget_iters == expected and opt.n_epochs == math.ceil(expected / 30)
    assert opt.budget_plans[1] == [100, expected, pytest.approx(0.05), 40.0]
    budget_lr = scheduler.lr_lambdas[0]  # the schedule follows: constant to half way, then down to 0 at the new end
    assert budget_lr(expected // 2 - 1) == 1.0
    assert budget_lr(expected - 1) == pytest.approx(1 / round(0.5 * expected)) and budget_lr(expected) == 0.0

    # a run on schedule (no evaluations, 0.1 s per iteration, 500 planned, 40 s left after 100) keeps its plan
    opt = argparse.Namespace(budget="60s", budget_iters=500, n_epochs=17, warmup=0.0, decay_fraction=0.5,
                             eval_interval=0, budget_eval_s=0.0, budget_plans=[[0, 500, 0.1, 50.0]])
    lambdas = scheduler.lr_lambdas
    budget.replan_budget(opt, 100, 30, procs, step_s=0.1, left_s=40.0, schedulers={"optimizer_G": scheduler}, log=None)
    assert (opt.budget_iters, opt.n_epochs) == (500, 17) and scheduler.lr_lambdas is lambdas


def test_replans_in_the_decay_keep_the_learning_rate_continuous_and_end_it_at_zero():
    """Replans in the warm-up, before the decay, in it (the end further, then nearer, then one
    iteration away): the factor never jumps (a replan after k iterations gives iteration k the
    factor it had), in the decay it falls in straight lines to 0 at the last plan's end, and a
    schedule rebuilt from the plans recorded so far (as --resume does) gives every factor again."""
    f = budget.BudgetLR(100, warmup=0.1, decay=0.5)
    replans = {5: 120, 30: 90, 60: 130, 80: 100, 95: 96}
    plans, factors = [[0, 100]], []
    for k in range(97):
        if k in replans:
            before = f.step(k)
            f.replan(k, replans[k])
            plans.append([k, replans[k]])
            assert f.step(k) == before, f"the factor jumps at the replan after {k} iterations"
        factors.append(f.step(k))
        opt = argparse.Namespace(budget_iters=plans[-1][1], budget_plans=plans, warmup=0.1, decay_fraction=0.5)
        assert budget.budget_schedule(opt).step(k) == factors[-1]
    assert factors[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])  # the warm-up kept the first plan's 10
    assert factors[10:46] == [1.0] * 36  # the 90-iteration plan decays from 45 on
    assert factors[45:61] == pytest.approx([(90 - k) / 45 for k in range(45, 61)])
    assert factors[60:81] == pytest.approx([30 / 45 * (130 - k) / 70 for k in range(60, 81)])
    assert factors[80:96] == pytest.approx([factors[80] * (100 - k) / 20 for k in range(80, 96)])
    assert factors[95] > 0 and f.step(96) == 0.0  # the last iteration (95) still learns; after it the rate is 0
    assert all(b <= a for a, b in zip(factors[45:], factors[46:]))  # once falling, it never rises again


@pytest.mark.parametrize("after, end", [("0.125", 240 + 320), ("0.5", 240 + 80)])
def test_a_replan_that_finds_the_speed_doubled_or_halved_moves_the_end_accordingly(monkeypatch, after, end):
    """100 s at a made-up 0.25 s per iteration: 400 iterations, the decay from 200. From
    iteration 240 (60 s) on the speed doubles or halves: the 40 s left hold 320 or 80 more.
    The replans (every 1 % of the plan) see it within their window of the last 10 %, the run
    ends exactly at 100 s, and the learning rate goes to 0 there without a jump."""
    monkeypatch.setenv("CYCLEGAN_SIMULATED_SPEED", f"0.25,240:{after}")
    opt = argparse.Namespace(budget="100s", warmup=0.0, decay_fraction=0.5, eval_interval=0)
    procs = argparse.Namespace(ddp=False, master=False)
    budget.fit_budget(opt, 30, procs, 0.0, None, False)
    assert (opt.budget_iters, opt.budget_plans) == (400, [[0, 400, 0.25, 100.0]])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedulers = {"G": torch.optim.lr_scheduler.LambdaLR(optimizer, budget.budget_schedule(opt).step)}
    planner = budget.Planner(opt, 30, procs, 0.0, 0, False)
    lrs, done = [], 0
    while done < opt.budget_iters:  # the loop's part, as training.py has it
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        done += 1
        planner.after(done, schedulers, None)
        schedulers["G"].step()
    assert done == opt.budget_iters == end and planner.clock(end) == 100.0
    assert optimizer.param_groups[0]["lr"] == 0.0 and lrs[-1] > 0
    plans = opt.budget_plans
    assert [p[0] for p in plans[1:]] == [a[0] + max(1, round(0.01 * a[1])) for a in plans[:-1]]  # every 1 % of the plan
    assert all(p[1] == 400 for p in plans if p[0] <= 240)  # nothing changed before the speed did
    settled = [p for p, w in zip(plans[10:], plans) if w[0] >= 240]  # their window (10 replans back) after the change
    assert settled and all(p[1] == end and p[2] == float(after) for p in settled)
    # continuous: every replan leaves the rate of the iteration after it as it was; it falls from 200 on, and in a
    # straight line to 0 from the first settled plan
    for i in range(1, len(plans)):
        old, new = (budget.budget_schedule(argparse.Namespace(budget_plans=plans[:j], budget_iters=plans[j - 1][1],
                                                              warmup=0.0, decay_fraction=0.5)) for j in (i, i + 1))
        assert old.step(plans[i][0]) == new.step(plans[i][0]) == pytest.approx(lrs[plans[i][0]], abs=1e-15)
    assert lrs[:200] == [1.0] * 200 and lrs[239] == pytest.approx(161 / 200)
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    r, total = settled[0][:2]
    assert lrs[r:] == pytest.approx([lrs[r] * (total - k) / (total - r) for k in range(r, total)])
    assert "used 1.67 of its 1.67 min (100.0 %)" in planner.spent()


def test_a_log_of_an_older_version_keeps_its_rows_when_new_columns_come():
    import report
    header = ["epoch", "batch", "iteration", "loss_G", "lr", "time", "replan"]
    path = os.path.join(os.environ["XDG_CACHE_HOME"], "old-log.csv")
    with open(path, "w") as f:
        f.write("epoch,batch,iteration,loss_G,lr,time\n"
                "0,0,0,1.5,0.0002,1.0\n0,1,1,1.4,0.0002,2.0\n0,2,2,1.3,0.0002,3.0\n")
    report.keep_rows_before(path, 2, header)
    with open(path) as f:
        assert f.read().splitlines() == [",".join(header), "0,0,0,1.5,0.0002,1.0,", "0,1,1,1.4,0.0002,2.0,"]
    # a new loss column (cut.py's loss_flat) in the middle: the old rows keep their values by name
    wider = ["epoch", "batch", "iteration", "loss_G", "loss_flat", "lr", "time", "replan"]
    report.keep_rows_before(path, 2, wider)
    with open(path) as f:
        assert f.read().splitlines() == [",".join(wider), "0,0,0,1.5,,0.0002,1.0,", "0,1,1,1.4,,0.0002,2.0,"]
    # another run's log (columns this one does not have) starts afresh
    report.keep_rows_before(path, 2, ["epoch", "batch", "iteration", "loss_D", "lr", "time", "replan"])
    with open(path) as f:
        assert f.read().splitlines() == ["epoch,batch,iteration,loss_D,lr,time,replan"]
