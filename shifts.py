"""
Where content sits on the generator's 4-px grid. The generator downsamples twice by 2, so what it
draws depends on the content's position modulo 4 px, and a video that pans by 1 px a frame
shimmers. Two cures: averaging the translations of all 16 shifts (test.py --shift_average), and
placing each input on the grid by its own content (--canonical_shift, which the generator applies
itself, so that training and translation see the same placement).
"""
import torch
import torch.nn.functional as F

# Every offset of the generator's 4-px grid: its two stride-2 layers tie the output to where
# the content sits modulo 4 px, so that a video panning by 1 px a frame shimmers.
GRID_SHIFTS = [(dy, dx) for dy in range(4) for dx in range(4)]


def grid_shift_average(translate_fn, x):
    """The mean over GRID_SHIFTS of translate_fn(x rolled by the shift), rolled back. 8-bit
    outputs (the strip path's) are summed in 16 bits and the mean rounded: 2 bytes a value."""
    # rolled, not padded: a generator trained at one size changes its output when the frame
    # grows, while a roll keeps the size and wraps at most 3 px of the far border
    total = 0
    for dy, dx in GRID_SHIFTS:
        y = torch.roll(translate_fn(torch.roll(x, (dy, dx), (2, 3))), (-dy, -dx), (2, 3))
        total = total + (y.short() if y.dtype == torch.uint8 else y)
    n = len(GRID_SHIFTS)
    return ((total + n // 2) // n).byte() if y.dtype == torch.uint8 else total / n


SHIFT_FRAME = 4  # the generator's total stride: a shift by it moves the output the same way


def fine_detail(x):
    """Each pixel's high-frequency energy, |x - its 3x3 mean|^2 averaged over the channels,
    x's border replicated: (N, H, W), in float32."""
    x = x.detach().float()
    return (x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)).square().mean(1)


def grid_phase_sums(detail):
    """fine_detail summed over each of the 16 phases of the 4-px grid, (N, 16), phase
    4 * row + column (modulo 4); rows and columns beyond a multiple of 4 are left out."""
    n, h, w = detail.shape
    return detail[:, :h // 4 * 4, :w // 4 * 4].reshape(n, h // 4, 4, w // 4, 4).sum((1, 3)).flatten(1)


def canonical_shift(x, phase_sums=None):
    """Where in a SHIFT_FRAME-larger frame to place each image of x (N x C x H x W) so that
    its fine detail falls on the same phase of the generator's 4-px grid wherever it sits:
    (N, 2) long offsets (dy, dx) in [0, 4). The phase is the one of the 16 whose pixels hold
    the most fine detail; moved by (a, b) px, the content has that phase moved by (a, b),
    so its offset moves by (-a, -b) mod 4 and the content lands where it did. (phase_sums:
    grid_phase_sums(fine_detail(x)), computed elsewhere, as the strip path does.)"""
    phase_sums = grid_phase_sums(fine_detail(x)) if phase_sums is None else phase_sums
    phase = phase_sums.argmax(1)  # (a blank image: the first, offset (0, 0))
    return torch.stack([(-(phase // 4)) % 4, (-(phase % 4)) % 4], 1)


def place_in_frame(x, shift):
    """x inside a frame SHIFT_FRAME px taller and wider, image k at offset shift[k], the rest
    of the frame its reflection. Gathers, not per-image padding, so that ONNX can trace it."""
    n, c, h, w = x.shape
    s = SHIFT_FRAME
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    rows = torch.arange(h + s, device=x.device) + s - shift[:, :1]  # N x (h + s)
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h + s, w + 2 * s))
    cols = torch.arange(w + s, device=x.device) + s - shift[:, 1:]
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h + s, w + s))


def flipped_shift(shift):
    """Where an image sits in the frame of its left-right flip placed at `shift`, once that
    frame is flipped back: the same row, SHIFT_FRAME - dx from the left."""
    return torch.stack([shift[:, 0], SHIFT_FRAME - shift[:, 1]], 1)


def crop_from_frame(y, shift, h, w):
    """The h x w image at offset shift[k] in each frame of y (place_in_frame's inverse)."""
    n, c = y.shape[:2]
    rows = torch.arange(h, device=y.device) + shift[:, :1]
    y = y.gather(2, rows[:, None, :, None].expand(n, c, h, y.size(3)))
    cols = torch.arange(w, device=y.device) + shift[:, 1:]
    return y.gather(3, cols[:, None, None, :].expand(n, c, h, w))
