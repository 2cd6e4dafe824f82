"""
Translating an image of any size in bounded memory: `translate_tiled(G, x, strip_rows)`
equals `models.translate(G, x)` up to float rounding, with memory set by the strip, not
the image (test.py --tile); `peak_bytes` says how much, for test.py --max_memory.

InstanceNorm normalises with statistics of the whole map, so tiles translated on their
own change colour tile by tile. Instead the network is cut into stages at its
InstanceNorm layers. Each stage is computed in horizontal strips of full width, each read
with the few extra rows (halo) its convolutions need, so every row is computed once and
exactly; its pre-norm output goes to a temporary file while its per-channel mean and
variance are accumulated; the next stage then normalises with those whole-map statistics.
"""
import shutil
import tempfile
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import (BlurDownsample, BlurUpsample, OfficialResnetBlock, ResidualBlock, padding_to_multiple_of_4,
                    to_levels)
from shifts import SHIFT_FRAME, canonical_shift, fine_detail, grid_phase_sums


def network_ops(layers, blocks=None):
    """The generator's layers in the order they run, residual blocks opened up into
    ('save', i) before the block's body and ('add', i) after it (x + body(x)), and the
    anti-aliasing blurs into their padding and fixed convolution."""
    blocks = [0] if blocks is None else blocks
    ops = []
    for m in layers:
        if isinstance(m, nn.Sequential):
            ops += network_ops(m, blocks)
        elif isinstance(m, (BlurDownsample, BlurUpsample)):
            ops += m.as_layers()
        elif isinstance(m, (ResidualBlock, OfficialResnetBlock)):
            i = blocks[0] = blocks[0] + 1
            body = m.block if isinstance(m, ResidualBlock) else m.conv_block
            ops += [("save", i)] + network_ops(body, blocks) + [("add", i)]
        else:
            ops.append(m)
    return ops


def is_norm(op):
    """An InstanceNorm that normalises with the statistics of the map itself."""
    return isinstance(op, nn.InstanceNorm2d) and not (op.track_running_stats and not op.training)


def row_geometry(m, axis):
    """How layer m maps positions along axis 0 (rows) or 1 (columns):
    ('pad', before, after), ('conv', extent, stride, padding), ('convT', extent,
    stride, padding, output_padding), ('up', factor), or ('point',) for layers that
    work position by position."""
    if isinstance(m, (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ConstantPad2d)):
        left, right, top, bottom = m.padding
        return ("pad", top, bottom) if axis == 0 else ("pad", left, right)
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ValueError(f"{m}: only zero padding given as numbers is supported in strips")
        extent = m.dilation[axis] * (m.kernel_size[axis] - 1) + 1
        if isinstance(m, nn.Conv2d):
            return ("conv", extent, m.stride[axis], m.padding[axis])
        return ("convT", extent, m.stride[axis], m.padding[axis], m.output_padding[axis])
    if isinstance(m, nn.Upsample):
        f = m.scale_factor if isinstance(m.scale_factor, (int, float)) else (m.scale_factor or [0, 0])[axis]
        if m.mode != "nearest" or m.size is not None or f != int(f):
            raise ValueError(f"{m}: only nearest upsampling by an integer factor is supported in strips")
        return ("up", int(f))
    if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout, nn.InstanceNorm2d)) \
            or isinstance(m, tuple):
        return ("point",)
    raise ValueError(f"{type(m).__name__} is not a layer the strip translator knows")


def out_length(g, n):
    if g[0] == "pad":
        return n + g[1] + g[2]
    if g[0] == "conv":
        return (n + 2 * g[3] - g[1]) // g[2] + 1
    if g[0] == "convT":
        return (n - 1) * g[2] - 2 * g[3] + g[1] + g[4]
    if g[0] == "up":
        return n * g[1]
    return n


def pad_index(j, n, m):
    """The input row that row j (-inf..inf) of padding layer m's input takes; -1 for the constant."""
    if 0 <= j < n:
        return j
    if isinstance(m, nn.ReflectionPad2d):
        return -j if j < 0 else 2 * (n - 1) - j
    if isinstance(m, nn.ReplicationPad2d):
        return min(max(j, 0), n - 1)
    return -1


