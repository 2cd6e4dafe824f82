"""Tests for utils.py: the replay buffer, the linear LR decay, atomic saving and
safe checkpoint loading, the full training state, the choice of device and precision."""

import argparse
import os
import random

import pytest
import torch

import checkpoint
import utils
from checkpoint import StopSignal, TrainingState, set_rng_state
from gan import LambdaLR, ReplayBuffer
from utils import cpu_info as real_cpu_info  # imported before conftest fakes utils.cpu_info
from utils import load_checkpoint, save_atomic


def img(value, n=1):
    """n images of shape (3, 2, 2) filled with `value`, `value`+1, ..."""
    return torch.stack([torch.full((3, 2, 2), float(value + k)) for k in range(n)])


def ids(t):
    """The fill value of each image in a batch."""
    return [int(x[0, 0, 0]) for x in t]


# ----------------------------------------------------------------------------- ReplayBuffer

def test_replay_buffer_returns_and_stores_the_first_max_size_images_unchanged():
    buf = ReplayBuffer(max_size=5, seed=0)
    for k in range(5):
        out = buf.push_and_pop(img(k))
        assert torch.equal(out, img(k))
        assert len(buf.data) == k + 1
    assert [ids(d)[0] for d in buf.data] == [0, 1, 2, 3, 4]


def test_replay_buffer_when_full_swaps_about_half_for_stored_ones_and_stays_bounded():
    max_size = 10
    buf = ReplayBuffer(max_size=max_size, seed=123)
    for k in range(max_size):
        buf.push_and_pop(img(k))
    old = 0
    pushes = 2000
    for k in range(max_size, max_size + pushes):
        stored_before = [ids(d)[0] for d in buf.data]
        (r,) = ids(buf.push_and_pop(img(k)))
        stored_after = [ids(d)[0] for d in buf.data]
        assert len(buf.data) == max_size
        if r == k:  # the new image went straight through; the buffer is untouched
            assert stored_after == stored_before
        else:  # a stored image came out and the new one took its slot
            old += 1
            i = stored_before.index(r)
            assert stored_after == stored_before[:i] + [k] + stored_before[i + 1:]
    assert 0.45 < old / pushes < 0.55


def test_replay_buffer_draws_come_from_its_own_seeded_rng():
    def run(global_seed):
        random.seed(global_seed)
        torch.manual_seed(global_seed)
        buf = ReplayBuffer(max_size=3, seed=7)
        return [ids(buf.push_and_pop(img(k)))[0] for k in range(40)]
    a, b = run(0), run(1)
    assert a == b  # the global RNGs do not matter
    assert a[:3] == [0, 1, 2] and a != list(range(40))
    buf = ReplayBuffer(max_size=3, seed=8)
    assert [ids(buf.push_and_pop(img(k)))[0] for k in range(40)] != a  # the buffer's seed does


def test_replay_buffer_returns_detached_tensors():
    buf = ReplayBuffer(max_size=2, seed=0)
    w = torch.ones((), requires_grad=True)
    for k in range(20):
        x = img(k, n=2) * w
        assert x.requires_grad
        out = buf.push_and_pop(x)
        assert not out.requires_grad and out.grad_fn is None
        assert all(not d.requires_grad for d in buf.data)


@pytest.mark.parametrize("max_size", [3, 4, 6, 50])
def test_replay_buffer_batch_of_four_returns_four_and_never_exceeds_max_size(max_size):
    buf = ReplayBuffer(max_size=max_size, seed=1)
    for step in range(10):
        out = buf.push_and_pop(img(4 * step, n=4))
        assert out.shape == (4, 3, 2, 2)
        assert len(buf.data) == min(max_size, 4 * (step + 1))


def test_replay_buffer_rejects_negative_size_and_size_zero_passes_fakes_through():
    with pytest.raises(ValueError):
        ReplayBuffer(max_size=-1)
    buf = ReplayBuffer(max_size=0, seed=0)
    for _ in range(3):
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        out = buf.push_and_pop(x)
        assert torch.equal(out, x) and not out.requires_grad
    assert buf.data == []


