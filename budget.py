"""
--budget: a run's length given as wall time (90s, 45min, 1.5h) or as a number of
iterations, turned into iterations and a learning-rate schedule over them. A time budget is
planned from a short measurement of this machine's speed at the start, and planned again
from the run's own speed as it goes.
"""
import math
import re
import time

import torch
import torch.distributed as dist

from utils import die


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
    run never reaches its --decay_epoch.)"""

    def __init__(self, total, warmup=0.0, decay=0.5):
        self.total = total
        self.warmup_iters, self.decay_iters = round(warmup * total), round(decay * total)

    def step(self, iteration):
        factor = 1.0
        if self.warmup_iters > 0:
            factor = min(factor, (iteration + 1) / self.warmup_iters)
        if self.decay_iters > 0:
            factor = min(factor, (self.total - iteration) / self.decay_iters)
        return max(factor, 0.0)


def total_iterations(opt, n_batches):
    return opt.budget_iters if opt.budget is not None else opt.n_epochs * n_batches


def n_evaluations(opt, iterations, n_batches):
    """Evaluations in a run of `iterations`: every --eval_interval epochs, and after the last."""
    if opt.eval_interval <= 0:
        return 0
    epochs = math.ceil(iterations / n_batches)
    return epochs // opt.eval_interval + (epochs % opt.eval_interval != 0)


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


def agree_on(total, procs):
    """Under torchrun rank 0's figure is everyone's."""
    if procs.ddp:
        total_t = torch.tensor([total], dtype=torch.int64)
        dist.broadcast(total_t, src=0, group=procs.group)
        total = int(total_t[0])
    return total


def fit_budget(opt, n_batches, procs, started, measure_costs, evaluates):
    """Turn --budget into opt.budget_iters and opt.n_epochs at the start of a run; they are
    saved with the arguments in last.pt, so a resumed run keeps them. A time budget is the
    wall time of the whole run, less what has been spent since `started`: iterations at the
    measured speed plus the evaluations --eval_interval asks for. `measure_costs(seconds)`: the
    script's (seconds per iteration, seconds per evaluation), measured for about `seconds`;
    `evaluates`: whether the run evaluates. Returns the seconds per evaluation (for
    replan_budget; 0 for a number of iterations)."""
    kind, amount = parse_budget(opt.budget)
    eval_s = 0.0
    if kind == "iterations":
        total = amount
    else:
        seconds = min(60, 0.02 * amount)
        if procs.master:
            print(f"--budget {opt.budget}: first measuring this machine's speed, about {seconds:.0f} s of training steps"
                  + (", then one evaluation of both generators (its first also takes the test images' FID features)"
                     if evaluates else "") + " ...")
        step_s, eval_s = measure_costs(seconds)
        total = iterations_within(amount - (time.time() - started), step_s, eval_s, opt, n_batches)
        if total < 1:
            die(f"--budget {opt.budget}: too short here for one iteration ({step_s:.2f} s) and the evaluations "
                f"({eval_s:.0f} s each); give more time, or a number of iterations")
        if procs.master:
            print(f"--budget {opt.budget}: {step_s:.3f} s per iteration" + (f" and {eval_s:.0f} s per evaluation" if eval_s else "")
                  + f" on this machine: {total} iterations ({total / n_batches:.1f} epochs)")
    opt.budget_iters = agree_on(total, procs)
    opt.n_epochs = math.ceil(opt.budget_iters / n_batches)
    return eval_s


REPLAN_AT = (0.05, 0.2, 0.4)  # fractions of a time budget's planned iterations


def replan_points(opt, resume_state):
    """The iterations after which a time budget is planned again from the run's own speed:
    a few seconds' measurement at the start can be off by half (another process starting
    beside it, a first minute that runs slower or faster), and a run should end when its
    budget does. Only before the learning rate starts to fall (the plan moves where it falls,
    and a decay already under way would jump) and only in a run that started here, whose
    start time it knows; a resumed run keeps the plan in its last.pt."""
    if opt.budget is None or resume_state is not None or parse_budget(opt.budget)[0] != "seconds":
        return set()
    return {round(f * opt.budget_iters) for f in REPLAN_AT if 0 < f < 1 - opt.decay_fraction}


def replan_budget(opt, done, n_batches, procs, started, loop_started, eval_s, schedulers, log, now):
    """After `done` iterations of this run (started at `started`, its loop at `loop_started`):
    opt.budget_iters and opt.n_epochs from the speed of those iterations, so that the whole
    run takes --budget; the learning-rate schedules follow the new length. Not once the
    decay has begun (an earlier plan may have moved it before this point)."""
    if done >= (1 - opt.decay_fraction) * opt.budget_iters:
        return
    evaluated = (done // n_batches) // opt.eval_interval if opt.eval_interval > 0 else 0
    step_s = max(1e-9, (now - loop_started - evaluated * eval_s) / done)
    seconds = parse_budget(opt.budget)[1] - (now - started)
    total = done + iterations_within(seconds, step_s, eval_s, opt, n_batches, done, evaluated)
    total = agree_on(max(total, done + 1), procs)
    if total == opt.budget_iters:
        return
    if procs.master:
        print(f"--budget {opt.budget}: {step_s:.3f} s per iteration over this run's first {done}: "
              f"{total} iterations ({total / n_batches:.1f} epochs) instead of {opt.budget_iters}")
    opt.budget_iters, opt.n_epochs = total, math.ceil(total / n_batches)
    for scheduler in schedulers.values():
        scheduler.lr_lambdas = [BudgetLR(total, opt.warmup, opt.decay_fraction).step for _ in scheduler.lr_lambdas]
    if log is not None:
        log.set_total(total)