def input_rows(m, g, o0, o1, n_in):
    """The rows [i0, i1) of layer m's input (n_in rows) that its output rows [o0, o1) need."""
    if g[0] == "pad":
        idx = [pad_index(o - g[1], n_in, m) for o in range(o0, o1)]
        idx = [i for i in idx if i >= 0] or [0]
        return min(idx), max(idx) + 1
    if g[0] == "conv":
        _, extent, s, p = g
        lo, hi = o0 * s - p, (o1 - 1) * s - p + extent
    elif g[0] == "convT":  # output row o gets input rows i with o = i * s - p + (0..extent-1)
        _, extent, s, p, _ = g
        lo, hi = -((extent - 1 - o0 - p) // s), (o1 - 1 + p) // s + 1
    elif g[0] == "up":
        lo, hi = o0 // g[1], (o1 - 1) // g[1] + 1
    else:
        lo, hi = o0, o1
    return max(lo, 0), min(hi, n_in)


def layer_rows(m, g, x, i0, n_in, o0, o1):
    """Rows [o0, o1) of layer m's output, from x = rows [i0, i0 + x.shape[2]) of its input
    (n_in rows). Columns are whole, so the layer's own column padding applies; rows come
    from the strip, and the layer's row padding only where the strip meets the border."""
    if g[0] == "pad":
        idx = [pad_index(o - g[1], n_in, m) - i0 for o in range(o0, o1)]
        const = isinstance(m, nn.ConstantPad2d)
        if idx == list(range(idx[0], idx[0] + len(idx))) and idx[0] >= 0:  # inside the image: no row padding
            y = x[:, :, idx[0]:idx[0] + len(idx)]
        else:
            if const:  # row 0 becomes the constant row, index -1 -> 0
                x = F.pad(x, (0, 0, 1, 0), value=m.value)
            # gather rows in channels-last layout, which every later layer keeps (see read_rows)
            y = x.permute(0, 2, 3, 1).index_select(1, torch.tensor(idx, device=x.device) + const).permute(0, 3, 1, 2)
        left, right = m.padding[:2]
        mode = "constant" if const else "reflect" if isinstance(m, nn.ReflectionPad2d) else "replicate"
        return F.pad(y, (left, right, 0, 0), mode=mode, **({"value": m.value} if const else {})) if left or right else y
    if g[0] == "conv":
        _, extent, s, p = g
        lo, hi = o0 * s - p, (o1 - 1) * s - p + extent
        if i0 - lo or hi - i0 - x.shape[2]:  # zero rows only beyond the border
            x = F.pad(x, (0, 0, i0 - lo, hi - i0 - x.shape[2]))
        return F.conv2d(x, m.weight, m.bias, (s, m.stride[1]), (0, m.padding[1]), m.dilation, m.groups)
    if g[0] == "convT":
        _, extent, s, p, _ = g
        y = F.conv_transpose2d(x, m.weight, m.bias, m.stride, (0, m.padding[1]), m.output_padding, m.groups, m.dilation)
        first = i0 * s - p  # the global row of y's first row
        assert o1 - first <= y.shape[2], "transposed convolution strip too short"
        return y[:, :, o0 - first:o1 - first]
    if g[0] == "up":
        y = m(x)
        return y[:, :, o0 - i0 * g[1]:o1 - i0 * g[1]]
    return m(x)


def plan_stages(G, pads, shape):
    """The generator (with `pads`, the padding layers before it, in front) as stages cut at
    each InstanceNorm: [{'ops': [(op, rows, in_shape, out_shape), ...], 'out': shape}].
    Each stage after the first starts with the norm that ends the previous one."""
    stages = [{"ops": []}]
    for op in pads + network_ops(G.children()):
        if is_norm(op):
            stages[-1]["out"] = shape
            stages.append({"ops": []})
        c, h, w = shape
        if isinstance(op, tuple):  # a residual block's save / add
            g = ("point",)
        else:
            g = row_geometry(op, 0)
            c = getattr(op, "out_channels", c)
            h, w = out_length(g, h), out_length(row_geometry(op, 1), w)
        stages[-1]["ops"].append((op, g, shape, (c, h, w)))
        shape = (c, h, w)
    stages[-1]["out"] = shape
    return stages


def new_map(shape):
    """A (C, H, W) map in an anonymous temporary file, stored row by row with the
    channels last, so a strip of rows is one contiguous piece of the file. The file
    has no name, so it disappears when closed, also if the process is killed."""
    return {"file": tempfile.TemporaryFile(prefix="cyclegan-strips-"), "shape": shape, "dtype": None, "written": 0}


def write_rows(m, r0, y):
    """Write y (1, C, n, W), rows r0.. of map m."""
    data = y[0].permute(1, 2, 0).contiguous().cpu()
    m["dtype"] = data.dtype
    m["file"].seek(r0 * data[0].numel() * data.element_size())
    m["file"].write(data.view(torch.uint8).numpy())
    m["written"] = max(m["written"], r0 + y.shape[2])


def read_rows(m, r0, r1, device, dtype):
    """Rows [r0, r1) of map m (a temporary-file map, or the input image: a tensor in
    [-1, 1], or of 8-bit levels, converted as to_tensor does) as (1, C, n, W)."""
    if isinstance(m, torch.Tensor):
        x = m[:, :, r0:r1].to(device)
        return (x.float() / 127.5 - 1.0).to(dtype) if x.dtype == torch.uint8 else x
    c, h, w = m["shape"]
    assert r1 <= m["written"], f"rows up to {r1} read, only {m['written']} written"
    data = torch.empty((r1 - r0, w, c), dtype=m["dtype"])
    f = m["file"]
    f.seek(r0 * w * c * data.element_size())
    if f.readinto(data.view(torch.uint8).numpy()) != data.numel() * data.element_size():
        raise OSError(f"temporary file shorter than expected (rows {r0}..{r1})")
    # Kept channels-last: convolutions take it without reordering a copy of the strip first
    # (oneDNN on CPU), about a third less memory at the peak.
    return data.unsqueeze(0).permute(0, 3, 1, 2).to(device)


def add_stats(stats, y):
    """Fold rows y (1, C, n, W) into running per-channel (count, mean, M2) in float64,
    combining each strip's own mean and variance (Chan et al.), which keeps the
    variance accurate where the mean is large."""
    var, mean = torch.var_mean(y.to(torch.promote_types(y.dtype, torch.float32)), dim=(0, 2, 3), correction=0)
    n, mean, m2 = y.shape[2] * y.shape[3], mean.cpu().double(), var.cpu().double() * (y.shape[2] * y.shape[3])
    if stats is None:
        return n, mean, m2
    N, M, M2 = stats
    delta = mean - M
    return N + n, M + delta * n / (N + n), M2 + m2 + delta**2 * N * n / (N + n)


def normalize(x, stats, norm):
    """InstanceNorm with the whole map's statistics (biased variance, the layer's eps)."""
    N, M, M2 = stats
    dtype, shape = torch.promote_types(x.dtype, torch.float32), (1, -1, 1, 1)  # 16-bit maps: normalise in fp32
    mean = M.to(x.device, dtype).view(shape)
    rstd = (1.0 / torch.sqrt(M2 / N + norm.eps)).to(x.device, dtype).view(shape)
    y = (x.to(dtype) - mean).mul_(rstd)  # in place: one strip-sized temporary, not three
    if norm.affine:
        y.mul_(norm.weight.to(dtype).view(shape)).add_(norm.bias.to(dtype).view(shape))
    return y.to(x.dtype)


def strip_ranges(stage, o0, o1):
    """The rows of each layer's input, and then of the stage's output, that rows [o0, o1) of
    the stage's output need, found back to front."""
    ranges = [(o0, o1)]
    for op, g, in_shape, _ in reversed(stage["ops"]):
        ranges.append(input_rows(op, g, *ranges[-1], in_shape[1]))
    return ranges[::-1]


def stage_rows(stage, src, stats, skips, o0, o1, device, dtype):
    """Rows [o0, o1) of a stage's (pre-norm) output: find the rows each layer needs,
    read them from the stage's input, and run the layers front to back."""
    ops = stage["ops"]
    ranges = strip_ranges(stage, o0, o1)
    x = read_rows(src, *ranges[0], device, dtype)
    for (op, g, in_shape, _), (a0, a1), (b0, b1) in zip(ops, ranges, ranges[1:]):
        if is_norm(op):
            x = normalize(x, stats, op)
        elif isinstance(op, tuple) and op[0] == "save":  # each row once: strips' halos overlap
            m = skips[op[1]]
            if a0 > m["written"]:
                raise ValueError("residual block input strips leave a gap")
            if a1 > m["written"]:
                write_rows(m, m["written"], x[:, :, m["written"] - a0:])
        elif isinstance(op, tuple):  # add: x + body(x)
            x = x + read_rows(skips[op[1]], a0, a1, x.device, x.dtype)
        else:
            x = layer_rows(op, g, x, a0, in_shape[1], b0, b1)
    return x


def strip_step(strip_rows, rows, H):
    """Output rows per strip of a stage with `rows` output rows, for strips of `strip_rows`
    rows of the (padded) image of height H: every stage has about the same number of strips."""
    return max(1, strip_rows * rows // H)


def peak_bytes(G, shape, strip_rows=None):
    """An upper bound of the bytes that the tensors of translating one image of `shape`
    (C, H, W) hold at once, beyond the weights: in one piece (translate) or in strips of
    `strip_rows` rows (translate_tiled). It is twice the largest input plus output of any
    layer, which covers the copies beside them (a convolution's padded or reordered input,
    InstanceNorm's float32 temporary, the strip written to disk), each strip with its halo
    rows; in strips the 8-bit image and its translation are held whole besides. Checked
    against the tensors alive at once in tests/test_tiling.py."""
    c, h, w = shape
    stages = plan_stages(G, input_pads(G, padding_to_multiple_of_4(h, w)), shape)
    H = stages[0]["ops"][0][3][1]
    itemsize = next(G.parameters()).dtype.itemsize
    largest = 0
    for k, stage in enumerate(stages):
        rows = stage["out"][1]
        n = h if strip_rows is not None and k == len(stages) - 1 else rows  # strips stop at the crop
        step = n if strip_rows is None else min(n, strip_step(strip_rows, rows, H))
        o0 = (n - step) // 2  # a strip in the middle has halo rows on both sides
        ranges = strip_ranges(stage, o0, o0 + step)
        for (op, _, (ci, _, wi), (co, _, wo)), (a0, a1), (b0, b1) in zip(stage["ops"], ranges, ranges[1:]):
            size = max(itemsize, 4) if is_norm(op) else itemsize  # 16-bit maps normalise in float32
            largest = max(largest, (ci * (a1 - a0) * wi + co * (b1 - b0) * wo) * size)
    whole = 0 if strip_rows is None else (c + stages[-1]["out"][0]) * h * w
    return 2 * largest + whole


class NotEnoughTempSpace(OSError):
    pass


def temp_bytes_needed(stages, itemsize):
    """Peak bytes of temporary files: a stage's input and output maps, and the inputs of
    residual blocks still open."""
    size = lambda shape: shape[0] * shape[1] * shape[2] * itemsize  # noqa: E731
    saved, peak = {}, 0
    for k, stage in enumerate(stages):
        for op, _, in_shape, _ in stage["ops"]:
            if isinstance(op, tuple) and op[0] == "save":
                saved[op[1]] = size(in_shape)
        maps = (size(stages[k - 1]["out"]) if k > 0 else 0) + (size(stage["out"]) if k < len(stages) - 1 else 0)
        peak = max(peak, maps + sum(saved.values()))
        for op, *_ in stage["ops"]:
            if isinstance(op, tuple) and op[0] == "add":
                saved.pop(op[1], None)
    return peak


def input_pads(G, pad, shift=(0, 0)):
    """The padding layers before G's own: `pad` to a multiple of 4, and for a --canonical_shift
    G the frame that places the image at `shift` (shifts.place_in_frame, as a layer)."""
    if not getattr(G, "canonical_shift", False):
        return [pad]
    dy, dx = shift
    return [pad, nn.ReflectionPad2d((dx, SHIFT_FRAME - dx, dy, SHIFT_FRAME - dy))]


def canonical_shift_in_strips(x, pad, strip_rows):
    """models.canonical_shift of pad(x) (x: 1 x C x h x w), its fine detail summed strip by
    strip, each strip read with the row above and below it that the 3x3 mean needs."""
    g = row_geometry(pad, 0)
    h, H = x.shape[2], out_length(g, x.shape[2])
    step, sums = max(4, strip_rows // 4 * 4), 0
    for a in range(0, H, step):
        b = min(a + step, H)
        lo, hi = max(a - 1, 0), min(b + 1, H)
        i0, i1 = input_rows(pad, g, lo, hi, h)
        rows = layer_rows(pad, g, read_rows(x, i0, i1, x.device, torch.float32), i0, h, lo, hi)
        sums = sums + grid_phase_sums(fine_detail(rows)[:, a - lo:b - lo])
    return tuple(canonical_shift(x, sums)[0].tolist())


@torch.no_grad()
def translate_tiled(G, x, strip_rows, autocast=nullcontext()):
    """translate(G, x) computed in strips of about `strip_rows` image rows: the same
    output up to float rounding, with memory set by strip_rows x width, not the image.
    Maps between stages live in temporary files (TMPDIR). The output is on the CPU, in
    float32 (float64 for a float64 x), or for a uint8 x (8-bit levels, as the image
    file holds them) in 8-bit levels as to_image rounds them: 1 byte a value in and out."""
    if x.shape[0] > 1:  # InstanceNorm works per image anyway
        return torch.cat([translate_tiled(G, x[i:i + 1], strip_rows, autocast) for i in range(x.shape[0])])
    h, w = x.shape[-2:]
    pad = padding_to_multiple_of_4(h, w)
    shift = canonical_shift_in_strips(x, pad, strip_rows) if getattr(G, "canonical_shift", False) else (0, 0)
    stages = plan_stages(G, input_pads(G, pad, shift), tuple(x.shape[1:]))
    H = stages[0]["ops"][0][3][1]  # padded height: strips scale with each stage's height
    dtype = next(G.parameters()).dtype  # of the maps between stages
    need, free = temp_bytes_needed(stages, dtype.itemsize), shutil.disk_usage(tempfile.gettempdir()).free
    if need > free:
        raise NotEnoughTempSpace(f"translating a {w}x{h} image in strips needs {need / 2**30:.1f} GiB of temporary "
                                 f"files and {tempfile.gettempdir()} has {free / 2**30:.1f} GiB free; "
                                 f"set TMPDIR to a folder on a larger disk")
    src, stats, skips, files = x, None, {}, []
    out = torch.empty((1, stages[-1]["out"][0], h, w),
                      dtype=torch.uint8 if x.dtype == torch.uint8 else torch.promote_types(x.dtype, torch.float32))
    try:
        for k, stage in enumerate(stages):
            last = k == len(stages) - 1
            c, rows, _ = stage["out"]
            for op, _, in_shape, _ in stage["ops"]:  # inputs of residual blocks, kept for x + body(x)
                if isinstance(op, tuple) and op[0] == "save":
                    skips[op[1]] = new_map(in_shape)
                    files.append(skips[op[1]])
            if not last:
                dst, new_stats = new_map(stage["out"]), None
                files.append(dst)
            step = strip_step(strip_rows, rows, H)
            top, left = shift  # where the image sits in the last stage's output
            for o0 in range(top, top + h, step) if last else range(0, rows, step):
                o1 = min(o0 + step, top + h if last else rows)
                with autocast:
                    y = stage_rows(stage, src, stats, skips, o0, o1, x.device, dtype)
                assert y.shape[1:] == (c, o1 - o0, stage["out"][2]), (y.shape, stage["out"])
                if last:
                    y = y[..., left:left + w]
                    out[:, :, o0 - top:o1 - top] = (to_levels(y) if out.dtype == torch.uint8
                                                    else y.to(out.dtype)).cpu()
                else:
                    new_stats = add_stats(new_stats, y)
                    write_rows(dst, o0, y)
                del y  # freed before the next strip is computed, not when it replaces it
            for op, _, in_shape, _ in stage["ops"]:  # close what this stage used up: frees the disk space
                if isinstance(op, tuple) and op[0] == "add":
                    skips.pop(op[1])["file"].close()
                elif isinstance(op, tuple):
                    assert skips[op[1]]["written"] == in_shape[1], "a residual block's input was not saved whole"
            if not isinstance(src, torch.Tensor):
                src["file"].close()
            if not last:
                src, stats = dst, new_stats
    finally:
        for m in files:
            m["file"].close()
    return out