def test_replay_buffer_state_dict_round_trip_continues_bitwise_identically(tmp_path):
    buf = ReplayBuffer(max_size=4, seed=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        buf.push_and_pop(torch.randn(2, 3, 4, 4, generator=g))
    torch.save(buf.state_dict(), tmp_path / "buf.pt")
    restored = ReplayBuffer(max_size=1, seed=999)
    restored.load_state_dict(torch.load(tmp_path / "buf.pt", weights_only=True))
    assert restored.max_size == 4
    fresh = ReplayBuffer(max_size=4, seed=999)
    differs_from_fresh = False
    for _ in range(30):
        x = torch.randn(2, 3, 4, 4, generator=g)
        a, b, c = buf.push_and_pop(x), restored.push_and_pop(x), fresh.push_and_pop(x)
        assert torch.equal(a, b)
        differs_from_fresh |= not torch.equal(a, c)
    assert differs_from_fresh  # the restored state (contents + rng) is what made them equal


def test_replay_buffer_stores_copies_not_views_of_the_batch_it_was_given(tmp_path):
    """A stored fake must own just its own pixels: a view into the generator's 2n-image
    output would keep that whole tensor alive, and last.pt would save all of it."""
    buf = ReplayBuffer(max_size=4, seed=0)
    batch = torch.randn(8, 3, 32, 32)
    buf.push_and_pop(batch[4:])  # as train_step pushes the fakes: the second half of a stacked output
    one_image = 3 * 32 * 32 * 4
    assert all(d.untyped_storage().nbytes() == one_image for d in buf.data)
    batch.zero_()  # and the stored images do not change with the tensor they came from
    assert all(d.abs().sum() > 0 for d in buf.data)
    torch.save(buf.state_dict(), tmp_path / "buf.pt")
    assert os.path.getsize(tmp_path / "buf.pt") < 4 * one_image + 8192


# ----------------------------------------------------------------------------- LambdaLR

def test_lambda_lr_is_flat_until_decay_start_then_linear_to_zero():
    f = LambdaLR(n_epochs=200, offset=0, decay_start_epoch=100).step
    for e in (0, 1, 50, 99, 100):
        assert f(e) == 1.0
    assert f(150) == pytest.approx(0.5)
    assert f(199) == pytest.approx(0.01)
    assert f(101) == pytest.approx(0.99)


def test_lambda_lr_offset_shifts_the_curve():
    plain = LambdaLR(200, 0, 100).step
    shifted = LambdaLR(200, 50, 100).step
    assert shifted(0) == 1.0 and shifted(50) == 1.0
    assert shifted(100) == pytest.approx(0.5) == plain(150)
    assert shifted(149) == pytest.approx(plain(199))


@pytest.mark.parametrize("decay", [200, 250])
def test_lambda_lr_decay_start_not_before_n_epochs_raises_naming_the_flags(decay):
    with pytest.raises(ValueError) as info:
        LambdaLR(n_epochs=200, offset=0, decay_start_epoch=decay)
    assert "--decay_epoch" in str(info.value) and "--n_epochs" in str(info.value)


# ----------------------------------------------------------------------------- save_atomic

def test_save_atomic_writes_a_loadable_file_and_replaces_the_old_one(tmp_path):
    path = tmp_path / "ckpts" / "model.pth"  # folder is created
    save_atomic({"w": torch.arange(4)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))
    save_atomic({"w": torch.arange(5)}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5))
    assert os.listdir(path.parent) == ["model.pth"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), RuntimeError("unexpected pos"),
                                 KeyboardInterrupt()])
def test_save_atomic_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, exc, capsys):
    path = tmp_path / "model.pth"
    save_atomic({"w": torch.arange(3)}, path)
    before = path.read_bytes()
    wrote = []

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint" * 100)
        wrote.append(True)
        raise exc

    monkeypatch.setattr(torch, "save", failing_save)
    # a write error (full disk: OSError, or torch's RuntimeError) is one line; an interrupt stays one
    with pytest.raises(KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else SystemExit):
        save_atomic({"w": torch.arange(100)}, path)
    monkeypatch.undo()
    if not isinstance(exc, KeyboardInterrupt):
        assert one_line_error(capsys).startswith(f"error: could not write {path} ({type(exc).__name__}: ")
    assert wrote  # the failure really happened mid-write
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert os.listdir(tmp_path) == ["model.pth"]


# ----------------------------------------------------------------------------- load_checkpoint

def one_line_error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_load_checkpoint_returns_the_state_dict(tmp_path):
    save_atomic({"w": torch.arange(3), "epoch": 4}, tmp_path / "ok.pth")
    out = load_checkpoint(tmp_path / "ok.pth")
    assert out["epoch"] == 4 and torch.equal(out["w"], torch.arange(3))


