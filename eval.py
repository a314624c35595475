"""eval.py: what a trained FedGAN is worth, with its uncertainty. Fidelity (LPIPS per class; FID, KID,
precision and recall in a domain feature space), the backdoor on a continuous scale (trigger strength),
detection (the attackers' weight and share per round) and utility (a classifier trained on n real images
per class, with and without synthetic ones), for any number of run folders written by fedgan.py.

    python eval.py runs/vanilla runs/attack runs/feddetect --out eval_out
    python eval.py runs/study/*_s[0-9] --baseline vanilla,attack64 --metrics fid,kid,pr,trigger --out ev
    python eval.py runs/x --weights-dir weights/   # offline: alexnet-owt-7be5be79.pth and alex.pth there

Runs whose configs differ only by the seed (and speed or output settings) form an **arm**, named by the
folders' name without its _s<seed> suffix. Every figure is reported per arm as the mean over training
seeds with a 95% Student-t interval, and as a paired difference (same seed) from each --baseline arm
trained as many rounds; arms that differ only in rounds (a run and its extension) are also compared
longer minus shorter. results.md marks the differences whose interval excludes zero; arms.svg draws
each arm's interval, attacker_share.svg the attackers' share of the aggregate per round, utility.svg the
utility curves.

LPIPS (Zhang et al., CVPR 2018) is computed here with torchvision's AlexNet: the five ReLU maps, each
unit-normalised over channels, squared difference weighted by the learned per-channel v0.1 linear
weights, averaged over space, summed over layers. The domain features are the penultimate layer of a
small classifier trained on the run's real training data (not Inception: numbers are comparable only
within one dataset and this script); the reference real images are the held-out test split. The
utility study follows section 4.4 of the paper.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
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


def lpips_at_hand(weights_dir=None):
    """Are both LPIPS weight files there, in weights_dir or the torch cache (nothing is downloaded)?"""
    folder = Path(weights_dir) if weights_dir else Path(torch.hub.get_dir()) / "checkpoints"
    lin = LPIPS_FILE if weights_dir else "lpips_v0.1_alex.pth"
    return (folder / ALEXNET_FILE).exists() and (folder / lin).exists()


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
        fakes = draw(g, torch.full((pairs,), c), seed + 7919 * (c + 1))  # its own latents and noise
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


def steps_per_epoch(n, batch=32):
    """Optimizer steps of one epoch over n images in train_classifier (a last batch of 1 is skipped)."""
    return n // batch + (n % batch >= 2)


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


@dataclasses.dataclass
class ImageSet:
    """Images from any generator, read from an .npz: scored like a run's generator (draw)."""
    x: torch.Tensor          # uint8 (n, C, H, W)
    y: torch.Tensor          # (n,)
    n_classes: int

    def draw(self, labels, seed):
        """One stored image per label, of that class: without replacement while the class lasts."""
        gen, out = torch.Generator().manual_seed(seed), torch.empty(len(labels), *self.x.shape[1:], dtype=torch.uint8)
        for c in torch.as_tensor(labels).unique():
            want, have = torch.nonzero(labels == c).flatten(), torch.nonzero(self.y == c).flatten()
            pick = (torch.randperm(len(have), generator=gen)[:len(want)] if len(want) <= len(have) else
                    torch.randint(len(have), (len(want),), generator=gen))
            out[want] = self.x[have[pick]]
        return out


def draw(g, labels, seed):
    """uint8 images (n, C, H, W) of the classes `labels` from a generator (fedgan.generate: latents and noise
    from `seed` alone, whatever was evaluated before) or from an ImageSet."""
    return g.draw(torch.as_tensor(labels), seed) if isinstance(g, ImageSet) else fedgan.generate(g, labels, seed)


def synthesize(g, n_per_class, n_classes, seed):
    """n_per_class images of every class from g, as uint8 (n, C, H, W) and labels."""
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return draw(g, y, seed), y


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
# Fidelity in the domain features: FID, KID, precision and recall
# ------------------------------------------------------------------------------------------------


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to feature sets a (n, d) and b (m, d), in float64:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The last trace is the sum of the square
    roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (d x d); when a set holds fewer images than there
    are features, the same non-zero spectrum comes cheaper as the singular values of the n x m matrix
    A_c B_c^T / sqrt((n-1)(m-1)) (A_c, B_c: the centred sets), which also leaves out the null space's
    rounding noise."""
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    ac, bc = a - a.mean(0), b - b.mean(0)
    n, m = len(a), len(b)
    if min(n, m) < a.shape[1]:
        cross = torch.linalg.svdvals(ac @ bc.T).sum() / math.sqrt((n - 1) * (m - 1))
    else:
        sa, sb = ac.T @ ac / (n - 1), bc.T @ bc / (m - 1)
        ev, vec = torch.linalg.eigh(sa)
        root_a = vec @ torch.diag(ev.clamp(min=0).sqrt()) @ vec.T
        cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp(min=0).sqrt().sum()
    return (mu @ mu + ac.square().sum() / (n - 1) + bc.square().sum() / (m - 1) - 2 * cross).item()


def kernel_inception_distance(a, b):
    """KID (Binkowski et al., ICLR 2018): the unbiased estimate of the squared MMD between feature sets
    a (n, d) and b (m, d) under the kernel k(x, y) = (x.y / d + 1)^3. Unlike FID it has no bias from the
    sample size, so a few hundred images per set give an honest (if noisy) figure; it can be below zero."""
    a, b = a.double(), b.double()
    d, n, m = a.shape[1], len(a), len(b)
    kaa, kbb, kab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    return ((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
            - 2 * kab.mean()).item()


def precision_recall(real, fake, k=3, seed=0):
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019): a set's manifold is the union
    of balls around its points, each as wide as the distance to its k-th nearest neighbour in the set.
    Precision: the share of fakes inside the real manifold (are samples realistic?); recall: the share of
    reals inside the fake manifold (is the real variety covered?). The larger set is cut to the smaller
    one's size first, since the radii shrink as a set grows: by a seeded random subset, never the first
    rows (a set sorted by class would lose whole classes)."""
    n = min(len(real), len(fake))
    gen = torch.Generator().manual_seed(seed)
    real, fake = (x[torch.randperm(len(x), generator=gen)[:n]].double() if len(x) > n else x.double()
                  for x in (real, fake))

    def radii(x):  # distance of each point to its k-th nearest other point
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def inside(points, centres, r):  # share of points within some ball
        return (torch.cdist(points, centres) <= r[None, :]).any(1).double().mean().item()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def same_class_mix(a, a_y, b, b_y, n_classes, seed):
    """Seeded subsets of a and b with the same number of images of each class (min of the two per class), so
    that an 'overall' figure compares the same class mix and does not score a class prior as damage."""
    gen = torch.Generator().manual_seed(seed)
    ia, ib = [], []
    for c in range(n_classes):
        pa, pb = torch.nonzero(a_y == c).flatten(), torch.nonzero(b_y == c).flatten()
        k = min(len(pa), len(pb))
        ia.append(pa[torch.randperm(len(pa), generator=gen)[:k]])
        ib.append(pb[torch.randperm(len(pb), generator=gen)[:k]])
    ia, ib = torch.cat(ia), torch.cat(ib)
    return a[ia], b[ib]


@torch.no_grad()
def features_of(net, x, device, batch=256):
    return torch.cat([net(fedgan.to_unit(x[s:s + batch]).to(device), penultimate=True).cpu()
                      for s in range(0, len(x), batch)])


def domain_metrics(fr, real_y, fs, fake_y, n_classes, seed=0):
    """FID, KID, precision and recall between real features fr (with labels real_y) and synthetic ones
    fs (fake_y): per class, overall (on the same class mix, same_class_mix) and as the mean over classes
    ('class mean': blind to no class, so it sees images drawn under the wrong label). A class with fewer than
    2 real images gets None ('n/a')."""
    out = dict(fid={}, kid={}, precision={}, recall={})
    for key in [str(c) for c in range(n_classes)] + ["overall"]:
        if key == "overall":
            a, b = same_class_mix(fr, real_y, fs, fake_y, n_classes, seed)
        else:
            a, b = fr[real_y == int(key)], fs[fake_y == int(key)]
        if len(a) < 2 or len(b) < 2:
            for m in out:
                out[m][key] = None
            continue
        out["fid"][key], out["kid"][key] = frechet_distance(a, b), kernel_inception_distance(a, b)
        k = min(3, len(a) - 1, len(b) - 1)
        out["precision"][key], out["recall"][key] = precision_recall(a, b, k, seed)
    for m in out:
        per = [out[m][str(c)] for c in range(n_classes)]
        out[m]["class mean"] = None if None in per else float(np.mean(per))
    return out


def pixel_features(x, side=8):
    """uint8 images (n, C, H, W) -> (n, C * side * side): each image's layout, average-pooled to side x side
    in [-1, 1], with no learned feature in between. A classifier's features answer 'which class?', and
    can score blobs closer to real images than well-formed ones; the layout cannot be fooled that way."""
    return F.adaptive_avg_pool2d(fedgan.to_unit(x).float(), side).flatten(1)


@torch.no_grad()
def deep_features(net, x, device, batch=256):
    """uint8 images (n, C, H, W) -> (n, 2 * 352): per channel of each of the SmallCNN's four conv blocks, the
    spatial mean and standard deviation of its pre-activation map (after BatchNorm, before ReLU). The
    128-d head is one 'class evidence' axis; several depths before the ReLU, and their spread over space,
    see contrast and texture (noise, blur, blobs) as well."""
    out = []
    for s in range(0, len(x), batch):
        h, stats = fedgan.to_unit(x[s:s + batch]).to(device), []
        for layer in net.body:
            h = layer(h)
            if isinstance(layer, nn.BatchNorm2d):
                stats += [h.mean((2, 3)), h.std((2, 3))]                      # (b, C) each
        out.append(torch.cat(stats, 1).cpu())
    return torch.cat(out)


