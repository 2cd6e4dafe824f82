"""
What a run shows of itself: the training log (log.csv and the progress line, which also
stops a run whose losses stop being finite), the FID/KID log of the evaluations during
training (eval.csv, best_G_*.pth), the sample grids, the loss and FID curves, TensorBoard,
and the results pages, of a training run (images/<dataset>/index.html) and of test.py's
translations (<output_dir>/index.html). Nothing here changes what is trained.
"""
import csv
import html
import io
import os
import urllib.parse
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from datasets import split_dirs
from utils import die, save_atomic, write_atomic, write_failed, write_text_atomic

EVAL_COLUMNS = ["fid", "kid_mean", "kid_std", "fid_identity", "kid_identity_mean", "mae", "psnr"]
PAGE_STYLE = ("body{font-family:sans-serif;margin:2em}img,video{max-width:100%;image-rendering:pixelated}"
              "figure{display:inline-block;margin:0 1em 1em 0}"
              "td,th{padding:4px 1em 4px 0;vertical-align:top;text-align:left}"
              "td.name{padding-top:1em;font-size:90%;color:#444}table img,table video{max-width:400px;max-height:400px;"
              "min-width:96px;border:1px solid #ccc}")


def write_page(path, title, body):
    """A self-contained HTML page (relative links only, so it opens from the disk), written
    atomically so that a reader never sees half of it."""
    write_text_atomic(path, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                            f"<style>{PAGE_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
                            f"<p>updated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>\n{body}\n</body></html>\n")


# -----------------------------------------------------------------------------
# The training log