def test_load_checkpoint_missing_file_exits_with_one_line_naming_path(tmp_path, capsys):
    path = tmp_path / "nope" / "G_AB_7.pth"
    with pytest.raises(SystemExit) as info:
        load_checkpoint(path)
    assert info.value.code not in (0, None)
    line = one_line_error(capsys)
    assert str(path) in line and "does not exist" in line


def test_load_checkpoint_truncated_file_exits_with_one_line(tmp_path, capsys):
    path = tmp_path / "trunc.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as info:
        load_checkpoint(path)
    assert info.value.code not in (0, None)
    line = one_line_error(capsys)
    assert str(path) in line and "could not be read" in line


class Payload:
    """Unpickling this creates the marker file (a stand-in for os.system)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_checkpoint_refuses_a_pickle_that_runs_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(SystemExit) as info:
        load_checkpoint(path)
    assert info.value.code not in (0, None)
    assert not marker.exists()
    line = one_line_error(capsys)
    assert str(path) in line and "arbitrary code" in line and "weights_only" in line

    # control: the payload is real -- a plain torch.load would have run it
    f = torch.load(path, weights_only=False)["x"]
    f.close()
    assert marker.exists()


def test_die_prints_one_error_line_and_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as info:
        utils.die("something broke")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: something broke\n"


def test_save_atomic_file_gets_ordinary_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        save_atomic({"x": torch.zeros(1)}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.pt").st_mode & 0o777) == 0o644


# ----------------------------------------------------------------------------- the full training state

def tiny_training(seed=0, scaler=None):
    torch.manual_seed(seed)
    nets = {"G": torch.nn.Linear(3, 2), "D": torch.nn.Linear(2, 1)}
    optimizers = {"optimizer_G": torch.optim.Adam(nets["G"].parameters(), lr=1e-3, foreach=True),
                  "optimizer_D": torch.optim.Adam(nets["D"].parameters(), lr=1e-3, foreach=True)}
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 - e / 10) for k, o in optimizers.items()}
    buffers = {"fake_A": ReplayBuffer(2, seed=1), "fake_B": ReplayBuffer(2, seed=2)}
    return TrainingState(argparse.Namespace(seed=3, epoch=0), nets, optimizers, schedulers, buffers, scaler)


def train_a_little(run_state, steps=3):
    nets = run_state.nets
    for _ in range(steps):
        x = torch.randn(4, 3)
        loss = nets["D"](run_state.buffers["fake_A"].push_and_pop(nets["G"](x))).mean() + nets["G"](x).pow(2).mean()
        for o in run_state.optimizers.values():
            o.zero_grad()
        loss.backward()
        for o in run_state.optimizers.values():
            o.step()
        for s in run_state.schedulers.values():
            s.step()


def test_training_state_round_trip_restores_everything_including_the_grad_scaler(tmp_path):
    """--amp fp16: the GradScaler's scale and growth tracker are part of the state; a resume
    that restarted them at 2**16 would skip steps the uninterrupted run takes."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    run_state = tiny_training(scaler=scaler)
    train_a_little(run_state)
    scaler.scale(torch.ones(()))  # (the scale is created lazily)
    scaler.update(new_scale=512.0)  # as after a few overflows
    scaler._growth_tracker.fill_(7)
    run_state.epoch, run_state.batch, run_state.best_fid = 2, 5, {"G_AB": 1.5}
    path = tmp_path / "last.pt"
    run_state.save(path)
    random.random(), torch.rand(1)  # move the global RNGs on: the state must bring them back

    state = load_checkpoint(path)
    assert state["best_fid"] == {"G_AB": 1.5} and state["args"]["seed"] == 3
    assert (state["device_type"], state["precision"]) == ("cpu", "fp32")
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    fresh = tiny_training(seed=1, scaler=fresh_scaler)
    fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.batch, fresh.best_fid) == (2, 5, {"G_AB": 1.5})
    assert fresh_scaler.state_dict()["scale"] == 512.0 and fresh_scaler.state_dict()["_growth_tracker"] == 7
    # the continuation is the same as continuing the original
    after_restore = (random.random(), torch.rand(1).item())
    set_rng_state(state["rng"])
    assert after_restore == (random.random(), torch.rand(1).item())
    set_rng_state(state["rng"])
    train_a_little(run_state)
    set_rng_state(state["rng"])
    train_a_little(fresh)
    for name in ("G", "D"):
        for p, q in zip(run_state.nets[name].parameters(), fresh.nets[name].parameters()):
            assert torch.equal(p, q)


