"""eval.py: what a trained FedGAN is worth. Fidelity (LPIPS per class, a domain FID) and utility
(a classifier trained on n real images per class, with and without synthetic ones), for any number
of run folders written by fedgan.py, side by side.

    python eval.py runs/vanilla runs/attack runs/feddetect --out eval_out
    python eval.py runs/* --metrics fid,utility --n-real 10,50,200 --seeds 3 --classifier small
    python eval.py runs/x --weights-dir weights/   # offline: alexnet-owt-7be5be79.pth and alex.pth there

LPIPS (Zhang et al., CVPR 2018) is computed here with torchvision's AlexNet: the five ReLU maps, each
unit-normalised over channels, squared difference weighted by the learned per-channel v0.1 linear
weights, averaged over space, summed over layers. The domain FID is the Frechet distance between real
and synthetic images in the penultimate features of a small classifier trained on the run's real
training data (not Inception FID: numbers are comparable only within one dataset and this script).
The utility study follows section 4.4 of the paper.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fedgan

ALEXNET_FILE, ALEXNET_SHA256_PREFIX = "alexnet-owt-7be5be79.pth", "7be5be79"  # torchvision names files by it
LPIPS_FILE = "alex.pth"
LPIPS_SHA256 = "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE


class EvalError(Exception):
    """Bad input or missing weights: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------
# LPIPS
# ------------------------------------------------------------------------------------------------


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path, want):
    """Raise EvalError unless the file's SHA-256 starts with `want` (a full digest or a published prefix)."""
    got = sha256_file(path)
    if not got.startswith(want):
        raise EvalError(f"{path} has SHA-256 {got[:16]}..., expected {want[:16]}...; the file is corrupt or "
                        f"not the official one: delete it and fetch it again")


def lpips_weights(weights_dir=None):
    """(AlexNet state dict, list of 5 LPIPS linear weight vectors), both hash-checked.

    weights_dir: a folder holding alexnet-owt-7be5be79.pth and alex.pth (offline machines). Otherwise
    AlexNet comes through torchvision's weights API and alex.pth from the LPIPS repository, each
    downloaded once to the torch cache."""
    if weights_dir:
        alex_path, lin_path = Path(weights_dir) / ALEXNET_FILE, Path(weights_dir) / LPIPS_FILE
        for p, url in ((alex_path, ALEXNET_URL), (lin_path, LPIPS_URL)):
            if not p.exists():
                raise EvalError(f"missing {p}: put {p.name} in {weights_dir} (get it from {url}), "
                                f"or leave LPIPS out with --metrics fid,utility")
    else:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        alex_path, lin_path = cache / ALEXNET_FILE, cache / "lpips_v0.1_alex.pth"
        try:
            if not alex_path.exists():
                import torchvision
                torchvision.models.AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
            if not lin_path.exists():
                cache.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(LPIPS_URL, str(lin_path), progress=True)
        except Exception as e:
            missing = ALEXNET_FILE if not alex_path.exists() else LPIPS_FILE
            raise EvalError(f"cannot download {missing} ({type(e).__name__}); on a machine without internet put "
                            f"{ALEXNET_FILE} (from {ALEXNET_URL}) and {LPIPS_FILE} (from {LPIPS_URL}) in a folder "
                            f"and pass --weights-dir, or leave LPIPS out with --metrics fid,utility")
    check_sha256(alex_path, ALEXNET_SHA256_PREFIX)
    check_sha256(lin_path, LPIPS_SHA256)
    alex = torch.load(alex_path, map_location="cpu", weights_only=True)
    lin = torch.load(lin_path, map_location="cpu", weights_only=True)
    return alex, [lin[f"lin{i}.model.1.weight"].flatten() for i in range(5)]


def alexnet_features(alex_state=None):
    """A function x -> the five ReLU feature maps of torchvision's AlexNet (relu1..relu5)."""
    import torchvision
    net = torchvision.models.alexnet(weights=None)
    if alex_state is not None:
        net.load_state_dict(alex_state)
    layers = net.features[:12].eval().requires_grad_(False)
    taps = (1, 4, 7, 9, 11)  # the ReLU after each of the five convolutions

    def features(x):
        out = []
        for i, layer in enumerate(layers):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out
    features.layers = layers
    return features


