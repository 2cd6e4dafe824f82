"""Tests for utils.py: the replay buffer, the linear LR decay, atomic saving and
safe checkpoint loading."""

import os
import random

import pytest
import torch

import utils
from utils import LambdaLR, ReplayBuffer, load_checkpoint, save_atomic


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


def test_lambda_lr_drives_torch_scheduler_to_base_lr_times_factor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=2e-4)
    schedule = LambdaLR(n_epochs=200, offset=0, decay_start_epoch=100)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule.step)
    for epoch in range(200):
        assert opt.param_groups[0]["lr"] == pytest.approx(2e-4 * schedule.step(epoch), abs=1e-15)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


# ----------------------------------------------------------------------------- save_atomic

def test_save_atomic_writes_a_loadable_file_and_replaces_the_old_one(tmp_path):
    path = tmp_path / "ckpts" / "model.pth"  # folder is created
    save_atomic({"w": torch.arange(4)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))
    save_atomic({"w": torch.arange(5)}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5))
    assert os.listdir(path.parent) == ["model.pth"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_save_atomic_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, exc):
    path = tmp_path / "model.pth"
    save_atomic({"w": torch.arange(3)}, path)
    before = path.read_bytes()
    wrote = []

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint" * 100)
        wrote.append(True)
        raise exc

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(exc)):
        save_atomic({"w": torch.arange(100)}, path)
    monkeypatch.undo()
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
