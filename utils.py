"""
Small pieces of the training recipe: the fake-image replay buffer, the linear
learning-rate decay, and the atomic, safe checkpoint I/O every script uses.
"""
import os
import pickle
import random
import sys
import tempfile

import torch


class ReplayBuffer:
    """Shrivastava et al.'s image history: the discriminators see a mix of the
    newest fakes and fakes from up to `max_size` earlier steps, which keeps the
    generators from chasing a discriminator that only knows the latest fakes.

    Once full, each new image replaces a random stored one with probability 0.5,
    and the stored one is returned in its place. The buffer owns its random
    generator so that its draws can be saved and resumed exactly."""

    def __init__(self, max_size=50, seed=None):
        if max_size < 0:
            raise ValueError(f"ReplayBuffer max_size must be >= 0, got {max_size}")
        self.max_size = max_size  # 0: no buffer, the newest fakes pass straight through
        self.data = []
        self.rng = random.Random(seed)

    def push_and_pop(self, data):
        if self.max_size == 0:
            return data.detach()
        to_return = []
        for element in data.detach():
            element = element.unsqueeze(0)
            if len(self.data) < self.max_size:
                self.data.append(element)
                to_return.append(element)
            elif self.rng.uniform(0, 1) > 0.5:
                i = self.rng.randint(0, self.max_size - 1)
                to_return.append(self.data[i].clone())
                self.data[i] = element
            else:
                to_return.append(element)
        return torch.cat(to_return)

    def state_dict(self):
        return {"max_size": self.max_size, "data": [d.cpu() for d in self.data], "rng": self.rng.getstate()}

    def load_state_dict(self, state, device="cpu"):
        self.max_size = state["max_size"]
        self.data = [d.to(device) for d in state["data"]]
        self.rng.setstate(_as_random_state(state["rng"]))


def _as_random_state(state):
    # random.getstate() is a tuple of (int, tuple, None); a round trip through
    # torch.save with weights_only=True turns the inner tuple into a list.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class LambdaLR:
    """Linear decay as the paper: the rate stays at its initial value until
    `decay_start_epoch`, then falls linearly to 0 at `n_epochs`. `offset` is the
    epoch training (re)starts from, so a resumed run continues the same curve."""

    def __init__(self, n_epochs, offset, decay_start_epoch):
        if decay_start_epoch >= n_epochs:
            raise ValueError(
                f"--decay_epoch ({decay_start_epoch}) must be smaller than --n_epochs ({n_epochs}): "
                f"the learning rate decays linearly to 0 between them"
            )
        self.n_epochs = n_epochs
        self.offset = offset
        self.decay_start_epoch = decay_start_epoch

    def step(self, epoch):
        return 1.0 - max(0, epoch + self.offset - self.decay_start_epoch) / (self.n_epochs - self.decay_start_epoch)


def die(msg):
    """Stop with one clear line instead of a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync it, then rename it
    over `path`: a crash or a full disk mid-save leaves the old file intact."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True, and one clear line for every way it can
    fail: missing file, truncated file, or a pickle that wants to run code."""
    path = str(path)
    if not os.path.isfile(path):
        die(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        die(
            f"checkpoint {path} was refused: it needs arbitrary code to unpickle "
            f"(weights_only=True), so it is not a plain state_dict; re-save it as one "
            f"only if you trust its source ({str(e).splitlines()[0][:200]})"
        )
    except Exception as e:  # truncated or not a torch file at all
        die(f"checkpoint {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); is it a complete .pth file?")