def test_training_state_saved_with_fused_adam_loads_with_the_options_of_this_device(tmp_path):
    """A last.pt written on CUDA carries fused=True in its optimizer state; resumed on
    the CPU, the optimizers must use the CPU's options."""
    run_state = tiny_training()
    train_a_little(run_state)
    run_state.epoch = 1
    run_state.save(tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")
    for name in ("optimizer_G", "optimizer_D"):
        for group in state[name]["param_groups"]:
            group.update(fused=True, foreach=None)  # as saved by a CUDA run
    fresh = tiny_training(seed=1)
    fresh.load_state_dict(state, optimizer_options={"fused": None, "foreach": True})
    for o in fresh.optimizers.values():
        assert all(g["fused"] is None and g["foreach"] is True for g in o.param_groups)


def test_training_state_refuses_a_mid_epoch_resume_with_another_process_count(tmp_path, capsys):
    run_state = tiny_training()
    run_state.epoch, run_state.batch = 1, 3
    run_state.save(tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")
    with pytest.raises(SystemExit):
        tiny_training().load_state_dict(state, world_size=2)
    assert "saved mid-epoch by 1 process(es)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- device and precision

@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_pick_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert utils.pick_device("auto").type == expected
    assert utils.pick_device("cpu").type == "cpu"


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_pick_device_missing_backend_is_one_line_naming_the_flag(monkeypatch, capsys, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        utils.pick_device(name)
    assert one_line_error(capsys).startswith(f"error: --device {name}: ")


CPU = torch.device("cpu")
XEON_NO_BF16 = {"avx2", "avx512f", "avx512bw", "avx512_vnni"}  # AVX-512, but no AVX512_BF16 or AMX
EPYC_BF16 = {"avx2", "avx512f", "avx512bw", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}


@pytest.mark.parametrize("flags,expected", [(XEON_NO_BF16, None), ({"avx2", "fma"}, None), (set(), None),
                                            (EPYC_BF16, torch.bfloat16), (SAPPHIRE_RAPIDS, torch.bfloat16)])
def test_amp_auto_picks_bf16_only_on_cpus_reporting_native_bf16_instructions(flags, expected):
    assert utils.pick_precision("auto", CPU, cpu_flags=flags) == (expected, None)


def test_amp_bf16_on_a_cpu_that_emulates_it_runs_bf16_with_a_one_line_warning():
    dtype, warning = utils.pick_precision("bf16", CPU, cpu_flags=XEON_NO_BF16)
    assert dtype == torch.bfloat16 and "\n" not in warning and "slower" in warning and "--amp bf16" in warning
    assert utils.pick_precision("bf16", CPU, cpu_flags=EPYC_BF16) == (torch.bfloat16, None)
    assert utils.pick_precision("none", CPU, cpu_flags=EPYC_BF16) == (None, None)


@pytest.mark.parametrize("capability,expected", [((7, 0), None), ((7, 5), None), ((8, 0), torch.bfloat16),
                                                 ((9, 0), torch.bfloat16)])
def test_amp_auto_on_cuda_follows_the_compute_capability(capability, expected):
    assert utils.pick_precision("auto", torch.device("cuda"), cuda_capability=capability) == (expected, None)
    assert utils.pick_precision("fp16", torch.device("cuda"), cuda_capability=capability) == (torch.float16, None)


def test_amp_fp16_on_the_cpu_is_one_line(capsys):
    with pytest.raises(SystemExit):
        utils.pick_precision("fp16", CPU, cpu_flags=EPYC_BF16)
    assert "--amp fp16" in one_line_error(capsys)


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text,name,flags", [
    (X86_CPUINFO, "Intel(R) Xeon(R) Platinum 8480+",
     {"fpu", "sse4_2", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
    (ARM_CPUINFO, None, {"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "bf16"})])
def test_cpu_info_reads_the_model_and_the_first_processors_flags(tmp_path, text, name, flags):
    (tmp_path / "cpuinfo").write_text(text)
    got_name, got_flags = real_cpu_info(str(tmp_path / "cpuinfo"))
    assert got_flags == flags
    assert got_name == name if name else isinstance(got_name, str) and got_name


def test_cpu_info_without_a_cpuinfo_file_knows_no_flags(tmp_path):
    name, flags = real_cpu_info(str(tmp_path / "missing"))
    assert flags == set() and isinstance(name, str) and name


def test_the_suite_fakes_the_hardware_report_so_auto_means_fp32_here(cpu_bf16):
    """conftest.py's fake is what pick_precision sees, on every machine: both branches run."""
    assert utils.pick_precision("auto", CPU) == ((torch.bfloat16 if cpu_bf16 else None), None)
    dtype, warning = utils.pick_precision("bf16", CPU)
    assert dtype == torch.bfloat16 and (warning is None) == cpu_bf16


def test_first_line_is_the_messages_first_line_cut_to_the_limit_and_empty_for_no_message():
    assert (utils.first_line(RuntimeError("\n  size mismatch for model.1\n  more detail\n"))
            == "size mismatch for model.1")
    assert utils.first_line(ValueError("x" * 500)) == "x" * 200
    assert utils.first_line(ValueError("x" * 500), 300) == "x" * 300
    assert utils.first_line(KeyError()) == ""


def test_precision_names_round_trip_through_the_one_map():
    assert [utils.precision_name(utils.PRECISIONS[n]) for n in ("none", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_every_computing_script_declares_the_same_device_and_precision_flags():
    import cyclegan
    import evaluate
    from conftest import translate_script as load_translate_script
    translate_script = load_translate_script()
    for module, amp in ((cyclegan, "auto"), (translate_script, "auto"), (evaluate, "none")):
        opt = module.get_parser().parse_args(["--checkpoint", "x", "--image_path", "y"]
                                             if module is translate_script else [])
        assert (opt.device, opt.amp) == ("auto", amp), module.__name__
        for value in ("auto", "none", "bf16", "fp16"):
            args = ["--checkpoint", "x", "--image_path", "y"] if module is translate_script else []
            assert module.get_parser().parse_args(args + ["--amp", value]).amp == value


def test_help_shows_a_default_once_and_never_none():
    """Each script's --help ends a flag's text with its default, but not "(default: None)",
    and not a second default where the text already gives one in words."""
    import bench
    import cut
    import cyclegan
    import evaluate
    import export
    from conftest import translate_script as load_translate_script
    for module in (cyclegan, cut, load_translate_script(), evaluate, export, bench):
        text = " ".join(module.get_parser().format_help().split())
        assert "(default: None)" not in text, module.__name__
    cyclegan_help = " ".join(cyclegan.get_parser().format_help().split())
    assert "adam: learning rate (default: 0.0002)" in cyclegan_help  # the seed's value, from argparse
    data_root = cyclegan_help.split("--data_root DATA_ROOT")[-1].split(" --")[0]  # its line under options
    assert data_root.count("default") == 1 and "data/<dataset_name>" in data_root
    evaluate_help = " ".join(evaluate.get_parser().format_help().split())
    assert "--amp {auto,none,bf16,fp16}" in evaluate_help and "(default: none)" in evaluate_help


def test_a_signal_that_arrives_during_the_stop_all_reduce_is_honoured_after_the_next_batch(monkeypatch):
    """Under DDP agreed() sends this process's flag and waits in an all-reduce; a signal handled
    while it waits missed that flag, so all processes agree to go on this time, and must agree
    to stop at the next batch (it used to be overwritten by the all-reduce's result and lost:
    a torchrun run given SIGTERM trained to the end)."""
    import signal as sig
    saved = {s: sig.getsignal(s) for s in (sig.SIGINT, sig.SIGTERM)}
    try:
        stop = StopSignal()
        calls = []

        def all_reduce(flag, op=None, group=None):  # the other process's flag is 0
            calls.append(int(flag[0]))
            if len(calls) == 1:
                stop._on_signal(sig.SIGTERM, None)  # handled while this process waits

        monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(checkpoint.dist, "all_reduce", all_reduce)
        assert stop.agreed() is False  # the flag went out without it: everyone goes on
        assert stop.agreed() is True and stop.signum == sig.SIGTERM
        assert calls == [0, sig.SIGTERM]
    finally:
        for s, handler in saved.items():
            sig.signal(s, handler)
