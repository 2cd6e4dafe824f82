"""
--budget: a run's length given as wall time (90s, 45min, 1.5h) or as a number of
iterations, turned into iterations and a learning-rate schedule over them. A time budget is
planned from a short measurement of this machine's speed at the start, then planned again
from the run's own recent speed every REPLAN_EVERY of its iterations until it ends (Planner),
so that it ends when its time does whatever happens to the machine's load. Every plan is
recorded in the arguments (opt.budget_plans, saved in last.pt), the learning-rate schedule is
rebuilt from them, and a resumed run replays them exactly.
"""
import math
import os
import re
import time

import torch
import torch.distributed as dist

from utils import die

REPLAN_EVERY = 0.01  # of the planned iterations (docs/budget.md: what a replan costs, how noisy the speed is)
REPLAN_WINDOW = 10   # replan intervals: the speed a replan plans with is that of the last ones, so a load change shows


def parse_budget(text):
    """--budget: ('seconds', s) for 90s, 45min, 1.5h; ('iterations', n) for a plain number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|min|m|h)?\s*", text or "")
    if not m or float(m.group(1)) <= 0 or (m.group(2) is None and not m.group(1).isdigit()):
        raise ValueError(f"{text!r} is neither a time (90s, 45min, 1.5h) nor a whole number of iterations")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        return "iterations", int(value)
    return "seconds", value * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]


class BudgetLR:
    """The learning-rate factor of a run of `total` iterations (--budget), stepped once per
    iteration: a linear warm-up over the first `warmup` fraction, constant, then a linear
    decay to 0 over the last `decay` fraction. (The seed's LambdaLR is in epochs, and a short
    run never reaches its --decay_epoch.) `replans`: the (iteration, total) of each later
    plan, in order (see replan)."""

    def __init__(self, total, warmup=0.0, decay=0.5, replans=()):
        self.total, self.decay = total, decay
        self.warmup_iters, self.decay_iters = round(warmup * total), round(decay * total)
        self.anchor = None  # (iteration, factor): from there a straight line to 0 at total
        for iteration, new_total in replans:
            self.replan(iteration, new_total)

    def replan(self, iteration, total):
        """From `iteration` on, the run ends after `total` iterations. Before the decay the
        schedule keeps its shape over the new length (the decay moves with the end; the
        warm-up keeps the first plan's length, so that it does not jump). Once the decay has
        begun, under the old plan or the new one, the factor goes in a straight line from its
        value at `iteration` to 0 at the new end: continuous, however far the end moves."""
        if total == self.total:
            return
        factor = self.step(iteration)
        self.total, self.decay_iters = total, round(self.decay * total)
        if self.anchor is not None or self.step(iteration) != factor:
            self.anchor = (iteration, factor)

    def step(self, iteration):
        if self.anchor is not None:
            start, factor = self.anchor
            return max(0.0, factor * ((self.total - iteration) / (self.total - start)))
        factor = 1.0
        if self.warmup_iters > 0:
            factor = min(factor, (iteration + 1) / self.warmup_iters)
        if self.decay_iters > 0:
            factor = min(factor, (self.total - iteration) / self.decay_iters)
        return max(factor, 0.0)


def budget_schedule(opt):
    """The BudgetLR of a --budget run, with every plan recorded so far (a last.pt older than
    the plans: its one length)."""
    plans = getattr(opt, "budget_plans", None) or [[0, opt.budget_iters]]
    return BudgetLR(plans[0][1], opt.warmup, opt.decay_fraction, [(p[0], p[1]) for p in plans[1:]])


def total_iterations(opt, n_batches):
    return opt.budget_iters if opt.budget is not None else opt.n_epochs * n_batches


def n_evaluations(opt, iterations, n_batches):
    """Evaluations in a run of `iterations`: every --eval_interval epochs, and after the last."""
    if opt.eval_interval <= 0:
        return 0
    epochs = math.ceil(iterations / n_batches)
    return epochs // opt.eval_interval + (epochs % opt.eval_interval != 0)


def evaluations_before(opt, done, n_batches):
    """Evaluations made before the replan after iteration `done`: those of the epochs ended
    before it (an epoch that ends with this iteration evaluates after the replan)."""
    return ((done - 1) // n_batches) // opt.eval_interval if opt.eval_interval > 0 and done > 0 else 0


def iterations_within(seconds, step_s, eval_s, opt, n_batches, done=0, evaluated=0):
    """How many iterations after the first `done` fit in `seconds` at `step_s` each, less the
    evaluations --eval_interval asks for beyond the `evaluated` already done."""
    def cost(iterations):
        return iterations * step_s + (n_evaluations(opt, done + iterations, n_batches) - evaluated) * eval_s

    low, high = 0, max(0, int(seconds / step_s))  # the most whose cost fits (it only grows with iterations)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= seconds else (low, mid - 1)
    return low


def agree_on(values, procs):
    """Under torchrun rank 0's figures are everyone's: a plan is the same on every rank."""
    if procs.ddp:
        values_t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.broadcast(values_t, src=0, group=procs.group)
        values = [type(v)(x) for v, x in zip(values, values_t.tolist())]
    return tuple(values)


def process_started():
    """When this process began (Linux: from /proc; elsewhere: now), so that a time budget counts
    the seconds a small CPU takes to import PyTorch before the script's first line runs."""
    try:
        with open("/proc/self/stat") as f:
            ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def simulated_clock():
    """Tests make the machine's speed up instead of timing it (no test may depend on the CPU):
    CYCLEGAN_SIMULATED_SPEED="0.25" is 0.25 s per iteration, "0.25,40:0.5" 0.5 s from iteration
    40 on. Returns the seconds of the run by the end of iteration `done` at that speed (the
    measurement at the start takes none), or None: the real clock."""
    text = os.environ.get("CYCLEGAN_SIMULATED_SPEED")
    if not text:
        return None
    first, *rest = text.split(",")
    pieces = [(0, float(first))] + [(int(k), float(s)) for k, s in (part.split(":") for part in rest)]
    ends = [start for start, _ in pieces[1:]] + [math.inf]

    def clock(done):
        return sum(max(0, min(done, end) - start) * s for (start, s), end in zip(pieces, ends))
    return clock


def fit_budget(opt, n_batches, procs, started, measure_costs, evaluates):
    """Turn --budget into opt.budget_iters and opt.n_epochs at the start of a run; they are
    saved with the arguments in last.pt, so a resumed run keeps them. A time budget is the
    wall time of the whole run, less what has been spent since `started`: iterations at the
    measured speed plus the evaluations --eval_interval asks for; that first plan is
    opt.budget_plans[0] (see Planner), the seconds per evaluation opt.budget_eval_s.
    `measure_costs(seconds)`: the script's (seconds per iteration, seconds per evaluation),
    measured for about `seconds`; `evaluates`: whether the run evaluates."""
    kind, amount = parse_budget(opt.budget)
    if kind == "iterations":
        opt.budget_iters = amount
    else:
        simulated = simulated_clock()
        if simulated is not None:
            step_s, eval_s, spent = simulated(1), 0.0, 0.0
        else:
            seconds = min(60, 0.02 * amount)
            if procs.master:
                print(f"--budget {opt.budget}: first measuring this machine's speed, about {seconds:.0f} s of "
                      f"training steps" + (", then one evaluation of both generators (its first also takes the test "
                                           "images' FID features)" if evaluates else "") + " ...")
            step_s, eval_s = measure_costs(seconds)
            spent = time.time() - started
        total = iterations_within(amount - spent, step_s, eval_s, opt, n_batches)
        if total < 1:
            die(f"--budget {opt.budget}: too short here for one iteration ({step_s:.2f} s) and the evaluations "
                f"({eval_s:.0f} s each); give more time, or a number of iterations")
        if procs.master:
            print(f"--budget {opt.budget}: {step_s:.3f} s per iteration"
                  + (f" and {eval_s:.0f} s per evaluation" if eval_s else "")
                  + f" on this machine: {total} iterations ({total / n_batches:.1f} epochs)")
        total, step_s, left, eval_s = agree_on((total, step_s, amount - spent, eval_s), procs)
        # a plan: [after iteration, total iterations, seconds per iteration, seconds left then]
        opt.budget_iters, opt.budget_plans, opt.budget_eval_s = total, [[0, total, step_s, left]], eval_s
    opt.n_epochs = math.ceil(opt.budget_iters / n_batches)


def replan_budget(opt, done, n_batches, procs, step_s, left_s, schedulers, log):
    """After `done` iterations, with `left_s` seconds of the budget left at `step_s` seconds per
    iteration (the speed measured lately): opt.budget_iters and opt.n_epochs such that the
    run ends when its time does, the plan recorded in opt.budget_plans, and the learning-rate
    schedules rebuilt from the plans (see BudgetLR.replan); `log` (rank 0's) marks the row."""
    evaluated = evaluations_before(opt, done, n_batches)
    total = done + iterations_within(left_s, step_s, opt.budget_eval_s, opt, n_batches, done, evaluated)
    total, step_s, left_s = agree_on((max(total, done + 1), step_s, left_s), procs)
    opt.budget_plans.append([done, total, step_s, left_s])
    if log is not None:
        log.set_total(total)
    if total == opt.budget_iters:
        return
    if procs.master and abs(total - opt.budget_iters) >= REPLAN_EVERY * opt.budget_iters:  # (log.csv has them all)
        print(f"--budget {opt.budget}: {step_s:.3f} s per iteration lately, {left_s / 60:.1f} min left after "
              f"iteration {done}: {total} iterations ({total / n_batches:.1f} epochs) instead of {opt.budget_iters}")
    opt.budget_iters, opt.n_epochs = total, math.ceil(total / n_batches)
    schedule = budget_schedule(opt)
    for scheduler in schedulers.values():
        scheduler.lr_lambdas = [schedule.step for _ in scheduler.lr_lambdas]


class Planner:
    """Plans a time budget again every REPLAN_EVERY of its planned iterations, to its end, from
    the speed of the last REPLAN_WINDOW intervals (not since the start: a load change has
    shown fully after 10 % of the run). When it replans follows from the plans alone, so every
    rank replans after the same iterations, and a resumed run where the saved one would have.
    A resumed run starts with the time its last plan left, less the iterations since then at
    that plan's speed (the minutes between the save and --resume are not the run's), and
    replans from its own speed. after(done) is called after every iteration; an iteration
    budget, or a last.pt older than the plans, is never replanned."""

    def __init__(self, opt, n_batches, procs, started, done, resumed):
        self.opt, self.n_batches, self.procs = opt, n_batches, procs
        plans = getattr(opt, "budget_plans", None)
        self.active = bool(plans)
        if not self.active:
            return
        self.seconds = parse_budget(opt.budget)[1]
        simulated = simulated_clock()
        self.clock = simulated or (lambda _: time.time() - started)  # seconds since the run began
        last, total, step_s, left = plans[-1]
        if resumed:
            evals = evaluations_before(opt, done, n_batches) - evaluations_before(opt, last, n_batches)
            left -= (done - last) * step_s + evals * opt.budget_eval_s
        else:
            left = self.seconds - self.clock(done)
        self.left_at = (left, self.clock(done))
        # (iterations done, clock) after the loop's first iteration, whose one-off costs (the first sample
        # grid, the first batches) are not the run's speed, and at every replan since
        self.first, self.marks = done + 1, []
        self.next = max(last + self.interval(total), done + 1)

    def interval(self, total):
        return max(1, round(REPLAN_EVERY * total))

    def left(self, now):
        left, then = self.left_at
        return left - (now - then)

    def after(self, done, schedulers, log):
        if not self.active:
            return
        if done == self.first:
            self.marks = [(done, self.clock(done))]
        if done != self.next or done >= self.opt.budget_iters:
            return
        now = self.clock(done)
        self.marks = self.marks[-REPLAN_WINDOW:] + [(done, now)]
        start, then = self.marks[0]
        evals = evaluations_before(self.opt, done, self.n_batches) - evaluations_before(self.opt, start, self.n_batches)
        step_s = max(1e-9, (now - then - evals * self.opt.budget_eval_s) / (done - start)) if done > start else \
            self.opt.budget_plans[-1][2]  # (nothing measured yet: the last plan's speed)
        replan_budget(self.opt, done, self.n_batches, self.procs, step_s, self.left(now), schedulers, log)
        self.next = done + self.interval(self.opt.budget_iters)

    def spent(self):
        """The run's last line about its budget: the time used against it, the iterations, the replans."""
        if not self.active:
            return None
        opt, plans = self.opt, self.opt.budget_plans
        used = self.seconds - self.left(self.clock(opt.budget_iters))
        moved = sum(a[1] != b[1] for a, b in zip(plans, plans[1:]))
        return (f"--budget {opt.budget}: used {used / 60:.2f} of its {self.seconds / 60:.2f} min "
                f"({100 * used / self.seconds:.1f} %) for {opt.budget_iters} iterations, {plans[0][1]} at the start; "
                f"planned again {len(plans) - 1} times (every {REPLAN_EVERY:.0%} of the iterations, from the speed of "
                f"the last {REPLAN_WINDOW * REPLAN_EVERY:.0%}), {moved} of which moved the end")
