"""
The built-in dataset: procedural, unpaired "day -> night" landscapes that need no
download. A scene (geometry) and a style (palette) come from separate RNGs, so the
same scene can be rendered by day and by night; the night image is, region by
region, a recolouring of the day image, which a small generator learns from
unpaired samples within minutes, and the paired test scenes let it be scored.
"""
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from utils import current_umask

BUILTIN_DATASET = "synthetic_day2night"

# Region labels.  Each label gets a (top, bottom) colour pair per style so that
# regions carry a vertical gradient (sky brightening to the horizon, hazy hills).
SKY, SUN, MTN0, MTN1, MTN2, GROUND, WATER, TRUNK, LEAVES, WALL, ROOF, WINDOW = range(12)
_DAY = np.array([
    [(.25, .50, .90), (.70, .85, 1.0)], [(1.0, .95, .65), (1.0, .95, .65)],
    [(.55, .65, .78), (.62, .72, .78)], [(.35, .55, .38), (.40, .58, .35)],
    [(.32, .46, .20), (.42, .40, .22)], [(.42, .72, .25), (.28, .55, .15)],
    [(.40, .65, .92), (.30, .50, .80)], [(.42, .26, .12), (.42, .26, .12)],
    [(.16, .48, .16), (.10, .35, .10)], [(.92, .86, .72), (.85, .80, .66)],
    [(.72, .26, .20), (.60, .20, .16)], [(.35, .50, .65), (.35, .50, .65)]])
# Night: dark, desaturated, blue-shifted; the only bright things are the moon and
# lit windows -- both located by geometry visible in the day image.
_NIGHT = np.array([
    [(.02, .03, .10), (.08, .12, .26)], [(.92, .93, .86), (.92, .93, .86)],
    [(.15, .18, .29), (.17, .20, .30)], [(.10, .12, .20), (.11, .13, .20)],
    [(.06, .08, .14), (.07, .08, .13)], [(.07, .10, .13), (.05, .08, .10)],
    [(.09, .13, .27), (.05, .08, .19)], [(.06, .05, .06), (.06, .05, .06)],
    [(.04, .07, .08), (.03, .05, .06)], [(.22, .22, .29), (.19, .19, .26)],
    [(.13, .09, .15), (.11, .08, .13)], [(1.0, .86, .42), (1.0, .80, .35)]])
_GLOW = {False: np.array([1.0, 1.0, .85]) * .35, True: np.array([.60, .65, .80]) * .15}


def _scene_labels(rng, s):
    """Label map (s x s) and sun position; all geometry comes from `rng` only."""
    y, x = np.mgrid[0:s, 0:s] / s
    lab = np.full((s, s), SKY, np.uint8)
    sun = (rng.uniform(.15, .85), rng.uniform(.10, .32), rng.uniform(.05, .08))
    lab[(x - sun[0]) ** 2 + (y - sun[1]) ** 2 < sun[2] ** 2] = SUN
    horizon = rng.uniform(.66, .76)

    def ridge(base, amp, nfreq):  # smooth random ridgeline: a few low-frequency sines
        f = rng.uniform(.5, 4.0, nfreq)[:, None]
        a = amp * rng.uniform(.3, 1, nfreq)[:, None] / f
        return base + (a * np.sin(2 * np.pi * f * x[0] + rng.uniform(0, 2 * np.pi, (nfreq, 1)))).sum(0)

    n = int(rng.integers(2, 4))
    for k, label in enumerate([MTN0, MTN1, MTN2][3 - n:]):  # far -> near, near overdraws
        top = ridge(horizon - rng.uniform(.18, .34) * (n - k) / n, .06, 4)
        lab[y > top[None, :]] = label
    ground = ridge(horizon, .015, 2)[None, :]
    lab[y > ground] = GROUND
    if rng.random() < .5:  # lake: flat ellipse just below the horizon
        cx, cy = rng.uniform(.2, .8), horizon + rng.uniform(.07, .14)
        rx, ry = rng.uniform(.15, .3), rng.uniform(.03, .06)
        lab[(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1) & (y > ground)] = WATER
    # Trees and houses, sorted by base so nearer objects overdraw farther ones;
    # size grows with distance below the horizon for a hint of perspective.
    objs = [(rng.uniform(horizon + .03, .97), rng.uniform(.05, .95), rng.random() < .25)
            for _ in range(int(rng.integers(2, 7)))]
    for base, cx, house in sorted(objs):
        sc = .5 + 2.5 * (base - horizon)
        if house:
            w, h = .10 * sc, .07 * sc
            lab[(abs(x - cx) < w / 2) & (y < base) & (y > base - h)] = WALL
            lab[(y <= base - h) & (abs(x - cx) < (y - (base - h - .6 * h)) / (.6 * h) * .6 * w)] = ROOF
            for wx in (cx - w / 4, cx + w / 4):
                lab[(abs(x - wx) < .015 * sc) & (abs(y - (base - h / 2)) < .015 * sc)] = WINDOW
        else:
            h, w = rng.uniform(.10, .18) * sc, rng.uniform(.03, .05) * sc
            lab[(abs(x - cx) < w / 5) & (y < base) & (y > base - h * .3)] = TRUNK
            crown = (y > base - h) & (y < base - h * .2)
            lab[crown & (abs(x - cx) < (y - (base - h)) / (.8 * h) * w)] = LEAVES
    return lab, y, x, sun