@dataclasses.dataclass
class Reference:
    """The held-out real images every fidelity figure is measured against, featurized once per space."""
    x: torch.Tensor          # uint8 (n, C, H, W)
    y: torch.Tensor          # (n,)
    n_classes: int
    net: nn.Module           # the domain classifier (features_of, deep_features)
    device: torch.device
    feats: dict = None       # space -> (n, d) features of x
    centre: torch.Tensor = None  # deep features: mean and sd on x, so every dimension is z-scored on real images
    spread: torch.Tensor = None

    def __post_init__(self):
        deep = deep_features(self.net, self.x, self.device)
        self.centre, self.spread = deep.mean(0), deep.std(0)
        keep = self.spread > 1e-6                                         # dead units carry nothing
        self.centre, self.spread = self.centre[keep], self.spread[keep]
        self.keep = keep
        self.feats = self.featurize(self.x, deep)

    def featurize(self, x, deep=None):
        deep = deep_features(self.net, x, self.device) if deep is None else deep
        return {"classifier": features_of(self.net, x, self.device), "pixel": pixel_features(x),
                "deep": (deep[:, self.keep] - self.centre) / self.spread}


SPACES = {"classifier": "", "pixel": "pixel ", "deep": "deep "}  # space -> prefix of its figures' names


def fidelity(ref, x, y, seed, bootstrap=0):
    """domain_metrics of images x (labels y) against the reference in every space: the classifier's 128-d
    features at the top level, res["pixel"] and res["deep"] beside them. With bootstrap = B > 0 also
    res["reference_sd"]: each figure's sd over B redraws of the reference within each class (with
    replacement for FID and KID; half-size subsets without replacement for precision/recall, whose k-NN
    radii collapse to 0 on duplicates, so their sd is an upper bound)."""
    fs = ref.featurize(x)
    per = {sp: domain_metrics(ref.feats[sp], ref.y, fs[sp], y, ref.n_classes, seed) for sp in SPACES}
    res = dict(per["classifier"], pixel=per["pixel"], deep=per["deep"])
    if bootstrap:
        gen = torch.Generator().manual_seed(seed + 3)
        by_class = [torch.nonzero(ref.y == c).flatten() for c in range(ref.n_classes)]
        draws = []
        for _ in range(bootstrap):
            with_rep = torch.cat([i[torch.randint(len(i), (len(i),), generator=gen)] for i in by_class if len(i)])
            half = torch.cat([i[torch.randperm(len(i), generator=gen)[:max(2, len(i) // 2)]] for i in by_class
                              if len(i)])
            d = {}
            for sp in SPACES:
                a = domain_metrics(ref.feats[sp][with_rep], ref.y[with_rep], fs[sp], y, ref.n_classes, seed)
                b = domain_metrics(ref.feats[sp][half], ref.y[half], fs[sp], y, ref.n_classes, seed)
                d[sp] = dict(fid=a["fid"], kid=a["kid"], precision=b["precision"], recall=b["recall"])
            draws.append(d)

        def sd(sp, m, k):
            v = [dr[sp][m][k] for dr in draws]
            return None if None in v else float(np.std(v, ddof=1))
        sds = {sp: {m: {k: sd(sp, m, k) for k in per[sp][m]} for m in per[sp]} for sp in SPACES}
        res["reference_sd"] = dict(sds["classifier"], pixel=sds["pixel"], deep=sds["deep"])
    return res


def domain_scores(ref, g, n_synth, seed, bootstrap=0):
    """fidelity of generator g (or an ImageSet): n_synth images per class from `seed` against the reference."""
    sx, sy = synthesize(g, n_synth, ref.n_classes, seed)
    return fidelity(ref, sx, sy, seed, bootstrap)


# ------------------------------------------------------------------------------------------------
# The metric ladder: does a figure see known damage, and rank real images above it?
# ------------------------------------------------------------------------------------------------

# damage: (what its level means, three levels from mild to strong); sizes in px are at 32 px, scaled
LADDER = {"noise": ("additive Gaussian noise, sd in grey levels", (10, 20, 40)),
          "blur": ("Gaussian blur, sigma in px", (0.5, 1.0, 2.0)),
          "blobs": ("block averaging, block side in px", (2, 4, 8)),
          "contrast": ("contrast about each image's mean, factor", (0.8, 0.6, 0.4)),
          "brightness": ("brightness shift, grey levels", (10, 20, 40)),
          "class swap": ("share of images under the other class's label", (0.1, 0.25, 0.5)),
          "mode collapse": ("share replaced by copies of 2 images per class", (0.25, 0.5, 0.9)),
          "trigger": ("share with the trigger pasted (64 px at 256 px)", (0.1, 0.25, 0.5))}


def damage(x, y, kind, level, n_classes, seed):
    """Known damage of uint8 images x (n, C, H, W) with labels y, at one LADDER level; returns (x, y)."""
    gen = torch.Generator().manual_seed(seed)
    n, H = len(x), x.shape[-1]
    f = x.double()
    share = torch.randperm(n, generator=gen)[:round(level * n)] if kind in ("class swap", "mode collapse",
                                                                             "trigger") else None
    if kind == "noise":
        f = f + level * torch.randn(f.shape, generator=gen, dtype=torch.float64)
    elif kind == "blur":
        sigma = level * H / 32
        r = max(1, math.ceil(3 * sigma))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
        k = (k / k.sum()).to(f)
        C = f.shape[1]
        f = F.conv2d(F.pad(f, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
        f = F.conv2d(F.pad(f, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)
    elif kind == "blobs":
        b = max(1, round(level * H / 32))
        f = F.interpolate(F.avg_pool2d(f, b, ceil_mode=True), scale_factor=b, mode="nearest")[..., :H, :H]
    elif kind == "contrast":
        m = f.mean((1, 2, 3), keepdim=True)
        f = m + level * (f - m)
    elif kind == "brightness":
        f = f + level
    elif kind == "class swap":
        y = y.clone()
        y[share] = (y[share] + 1 + torch.randint(n_classes - 1, (len(share),), generator=gen)) % n_classes
    elif kind == "mode collapse":
        f = f.clone()
        for c in range(n_classes):
            own = torch.nonzero(y == c).flatten()
            if len(own) == 0:
                continue
            templates = own[torch.randperm(len(own), generator=gen)[:2]]
            hit = share[y[share] == c]
            f[hit] = f[templates[torch.randint(len(templates), (len(hit),), generator=gen)]]
    elif kind == "trigger":
        trig = fedgan.make_trigger(max(1, 64 * H // 256), x.shape[1], seed=0)
        f = f.clone()
        f[share] = fedgan.apply_trigger(x[share], trig, fedgan.trigger_margin(H)).double()
    else:
        raise ValueError(f"unknown damage {kind!r}")
    return f.round().clamp(0, 255).to(torch.uint8), y


def lower_is_better(metric):
    return not metric.split(" (")[0].split(" ")[-1] in ("precision", "recall")


def better(metric):
    """'higher' or 'lower': which way a figure of the tables improves (None where neither is better)."""
    m = metric.lower()
    if any(w in m for w in ("precision", "recall", "tpr", "accuracy", "lowest benign weight")):
        return "higher"
    if any(w in m for w in ("fid", "kid", "trigger", "attacker", "fpr", "first flag")):
        return "lower"
    return None


def direction_line(metrics):
    """'Lower is better: A, B. Higher is better: C.' for a table's columns."""
    ways = {w: [m for m in metrics if better(m) == w] for w in ("lower", "higher")}
    return " ".join(f"{w.capitalize()} is better: {', '.join(ms)}." for w, ms in ways.items() if ms)


def ladder(ref, real_x, real_y, seed, classes, say=lambda msg: None):
    """Every fidelity figure of real images (a set disjoint from the reference) and of the same images under
    each LADDER damage at its three levels. Returns dict(real={figure: value}, damaged={damage: [3 x
    {figure: value}]}, verdict={figure: {damage: 'sees' | why not}})."""
    score = lambda x, y: scalar_metrics(fidelity(ref, x, y, seed), classes)  # noqa: E731
    t0 = time.time()
    real, damaged = score(real_x, real_y), {}
    for j, (kind, (_, levels)) in enumerate(LADDER.items()):
        damaged[kind] = [score(*damage(real_x, real_y, kind, lv, ref.n_classes, seed + i))
                         for i, lv in enumerate(levels)]
        say(f"ladder: {kind} done, {j + 1}/{len(LADDER)} damages, "
            f"~{(time.time() - t0) / (j + 1) * (len(LADDER) - j - 1) / 60:.1f} min left")
    verdict = {}
    for m in real:
        sign = 1 if lower_is_better(m) else -1
        verdict[m] = {}
        for kind, rows in damaged.items():
            v = [sign * r[m] for r in rows if r.get(m) is not None]
            if len(v) < 3 or real[m] is None:
                verdict[m][kind] = "n/a"
            elif min(v) <= sign * real[m]:
                verdict[m][kind] = "misranks"       # some damaged set scores as well as real images
            elif not (v[0] <= v[1] <= v[2]):              # ties: a figure that saturates still sees it
                verdict[m][kind] = "not monotone"
            else:
                verdict[m][kind] = "sees"
    return dict(real=real, damaged=damaged, verdict=verdict, levels={k: v for k, v in LADDER.items()})


def ladder_passes(verdict, figure):
    """A figure the study may read first: it sees every damage of the ladder."""
    return all(v == "sees" for v in verdict[figure].values())


def ladder_markdown(lad, figures=None):
    """The ladder as markdown: per figure, its real value and per damage the three levels' values, then the
    verdict."""
    figures = figures or list(lad["real"])
    lines = ["## The metric ladder: which figure sees which damage", "",
             "A disjoint real set (the real floor's images) against the reference, and the same images under known "
             "damage at three levels (mild, medium, strong). A figure **sees** a damage when it scores real images "
             "better than every damaged set and orders the three levels; *misranks*: some damaged set scores as "
             "well as real images; *not monotone*: damaged sets score worse than real but out of order. Damages: " +
             "; ".join(f"{k}: {d} {', '.join(map(str, lv))}" for k, (d, lv) in lad["levels"].items()) + ".", "",
             "| figure | real | " + " | ".join(lad["damaged"]) + " | sees all |", "|---" * (len(lad["damaged"]) + 3)
             + "|"]
    for m in figures:
        cells = []
        for kind, rows in lad["damaged"].items():
            vals = "/".join(num(r.get(m)) for r in rows)
            v = lad["verdict"][m][kind]
            cells.append(vals + ("" if v == "sees" else f" ({v})"))
        lines.append(f"| {m} | {num(lad['real'][m])} | " + " | ".join(cells) +
                     f" | {'yes' if ladder_passes(lad['verdict'], m) else 'no'} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------
# The backdoor, measured on a continuous scale
# ------------------------------------------------------------------------------------------------


trigger_figures = fedgan.trigger_figures  # one definition: the run's closing line, summary.json and eval agree


def trigger_specs(cfgs):
    """The distinct trigger sizes of the poisoned runs: what clean runs are measured against."""
    return sorted({c.poison for c in cfgs if c.poison > 0 and c.attack == "patch"})


def backdoor_metrics(g, cfg, specs, reference, seed, per_class):
    """Trigger strength (mean over generated images) and trigger rate, for the run's own trigger or,
    for a run without one, for every trigger of the evaluation (with the run's seed, as its colours)."""
    own = [cfg.poison] if cfg.poison > 0 and cfg.attack == "patch" else specs
    fake = draw(g, torch.arange(g.n_classes).repeat_interleave(per_class), seed)
    margin = fedgan.trigger_margin(cfg.img_size)
    return {str(size): trigger_figures(fake, fedgan.make_trigger(size, cfg.channels, seed=cfg.seed), margin,
                                       reference) for size in own}


# ------------------------------------------------------------------------------------------------
# Detection, from what the run wrote
# ------------------------------------------------------------------------------------------------


def aggregation_weights(record):
    """The share each client had in this round's aggregate: the detector's weights, restricted to the
    clients Krum kept when it chose."""
    w = np.array(record["weights"], float)
    if "selected" in record:
        w = w * np.array(record["selected"], float)
    return w / w.sum() if w.sum() > 0 else w


def detection_metrics(folder, cfg, say=print):
    """From metrics.jsonl and summary.json: the attackers' final weight, their share of the aggregate
    per round (and its mean), the lowest benign final weight, TPR and FPR after warm-up, and the
    shadow detectors' rates when the run logged them. A run without those files (or with damaged ones)
    gets no detection figures, and a line saying so."""
    try:
        recs = [json.loads(ln) for ln in (Path(folder) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        summary = json.loads((Path(folder) / "summary.json").read_text())
        recs[-1]["malicious"]
    except (OSError, ValueError, IndexError, KeyError) as e:
        why = "missing" if isinstance(e, OSError) else "damaged"
        say(f"{folder}: metrics.jsonl or summary.json {why}; scored without detection figures")
        return {}
    mal = np.array(recs[-1]["malicious"], bool)
    out = dict(lowest_benign_weight=summary.get("lowest_benign_weight"))
    if mal.any():
        share = [float(aggregation_weights(r)[mal].sum()) for r in recs]
        # its part of the last aggregate (under Krum what it kept, not its weight w_i), read from the log itself
        out.update(attacker_final_weight=share[-1], attacker_share=share,
                   attacker_mean_share=float(np.mean(share)))
    for k in ("tpr_after_warmup", "fpr_after_warmup"):
        out[k] = summary.get(k)
    out["shadow"] = summary.get("shadow")  # --shadow: what every detector would have flagged
    return out


# ------------------------------------------------------------------------------------------------
# Arms and intervals over training seeds
# ------------------------------------------------------------------------------------------------

# config.json keys that do not change the experiment: runs differing only in these are one arm
NOT_THE_EXPERIMENT = {"seed", "out", "resume", "environment", "device", "amp", "amp_dtype", "tf32", "channels_last",
                      "compile", "offload", "ckpt_every", "sample_every", "bench", "bench_steps",
                      "bench_round", "recipe"}  # recipe: a name for values recorded on their own
# Student's t, 97.5% quantile, by degrees of freedom (the two-sided 95% interval)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df):
    """Student's t 97.5% quantile; beyond the table, the Cornish-Fisher expansion around 1.96 (error < 1e-3)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 / max(abs(1.0 - (a + b) * x / (a + 1)), tiny) * math.copysign(1, 1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * h


def t_pvalue(t, df):
    """Two-sided p-value of Student's t with df degrees of freedom: I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    return betainc(df / 2, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0


def holm(pvalues, alpha=0.05):
    """Holm's step-down procedure: which hypotheses are rejected with the family-wise error held to alpha.
    pvalues may hold None (not tested: never rejected, not counted)."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    keep = [False] * len(pvalues)
    for rank, (p, i) in enumerate(tested):
        if p > alpha / (len(tested) - rank):
            break
        keep[i] = True
    return keep


def interval(values):
    """Mean and 95% t-interval of values (one per training seed): dict(mean, lo, hi, n, sd, p), p the
    two-sided t-test p-value of mean 0. With one value there is no interval (lo = hi = p = None);
    identical values give a zero-width one."""
    v = np.array([x for x in values if x is not None], float)
    if len(v) == 0:
        return dict(mean=None, lo=None, hi=None, n=0, sd=None, p=None)
    mean = float(v.mean())
    if len(v) == 1:
        return dict(mean=mean, lo=None, hi=None, n=1, sd=None, p=None)
    sd = float(v.std(ddof=1))
    half = t975(len(v) - 1) * sd / math.sqrt(len(v))
    p = (t_pvalue(abs(mean) / (sd / math.sqrt(len(v))), len(v) - 1) if sd > 0 else float(mean == 0))
    return dict(mean=mean, lo=mean - half, hi=mean + half, n=len(v), sd=sd, p=p)


GONE = dict(trim=None, parallel_clients=None, attack_start=0)  # settings fedgan.py no longer has (None: any value)


def meaningful(config):
    """config without the settings that do nothing in it (fedgan.NEEDS: --reconstruct-epochs without a
    reconstruction, --blend-alpha without a blend, ...), and without settings fedgan.py no longer has at their
    only value, so runs that differ only there are one arm."""
    config = {k: v for k, v in config.items() if not (k in GONE and GONE[k] in (None, v))}
    cfg = fedgan.Config(**{f.name: config[f.name] for f in dataclasses.fields(fedgan.Config) if f.name in config})
    return {k: v for k, v in config.items() if not (k in fedgan.NEEDS and not fedgan.NEEDS[k][0](cfg))}


def arm_key(config):
    """What makes an experiment: config.json without the seed, the speed and output settings, and the
    settings that do nothing in it."""
    return json.dumps({k: v for k, v in meaningful(config).items() if k not in NOT_THE_EXPERIMENT}, sort_keys=True)


def arm_label(names):
    """An arm's name: its folders' common name with the seed suffix (_s0, -s12) taken off."""
    stripped = sorted({re.sub(r"[_-]s\d+(_\d{8}-\d{6})?$", "", n) for n in names})  # fedgan's default names end
    # in _sSEED_YYYYMMDD-HHMMSS: the time tells one seed's folder from another's, not one arm from another
    return stripped[0] if len(stripped) == 1 else "/".join(stripped)


def group_arms(configs):
    """configs: {run name: config.json dict}. Returns {arm label: [run names, by seed]}, refusing two runs
    of one arm with the same seed (the same experiment twice would count as two seeds)."""
    groups = {}
    for name, c in configs.items():
        groups.setdefault(arm_key(c), []).append(name)
    arms = {}
    for names in groups.values():
        names.sort(key=lambda n: configs[n]["seed"])
        seeds = [configs[n]["seed"] for n in names]
        dup = next((s for s in seeds if seeds.count(s) > 1), None)
        if dup is not None:
            twins = [n for n in names if configs[n]["seed"] == dup]
            raise EvalError(f"{twins[0]} and {twins[1]} are the same experiment with the same seed {dup}; "
                            "pass one of them")
        label = arm_label(names)
        while label in arms:
            label += "'"
        arms[label] = names
    return arms


def paired(arm_runs, base_runs, value, seed_of):
    """Per-seed differences value(arm run) - value(baseline run) over the seeds both arms have."""
    base = {seed_of[n]: value(n) for n in base_runs}
    diffs = [value(n) - base[seed_of[n]] for n in arm_runs
             if seed_of[n] in base and value(n) is not None and base[seed_of[n]] is not None]
    return interval(diffs)


def scalar_metrics(res, classes):
    """One run's results as {metric name: number}, the figures that get intervals over seeds."""
    out = {}
    for c, cname in enumerate(classes):
        if "lpips" in res:
            out[f"LPIPS ({cname})"] = res["lpips"][str(c)]["mean"]
    for space, prefix in ((res, ""), (res.get("pixel", {}), "pixel "), (res.get("deep", {}), "deep ")):
        for m, label, scale in (("fid", "FID", 1), ("kid", "KID x1000", 1000), ("precision", "precision", 1),
                                ("recall", "recall", 1)):
            for key, cname in [("overall", "overall"), ("class mean", "class mean")] + [
                    (str(c), cn) for c, cn in enumerate(classes)]:
                if m in space and space[m].get(key) is not None:
                    out[f"{prefix}{label} ({cname})"] = space[m][key] * scale
    for size, b in res.get("trigger", {}).items():
        out[f"trigger strength ({size} px)"] = b["strength"]
        out[f"trigger rate ({size} px)"] = b["rate"]
    det = res.get("detection", {})
    for k, label in (("attacker_final_weight", "attacker final weight"),
                     ("attacker_mean_share", "attacker share, mean over rounds"),
                     ("lowest_benign_weight", "lowest benign final weight"),
                     ("tpr_after_warmup", "TPR after warm-up"), ("fpr_after_warmup", "FPR after warm-up")):
        if det.get(k) is not None:
            out[label] = det[k]
    for name, rates in (det.get("shadow") or {}).items():
        for k, label in (("tpr", "TPR"), ("fpr", "FPR"), ("first", "first flag")):
            if rates.get(k) is not None:
                out[f"{name} in shadow: {label}"] = rates[k]
    return out


def length_free_key(config):
    return arm_key({k: v for k, v in config.items() if k != "rounds"})


def baseline_for(arm, b, configs):
    """The arm an arm is compared with for baseline b: b itself, or b's twin trained as many rounds as the
    arm (a 20-round arm is compared with the 20-round baseline); None when there is none, or it is the arm."""
    twin = next((x for x, c in configs.items() if length_free_key(c) == length_free_key(configs[b])
                 and c["rounds"] == configs[arm]["rounds"]), None)
    return None if twin == arm else twin


def length_pairs(configs):
    """(shorter, longer) arm pairs that differ only in the number of rounds (a run and its extension)."""
    return [(s, l) for s in configs for l in configs if configs[s]["rounds"] < configs[l]["rounds"]
            and length_free_key(configs[s]) == length_free_key(configs[l])]


def summarize_arms(results, arms, configs, seed_of, baselines):
    """Mean and 95% interval over seeds of every metric per arm; paired differences from each baseline
    (at the arm's length), and between the lengths of one arm (longer minus shorter)."""
    flat = {n: scalar_metrics(r, results["classes"]) for n, r in results["runs"].items()}
    metrics = list(dict.fromkeys(m for f in flat.values() for m in f))
    summary = {m: {a: interval([flat[n].get(m) for n in runs]) for a, runs in arms.items()} for m in metrics}
    diffs = {}
    for b in baselines:
        pairs = {a: baseline_for(a, b, configs) for a in arms}
        diffs[b] = {m: {a: paired(arms[a], arms[x], lambda n: flat[n].get(m), seed_of)
                        for a, x in pairs.items() if x is not None} for m in metrics}
    lengths = {f"{l} minus {s}": {m: paired(arms[l], arms[s], lambda n: flat[n].get(m), seed_of) for m in metrics}
               for s, l in length_pairs(configs)}
    return summary, diffs, lengths


# ------------------------------------------------------------------------------------------------
# Reports: results.json, results.md and SVG plots (no plotting library)
# ------------------------------------------------------------------------------------------------

HEADLINE = "deep FID (class mean)"  # the fidelity figure read first: the one the metric ladder validates best
FIDELITY = ("FID", "KID x1000", "precision", "recall", "LPIPS")


def figure_of(m):
    """'pixel KID x1000 (overall)' -> ('pixel ', 'KID x1000', 'overall')."""
    head, _, key = m.partition(" (")
    prefix = next((p for p in ("pixel ", "deep ") if head.startswith(p)), "")
    return prefix, head[len(prefix):], key.rstrip(")")


FAMILIES = [("Fidelity in the validated space ('deep'), overall and mean over classes",
             lambda m: figure_of(m)[0] == "deep " and figure_of(m)[2] in ("overall", "class mean")),
            ("Fidelity per class: LPIPS and the validated space",
             lambda m: figure_of(m)[1] == "LPIPS" or (figure_of(m)[0] == "deep " and
                                                     figure_of(m)[2] not in ("overall", "class mean"))),
            ("Fidelity in the classifier's head and in pixels, overall and mean over classes (see the ladder for what "
             "each can see)", lambda m: figure_of(m)[0] != "deep " and figure_of(m)[1] in FIDELITY
             and figure_of(m)[2] in ("overall", "class mean")),
            ("Fidelity per class in the classifier's head and in pixels",
             lambda m: figure_of(m)[0] != "deep " and figure_of(m)[1] in FIDELITY[:4]
             and figure_of(m)[2] not in ("overall", "class mean")),
            ("Backdoor", lambda m: m.startswith("trigger")),
            ("Detection and weights", lambda m: m.split(" (")[0] in ("attacker final weight",
                                                                    "attacker share, mean over rounds",
                                                                    "lowest benign final weight", "TPR after warm-up",
                                                                    "FPR after warm-up")),
            ("Detection in shadow (what each detector would flag; TPR and benign FPR per client-round after warm-up, "
             "first detection round that flags the attacker)", lambda m: " in shadow: " in m)]


def num(v):
    return "n/a" if v is None else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}")


def cell(iv):
    """'mean [lo, hi]' (or the mean alone for one seed)."""
    if iv["mean"] is None:
        return "n/a"
    if iv["lo"] is None:
        return num(iv["mean"]) + " (1 seed)"
    return f"{num(iv['mean'])} [{num(iv['lo'])}, {num(iv['hi'])}]"


def diff_cell(iv, kept):
    """A paired difference: its raw 95% interval, then * when Holm keeps it in its family, '(raw only)' when the
    raw interval excludes 0 but Holm does not keep it, or the largest effect the interval leaves possible."""
    text = cell(iv)
    if iv["lo"] is None:
        return text
    if kept:
        return text + " *"
    if iv["lo"] > 0 or iv["hi"] < 0:
        return text + " (raw only)"
    return text + f" (|d| > {num(max(abs(iv['lo']), abs(iv['hi'])))} excluded)"


def config_difference(config, base):
    config, base = meaningful(config), meaningful(base)
    keys = sorted(k for k in set(config) | set(base) if k not in NOT_THE_EXPERIMENT and config.get(k) != base.get(k))
    return ", ".join(f"{k}={config.get(k)}" for k in keys) or "(the baseline)"


def table(arms, metrics, cells):
    lines = ["| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(cells(m, a) for m in metrics) + " |" for a in arms]
    return lines + [""]


def holm_table(title, rows, metrics, ivs):
    """A table of paired differences, Holm-adjusted within it: ivs(metric, row) -> interval. Returns the
    markdown lines and the count (tested, raw, kept)."""
    keys = [(m, r) for r in rows for m in metrics]
    kept = dict(zip(keys, holm([ivs(m, r)["p"] for m, r in keys])))
    tested = sum(ivs(m, r)["p"] is not None for m, r in keys)
    raw = sum(ivs(m, r)["lo"] is not None and (ivs(m, r)["lo"] > 0 or ivs(m, r)["hi"] < 0) for m, r in keys)
    lines = [title, ""] + table(rows, metrics, lambda m, r: diff_cell(ivs(m, r), kept[(m, r)]))
    lines += [f"This table is one family: {tested} differences tested; at 5% about {0.05 * tested:.1f} would exclude 0 "
              f"by chance alone; {raw} do unadjusted; Holm keeps {sum(kept.values())} (*).", ""]
    return lines


def brief(results):
    """A few lines for the console: per arm, its seeds and the figures read first; results.md has the rest."""
    summary = results.get("summary", {})
    first = [m for m in (HEADLINE, "trigger strength", "trigger rate", "attacker final weight")
             if any(k.split(" (")[0] == m or k == m for k in summary)]
    lines = []
    for arm, v in results["arms"].items():
        figs = []
        for m in first:
            key = next(k for k in summary if k.split(" (")[0] == m or k == m)
            iv = summary[key].get(arm)
            if iv and iv.get("mean") is not None:
                figs.append(f"{key} {cell(iv)}")
        lines.append(f"{arm} (seeds {', '.join(map(str, v['seeds']))}): " + ("; ".join(figs) or "see results.md"))
    return "\n".join(lines)


def markdown(results):
    lines = ["# FedGAN evaluation", "", "Protocol: " + results["protocol_text"], ""]
    arms, summary = results["arms"], results.get("summary", {})
    if arms:
        base = results["baselines"][0] if results["baselines"] else next(iter(arms))
        lines += ["## Arms (runs that differ only by training seed)", "",
                  f"| arm | seeds | differs from {base} in |", "|---|---|---|"]
        lines += [f"| {a} | {', '.join(map(str, v['seeds']))} | {v['differs']} |" for a, v in arms.items()] + [""]
    for family, belongs in FAMILIES:
        metrics = [m for m in summary if belongs(m)]
        if metrics:
            lines += family_markdown(results, family, metrics)
    lad = results.get("ladder")
    if lad:
        figs = [m for m in lad["real"] if figure_of(m)[2] in ("overall", "class mean")]
        lines += ladder_markdown(lad, figs)
    if results.get("utility"):
        lines += utility_markdown(results["utility"])
    return "\n".join(lines)


def family_markdown(results, family, metrics):
    """One family's section: the arms' means, what the ladder says each figure sees, the real floor, the
    reference's own noise, and the paired differences (Holm within each table)."""
    arms, summary, lad = results["arms"], results["summary"], results.get("ladder")
    lines = [f"## {family}: mean [95% interval] over training seeds", ""]
    if " in shadow: " in metrics[0]:  # one column per detector; no differences (TPR is the attack's)
        names = list(dict.fromkeys(m.split(" in shadow: ")[0] for m in metrics))
        return lines + table(arms, names, lambda d, a: "; ".join(
            f"{k} {cell(summary[f'{d} in shadow: {k}'][a])}" for k in ("TPR", "FPR", "first flag")
            if f"{d} in shadow: {k}" in summary and summary[f"{d} in shadow: {k}"][a]["mean"] is not None))
    if direction_line(metrics):
        lines += [direction_line(metrics), ""]
    lines += table(arms, metrics, lambda m, a: cell(summary[m][a]))
    if lad and any(m in lad["verdict"] for m in metrics):
        blind = [f"{m}: {', '.join(k for k, v in lad['verdict'][m].items() if v != 'sees')}" for m in metrics
                 if m in lad["verdict"] and not ladder_passes(lad["verdict"], m)]
        lines += ["Metric ladder: " + ("every figure here sees every damage of the ladder." if not blind else
                                       "figures that do not see every damage (see the ladder table): " +
                                       "; ".join(blind) + "."), ""]
    floor = results.get("real_floor", {})
    if any(m in floor for m in metrics):
        lines += ["Real training images in place of synthetic ones (the floor at this reference size): " +
                  ", ".join(f"{m} {num(floor[m])}" for m in metrics if m in floor) + ".", ""]
    noise = results.get("reference_noise")
    if noise and any(m in noise["sd"] for m in metrics):
        lines += [f"Noise from the reference set alone (sd over {noise['bootstrap']} redraws of the held-out "
                  f"images, run {noise['run']}): " + ", ".join(f"{m} {num(noise['sd'][m])}" for m in metrics
                                                             if m in noise["sd"]) + ".", ""]
    for b, d in results.get("differences", {}).items():
        rows = [a for a in arms if a in d[metrics[0]]]
        lines += holm_table(f"Paired difference from **{b}** (arm minus {b} trained as many rounds, per training "
                            "seed; raw 95% interval):", rows, metrics, lambda m, a: d[m][a])
    lengths = results.get("lengths", {})
    if lengths:
        lines += holm_table("Longer minus shorter training of the same arm (paired by seed; raw 95% interval):",
                            list(lengths), metrics, lambda m, a: lengths[a][m])
    return lines


def utility_markdown(u):
    """The utility study's section: accuracy with and without synthetic images, and the paired differences."""
    lines = [f"## Utility: test accuracy of a {u['classifier']} classifier, mean [95% interval] "
             f"(real only, or + {u['n_synth']} synthetic images per class)", "", u["interval_text"], ""]
    cols = [(str(n) if used == [n] * len(used) else f"{n} (used {'/'.join(map(str, used))})")
            for n, used in zip(u["n_real"], u["n_real_used"])]
    head = ["| | " + " | ".join(f"n real = {c}" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += head + [f"| {name} | " + " | ".join(cell(iv) for iv in c) + " |" for name, c in u["curves"].items()]
    lines.append("")
    for b, d in u["differences"].items():
        rows = list(d)
        kept = holm([iv["p"] for name in rows for iv in d[name]])
        flat = {(name, i): k for (name, i), k in zip([(n, i) for n in rows for i in range(len(cols))], kept)}
        lines += [f"Paired difference in accuracy from **{b}** (raw 95% interval; * = Holm keeps it within this "
                  "table):", ""] + head
        lines += [f"| {name} | " + " | ".join(diff_cell(iv, flat[(name, i)]) for i, iv in enumerate(c)) + " |"
                  for name, c in d.items()]
        lines.append("")
    return lines


COLOURS = ["#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22"]


def svg_open(w, h):
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
            f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>']


def svg_axes(w, h, pad, xlabel, ylabel):
    """An SVG's opening, its two axes and their labels (a list of elements to append to)."""
    return svg_open(w, h) + [
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 14}" text-anchor="middle">{xlabel}</text>',
        f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">{ylabel}</text>']


def arms_svg(summary, arms, metrics, reference=None, panel=210, row=22, left=150, top=40):
    """A forest plot: one panel per metric, one row per arm, the mean as a dot and the 95% interval as
    a bar; the dashed line is the reference arm's mean."""
    arms = list(arms)
    w, h = left + panel * len(metrics) + 20, top + row * len(arms) + 40
    out = svg_open(w, h)
    for i, a in enumerate(arms):
        out.append(f'<text x="{left - 8}" y="{top + row * i + row / 2 + 4}" text-anchor="end">{a}</text>')
    for j, m in enumerate(metrics):
        x0p = left + panel * j + 10
        ivs = [summary[m][a] for a in arms]
        vals = [v for iv in ivs for v in (iv["mean"], iv["lo"], iv["hi"]) if v is not None]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        lo, hi = (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)) if hi > lo else (lo - 0.5, hi + 0.5)
        X = lambda v: x0p + (v - lo) / (hi - lo) * (panel - 20)  # noqa: E731
        out.append(f'<text x="{x0p + (panel - 20) / 2}" y="{top - 16}" text-anchor="middle">{m}</text>')
        out.append(f'<rect x="{x0p}" y="{top}" width="{panel - 20}" height="{row * len(arms)}" fill="none" '
                   f'stroke="#999999"/>')
        for v in (lo, hi):
            out.append(f'<text x="{X(v):.1f}" y="{top + row * len(arms) + 14}" text-anchor="middle" '
                       f'font-size="10">{num(v)}</text>')
        if reference in summary[m] and summary[m][reference]["mean"] is not None:
            xr = X(summary[m][reference]["mean"])
            out.append(f'<line x1="{xr:.1f}" y1="{top}" x2="{xr:.1f}" y2="{top + row * len(arms)}" stroke="#999999" '
                       f'stroke-dasharray="4 3"/>')
        for i, iv in enumerate(ivs):
            if iv["mean"] is None:
                continue
            y, col = top + row * i + row / 2, COLOURS[i % len(COLOURS)]
            if iv["lo"] is not None:
                out.append(f'<line x1="{X(iv["lo"]):.1f}" y1="{y}" x2="{X(iv["hi"]):.1f}" y2="{y}" stroke="{col}" '
                           f'stroke-width="2"/>')
            out.append(f'<circle cx="{X(iv["mean"]):.1f}" cy="{y}" r="4" fill="{col}"/>')
    out.append(f'<text x="{left}" y="{h - 8}" font-size="11">dot: mean over training seeds; bar: 95% t-interval; '
               f'dashed: {reference or "-"}</text>')
    return "\n".join(out + ["</svg>"])


def share_svg(curves, w=640, h=360, pad=56):
    """The attackers' share of the aggregate per round: per arm the mean over seeds (line) and the
    lowest to highest seed (band). curves: {arm: (seeds, rounds) array}."""
    rounds = max(c.shape[1] for c in curves.values())
    X = lambda r: pad + (r - 1) / max(1, rounds - 1) * (w - 2 * pad)   # noqa: E731
    Y = lambda v: h - pad - v * (h - 2 * pad)                          # noqa: E731
    out = svg_axes(w, h, pad, "round", "attackers' share of the aggregate")
    for v in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<text x="{pad - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for r in sorted({1, rounds, *range(0, rounds + 1, max(1, rounds // 5))} - {0}):
        out.append(f'<text x="{X(r):.1f}" y="{h - pad + 16}" text-anchor="middle">{r}</text>')
    for i, (arm, c) in enumerate(curves.items()):
        col, r = COLOURS[i % len(COLOURS)], np.arange(1, c.shape[1] + 1)
        band = [(X(a), Y(b)) for a, b in zip(r, c.max(0))] + [(X(a), Y(b)) for a, b in zip(r[::-1], c.min(0)[::-1])]
        out.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in band)}" fill="{col}" '
                   f'fill-opacity="0.15" stroke="none"/>')
        out.append(f'<polyline points="{" ".join(f"{X(a):.1f},{Y(b):.1f}" for a, b in zip(r, c.mean(0)))}" '
                   f'fill="none" stroke="{col}" stroke-width="2"/>')
        out.append(f'<text x="{w - pad - 150}" y="{pad + 16 * i}" fill="{col}">{arm} ({len(c)} seeds)</text>')
    return "\n".join(out + ["</svg>"])


def utility_svg(u, w=640, h=400, pad=56):
    """Accuracy against n real per class (log x axis), per curve the mean and its 95% interval as a band."""
    ns = u["n_real"]
    lx = [math.log10(n) for n in ns]
    x0, x1 = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1
    band = lambda c: [(iv["lo"] if iv["lo"] is not None else iv["mean"],  # noqa: E731
                       iv["hi"] if iv["hi"] is not None else iv["mean"]) for iv in c]
    allv = [v for c in u["curves"].values() for pair in band(c) for v in pair]
    y0, y1 = max(0.0, min(allv) - 0.02), min(1.0, max(allv) + 0.02)
    y1 = y1 if y1 > y0 else y0 + 0.1
    X = lambda v: pad + (v - x0) / (x1 - x0) * (w - 2 * pad)          # noqa: E731
    Y = lambda v: h - pad - (v - y0) / (y1 - y0) * (h - 2 * pad)      # noqa: E731
    out = svg_axes(w, h, pad, "real images per class (log scale)", "test accuracy")
    for n, v in zip(ns, lx):
        out.append(f'<text x="{X(v):.1f}" y="{h - pad + 16}" text-anchor="middle">{n}</text>')
    for k in range(6):
        v = y0 + (y1 - y0) * k / 5
        out.append(f'<text x="{pad - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for i, (name, c) in enumerate(u["curves"].items()):
        col, b = COLOURS[i % len(COLOURS)], band(c)
        pts = [(X(v), Y(hi)) for v, (lo, hi) in zip(lx, b)] + [(X(v), Y(lo)) for v, (lo, hi) in zip(lx, b)][::-1]
        out.append(f'<polygon points="{" ".join(f"{a:.1f},{y:.1f}" for a, y in pts)}" fill="{col}" '
                   f'fill-opacity="0.15" stroke="none"/>')
        line = " ".join(f"{X(v):.1f},{Y(iv['mean']):.1f}" for v, iv in zip(lx, c))
        out.append(f'<polyline points="{line}" fill="none" stroke="{col}" stroke-width="2"/>')
        out.append(f'<text x="{w - pad - 150}" y="{pad + 16 * i}" fill="{col}">{name}</text>')
    return "\n".join(out + ["</svg>"])


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def load_run(folder, data_root, device):
    """(Config, its settings as a dict with every field, generator) of a finished run folder; the dict has
    the defaults of fields newer than the run, so old and new runs of one experiment group together."""
    folder = Path(folder)
    holder = fedgan.folder_in_use(folder)
    if holder:
        raise EvalError(f"{folder} is still training ({holder} holds it); score it when that run ends")
    if not (folder / "generator.pt").exists() or not (folder / "config.json").exists():
        raise EvalError(f"{folder} is not a finished fedgan run (needs config.json and generator.pt); "
                        "train one with python fedgan.py --out DIR, or give an .npz of images")
    try:
        cfg = fedgan.config_from_json(json.loads((folder / "config.json").read_text()), folder / "config.json")
    except ValueError:
        raise EvalError(f"{folder}/config.json is not valid JSON; restore it from the run")
    raw = dataclasses.asdict(cfg)
    if data_root:
        cfg.data_root = data_root
    try:
        g = fedgan.load_generator(folder / "generator.pt", map_location=device)
        made_at = torch.load(folder / "generator.pt", map_location="cpu", weights_only=True).get("rounds")
    except Exception as e:
        raise EvalError(f"cannot read {folder}/generator.pt ({type(e).__name__}); it is damaged: train the run again "
                        f"or resume it (python fedgan.py --resume {folder})")
    if made_at is not None and made_at != cfg.rounds:
        raise EvalError(f"{folder}/generator.pt is from round {made_at} but the run is set to {cfg.rounds} rounds: it "
                        f"is being extended or was stopped; finish it (python fedgan.py --resume {folder}) first")
    return cfg, raw, g.to(device)


def recorded_fingerprint(folder):
    """The data fingerprint config.json recorded when the run trained (None for older runs)."""
    try:
        return (json.loads((Path(folder) / "config.json").read_text()).get("data") or {}).get("fingerprint")
    except (OSError, ValueError):
        return None


def native_channels(root):
    """1 or 3: whether the data at root (an .npz or a class-per-folder tree) is gray or colour, from its first
    image; None when that cannot be told (fedgan's data loading then says what is wrong)."""
    root = Path(root)
    try:
        if root.is_file():
            im = np.load(root, mmap_mode="r")["train_images"]
            return 3 if im.ndim == 4 and im.shape[-1] in (3, 4) else 1
        from PIL import Image
        first = next(p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in fedgan.image_ext())
        with Image.open(first) as im:
            return 1 if im.mode in ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F") else 3
    except Exception:
        return None


def load_images(path, a):
    """(Config, settings dict, ImageSet) of an .npz of generated images: `images` (n, H, W[, C]) or (n, C, H, W),
    any common dtype, and `labels` (n,) ints. Its reference is the held-out split of --data-root at the
    images' size (the embedded synthetic set when --data-root is not given)."""
    path = Path(path)
    z, _ = fedgan.open_npz(path, ("images", "labels"), "save np.savez(path, images=..., labels=...)")
    raw = fedgan.npz_images(z["images"], f"{path}: images")
    x = torch.from_numpy(np.ascontiguousarray(fedgan.to_uint8_images(raw, f"{path}: images")[0])).permute(0, 3, 1, 2)
    y = torch.from_numpy(fedgan.npz_labels(z["labels"], len(x), f"{path}: labels"))
    size, channels = x.shape[-1], x.shape[1]
    if x.shape[-2] != size:
        raise EvalError(f"{path}: images are {x.shape[-2]}x{size}; give square images")
    if size < 16 or size > 256 or size & (size - 1):  # MedMNIST's 28 px, say: to the next size fedgan trains at
        fit = min(256, max(16, 1 << (size - 1).bit_length()))
        print(f"{path.name}: {size} px images resized to {fit} px (fedgan's sizes are the powers of two 16..256)")
        x, size = fedgan.resize_uint8(x, fit), fit
    native = native_channels(a.data_root) if a.data_root else None
    if native and native != channels:  # scoring against the same images in another colour model compares nothing
        kind = {1: "gray", 3: "RGB"}
        raise EvalError(f"{path} holds {kind[channels]} images but --data-root {a.data_root} is {kind[native]}; give "
                        "the data the images were generated for")
    dataset = a.dataset or ("synthetic" if not a.data_root else "chestx" if channels == 1 else "isic")
    cfg = fedgan.Config(dataset=dataset, data_root=a.data_root, img_size=size, channels=channels, rounds=1)
    fedgan.finalize(cfg)
    n_classes = int(y.max()) + 1 if len(y) else 0
    raw_cfg = dict(dataclasses.asdict(cfg), images=path.stem)  # each file its own arm
    return cfg, raw_cfg, ImageSet(x, y, n_classes)


def data_key(cfg):
    return (cfg.dataset, cfg.data_root, cfg.img_size, cfg.channels, cfg.seed if cfg.dataset == "synthetic" else 0,
            cfg.synthetic_per_class, cfg.test_frac)


METRICS = ("lpips", "fid", "kid", "pr", "trigger", "utility")
SMALL_REFERENCE = 50  # reference images per class below which results.md warns about the distribution figures
OUTPUTS = {"results.json", "results.md", "arms.svg", "attacker_share.svg", "utility.svg", "samples.png"}  # in --out


def wanted(measure, metrics):
    """Is a domain measure (fid, kid, precision, recall) among the --metrics asked for?"""
    return {"precision": "pr", "recall": "pr"}.get(measure, measure) in metrics


def build_parser():
    p = fedgan._Parser(prog="eval.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders written by fedgan.py, or .npz files of generated images "
                   "(arrays 'images' and 'labels'); runs whose configs differ only by the seed form one arm, named by "
                   "the folders' name without its _s<seed> suffix")
    p.add_argument("--ladder", metavar="DATA_ROOT", default=None,
                   help="score known damage of real images instead of runs: which figure sees which damage (a data "
                   "root, or 'synthetic' for the embedded set); with --img-size, --channels")
    p.add_argument("--out", default="eval_out", help="where results.json, results.md and the SVG plots go")
    p.add_argument("--force", action="store_true", help="overwrite the results already in --out")
    p.add_argument("--metrics", default=None,
                   help="comma list of lpips, fid, kid, pr (precision/recall), trigger (strength and rate), utility "
                        "(default: all of them, LPIPS only where its weights are at hand: --weights-dir or the torch "
                        "cache)")
    p.add_argument("--baseline", default=None, help="comma list of arms every other arm is compared with, seed by "
                   "seed (e.g. vanilla,attack64); none by default")
    p.add_argument("--n-real", default="1,5,10,50,100,200,500", help="real images per class in the utility study")
    p.add_argument("--n-synth", type=int, default=1000, help="synthetic images per class (utility and FID)")
    p.add_argument("--seeds", type=int, default=5, help="classifier seeds of the utility study (per generator)")
    p.add_argument("--classifier", default="small", choices=["densenet121", "small"],
                   help="utility classifier: a CPU-sized CNN, or the paper's DenseNet-121 (random init; 32 px or more)")
    p.add_argument("--epochs", type=int, default=20, help="classifier epochs (paper: 20)")
    p.add_argument("--match-steps", action="store_true", help="utility: train the real-only classifier for as many "
                   "optimizer steps as the ones with synthetic images (more epochs), so that extra images are not "
                   "confused with extra training")
    p.add_argument("--fid-epochs", type=int, default=10, help="epochs of the domain-feature classifier")
    p.add_argument("--pairs", type=int, default=1000, help="LPIPS: random (synthetic, real) pairs per class")
    p.add_argument("--weights-dir", default=None, help=f"folder with {ALEXNET_FILE} and {LPIPS_FILE} (offline)")
    p.add_argument("--data-root", default=None, help="override every run's data location; the reference of .npz "
                   "inputs")
    p.add_argument("--dataset", default=None, choices=["synthetic", "chestx", "isic"],
                   help=".npz inputs and --ladder: which data the reference is (class names, folder layout); by "
                   "default synthetic without --data-root, else chestx for gray and isic for RGB")
    p.add_argument("--img-size", type=int, default=32, help="--ladder: resolution of the real images")
    p.add_argument("--channels", type=int, default=1, choices=[1, 3], help="--ladder: 1 gray or 3 RGB")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the networks run")
    p.add_argument("--seed", type=int, default=0, help="seeds LPIPS pairs, synthetic latents, feature classifier")
    return p


def parse_args(argv):
    a = build_parser().parse_args(argv)
    if bool(a.runs) == bool(a.ladder):
        raise EvalError("give run folders (or .npz files) to score, or --ladder DATA_ROOT, not both"
                        if a.runs else "nothing to score: give run folders, .npz files or --ladder DATA_ROOT")
    if a.ladder:
        a.data_root = None if a.ladder == "synthetic" else a.ladder
    if a.data_root and not Path(a.data_root).exists():
        raise EvalError(f"--data-root {a.data_root} does not exist; give the folder or .npz the runs trained on"
                        if not a.ladder else f"--ladder {a.ladder}: no such file or folder; give a data folder, an "
                        ".npz, or 'synthetic'")
    if a.metrics is None:  # everything a newcomer's machine can compute offline, and one line for what it cannot
        a.metrics = ["lpips", "fid", "kid", "pr", "trigger", "utility"]
        if not a.ladder and not lpips_at_hand(a.weights_dir):
            a.metrics.remove("lpips")
            print(f"LPIPS skipped: its AlexNet weights are not at hand (give --weights-dir with {ALEXNET_FILE} and "
                  f"{LPIPS_FILE})")
    else:
        a.metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    bad = set(a.metrics) - set(METRICS)
    if bad or not a.metrics:
        raise EvalError(f"--metrics {','.join(sorted(bad)) or '(empty)'} unknown; choose from {', '.join(METRICS)}")
    a.baseline = [b.strip() for b in (a.baseline or "").split(",") if b.strip()]
    try:
        a.n_real = [int(n) for n in a.n_real.split(",")]
    except ValueError:
        raise EvalError(f"--n-real {a.n_real!r} must be a comma-separated list of positive integers")
    for name, value, lo in [("--n-real", min(a.n_real), 1), ("--n-synth", a.n_synth, 2), ("--seeds", a.seeds, 1),
                            ("--epochs", a.epochs, 1), ("--fid-epochs", a.fid_epochs, 1), ("--pairs", a.pairs, 1)]:
        if value < lo:
            raise EvalError(f"{name} {value} must be at least {lo}")
    if not 0 <= a.seed < 2 ** 32:
        raise EvalError(f"--seed {a.seed} must lie in [0, 2^32)")
    check_out(Path(a.out), a.force)
    return a


def check_out(out, force):
    """Before any work: --out must be a folder we may write, and not hold results unless --force."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and (out / "results.json").exists() and not force:
        raise EvalError(f"--out {out} already holds results; pass --force to overwrite or choose another folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise EvalError(f"--out {out}: cannot write under {parent}; choose a folder you can write")


def load_data(cfg):
    try:
        return fedgan.data_of(cfg)
    except fedgan.FedGANError as e:
        raise EvalError(str(e))


def load_runs(a, device):
    """{run name: dict(cfg, config, g, data, folder)}; the name is the folder's (or file's stem), or its path
    when two share one. Runs of one evaluation must share their data: one table across datasets, sizes or
    channels would compare figures measured against different references."""
    runs, datasets = {}, {}
    base = [Path(f).stem if str(f).endswith(".npz") else Path(f).name for f in a.runs]
    if len(set(map(str, map(Path, a.runs)))) < len(a.runs):
        raise EvalError("a run folder is given twice; pass each once")
    for folder, name in zip(a.runs, base):
        if str(folder).endswith(".npz"):
            cfg, raw, g = load_images(folder, a)
        else:
            cfg, raw, g = load_run(folder, a.data_root, device)
            g = g.eval()
        key = data_key(cfg)
        if key not in datasets:
            datasets[key] = load_data(cfg)
        saved = None if isinstance(g, ImageSet) else recorded_fingerprint(folder)
        if saved and saved != fedgan.data_fingerprint(datasets[key]):
            raise EvalError(f"the data at {cfg.data_root} is not the data {folder} trained on (fingerprints differ); "
                            "pass --data-root to that run's data")
        if isinstance(g, ImageSet) and g.n_classes > len(datasets[key].classes):
            raise EvalError(f"{folder} has labels up to {g.n_classes - 1} but its reference has "
                            f"{len(datasets[key].classes)} classes; label the images 0..{len(datasets[key].classes) - 1}")
        runs[name if base.count(name) == 1 else str(folder)] = dict(cfg=cfg, config=raw, g=g, data=datasets[key],
                                                                    folder=folder)
    kinds = {k[:4] for k in datasets}  # the synthetic set is made from each run's seed: one kind, many draws
    if len(kinds) > 1:
        which = sorted({f"{k[0]} {k[1] or ''} {k[2]} px {k[3]} ch".replace("  ", " ") for k in kinds})
        raise EvalError(f"the runs use different data ({'; '.join(which)}); evaluate one dataset, size and channel "
                        "count at a time")
    return runs


def protocol_text(a, test_counts):
    return " ".join(
        [f"Reference real images: the held-out test split ({test_counts}); every arm is compared with the same "
         "images, so their sampling noise largely cancels in the paired differences."] +
        [f"LPIPS: per class, mean over {a.pairs} random (synthetic, real held-out test) pairs of that class, "
         f"seed {a.seed}."] * ("lpips" in a.metrics) +
        [f"Three feature spaces, {a.n_synth} synthetic images per class: 'deep' = per channel, the spatial mean and sd "
         f"of the four pre-activation conv maps of a small CNN trained {a.fid_epochs} epochs on the real training "
         "split, each dimension z-scored on the reference (the space the metric ladder below validates); plain = that "
         "CNN's 128-d penultimate layer; 'pixel' = every image average-pooled to 8x8. FID is biased upwards at this "
         "reference size (see the real floor); KID (x1000) is unbiased; precision/recall use k = 3 nearest "
         "neighbours on equal-size seeded subsets; 'overall' compares the same class mix, 'class mean' averages the "
         "per-class figures."] * bool({"fid", "kid", "pr"} & set(a.metrics)) +
        ["Trigger strength: at each corner, the place minus its own surround, projected on the trigger, less the "
         "same in real images; the trigger's corner less the median of the other three (0 = as real images, or a "
         "generator that departs from them alike at every corner; 1 = the trigger pasted; a uniform change of "
         "brightness cannot move it); trigger rate: the share of images above the real images' 99th percentile of "
         "that score at the trigger's corner, less the same share at the other corners (their median; n/a where that "
         "share exceeds 1/4: the images then depart from real ones everywhere); both can fall a little below 0 by "
         "chance (fedgan.trigger_figures, the run's closing line too)."] * ("trigger" in a.metrics) +
        ["Intervals: mean over training seeds ± t(0.975, n-1) x sd / sqrt(n) (Student's t); a paired difference "
         "takes the two arms' runs with the same seed; * marks a difference that Holm's procedure keeps at 5% "
         "within its table (the family), with each table's count of tested cells."])


def domain_reference(data, n_classes, a, device, say):
    """The domain classifier trained on the real training split and the held-out Reference."""
    say(f"training the domain-feature classifier on {len(data.train[1])} real images")
    net = train_classifier(*data.train, n_classes, "small", a.fid_epochs, a.seed, device)
    return Reference(*data.test, n_classes, net, device)


def run_ladder(a):
    """--ladder DATA_ROOT: the ladder alone, on the real images of a data root."""
    device = fedgan.pick_device(a.device)
    t0 = time.time()
    say = lambda msg: print(f"[eval {time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    cfg = fedgan.Config(dataset=a.dataset or ("synthetic" if not a.data_root else "chestx" if a.channels == 1
                                              else "isic"), data_root=a.data_root, img_size=a.img_size,
                        channels=a.channels, rounds=1)
    try:
        fedgan.finalize(cfg)
    except fedgan.FedGANError as e:
        raise EvalError(str(e))
    data = load_data(cfg)
    n_classes = len(data.classes)
    ref = domain_reference(data, n_classes, a, device, say)
    rx, ry = sample_per_class(*data.train, a.n_synth, n_classes, a.seed)
    say(f"ladder: {len(ry)} real training images against the {len(ref.y)} held-out ones, {len(LADDER)} damages x 3")
    counts = ", ".join(f"{int((ref.y == c).sum())} {cn}" for c, cn in enumerate(data.classes))
    text = (f"{cfg.dataset} {a.data_root or ''} at {cfg.img_size} px, {cfg.channels} channel(s); reference: the held-out "
            f"split ({counts}); the real set: {len(ry)} training images (up to {a.n_synth} per class); domain CNN "
            f"{a.fid_epochs} epochs; seed {a.seed}.")
    return dict(classes=data.classes, protocol_text=text, ladder=ladder(ref, rx, ry, a.seed, data.classes, say))


def evaluate(a):
    device = fedgan.pick_device(a.device)
    t0 = time.time()
    say = lambda msg: print(f"[eval {time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    features = lin = None
    if "lpips" in a.metrics:  # fail on missing weights before any work is done
        alex, lin = lpips_weights(a.weights_dir)
        features = alexnet_features(alex)
        features.layers.to(device)
    runs = load_runs(a, device)
    arms = group_arms({n: r["config"] for n, r in runs.items()})
    missing = [b for b in a.baseline if b not in arms]
    if missing:
        raise EvalError(f"--baseline {','.join(missing)} is not an arm here; the arms are {', '.join(arms)}")
    seed_of = {n: r["cfg"].seed for n, r in runs.items()}
    first = next(iter(runs.values()))
    data, n_classes = first["data"], len(first["data"].classes)
    test_counts = reference_counts(data, a.metrics, say)
    a.n_synth = synthetic_count(a.n_synth, runs, n_classes, say)
    ref_cfg = runs[arms[a.baseline[0]][0]]["config"] if a.baseline else first["config"]
    results = dict(classes=data.classes, runs={}, baselines=a.baseline, protocol_text=protocol_text(a, test_counts),
                   arms={label: dict(runs=names, seeds=[seed_of[n] for n in names],
                                     differs=config_difference(runs[names[0]]["config"], ref_cfg))
                         for label, names in arms.items()})
    specs = trigger_specs([r["cfg"] for r in runs.values()])
    if "trigger" in a.metrics and not specs:
        say("no trigger table: none of these runs trained with the patch attack (--poison SIZE), so there is no "
            "trigger to look for")
    refs, floors = domain_references(a, runs, n_classes, results, device, say)
    noise_run = arms[a.baseline[0]][0] if a.baseline else next(iter(runs))
    t_runs = time.time()
    for i, (name, r) in enumerate(runs.items()):
        if i:  # this phase's pace so far: the time left for the rest of the runs
            say(f"scored {i}/{len(runs)} runs, ~{(time.time() - t_runs) / i * (len(runs) - i) / 60:.1f} min left")
        res = results["runs"].setdefault(name, {})
        res.update(score_run(a, name, r, refs, specs, (features, lin), name == noise_run, results, device, say))
    if len(floors) == 1:  # one dataset: its real floor, under the same metric names
        floor_res = next(iter(floors.values()))
        if "trigger" in a.metrics and specs:
            size = specs[0]
            trig = fedgan.make_trigger(size, first["cfg"].channels, seed=first["cfg"].seed)
            margin = fedgan.trigger_margin(first["cfg"].img_size)
            floor_res["trigger"] = {str(size): trigger_figures(data.train[0], trig, margin, data.test[0])}
        results["real_floor"] = scalar_metrics(floor_res, data.classes)
    configs = {label: runs[names[0]]["config"] for label, names in arms.items()}
    results["summary"], results["differences"], results["lengths"] = summarize_arms(results, arms, configs, seed_of,
                                                                                    a.baseline)
    results["attacker_share"] = {label: [results["runs"][n]["detection"]["attacker_share"] for n in names]
                                 for label, names in arms.items()
                                 if all(results["runs"][n].get("detection", {}).get("attacker_share") and
                                        None not in results["runs"][n]["detection"]["attacker_share"] for n in names)}
    if "utility" in a.metrics:
        results["utility"] = utility_study(a, runs, arms, configs, seed_of, n_classes, device, say)
    results["sheet"] = contact_sheet(data, runs, arms, n_classes, a.seed)
    return results


def reference_counts(data, metrics, say):
    """The held-out set's images per class, for the protocol line, with a warning where a class is too small
    for the per-class distribution figures."""
    ty, classes = data.test[1], data.classes
    counts = ", ".join(f"{int((ty == c).sum())} {cn}" for c, cn in enumerate(classes))
    fewest = min(int((ty == c).sum()) for c in range(len(classes)))
    if fewest < SMALL_REFERENCE and {"fid", "kid", "pr"} & set(metrics):
        counts += (f"; WARNING: {fewest} images in its smallest class, too few for per-class FID, KID and "
                   f"precision/recall (their noise dwarfs differences; {SMALL_REFERENCE}+ per class is a floor)")
        say(f"WARNING: the reference holds {fewest} images in its smallest class: per-class FID, KID and "
            "precision/recall are mostly noise at that size")
    return counts


def synthetic_count(n_synth, runs, n_classes, say):
    """Synthetic images per class: --n-synth, or fewer when an .npz input holds fewer (an image file gives
    what it holds, and every input is scored on as many images per class)."""
    sets = [r["g"] for r in runs.values() if isinstance(r["g"], ImageSet)]
    if not sets:
        return n_synth
    least = min(n_synth, *(int((s.y == c).sum()) for s in sets for c in range(n_classes)))
    if least < 2:
        raise EvalError("an .npz holds fewer than 2 images of some class; give at least 2 per class")
    if least < n_synth:
        say(f"the .npz inputs hold {least} images of their smallest class: {least} per class for every input")
    return least


def domain_references(a, runs, n_classes, results, device, say):
    """Per data set the runs trained on: the reference features of its held-out images and its real floor
    (as many real training images as synthetic ones, scored in the generator's place); the metric ladder
    once, in results. -> ({data key: reference}, {data key: floor figures}); empty without fid, kid, pr."""
    refs, floors = {}, {}
    for key in dict.fromkeys(data_key(r["cfg"]) for r in runs.values()) if {"fid", "kid", "pr"} & set(a.metrics) \
            else []:
        d = next(r["data"] for r in runs.values() if data_key(r["cfg"]) == key)
        refs[key] = domain_reference(d, n_classes, a, device, say)
        fx, fy = sample_per_class(*d.train, a.n_synth, n_classes, a.seed)
        fl = fidelity(refs[key], fx, fy, a.seed)
        floors[key] = {m: v for m, v in fl.items() if m in SPACES or wanted(m, a.metrics)}
        for sp in ("pixel", "deep"):
            floors[key][sp] = {m: v for m, v in fl[sp].items() if wanted(m, a.metrics)}
        if "ladder" not in results:
            say("the metric ladder: the floor's real images under known damage")
            results["ladder"] = ladder(refs[key], fx, fy, a.seed, d.classes, say)
    return refs, floors


def score_run(a, name, r, refs, specs, lpips_net, noise_run, results, device, say):
    """One run's figures: LPIPS per class, fidelity in the three feature spaces, the trigger, detection
    (not for an image file). noise_run: also bootstrap the reference's own noise into results."""
    res, (tx, ty), n_classes = {}, r["data"].test, len(r["data"].classes)
    if "lpips" in a.metrics:
        say(f"{name}: LPIPS, {a.pairs} pairs per class")
        res["lpips"] = {str(c): v for c, v in lpips_per_class(r["g"], tx, ty, n_classes, *lpips_net, a.pairs,
                                                               a.seed, device).items()}
    if refs:
        say(f"{name}: fidelity in three feature spaces")
        dm = domain_scores(refs[data_key(r["cfg"])], r["g"], a.n_synth, a.seed, bootstrap=30 if noise_run else 0)
        if "reference_sd" in dm:  # what the reference set's size alone does to each figure, for one run
            sd = dm.pop("reference_sd")
            sd = dict({m: v for m, v in sd.items() if wanted(m, a.metrics)},
                      **{sp: {m: v for m, v in sd[sp].items() if wanted(m, a.metrics)} for sp in ("pixel", "deep")})
            results["reference_noise"] = dict(run=name, bootstrap=30, sd=scalar_metrics(sd, r["data"].classes))
        res.update({m: dm[m] for m in dm if wanted(m, a.metrics)})
        for sp in ("pixel", "deep"):
            res[sp] = {m: v for m, v in dm[sp].items() if wanted(m, a.metrics)}
    if "trigger" in a.metrics and (specs or r["cfg"].poison > 0):
        res["trigger"] = backdoor_metrics(r["g"], r["cfg"], specs, tx, a.seed + 12345, per_class=256)
    if not isinstance(r["g"], ImageSet):
        res["detection"] = detection_metrics(r["folder"], r["cfg"], say)
    return res


def contact_sheet(data, runs, arms, n_classes, seed):
    """samples.png's rows: real held-out images, then each arm's first run, the same latents for every arm."""
    labels = torch.arange(n_classes).repeat_interleave(8)
    hx, hy = data.test
    real = sample_per_class(hx, hy, 8, n_classes, seed)[0] if all((hy == c).sum() >= 8 for c in range(n_classes)) \
        else None
    return ([("real (held out)", real)] if real is not None else []) + [
        (arm, draw(runs[names[0]]["g"], labels, seed + 777)) for arm, names in arms.items()]


def utility_study(a, runs, arms, configs, seed_of, n_classes, device, say):
    """Accuracy on the balanced test set of classifiers trained on n real images per class, alone or
    with n_synth synthetic images per class from each generator. Classifier seed k (0..a.seeds-1) draws
    the real subset, the synthetic latents and the classifier's init; every generator meets the same k.
    Runs on data made from their seed (the synthetic sets) each meet the real-only classifiers of their data."""
    datas = {}
    for n, r in runs.items():
        datas.setdefault(data_key(r["cfg"]), r["data"])
    key_of = {n: data_key(r["cfg"]) for n, r in runs.items()}
    tests = utility_tests(datas, n_classes, a.classifier)
    real, acc = utility_accuracies(a, runs, datas, key_of, tests, n_classes, device, say)
    S, N = a.seeds, len(a.n_real)
    # what each n means in fact: a class with fewer real training images gives all it has
    ry0 = next(iter(datas.values())).train[1]
    used = [[min(n, int((ry0 == c).sum())) for c in range(n_classes)] for n in a.n_real]

    def over(per):  # per: one (N, S) array per run; interval over runs, or over k for a single run
        if len(per) > 1:
            return [interval([p[i].mean() for p in per]) for i in range(N)]
        return [interval(per[0][i]) for i in range(N)]

    curves = {"real only": over(list(real.values()))}
    curves.update({f"+ {arm}": over([acc[n] for n in names]) for arm, names in arms.items()})
    diffs = {"real only": {f"+ {arm}": over([acc[n] - real[key_of[n]] for n in names]) for arm, names in arms.items()}}
    for b in a.baseline:
        diffs[b] = {}
        for arm, names in arms.items():
            x = baseline_for(arm, b, configs)
            if x is None:
                continue
            base = {seed_of[n]: n for n in arms[x]}
            diffs[b][f"+ {arm}"] = over([acc[n] - acc[base[seed_of[n]]] for n in names if seed_of[n] in base])
    text = (f"Classifier seeds 0..{S - 1} each draw the real subset, the synthetic latents and the classifier's init, "
            f"the same for every generator. " + ("'real only' trains for as many optimizer steps as the others "
                                                 "(--match-steps). " if a.match_steps else
                                                 f"Every classifier trains {a.epochs} epochs, so 'real only' takes "
                                                 "fewer optimizer steps (see --match-steps). ") + f"'real only': 95% interval over the {S} classifier seeds"
            + (f" (over the {len(datas)} datasets made from the training seeds)" if len(datas) > 1 else "") +
            "; an arm: over its training seeds, each the mean over the classifier seeds (over the classifier seeds "
            "for an arm of one run); differences are paired by classifier seed and training seed.")
    return dict(classifier=a.classifier, seeds=S, n_synth=a.n_synth, n_real=a.n_real, n_real_used=used,
                test_images=len(next(iter(tests.values()))[1]), interval_text=text, curves=curves, differences=diffs,
                accuracy={**{f"real only {i}": v.tolist() for i, v in enumerate(real.values())},
                          **{n: v.tolist() for n, v in acc.items()}})


def utility_tests(datas, n_classes, classifier):
    """The balanced test set of each data set ({key: (x, y)}), refused where a class is missing from it or
    the images are too small for the classifier."""
    tests = {}
    for key, data in datas.items():
        tests[key] = balanced(*data.test, n_classes)
        if len(tests[key][1]) == 0:
            missing = [data.classes[c] for c in range(n_classes) if not (data.test[1] == c).any()]
            raise EvalError(f"the held-out split has no image of class {', '.join(missing)}; the utility study tests "
                            "on every class: give data whose test split holds them all")
    size = next(iter(datas.values())).train[0].shape[-1]
    if classifier == "densenet121" and size < 32:  # its five poolings leave nothing of a smaller image
        raise EvalError(f"--classifier densenet121 needs images of 32 px or more, these are {size} px; use "
                        "--classifier small")
    return tests


def utility_accuracies(a, runs, datas, key_of, tests, n_classes, device, say):
    """Every classifier trained and tested: ({data key: (N, S) real-only accuracies}, {run: (N, S)
    accuracies with its synthetic images}), N sizes of the real subset, S classifier seeds."""
    S, N = a.seeds, len(a.n_real)
    real = {key: np.zeros((N, S)) for key in datas}
    acc = {n: np.zeros((N, S)) for n in runs}
    total, done, t_start = N * S * (len(runs) + len(datas)), 0, time.time()
    for k in range(S):
        synth = {n: synthesize(r["g"], a.n_synth, n_classes, 1000 + k) for n, r in runs.items()}
        for i, n_real in enumerate(a.n_real):
            for key, data in datas.items():
                xr, yr = sample_per_class(*data.train, n_real, n_classes, k)
                for name in [None, *[n for n in runs if key_of[n] == key]]:
                    x, y = (xr, yr) if name is None else (torch.cat([xr, synth[name][0]]),
                                                          torch.cat([yr, synth[name][1]]))
                    epochs = a.epochs
                    if name is None and a.match_steps:  # as many optimizer steps as with the synthetic images
                        epochs = a.epochs * steps_per_epoch(len(xr) + n_classes * a.n_synth) // steps_per_epoch(len(xr))
                    net = train_classifier(x, y, n_classes, a.classifier, epochs, k, device)
                    row = real[key][i] if name is None else acc[name][i]
                    row[k] = accuracy(net, *tests[key], device)
                    done += 1
                    left = (time.time() - t_start) / done * (total - done)
                    say(f"utility {done}/{total}: n_real {n_real}, seed {k}, {name or 'real only'}: acc {row[k]:.3f} "
                        f"(~{left / 60:.1f} min left)")
    return real, acc


def sample_sheet(rows, n_classes, per_class=8, scale=2):
    """A PIL image of labelled blocks, one per (label, uint8 images (n_classes * per_class, C, S, S)): one row
    per class, the same latents in every block, so arms can be compared image by image."""
    from PIL import Image, ImageDraw
    s = rows[0][1].shape[-1] * scale
    left, gap = 110, 6
    sheet = Image.new("RGB", (left + per_class * s, len(rows) * (n_classes * s + gap)), "white")
    pen = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(rows):
        top = i * (n_classes * s + gap)
        big = img.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        sheet.paste(fedgan.grid_image(big, n_classes).convert("RGB"), (left, top))
        pen.text((4, top + n_classes * s // 2 - 6), label, fill="black")
    return sheet


def forest_metrics(summary):
    """The figures worth a panel in arms.svg, in this order, where present."""
    keys = [HEADLINE, "deep KID x1000 (class mean)", "deep precision (class mean)", "deep recall (class mean)"]
    keys += [m for m in summary if m.startswith("trigger strength")] + ["attacker final weight"]
    return [m for m in keys if m in summary and any(iv["mean"] is not None for iv in summary[m].values())]


def main(argv=None):
    try:
        a = parse_args(argv)
        results = run_ladder(a) if a.ladder else evaluate(a)
        sheet = results.pop("sheet", None)
    except (EvalError, fedgan.FedGANError) as e:
        sys.stderr.write(f"eval.py: error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("eval.py: stopped by Ctrl-C; nothing was written (evaluations are not resumable: run it "
                         "again)\n")
        sys.exit(130)
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.stderr.write(f"eval.py: error: cannot create {out} ({e.strerror}); results not written\n")
        sys.exit(2)
    written = ["results.json", "results.md"]
    (out / "results.json").write_text(json.dumps(fedgan.json_safe(results), indent=2))
    if a.ladder:
        text = "\n".join(["# The metric ladder", "", "Data: " + results["protocol_text"], ""] +
                         ladder_markdown(results["ladder"]))
        (out / "results.md").write_text(text)
        for stale in OUTPUTS - set(written):
            (out / stale).unlink(missing_ok=True)
        print(text)
        print("wrote " + ", ".join(f"{out}/{f}" for f in written))
        return
    (out / "results.md").write_text(markdown(results))
    panels = forest_metrics(results["summary"])
    if panels:
        reference = results["baselines"][0] if results["baselines"] else None
        (out / "arms.svg").write_text(arms_svg(results["summary"], results["arms"], panels, reference))
        written.append("arms.svg")
    if results["attacker_share"]:
        (out / "attacker_share.svg").write_text(share_svg({k: np.array(v) for k, v in results["attacker_share"].items()}))
        written.append("attacker_share.svg")
    if "utility" in results:
        (out / "utility.svg").write_text(utility_svg(results["utility"]))
        written.append("utility.svg")
    if sheet:
        sample_sheet(sheet, len(results["classes"])).save(out / "samples.png")
        written.append("samples.png")
    for stale in OUTPUTS - set(written):  # an earlier evaluation's figures do not stay beside these
        (out / stale).unlink(missing_ok=True)
    print(brief(results))
    print("wrote " + ", ".join(f"{out}/{f}" for f in written) + f" (every table: {out}/results.md)")


if __name__ == "__main__":
    main()