# The reference implementation's input scaling, for images in [-1, 1].
LPIPS_SHIFT = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
LPIPS_SCALE = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]


def lpips(x0, x1, features, lin_weights):
    """LPIPS distance per pair. x0, x1 (B, C, H, W) in [-1, 1], C in {1, 3}; gray is repeated to RGB.
    features: x -> list of L maps (B, C_l, H_l, W_l); lin_weights: L vectors (C_l,). Returns (B,)."""
    def prep(x):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return (x - LPIPS_SHIFT.to(x)) / LPIPS_SCALE.to(x)

    def unit(f):  # unit length over channels at every position
        return f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)

    total = 0.0
    for f0, f1, w in zip(features(prep(x0)), features(prep(x1)), lin_weights):
        d = (unit(f0) - unit(f1)).square() * w.to(f0)[None, :, None, None]   # (B, C_l, H_l, W_l)
        total = total + d.sum(1).mean((1, 2))                                  # (B,)
    return total


@torch.no_grad()
def lpips_per_class(g, real_x, real_y, n_classes, features, lin_weights, pairs, seed, device, batch=100):
    """For each class: mean and standard error of LPIPS over `pairs` random (synthetic, real held-out)
    pairs of that class; synthetic latents and real picks drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for c in range(n_classes):
        reals = real_x[real_y == c]
        if len(reals) == 0:  # nothing to compare with: say so rather than fail
            out[c] = dict(mean=None, se=None, pairs=0)
            continue
        pick = torch.randint(len(reals), (pairs,), generator=gen)
        fakes = fedgan.generate(g, torch.full((pairs,), c), seed + 7919 * (c + 1))  # its own latents and noise
        d = []
        for s in range(0, pairs, batch):
            fake = fedgan.to_unit(fakes[s:s + batch]).to(device)
            real = fedgan.to_unit(reals[pick[s:s + batch]]).to(device)
            d.append(lpips(fake, real, features, lin_weights).cpu())
        d = torch.cat(d).double()
        out[c] = dict(mean=d.mean().item(), se=(d.std() / math.sqrt(len(d))).item(), pairs=pairs)
    return out


# ------------------------------------------------------------------------------------------------
# Classifiers: the utility study and the domain FID's feature extractor
# ------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """A CPU-sized classifier: four conv blocks (conv, BN, ReLU, 2x2 pool) and a 128-d penultimate layer."""

    def __init__(self, channels, n_classes, width=32):
        super().__init__()
        c, layers = channels, []
        for k in (1, 2, 4, 4):
            layers += [nn.Conv2d(c, width * k, 3, padding=1), nn.BatchNorm2d(width * k), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = width * k
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 128),
                                  nn.ReLU(inplace=True))
        self.head = nn.Linear(128, n_classes)

    def forward(self, x, penultimate=False):
        h = self.body(x)  # (B, 128)
        return h if penultimate else self.head(h)


def build_classifier(kind, channels, n_classes):
    if kind == "small":
        return SmallCNN(channels, n_classes)
    import torchvision
    net = torchvision.models.densenet121(weights=None, num_classes=n_classes)
    if channels == 1:  # gray in, same architecture otherwise
        net.features.conv0 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return net


def recipe(kind, channels):
    """The paper's optimiser per dataset for DenseNet-121 (ChestX: Adam 1e-5; ISIC: SGD 1e-3, wd 1e-4),
    lr x0.9 per epoch, 20 epochs, random flips. The small CNN uses Adam 1e-3 (1e-5 barely moves it)."""
    if kind == "small":
        return dict(opt="adam", lr=1e-3, wd=0.0)
    return dict(opt="adam", lr=1e-5, wd=0.0) if channels == 1 else dict(opt="sgd", lr=1e-3, wd=1e-4)


def train_classifier(x, y, n_classes, kind, epochs, seed, device, batch=32):
    """Train on uint8 images x (n, C, H, W) with labels y; returns the model in eval mode."""
    torch.manual_seed(seed)
    net = build_classifier(kind, x.shape[1], n_classes).to(device)
    r = recipe(kind, x.shape[1])
    opt = (torch.optim.Adam(net.parameters(), lr=r["lr"]) if r["opt"] == "adam" else
           torch.optim.SGD(net.parameters(), lr=r["lr"], momentum=0.9, weight_decay=r["wd"]))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    x, y = x.to(device), y.to(device)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), device=device)
        for s in range(0, len(x), batch):
            idx = perm[s:s + batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb = fedgan.augment(fedgan.to_unit(x[idx]), "flip")
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net, x, y, device, batch=256):
    hits = sum((net(fedgan.to_unit(x[s:s + batch]).to(device)).argmax(1).cpu() == y[s:s + batch]).sum().item()
               for s in range(0, len(x), batch))
    return hits / len(x)


def synthesize(g, n_per_class, n_classes, seed):
    """n_per_class images of every class from generator g, as uint8 (n, C, H, W) and labels; the
    latents and noise come from `seed` alone (fedgan.generate), whatever was evaluated before."""
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return fedgan.generate(g, y, seed), y


def balanced(x, y, n_classes):
    """The largest class-balanced subset (first k of each class)."""
    k = min(int((y == c).sum()) for c in range(n_classes))
    idx = torch.cat([torch.nonzero(y == c).flatten()[:k] for c in range(n_classes)])
    return x[idx], y[idx]


def sample_per_class(x, y, n, n_classes, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=gen)[:n]]
                     for c in range(n_classes)])
    return x[idx], y[idx]


# ------------------------------------------------------------------------------------------------
# Domain FID
# ------------------------------------------------------------------------------------------------


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to feature sets a (n, d) and b (m, d), in float64:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the trace via eigenvalues of S_a^(1/2) S_b S_a^(1/2)."""
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(sa)
    root_a = vec @ torch.diag(ev.clamp(min=0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp(min=0).sqrt().sum()
    return (mu @ mu + sa.trace() + sb.trace() - 2 * cross).item()


@torch.no_grad()
def features_of(net, x, device, batch=256):
    return torch.cat([net(fedgan.to_unit(x[s:s + batch]).to(device), penultimate=True).cpu()
                      for s in range(0, len(x), batch)])


def domain_fid(feature_net, g, real_x, real_y, n_classes, n_synth, seed, device):
    """Per class and overall, real held-out images against n_synth synthetic images per class."""
    sx, sy = synthesize(g, n_synth, n_classes, seed)
    fr, fs = features_of(feature_net, real_x, device), features_of(feature_net, sx, device)
    # a class with fewer than 2 real images has no covariance: its FID is not defined (None, "n/a")
    res = {c: frechet_distance(fr[real_y == c], fs[sy == c]) if int((real_y == c).sum()) >= 2 else None
           for c in range(n_classes)}
    res["overall"] = frechet_distance(fr, fs)
    return res


# ------------------------------------------------------------------------------------------------
# Reports: results.json, results.md, utility.svg (no plotting library)
# ------------------------------------------------------------------------------------------------


def markdown(results):
    lines = ["# FedGAN evaluation", "", "Protocol: " + results["protocol_text"], ""]
    runs = results["runs"]
    names, classes = list(runs), results["classes"]
    if any("lpips" in r for r in runs.values()):
        lines += ["## LPIPS (AlexNet, lower is better), mean ± standard error", "",
                  "| class | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for c, cname in enumerate(classes):
            cells = [f"{runs[n]['lpips'][str(c)]['mean']:.4f} ± {runs[n]['lpips'][str(c)]['se']:.4f}"
                     if "lpips" in runs[n] and runs[n]["lpips"][str(c)]["mean"] is not None else "n/a"
                     for n in names]
            lines.append(f"| LPIPS ({cname}) | " + " | ".join(cells) + " |")
        lines.append("")
    if any("fid" in r for r in runs.values()):
        lines += ["## Domain FID (penultimate features of a classifier trained on the real training data; "
                  "lower is better; not Inception FID)", "",
                  "| class | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for key, label in [(str(c), cn) for c, cn in enumerate(classes)] + [("overall", "overall")]:
            lines.append(f"| {label} | " + " | ".join(f"{runs[n]['fid'][key]:.2f}"
                                                     if runs[n].get("fid", {}).get(key) is not None else "n/a"
                                                     for n in names) + " |")
        lines.append("")
    u = results.get("utility")
    if u:
        lines += [f"## Utility: test accuracy of a {u['classifier']} classifier, mean ± sd over {u['seeds']} seeds "
                  f"(real only, or + {u['n_synth']} synthetic images per class)", "",
                  "| n real per class | " + " | ".join(u["curves"]) + " |", "|---" * (len(u["curves"]) + 1) + "|"]
        for i, n in enumerate(u["n_real"]):
            used = u["n_real_used"][i]
            label = str(n) if used == [n] * len(used) else f"{n} (used {'/'.join(map(str, used))}: all there are)"
            lines.append(f"| {label} | " + " | ".join(f"{c['mean'][i]:.3f} ± {c['std'][i]:.3f}"
                                                  for c in u["curves"].values()) + " |")
        lines.append("")
    return "\n".join(lines)


def utility_svg(u, w=640, h=400, pad=56):
    """Accuracy against n real per class (log x axis), one line and a ±sd band per generator."""
    ns = u["n_real"]
    lx = [math.log10(n) for n in ns]
    x0, x1 = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1
    allv = [v for c in u["curves"].values() for m, s in zip(c["mean"], c["std"]) for v in (m - s, m + s)]
    y0, y1 = max(0.0, min(allv) - 0.02), min(1.0, max(allv) + 0.02)
    y1 = y1 if y1 > y0 else y0 + 0.1
    X = lambda v: pad + (v - x0) / (x1 - x0) * (w - 2 * pad)          # noqa: E731
    Y = lambda v: h - pad - (v - y0) / (y1 - y0) * (h - 2 * pad)      # noqa: E731
    colours = ["#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 14}" text-anchor="middle">real images per class (log scale)</text>',
           f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">test accuracy</text>']
    for n, v in zip(ns, lx):
        out.append(f'<text x="{X(v):.1f}" y="{h - pad + 16}" text-anchor="middle">{n}</text>')
    for k in range(6):
        v = y0 + (y1 - y0) * k / 5
        out.append(f'<text x="{pad - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for i, (name, c) in enumerate(u["curves"].items()):
        col = colours[i % len(colours)]
        upper = [(X(v), Y(m + s)) for v, m, s in zip(lx, c["mean"], c["std"])]
        lower = [(X(v), Y(m - s)) for v, m, s in zip(lx, c["mean"], c["std"])][::-1]
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in upper + lower)
        out.append(f'<polygon points="{pts}" fill="{col}" fill-opacity="0.15" stroke="none"/>')
        line = " ".join(f"{X(v):.1f},{Y(m):.1f}" for v, m in zip(lx, c["mean"]))
        out.append(f'<polyline points="{line}" fill="none" stroke="{col}" stroke-width="2"/>')
        out.append(f'<text x="{w - pad - 150}" y="{pad + 16 * i}" fill="{col}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def load_run(folder, data_root, device):
    folder = Path(folder)
    if not (folder / "generator.pt").exists() or not (folder / "config.json").exists():
        raise EvalError(f"{folder} is not a finished fedgan run (needs config.json and generator.pt); "
                        "train one with python fedgan.py --out DIR")
    try:
        cfg = fedgan.config_from_json(json.loads((folder / "config.json").read_text()), folder / "config.json")
    except ValueError:
        raise EvalError(f"{folder}/config.json is not valid JSON; restore it from the run")
    if data_root:
        cfg.data_root = data_root
    try:
        g = fedgan.load_generator(folder / "generator.pt", map_location=device)
    except Exception as e:
        raise EvalError(f"cannot read {folder}/generator.pt ({type(e).__name__}); it is damaged: train the run again "
                        f"or resume it (python fedgan.py --resume {folder})")
    return cfg, g.to(device)


def data_key(cfg):
    return (cfg.dataset, cfg.data_root, cfg.img_size, cfg.channels, cfg.seed if cfg.dataset == "synthetic" else 0,
            cfg.synthetic_per_class, cfg.test_frac)


def parse_args(argv):
    p = fedgan._Parser(prog="eval.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by fedgan.py (labelled by folder name)")
    p.add_argument("--out", default="eval_out", help="where results.json, results.md and utility.svg go")
    p.add_argument("--force", action="store_true", help="overwrite the results already in --out")
    p.add_argument("--metrics", default="lpips,fid,utility", help="comma list of lpips, fid, utility")
    p.add_argument("--n-real", default="1,5,10,50,100,200,500", help="real images per class in the utility study")
    p.add_argument("--n-synth", type=int, default=1000, help="synthetic images per class (utility and FID)")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the utility study")
    p.add_argument("--classifier", default="densenet121", choices=["densenet121", "small"],
                   help="utility classifier: the paper's DenseNet-121 (random init) or a CPU-sized CNN")
    p.add_argument("--epochs", type=int, default=20, help="classifier epochs (paper: 20)")
    p.add_argument("--fid-epochs", type=int, default=10, help="epochs of the domain-FID feature classifier")
    p.add_argument("--pairs", type=int, default=1000, help="LPIPS: random (synthetic, real) pairs per class")
    p.add_argument("--weights-dir", default=None, help=f"folder with {ALEXNET_FILE} and {LPIPS_FILE} (offline)")
    p.add_argument("--data-root", default=None, help="override every run's data location")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0, help="seeds LPIPS pairs, synthetic latents, FID classifier")
    a = p.parse_args(argv)
    a.metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    bad = set(a.metrics) - {"lpips", "fid", "utility"}
    if bad:
        raise EvalError(f"--metrics {','.join(sorted(bad))} unknown; choose from lpips, fid, utility")
    try:
        a.n_real = [int(n) for n in a.n_real.split(",")]
    except ValueError:
        raise EvalError(f"--n-real {a.n_real!r} must be a comma-separated list of positive integers")
    for name, value, lo in [("--n-real", min(a.n_real), 1), ("--n-synth", a.n_synth, 2), ("--seeds", a.seeds, 1),
                            ("--epochs", a.epochs, 1), ("--fid-epochs", a.fid_epochs, 1), ("--pairs", a.pairs, 1)]:
        if value < lo:
            raise EvalError(f"{name} {value} must be at least {lo}")
    check_out(Path(a.out), a.force)
    return a


def check_out(out, force):
    """Before any work: --out must be a folder we may write, and not hold results unless --force."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and (out / "results.json").exists() and not force:
        raise EvalError(f"{out} already holds results; pass --force to overwrite them, or choose another --out")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise EvalError(f"--out {out}: cannot write under {parent}; choose a folder you can write")


def evaluate(a):
    device = fedgan.pick_device(a.device)
    t0 = time.time()
    say = lambda msg: print(f"[eval {time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    features = lin = None
    if "lpips" in a.metrics:  # fail on missing weights before any work is done
        alex, lin = lpips_weights(a.weights_dir)
        features = alexnet_features(alex)
        features.layers.to(device)
    runs, datasets = {}, {}
    for folder in a.runs:
        cfg, g = load_run(folder, a.data_root, device)
        key = data_key(cfg)
        if key not in datasets:
            try:
                datasets[key] = fedgan.data_of(fedgan.finalize(cfg))
            except fedgan.FedGANError as e:
                raise EvalError(str(e))
        runs[Path(folder).name] = dict(cfg=cfg, g=g.eval(), data=datasets[key])
    if len(datasets) > 1 and "utility" in a.metrics:
        raise EvalError("the runs use different data (dataset, size or channels); evaluate one dataset at a time")
    first = next(iter(runs.values()))
    classes, n_classes = first["data"].classes, len(first["data"].classes)
    results = dict(classes=classes, runs={}, protocol=dict(
        lpips=dict(pairs_per_class=a.pairs, seed=a.seed, real="held-out test split", net="AlexNet (torchvision) + "
                   "LPIPS v0.1 linear weights", input="[-1, 1], gray repeated to RGB, no resizing"),
        fid=dict(features="penultimate layer (128-d) of SmallCNN trained on the real training data",
                 epochs=a.fid_epochs, n_synth_per_class=a.n_synth, real="held-out test split")))
    results["protocol_text"] = " ".join(
        [f"LPIPS: per class, mean over {a.pairs} random (synthetic, real held-out test) pairs of that class, "
         f"seed {a.seed}, ± standard error."] * ("lpips" in a.metrics) +
        [f"Domain FID: {a.n_synth} synthetic images per class against the test split."] * ("fid" in a.metrics) +
        [f"Utility: {a.classifier} classifier, {a.epochs} epochs, {a.seeds} seeds."] * ("utility" in a.metrics))
    fid_nets = {}
    for name, r in runs.items():
        res = results["runs"].setdefault(name, {})
        tx, ty = r["data"].test
        if "lpips" in a.metrics:
            say(f"{name}: LPIPS, {a.pairs} pairs per class")
            res["lpips"] = {str(c): v for c, v in lpips_per_class(r["g"], tx, ty, n_classes, features, lin, a.pairs,
                                                                   a.seed, device).items()}
        if "fid" in a.metrics:
            key = data_key(r["cfg"])
            if key not in fid_nets:
                say(f"training the domain-FID feature classifier on {len(r['data'].train[1])} real images")
                fid_nets[key] = train_classifier(*r["data"].train, n_classes, "small", a.fid_epochs, a.seed,
                                                 device)
            say(f"{name}: domain FID")
            res["fid"] = {str(k): v for k, v in domain_fid(fid_nets[key], r["g"], tx, ty, n_classes, a.n_synth,
                                                            a.seed, device).items()}
    if "utility" in a.metrics:
        results["utility"] = utility_study(a, runs, n_classes, device, say)
    return results


def utility_study(a, runs, n_classes, device, say):
    """Accuracy on the balanced test set of classifiers trained on n real images per class, alone or
    with n_synth synthetic images per class from each generator, over a.seeds seeds."""
    data = next(iter(runs.values()))["data"]
    (rx, ry), (tx, ty) = data.train, balanced(*data.test, n_classes)
    if len(ty) == 0:
        missing = [data.classes[c] for c in range(n_classes) if not (data.test[1] == c).any()]
        raise EvalError(f"the held-out split has no image of class {', '.join(missing)}; the utility study tests on "
                        "every class: give data whose test split holds them all")
    names = ["real only"] + [f"+ {n}" for n in runs]
    acc = {n: np.zeros((len(a.n_real), a.seeds)) for n in names}
    # what each n means in fact: a class with fewer real training images gives all it has
    used = [[min(n, int((ry == c).sum())) for c in range(n_classes)] for n in a.n_real]
    total, done, t_start = len(a.n_real) * a.seeds * len(names), 0, time.time()
    for seed in range(a.seeds):
        synth = {f"+ {n}": synthesize(r["g"], a.n_synth, n_classes, 1000 + seed) for n, r in runs.items()}
        for i, n in enumerate(a.n_real):
            xr, yr = sample_per_class(rx, ry, n, n_classes, seed)
            for name in names:
                x, y = (xr, yr) if name == "real only" else (torch.cat([xr, synth[name][0]]),
                                                             torch.cat([yr, synth[name][1]]))
                net = train_classifier(x, y, n_classes, a.classifier, a.epochs, seed, device)
                acc[name][i, seed] = accuracy(net, tx, ty, device)
                done += 1
                left = (time.time() - t_start) / done * (total - done)
                say(f"utility {done}/{total}: n_real {n}, seed {seed}, {name}: acc {acc[name][i, seed]:.3f} "
                    f"(~{left / 60:.1f} min left)")
    return dict(classifier=a.classifier, seeds=a.seeds, n_synth=a.n_synth, n_real=a.n_real, n_real_used=used,
                test_images=len(ty), curves={n: dict(mean=v.mean(1).tolist(), std=v.std(1).tolist())
                                             for n, v in acc.items()})


def main(argv=None):
    try:
        a = parse_args(argv)
        results = evaluate(a)
    except (EvalError, fedgan.FedGANError) as e:
        sys.stderr.write(f"eval.py: error: {e}\n")
        sys.exit(2)
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.stderr.write(f"eval.py: error: cannot create {out} ({e.strerror}); results not written\n")
        sys.exit(2)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    if "utility" in results:
        (out / "utility.svg").write_text(utility_svg(results["utility"]))
    print(markdown(results))
    print(f"wrote {out}/results.json, {out}/results.md" + (f", {out}/utility.svg" if "utility" in results else ""))


if __name__ == "__main__":
    main()