class TrainingLog:
    """Every batch's losses appended to log.csv, and the progress: a tqdm bar on a terminal,
    a plain line every `log_interval` batches otherwise. Losses stay on the device until a
    flush (every `log_interval` batches, and before every save), so logging costs no
    per-batch sync; a flush that meets a non-finite loss stops training there.
    A run that starts at iteration k first drops the rows of iterations >= k (written after
    the last.pt it resumes from, or by an older run), so the log holds every iteration
    once, in order. The replan column: the iterations a --budget was planned again to after
    that iteration (empty where it was not)."""

    def __init__(self, path, loss_names, total, done, log_interval, model_dir, writer=None):
        """`loss_names`: what the training step returns, in the order of log.csv's columns."""
        self.path, self.total, self.log_interval = path, total, log_interval
        self.model_dir, self.writer = model_dir, writer
        self.loss_names = loss_names
        self.header = ["epoch", "batch", "iteration", *loss_names, "lr", "time", "replan"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        keep_rows_before(path, done, self.header)
        self.file = open(path, "a", newline="")
        self.csv = csv.writer(self.file)
        self.pending, self.replan = [], ""
        self.t0 = self.t0_done = None  # rates from the end of the first batch: compile and warm-up excluded
        self.bar = tqdm(total=total, initial=done, unit="it", dynamic_ncols=True) if sys.stdout.isatty() else None

    def set_total(self, total):
        """A replan after the iteration in hand (its row is added next)."""
        self.total, self.replan = total, total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def add(self, epoch, batch, iteration, losses, lr):
        if self.t0 is None:
            self.t0, self.t0_done = time.time(), iteration + 1
        self.pending.append((epoch, batch, iteration, lr, self.replan, torch.stack(list(losses.values()))))
        self.replan = ""
        if len(self.pending) >= self.log_interval:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        first = self.pending[0][2]
        epoch, batch, iteration = self.pending[-1][:3]
        values = self.write_pending()
        self.show_progress(epoch, batch, iteration + 1, values[-1])
        bad = next(((first + k, name) for k, v in enumerate(values) for name, x in zip(self.loss_names, v)
                    if not np.isfinite(x)), None)
        if bad is not None:
            self.close()
            die(f"{bad[1]} is not finite at iteration {bad[0]}; stopping without saving these weights "
                f"(the last good state is {self.model_dir}/last.pt). Try a lower --lr or --amp none")

    def write_pending(self):
        values = torch.stack([p[-1] for p in self.pending]).float().cpu().tolist()  # the one device sync
        now = time.time()
        try:
            for (epoch, batch, iteration, lr, replan, _), v in zip(self.pending, values):
                self.csv.writerow([epoch, batch, iteration, *[f"{x:.6g}" for x in v], f"{lr:.6g}", f"{now:.3f}",
                                   replan])
                if self.writer is not None:  # the values are on the host already: no extra sync
                    for name, x in zip(self.loss_names, v):
                        self.writer.add_scalar(f"loss/{name.removeprefix('loss_')}", x, iteration)
                    self.writer.add_scalar("lr", lr, iteration)
            self.file.flush()
        except OSError as e:
            die(write_failed(self.path, e, 1024,
                             f"{self.model_dir}/last.pt is intact: free some space, then continue with --resume"))
        self.pending = []
        return values

    def show_progress(self, epoch, batch, done, losses):
        postfix = f"epoch {epoch} batch {batch} | " + " ".join(
            f"{name.removeprefix('loss_').replace('identity', 'id')} {x:.4f}"
            for name, x in zip(self.loss_names[:5], losses))
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(postfix)
            if self.writer is not None and self.bar.format_dict["rate"]:
                self.writer.add_scalar("iterations_per_s", self.bar.format_dict["rate"], done - 1)
            return
        elapsed = time.time() - self.t0
        rate = (done - self.t0_done) / elapsed if done > self.t0_done and elapsed > 0 else None
        if self.writer is not None and rate:
            self.writer.add_scalar("iterations_per_s", rate, done - 1)
        print(tqdm.format_meter(done, self.total, elapsed, rate=rate, unit="it", postfix=postfix, ascii=True),
              flush=True)

    def remove_if_empty(self):
        self.close()
        with open(self.path, newline="") as f:
            empty = sum(1 for _ in zip(range(2), f)) < 2
        if empty:
            os.remove(self.path)

    def close(self):
        if self.pending:
            self.write_pending()
        if self.bar is not None:
            self.bar.close()
        self.file.close()


def keep_rows_before(path, iteration, header):
    """Rewrite log.csv with only the rows of iterations < `iteration` (and a fresh header if
    it has none or another one; that of an older version, whose columns are all in `header`,
    keeps its rows, moved to their columns' new places and empty in the new columns). A partly
    written last row is dropped too."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        old = rows[0] if rows and "time" in rows[0] and set(rows[0]) <= set(header) else []
        rows = [[dict(zip(old, r)).get(name, "") for name in header] for r in rows[1:]
                if old and len(r) == len(old) and r[2].isdigit() and int(r[2]) < iteration]
    write_text_atomic(path, csv_text([header, *rows]))


def csv_text(rows):
    out = io.StringIO(newline="")
    csv.writer(out).writerows(rows)
    return out.getvalue()


# -----------------------------------------------------------------------------
# Evaluations during training

def build_evaluator(opt, data_root, device):
    """The FID Inception network and the test folders, or None without --eval_interval.
    Loaded before training starts, so missing weights are reported at once."""
    if opt.eval_interval <= 0:
        return None
    import evaluate  # (its dependencies are optional, needed only here)
    try:
        dir_A, dir_B = split_dirs(data_root, "test")
    except FileNotFoundError as e:
        die(f"--eval_interval needs a test split: {e}")
    return SimpleNamespace(module=evaluate, net=evaluate.load_inception(opt.inception, device),
                           dir_A=dir_A, dir_B=dir_B, n=opt.eval_n if opt.eval_n > 0 else None,
                           cache_dir=evaluate.default_cache_dir())


def evaluate_generators(evaluator, nets, device):
    """FID/KID (and MAE/PSNR on a paired test split) of G_AB on testA -> testB and of G_BA
    on testB -> testA (of those the run has), under no_grad, in eval mode, in fp32 whatever
    the training precision (so that FIDs compare across runs); nothing else changes."""
    ev = evaluator.module
    directions = {"G_AB": (evaluator.dir_A, evaluator.dir_B), "G_BA": (evaluator.dir_B, evaluator.dir_A)}
    # (the real test images' features are cached once, the translations' computed every time)
    return {g: ev.evaluate_generator(nets[g], source, target, evaluator.net, device, evaluator.n,
                                     cache_dir=evaluator.cache_dir)
            for g, (source, target) in directions.items() if g in nets}


def record_evaluation(results, epoch, iteration, nets, model_dir, best_fid, writer=None):
    """Print, append to eval.csv, keep best_<G>.pth of the lowest FID so far (best_fid is
    carried in last.pt, so a resumed run does not replace a better one)."""
    path = os.path.join(model_dir, "eval.csv")
    header = ["epoch", "iteration"] + [f"{g}_{c}" for g in results for c in EVAL_COLUMNS] + ["n", "seconds"]
    new = not os.path.exists(path)
    try:
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(header)
            w.writerow([epoch, iteration] + [f"{results[g][c]:.6g}" if c in results[g] else ""
                                             for g in results for c in EVAL_COLUMNS]
                       + [results["G_AB"]["n_fake"], f"{sum(r['seconds'] for r in results.values()):.1f}"])
    except OSError as e:
        die(write_failed(path, e, 1024, f"{model_dir}/last.pt is intact: free some space, then continue with --resume"))
    line = []
    for g, r in results.items():
        line.append(f"{g} FID {r['fid']:.2f} (identity {r['fid_identity']:.2f}) "
                    f"KID {r['kid_mean']:.4f} +- {r['kid_std']:.4f}"
                    + (f" MAE {r['mae']:.4f}" if "mae" in r else ""))
        if r["fid"] < best_fid.get(g, float("inf")):
            best_fid[g] = r["fid"]
            save_atomic(nets[g].state_dict(), os.path.join(model_dir, f"best_{g}.pth"))
            line[-1] += " (best so far: best_" + g + ".pth)"
        if writer is not None:
            for c in ("fid", "kid_mean", "fid_identity", "mae"):
                if c in r:
                    writer.add_scalar(f"eval/{g}_{c}", r[c], iteration)
    print(f"eval after epoch {epoch} ({results['G_AB']['n_fake']} test images per domain): " + " | ".join(line),
          flush=True)


def keep_eval_rows_until(model_dir, epoch):
    """A resumed run drops the evaluations of epochs after the one it continues from."""
    path = os.path.join(model_dir, "eval.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= epoch]
        write_text_atomic(path, csv_text(kept))


# -----------------------------------------------------------------------------
# Samples, curves, pages, TensorBoard

@torch.no_grad()
def sample_images(path, real_A, real_B, G_AB, G_BA=None, autocast=nullcontext()):
    """Rows: real_A, fake_B, real_B, fake_A (without G_BA, a one-sided run: real_A, fake_B,
    real_B), from fixed test images, mapped from [-1, 1] back to [0, 1] (no per-row stretch,
    so colours are the model's own)."""
    generators = [G for G in (G_AB, G_BA) if G is not None]
    for G in generators:
        G.eval()
    with autocast:
        rows = [real_A, G_AB(real_A).float(), real_B] + ([G_BA(real_B).float()] if G_BA is not None else [])
    for G in generators:
        G.train()
    rows = torch.cat(rows)
    grid = make_grid((rows + 1) / 2, nrow=real_A.size(0), padding=2, pad_value=1.0).clamp(0, 1)
    write_atomic(path, lambda f: save_image(grid, f, format="png"))
    return grid


class ResultsPage:
    """images/<dataset>/index.html, rewritten after every sample grid: the newest grids
    first, the loss and FID curves as pictures (matplotlib, if installed; redrawn at most
    once a minute and after every epoch, since reading log.csv grows with the run), and
    the run's arguments."""

    def __init__(self, folder, opt, n_batches, model_dir, algorithm="CycleGAN"):
        self.folder, self.opt, self.n_batches = folder, opt, n_batches
        self.model_dir, self.algorithm = model_dir, algorithm
        self.plotted = 0.0

    def update(self, replot=False):
        os.makedirs(self.folder, exist_ok=True)
        if replot or time.time() - self.plotted > 60:
            self.plotted = time.time()
            self.plots = plot_curves(self.folder, os.path.join(self.model_dir, "log.csv"),
                                     os.path.join(self.model_dir, "eval.csv"))
        grids = sorted((int(f[:-4]) for f in os.listdir(self.folder) if f.endswith(".png") and f[:-4].isdigit()),
                       reverse=True)
        e = html.escape
        parts = []
        if self.plots:
            parts.append("<h2>Curves</h2>" + "".join(f"<img src='{e(p)}' alt='{e(p)}'> " for p in self.plots))
        elif self.plots is None:
            parts.append("<p>(pip install matplotlib for the loss and FID curves)</p>")
        parts.append("<h2>Samples</h2><p>rows: real A, fake B = G_AB(real A), real B"
                     + (", fake A = G_BA(real B)" if self.algorithm == "CycleGAN" else "") + "</p>")
        parts += [f"<figure><img src='{it}.png' loading='lazy' alt='iteration {it}'><figcaption>iteration {it}, "
                  f"epoch {it // self.n_batches}</figcaption></figure>" for it in grids]
        plans = getattr(self.opt, "budget_plans", None)
        if plans:
            parts.append(budget_plans_table(self.opt.budget, plans))
        parts.append("<h2>Arguments</h2><table>" + "".join(f"<tr><td>--{e(k)}</td><td>{e(str(v))}</td></tr>"
                                                           for k, v in sorted(vars(self.opt).items())
                                                           if k != "budget_plans") + "</table>")
        write_page(os.path.join(self.folder, "index.html"), f"{self.algorithm}: {self.opt.dataset_name}",
                   "\n".join(parts))


def budget_plans_table(budget, plans):
    """The plans of a time --budget (budget.Planner), one row each: after which iteration, the
    iterations planned, the speed it was planned with and the time then left."""
    rows = "".join(f"<tr><td>{r}</td><td>{total}</td><td>{step_s:.4f}</td><td>{left / 60:.2f}</td></tr>"
                   for r, total, step_s, left in plans)
    return (f"<h2>Budget</h2><details><summary>--budget {html.escape(budget)}: planned {len(plans)} times, to "
            f"{plans[-1][1]} iterations (the replans are the dots of losses.png's last panel, and log.csv's replan "
            f"column)</summary><table><tr><th>after iteration</th><th>iterations planned</th><th>s per iteration"
            f"</th><th>minutes left</th></tr>{rows}</table></details>")


def plot_curves(folder, log_csv, eval_csv):
    """losses.png (and fid.png once there is an eval.csv) in `folder`; their names, or None
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # (file, x column, panels of (column, label, colour, line style)): the losses in log.csv's
    # columns, the generators' beside the discriminators' (loss_D_*, or loss_D alone), and where a
    # --budget was planned again (a dot at every replan: the iterations it planned; "steps": no average)
    figures = [(log_csv, "losses.png", "iteration", lambda names: [
                   [(n, n, f"C{k}", "-")
                    for k, n in enumerate(n for n in names if n.startswith("loss_") and not n.startswith("loss_D"))],
                   [(n, n, f"C{k + 4}", "-")
                    for k, n in enumerate([n for n in names if n.startswith("loss_D_")] or ["loss_D"])],
                   [("replan", "iterations planned at each replan (--budget)", "C7", "steps")]]),
               (eval_csv, "fid.png", "epoch", lambda names: [
                   [(f"{g}_fid", f"{g} FID", c, "-") for g, c in (("G_AB", "C0"), ("G_BA", "C1"))
                    if f"{g}_fid" in names]
                   + [(f"{g}_fid_identity", f"{g} identity baseline", c, "--")
                      for g, c in (("G_AB", "C0"), ("G_BA", "C1")) if f"{g}_fid" in names]])]
    written = []
    for csv_path, png, x_name, panels_of in figures:
        if not os.path.exists(csv_path):
            continue
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        if not rows:
            continue
        panels = [p for p in panels_of(reader.fieldnames) if any(r.get(line[0]) for line in p for r in rows)]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
        x = np.array([float(r[x_name]) for r in rows])
        for ax, lines in zip(axes[0], panels):
            for name, label, colour, style in lines:
                y = np.array([float(r[name]) if r.get(name) else np.nan for r in rows])
                if style == "steps":
                    ax.plot(x[~np.isnan(y)], y[~np.isnan(y)], drawstyle="steps-post", marker="o", markersize=3,
                            color=colour, label=label)
                    continue
                k = max(1, len(y) // 200)  # a moving average, so thousands of noisy GAN losses read as a curve
                if k > 1:
                    y = np.convolve(y, np.ones(k) / k, mode="valid")
                ax.plot(x[len(x) - len(y):], y, style, color=colour, label=label,
                        marker="o" if png == "fid.png" else None)
            ax.set_xlabel(x_name)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        write_atomic(os.path.join(folder, png), lambda f: fig.savefig(f, dpi=80, format="png"))
        plt.close(fig)
        written.append(png)
    return written


def tensorboard_writer(opt):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        die("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(log_dir=opt.log_dir or os.path.join("runs", opt.dataset_name))


def write_translations_page(output_dir, rows, failed, reference_dir):
    """test.py's page: input | translation (| reference, MAE, PSNR) for every translated input."""
    from evaluate import psnr

    def media(rel, kind):
        src = urllib.parse.quote(rel.replace(os.sep, "/"))
        if kind == "video" and not rel.lower().endswith((".gif", ".webp", ".png")):
            return f'<video src="{src}" controls muted loop></video>'
        return f'<a href="{src}"><img src="{src}" alt="{html.escape(os.path.basename(rel))}"></a>'

    scored = reference_dir is not None
    head = "<th>input</th><th>translation</th>" + ("<th>reference</th><th>MAE</th><th>PSNR</th>" if scored else "")
    lines = []
    for r in rows:
        cells = [media(r["input"], r["kind"]), media(r["output"], r["kind"])]
        if scored:
            s = r.get("score")
            cells += [media(r["reference"], "image") if r.get("reference") else "",
                      f"{s[0]:.4f}" if s else "", f"{psnr(s[1]):.2f} dB" if s else ""]
        caption = html.escape(r["output"]) + (f" ({r['frames']} frames)" if "frames" in r else "")
        lines.append(f"<tr><td class=name colspan={len(cells)}>{caption}</td></tr>")
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    note = f"<p>Not translated (unreadable): {html.escape(', '.join(failed))}</p>" if failed else ""
    body = (f"<p>{len(rows)} input{'s' if len(rows) != 1 else ''}. Click an image for full size.</p>\n"
            f"<table><tr>{head}</tr>\n" + "\n".join(lines) + f"\n</table>\n{note}")
    write_page(os.path.join(output_dir, "index.html"), "CycleGAN translations", body)