def render_scene(scene_rng_seed, size, night, palette_rng_seed):
    """Render one scene as a size x size x 3 uint8 image in the day or night style."""
    s = 2 * size  # render at 2x and box-downsample: cheap anti-aliasing
    lab, y, x, (sx, sy, _) = _scene_labels(np.random.default_rng(scene_rng_seed), s)
    prng = np.random.default_rng(palette_rng_seed)
    # Palette jitter (global brightness, per-channel tint, per-region brightness)
    # makes each style a distribution while keeping day and night far apart.
    pal = (_NIGHT if night else _DAY) * np.exp(prng.normal(0, .08))
    pal = pal * (1 + prng.normal(0, .04, 3)) * (1 + prng.normal(0, .06, (12, 1, 1)))
    pal += prng.normal(0, .01, (12, 1, 3))  # small absolute shift: dark night colours stay dark
    img = pal[lab, 0] + (pal[lab, 1] - pal[lab, 0]) * y[..., None]
    glow = np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / .02) * (lab == SKY)  # halo, sky only
    img += glow[..., None] * _GLOW[bool(night)]
    img = (np.clip(img, 0, 1) * 255 + .5).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BOX))


def make_day2night(root, n_train=400, n_test=40, size=64, seed=0):
    """Write root/{trainA,trainB,testA,testB}/NNNN.png (A = day, B = night).

    Scene ids are split into disjoint ranges so trainA and trainB never share a
    scene (genuinely unpaired); testA/x.png and testB/x.png show the same scene.
    """
    root = os.fspath(root).rstrip("/\\")
    if os.path.exists(root):
        raise FileExistsError(root)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    # A private temporary folder, renamed into place once complete: an interrupted run
    # leaves no half dataset, and processes generating at once (torchrun on a shared file
    # system) cannot trip over each other; the first rename wins.
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    try:
        jobs = [("trainA", i, i, False) for i in range(n_train)]
        jobs += [("trainB", i, n_train + i, True) for i in range(n_train)]
        jobs += [(d, i, 2 * n_train + i, d == "testB") for d in ("testA", "testB") for i in range(n_test)]
        for d in ("trainA", "trainB", "testA", "testB"):
            os.makedirs(os.path.join(tmp, d))
        for d, i, scene, night in jobs:
            img = render_scene([seed, 0, scene], size, night, [seed, 1, scene, int(night)])
            Image.fromarray(img).save(os.path.join(tmp, d, f"{i:04d}.png"))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isdir(root):  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
