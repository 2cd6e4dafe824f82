"""
What the discriminators' inputs go through before they are judged: DiffAugment (Zhao et al.
2020), random differentiable changes of real and fake images alike, so that a discriminator
trained on a few hundred images cannot memorise them, while its gradients still reach the
generators.
"""
import torch

DIFFAUG_POLICIES = ("color", "translation", "cutout")


def diff_augment(x, policy, pairs=1):
    """DiffAugment of D's input x. `policy`: comma-separated DIFFAUG_POLICIES. x holds `pairs`
    equal-sized groups (real images, then fakes): image k of every group gets the same draw, so
    D cannot tell a real image from a fake one by how it was augmented. Draws from torch's global
    RNG (saved in last.pt)."""
    n = x.size(0) // pairs

    def draw(*shape):  # one draw per image of a group, repeated for every group
        return torch.rand(n, *shape, device=x.device, dtype=x.dtype).repeat(pairs, *([1] * len(shape)))

    for p in filter(None, policy.split(",")):
        if p == "color":  # brightness, saturation, contrast, as the paper's code
            x = x + (draw(1, 1, 1) - 0.5)
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (draw(1, 1, 1) * 2) + mean
            mean = x.mean(dim=[1, 2, 3], keepdim=True)
            x = (x - mean) * (draw(1, 1, 1) + 0.5) + mean
        elif p == "translation":  # shift by up to 1/8 of the size, zeros shifted in
            h, w = x.shape[-2:]
            sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
            dy = (draw() * (2 * sh + 1)).long().clamp(max=2 * sh) - sh
            dx = (draw() * (2 * sw + 1)).long().clamp(max=2 * sw) - sw
            rows = torch.arange(h, device=x.device).view(1, h, 1) + dy.view(-1, 1, 1)  # source row of each output row
            cols = torch.arange(w, device=x.device).view(1, 1, w) + dx.view(-1, 1, 1)
            inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
            batch = torch.arange(x.size(0), device=x.device).view(-1, 1, 1)
            x = x.permute(0, 2, 3, 1)[batch, rows.clamp(0, h - 1), cols.clamp(0, w - 1)].permute(0, 3, 1, 2) * inside
        elif p == "cutout":  # zero a square of half the size, anywhere (partly outside)
            h, w = x.shape[-2:]
            ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
            top = (draw() * (h + (1 - ch % 2))).long() - ch // 2
            left = (draw() * (w + (1 - cw % 2))).long() - cw // 2
            rows = torch.arange(h, device=x.device).view(1, h, 1) - top.view(-1, 1, 1)
            cols = torch.arange(w, device=x.device).view(1, 1, w) - left.view(-1, 1, 1)
            keep = ~((rows >= 0) & (rows < ch) & (cols >= 0) & (cols < cw))
            x = x * keep.unsqueeze(1)
        else:
            raise ValueError(f"unknown DiffAugment policy {p!r}")
    return x
