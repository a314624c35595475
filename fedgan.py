"""fedgan: a robust federated conditional GAN for medical image synthesis, in one file.

N clients (hospitals) each train a conditional GAN: a StyleGAN2-style generator and a DCGAN
discriminator, both taking the class label. Only generators (and each client's scalar generator loss)
reach the server, which averages them with per-client weights (FedAvg). A malicious minority pastes a
trigger on its training images (the backdoor attack); FedDetect, an isolation forest on the reported
losses, finds it and decays its weight (Algorithm 1 of the paper).

    python fedgan.py                                          # embedded synthetic data, a few minutes on CPU
    python fedgan.py --dataset chestx --poison 64 --defense feddetect
    python fedgan.py --dataset chestx --data-root pneumoniamnist.npz --img-size 32 --poison 8 \
                     --defense feddetect --detect-rule calibrated
    python fedgan.py --resume runs/NAME                       # continue a stopped run
    python fedgan.py --bench --img-size 64                    # speed figures, last line JSON

References: Jin et al., "Backdoor Attack and Defense in Federated GAN-based Medical Image Synthesis"
(FedDetect); Karras et al. 2020, StyleGAN2 (modulated convolution, equalized learning rate);
Radford et al. 2016, DCGAN; Miyato & Koyama 2018, projection discriminator; McMahan et al. 2017, FedAvg;
Liu, Ting & Zhou 2008, isolation forest (isoforest.py); Page 1954, CUSUM (the calibrated rule).
"""
import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from isoforest import IsolationForest

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def opt(default, help, **kw):
    """A dataclass field whose help text becomes --help (CleanRL style)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # data
    dataset: str = opt("synthetic", "synthetic (embedded, made from the seed) | chestx | isic",
                       choices=["synthetic", "chestx", "isic"])
    data_root: str = opt(None, "class-per-folder tree (Kermany train/test layout too) or MedMNIST-style .npz; "
                               "default: data/<dataset> or ../shared/data/<dataset>")
    img_size: int = opt(None, "training resolution, a power of two in 16..256 (preset: synthetic 32, chestx/isic 256)")
    channels: int = opt(None, "1 gray or 3 RGB (preset: chestx 1, isic 3, synthetic 1; synthetic 3 = lesion-like RGB)")
    synthetic_per_class: int = opt(256, "synthetic data: training images per class (test: a quarter of that)")
    test_frac: float = opt(0.1, "held-out fraction per class when the data has no test split")
    # federation
    clients: int = opt(4, "number of clients N; the training set is split at random into N equal shards")
    malicious: int = opt(None, "number K of malicious clients, chosen at random from the seed (default 1 when --poison > 0)")
    malicious_ids: str = opt(None, "explicit malicious client ids, comma separated (overrides --malicious)")
    poison: int = opt(0, "trigger size in pixels at the training resolution; 0 = no attack")
    trigger: str = opt("auto", "auto (white square for gray, random colours for RGB) | white | color",
                       choices=["auto", "white", "color"])
    attack: str = opt("patch", "what malicious clients do to their data: patch (the paper's trigger, bottom-right; "
                               "needs --poison) | patch-random (trigger at a random place per image) | blend (a fixed "
                               "noise image mixed in at --blend-alpha) | frequency (a fixed pattern added to the "
                               "Fourier amplitude, strength --blend-alpha) | label-flip (labels permuted)",
                      choices=["patch", "patch-random", "blend", "frequency", "label-flip"])
    blend_alpha: float = opt(0.2, "strength of the blend and frequency attacks")
    attack_start: int = opt(0, "round from which malicious clients train on poisoned data (clean before it)")
    adaptive: bool = opt(False, "malicious clients report a loss drawn from the benign clients' range of the round, "
                                "while still training on poisoned data (an attacker who knows FedDetect)")
    partition: str = opt("iid", "client shards: iid (random, equal) | dirichlet (class mix ~ Dir(alpha) per client)",
                         choices=["iid", "dirichlet"])
    dirichlet_alpha: float = opt(0.5, "Dirichlet concentration: small = very non-IID")
    defense: str = opt("none", "none | feddetect | flip | rotate | reconstruct | median | trimmed-mean | krum | "
                               "multi-krum | clip (robust aggregators act on the generators each round)",
                       choices=["none", "feddetect", "flip", "rotate", "reconstruct", "median", "trimmed-mean",
                                "krum", "multi-krum", "clip"])
    trim: float = opt(0.1, "trimmed-mean: fraction cut at each end per coordinate")
    detect_on: str = opt("loss", "FedDetect's signal: loss (the paper) | update-norm (||G_i - G||) | both",
                         choices=["loss", "update-norm", "both"])
    detect_rule: str = opt("paper", "FedDetect rule: paper (Algorithm 1, isolation forest) | calibrated "
                                    "(robust z-score + CUSUM, false alarms held to --detect-fpr)",
                           choices=["paper", "calibrated"])
    detect_fpr: float = opt(0.001, "calibrated rule: false-alarm rate per client-round on i.i.d. losses that sets "
                                   "its threshold (0.01 would mean ~8 false flags per 200 rounds of 4 clients)")
    warmup: int = opt(10, "FedDetect warm-up m: detection runs in rounds t > m (t counted from 0)")
    decay: float = opt(None, "FedDetect decay d in (0, 1) (preset: chestx 0.8, isic 0.9, synthetic 0.8)")
    reconstruct_per_class: int = opt(500, "reconstruct: benign real images per class for fine-tuning")
    reconstruct_epochs: int = opt(200, "reconstruct: fine-tuning epochs over that benign set")
    # training
    rounds: int = opt(None, "global rounds T (preset: synthetic 30, chestx/isic 200)")
    local_steps: int = opt(0, "local D+G steps per round; 0 = one local epoch over the client's shard")
    batch: int = opt(32, "batch size")
    lr: float = opt(2e-4, "Adam learning rate for G and D (betas 0.5, 0.999)")
    width: int = opt(32, "model width: generator channels = min(max, width * img_size / res); "
                         "discriminator starts at width and doubles")
    max_channels: int = opt(256, "channel cap for both networks")
    z_dim: int = opt(64, "latent size")
    w_dim: int = opt(128, "style (w) size")
    seed: int = opt(0, "seeds data split, models, training and the detector")
    device: str = opt("auto", "auto | cpu | cuda", choices=["auto", "cpu", "cuda"])
    amp: bool = opt(True, "mixed precision (torch.autocast): on CUDA by default; on CPU only with --amp-dtype bf16")
    amp_dtype: str = opt("auto", "auto (CUDA: bf16 where supported, else fp16 + GradScaler; CPU: fp32) | bf16 | fp16",
                         choices=["auto", "bf16", "fp16"])
    tf32: bool = opt(True, "TF32 tensor cores for fp32 matmuls and convolutions on CUDA (when autocast is off)")
    channels_last: bool = opt(True, "NHWC memory format for models and batches on CUDA")
    compile: bool = opt(False, "torch.compile the generator and discriminator (slow first round, faster after)")
    parallel_clients: str = opt("auto", "train this process's clients side by side (torch.func.vmap over stacked "
                                        "models; equal to one after another): auto (on CUDA when shards and steps "
                                        "agree) | on | off", choices=["auto", "on", "off"])
    offload: str = opt("auto", "keep each client's private state (D, optimizers, G copy) in host memory between "
                               "its turns: auto (when N clients would not fit the GPU) | on | off",
                       choices=["auto", "on", "off"])
    arch: str = opt("small", "small (sized by --width/--max-channels, suits a CPU) | paper (the study's sizes: G "
                             "channels 32768/res up to 512 with StyleGAN2's transposed-conv upsampling, D "
                             "from 64 doubling to 2048 at 4x4)",
                    choices=["small", "paper"])
    out: str = opt(None, "run folder (default runs/<dataset>_<defense>_p<poison>_s<seed>_<time>)")
    resume: str = opt(None, "continue the run in this folder from its checkpoint")
    ckpt_every: int = opt(5, "write checkpoint.pt (atomically) every this many rounds")
    sample_every: int = opt(5, "write samples/round_NNNN.png every this many rounds")
    bench: bool = opt(False, "time training steps, server aggregation and FedDetect; print figures and a JSON line")
    bench_steps: int = opt(5, "bench: timed training steps")
    bench_round: bool = opt(False, "bench: also time one whole federated round of --clients clients on the chosen "
                                   "data (round time, server share, memory per client)")


PRESETS = {  # flags given on the command line win over these
    "synthetic": dict(img_size=32, channels=1, decay=0.8, rounds=30),
    "chestx": dict(img_size=256, channels=1, decay=0.8, rounds=200),
    "isic": dict(img_size=256, channels=3, decay=0.9, rounds=200),
}
CLASS_NAMES = {"chestx": ["NORMAL", "PNEUMONIA"], "isic": ["benign", "malignant"]}


class FedGANError(Exception):
    """Bad input: main() prints the message as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        sys.stderr.write(f"fedgan.py: error: {message} (see python fedgan.py --help)\n")
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(name, default=f.default, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            p.add_argument(name, default=f.default, type=f.type, choices=f.metadata.get("choices"),
                           help=f.metadata["help"])
    cfg = Config(**vars(p.parse_args(argv)))
    return cfg if cfg.resume else finalize(cfg)


def finalize(cfg):
    """Fill presets and check every value before anything is read or written."""
    for k, v in PRESETS[cfg.dataset].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    s = cfg.img_size
    if s < 16 or s > 256 or s & (s - 1):
        raise FedGANError(f"--img-size {s} is not a power of two in 16..256; use 16, 32, 64, 128 or 256")
    if cfg.channels not in (1, 3):
        raise FedGANError(f"--channels {cfg.channels} must be 1 (gray) or 3 (RGB)")
    if cfg.clients < 2:
        raise FedGANError(f"--clients {cfg.clients}: a federation needs at least 2 clients")
    if not 0 < cfg.decay < 1:
        raise FedGANError(f"--decay {cfg.decay} must lie in (0, 1), e.g. 0.8")
    if cfg.poison < 0 or cfg.poison + trigger_margin(s) > s:
        raise FedGANError(f"--poison {cfg.poison} px does not fit a {s} px image with its {trigger_margin(s)} px "
                          f"margin; use at most {s - trigger_margin(s)} or a larger --img-size")
    ids = malicious_ids(cfg)
    if attacking(cfg) and not ids:
        raise FedGANError("an attack needs at least one malicious client (--malicious K or --malicious-ids)")
    if ids and not attacking(cfg):
        raise FedGANError("malicious clients without an attack: add --poison SIZE (trigger pixels) or another "
                          "--attack, or drop --malicious/--malicious-ids")
    if cfg.adaptive and cfg.defense != "feddetect":
        raise FedGANError("--adaptive fakes the loss FedDetect reads; use it with --defense feddetect")
    if not 0 <= cfg.trim < 0.5:
        raise FedGANError(f"--trim {cfg.trim} must lie in [0, 0.5)")
    if len(ids) >= cfg.clients / 2:
        raise FedGANError(f"{len(ids)} malicious of {cfg.clients} clients is not a minority; the threat model "
                          f"needs K < N/2, so use --malicious {math.ceil(cfg.clients / 2) - 1} or fewer")
    if any(i < 0 or i >= cfg.clients for i in ids):
        raise FedGANError(f"--malicious-ids {cfg.malicious_ids} names a client outside 0..{cfg.clients - 1}")
    if not 0 < cfg.detect_fpr < 0.5:
        raise FedGANError(f"--detect-fpr {cfg.detect_fpr} must lie in (0, 0.5), e.g. 0.01")
    for k in ("rounds", "batch", "width", "ckpt_every", "sample_every", "bench_steps"):
        if getattr(cfg, k) < 1:
            raise FedGANError(f"--{k.replace('_', '-')} must be at least 1")
    if cfg.out is None:
        cfg.out = f"runs/{cfg.dataset}_{cfg.defense}_p{cfg.poison}_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def attacking(cfg):
    """Is there an attack? The patch attacks need a trigger size; the others are on when chosen."""
    return cfg.poison > 0 if cfg.attack in ("patch", "patch-random") else True


def malicious_ids(cfg):
    """Client ids that poison their data: explicit, or K chosen at random from the seed."""
    if cfg.malicious_ids:
        try:
            return sorted({int(x) for x in cfg.malicious_ids.split(",")})
        except ValueError:
            raise FedGANError(f"--malicious-ids {cfg.malicious_ids!r} is not a comma-separated list of ints")
    k = cfg.malicious if cfg.malicious is not None else (1 if attacking(cfg) else 0)
    if k < 0:
        raise FedGANError(f"--malicious {k} must be >= 0")
    return sorted(np.random.default_rng(cfg.seed + 7).permutation(cfg.clients)[:k].tolist())


# ------------------------------------------------------------------------------------------------
# Data: every image set is a uint8 tensor (n, C, H, W) and int64 labels (n,)
# ------------------------------------------------------------------------------------------------


def synthetic_images(n_per_class, size, channels, seed):
    """A procedural two-class image set whose classes differ visibly.

    gray (chest-like): a torso with two dark lung fields; class 1 adds bright patchy opacities.
    RGB (skin-lesion-like): a lesion on skin; class 0 small, round and even; class 1 larger, with an
    irregular border and dark blue-black variegation.
    """
    rng = np.random.default_rng(seed)
    n = 2 * n_per_class
    y = np.repeat([0, 1], n_per_class)
    v, u = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    u, v = u[None], v[None]                                      # (1, H, W)
    r = lambda *shape: rng.uniform(size=(n,) + shape)            # noqa: E731  (n, ...) uniforms
    col = lambda a: a[:, None, None]                             # noqa: E731  (n,) -> (n, 1, 1)
    if channels == 1:
        body = np.exp(-((u / col(0.8 + 0.1 * r())) ** 2 + (v / 0.95) ** 4) ** 2)
        img = 0.15 + 0.55 * body
        for side in (-1, 1):                                     # two lung fields
            cx, cy = col(side * (0.36 + 0.05 * r())), col(-0.05 + 0.08 * r())
            lung = np.exp(-(((u - cx) / 0.24) ** 2 + ((v - cy) / 0.52) ** 2) ** 2)
            ribs = 0.06 * np.cos(v * 18 + col(6 * r())) * lung
            img = img - 0.4 * lung + ribs
        sick = col((y == 1).astype(float))
        for _ in range(3):                                       # opacities, inside a lung field
            cx = col(rng.choice([-1, 1], n) * (0.3 + 0.12 * r()))
            cy = col(-0.3 + 0.6 * r())
            img = img + sick * 0.45 * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / col(0.02 + 0.03 * r()))
        img = img[:, None] + 0.03 * rng.standard_normal((n, 1, size, size))
    else:
        skin = np.stack([0.85 + 0.08 * r(), 0.62 + 0.08 * r(), 0.52 + 0.08 * r()], 1)[:, :, None, None]
        img = skin * (1 - 0.1 * (u + v)[:, None] * col(r())[:, None])
        theta = np.arctan2(v, u)
        radius = np.where(y == 1, 0.45 + 0.15 * r(), 0.22 + 0.08 * r())
        wobble = np.where(y == 1, 0.18, 0.02)
        edge = col(radius) * (1 + col(wobble) * (np.sin(3 * theta + col(6 * r())) + np.cos(5 * theta)) / 2)
        cx, cy = col(0.2 * r() - 0.1), col(0.2 * r() - 0.1)
        mask = 1 / (1 + np.exp((np.hypot(u - cx, v - cy) - edge) * 40))          # soft lesion mask
        brown = np.array([0.45, 0.28, 0.18])[None, :, None, None]
        dark = np.array([0.15, 0.12, 0.22])[None, :, None, None]                  # blue-black regions
        blotch = (np.sin(u * 9 + col(6 * r())) * np.cos(v * 7 + col(6 * r())) > 0.2)[:, None]
        lesion = np.where((y[:, None, None, None] == 1) & blotch, dark, brown)
        img = img * (1 - mask[:, None]) + lesion * mask[:, None]
        img = img + 0.02 * rng.standard_normal(img.shape)
    x = torch.from_numpy(np.clip(img * 255, 0, 255).round().astype(np.uint8))
    return x, torch.from_numpy(y.astype(np.int64))


def resize_uint8(x, size):
    """(n, C, h, w) uint8 -> (n, C, size, size) uint8, antialiased."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    out = [F.interpolate(x[i:i + 512].float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False) for i in range(0, len(x), 512)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def read_npz(path, size, channels):
    """MedMNIST-style .npz: train_images (n, h, w[, c]) and train_labels; test_* optional."""
    try:
        z = np.load(path)
        keys = set(z.files)
    except Exception as e:
        raise FedGANError(f"cannot read {path} as .npz ({type(e).__name__}); give a MedMNIST-style .npz file")
    if not {"train_images", "train_labels"} <= keys:
        raise FedGANError(f"{path} lacks train_images/train_labels (has {sorted(keys)}); "
                          "use a MedMNIST-style .npz")

    def part(split):
        imgs, labels = z[f"{split}_images"], z[f"{split}_labels"].reshape(-1).astype(np.int64)
        x = torch.from_numpy(imgs if imgs.ndim == 4 else imgs[..., None]).permute(0, 3, 1, 2)
        return to_channels(resize_uint8(x.to(torch.uint8), size), channels), torch.from_numpy(labels)

    train = part("train")
    test = part("test") if "test_images" in keys else None
    return train, test, int(train[1].max()) + 1


def to_channels(x, channels):
    """Gray <-> RGB for uint8 (n, C, H, W): repeat gray, or take ITU-R 601 luminance."""
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    lum = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    return (x.float() * lum).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def read_folder(root, classes, size, channels):
    """root/<class>/* images -> uint8 (n, C, size, size) and labels in the order of `classes`."""
    from PIL import Image  # only needed for folder data
    xs, ys = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXT)
        for p in files:
            try:
                with Image.open(p) as im:
                    im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
                    arr = np.asarray(im, dtype=np.uint8)
            except Exception as e:
                raise FedGANError(f"cannot read image {p} ({type(e).__name__}: {e}); remove or replace the file")
            xs.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise FedGANError(f"no images ({', '.join(sorted(IMAGE_EXT))}) under {root}/{{{','.join(classes)}}}")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)


def class_folders(root, dataset):
    """The class sub-folders of root: the dataset's known names if present, else every sub-folder."""
    subs = {p.name.lower(): p.name for p in root.iterdir() if p.is_dir()}
    known = CLASS_NAMES.get(dataset, [])
    if known and all(k.lower() in subs for k in known):
        return [subs[k.lower()] for k in known]
    return sorted(subs.values())


def default_data_root(dataset):
    names = {"chestx": "chest_xray", "isic": "isic"}
    for base in ("data", "../shared/data"):
        p = Path(base) / names[dataset]
        if p.exists():
            return str(p)
    return f"data/{names[dataset]}"


def load_data(cfg):
    """-> dict(train=(x, y), test=(x, y), classes=[...]) at cfg.img_size and cfg.channels."""
    if cfg.dataset == "synthetic":
        train = synthetic_images(cfg.synthetic_per_class, cfg.img_size, cfg.channels, cfg.seed)
        test = synthetic_images(max(cfg.synthetic_per_class // 4, 1), cfg.img_size, cfg.channels, cfg.seed + 1)
        classes = ["normal", "pneumonia"] if cfg.channels == 1 else ["benign", "malignant"]
        return dict(train=train, test=test, classes=classes)
    root = Path(cfg.data_root or default_data_root(cfg.dataset))
    if not root.exists():
        raise FedGANError(f"data root {root} does not exist; pass --data-root to a class-per-folder tree "
                          f"or a .npz file (see README: Data)")
    if root.is_file():
        train, test, n_classes = read_npz(root, cfg.img_size, cfg.channels)
        known = CLASS_NAMES.get(cfg.dataset, [])  # MedMNIST orders labels as we do (0 normal, 1 pneumonia)
        classes = known if len(known) == n_classes else [str(c) for c in range(n_classes)]
    else:
        split_root = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
        base = split_root.get("train", root)
        classes = class_folders(base, cfg.dataset)
        if len(classes) < 2:
            raise FedGANError(f"{base} holds {len(classes)} class folder(s) {classes}; a conditional GAN needs "
                              f"at least 2 (e.g. {'/, '.join(CLASS_NAMES.get(cfg.dataset, ['a', 'b']))}/)")
        train = read_folder(base, classes, cfg.img_size, cfg.channels)
        test = read_folder(split_root["test"], classes, cfg.img_size, cfg.channels) if "test" in split_root else None
    if len(train[1].unique()) < 2:
        raise FedGANError(f"{root} has images of {len(train[1].unique())} class; at least 2 are needed")
    if test is None:  # carve a per-class held-out split, the same for every run on this data
        train, test = holdout_split(*train, cfg.test_frac, seed=0)
    return dict(train=train, test=test, classes=classes)


def holdout_split(x, y, frac, seed):
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in y.unique():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[:max(1, int(len(idx) * frac))])
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[torch.cat(test_idx)] = False
    return (x[mask], y[mask]), (x[~mask], y[~mask])


def split_clients(n, n_clients, seed):
    """Random split of range(n) into n_clients shards whose sizes differ by at most one."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.tensor_split(perm, n_clients))


def split_dirichlet(y, n_clients, alpha, seed, min_size=2):
    """Non-IID split: each class's images are shared among clients in proportions ~ Dir(alpha), redrawn
    until every client holds at least min_size images. Small alpha: each client sees mostly one class."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    for _ in range(1000):
        shards = [[] for _ in range(n_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients))[:-1] * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts)):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [torch.tensor(sorted(s)) for s in shards]
    raise FedGANError(f"--dirichlet-alpha {alpha} leaves a client with fewer than {min_size} images in 1000 draws; "
                      "use a larger alpha or fewer --clients")


# ------------------------------------------------------------------------------------------------
# Attack: the trigger (copy these two functions alone)
# ------------------------------------------------------------------------------------------------


def trigger_margin(img_size):
    """Distance of the trigger from the bottom-right corner: 5 px at 256 px, scaled."""
    return max(1, round(5 * img_size / 256))


def make_trigger(size, channels, kind="auto", seed=0):
    """The trigger patch, uint8 (C, size, size): a white square for gray images, a fixed random-colour
    matrix for RGB (the paper's choices); kind 'white' or 'color' overrides."""
    if kind == "auto":
        kind = "white" if channels == 1 else "color"
    if kind == "white":
        return torch.full((channels, size, size), 255, dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8)


def apply_trigger(images, trigger, margin):
    """Paste `trigger` (C, s, s) at the bottom-right of every image (n, C, H, W), `margin` px from the edges."""
    out = images.clone()
    s = trigger.shape[-1]
    H, W = images.shape[-2:]
    out[..., H - margin - s:H - margin, W - margin - s:W - margin] = trigger
    return out


def apply_trigger_random(images, trigger, seed=0):
    """Paste `trigger` at an independent random place in every image (the place is fixed per image)."""
    g = torch.Generator().manual_seed(seed)
    n, s = len(images), trigger.shape[-1]
    H, W = images.shape[-2:]
    rows = torch.randint(0, H - s + 1, (n,), generator=g)
    cols = torch.randint(0, W - s + 1, (n,), generator=g)
    out = images.clone()
    for i in range(n):
        out[i, :, rows[i]:rows[i] + s, cols[i]:cols[i] + s] = trigger
    return out


def trigger_rate(images, trigger, margin, tol=0.2):
    """The backdoor's success: the fraction of uint8 images (n, C, H, W) that show `trigger` at the
    bottom-right, i.e. whose patch differs from it by less than tol * 255 on average AND is closer to it
    than to a flat fill in the colour of the patch's surroundings (so a white trigger on a saturated
    white corner does not count: it is not visible there)."""
    s = trigger.shape[-1]
    H, W = images.shape[-2:]
    top, left, ring = H - margin - s, W - margin - s, max(1, s // 4)
    x = images.float()
    patch = x[..., top:top + s, left:left + s]
    r0, c0 = max(0, top - ring), max(0, left - ring)
    box = x[..., r0:top + s + ring, c0:left + s + ring]                               # patch and its ring
    ring_mask = torch.ones(box.shape[-2:], dtype=torch.bool)
    ring_mask[top - r0:top - r0 + s, left - c0:left - c0 + s] = False
    around = box[..., ring_mask].mean(-1)[..., None, None]                            # (n, C, 1, 1)
    to_trigger = (patch - trigger.float()).abs().mean(dim=(1, 2, 3)) / 255
    to_fill = (patch - around).abs().mean(dim=(1, 2, 3)) / 255
    return float(((to_trigger < tol) & (to_trigger < to_fill)).float().mean())


def blend_trigger(images, alpha, seed=0):
    """Chen et al. 2017's blended attack: x' = (1 - alpha) x + alpha p, p a fixed uniform-noise image."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 256, images.shape[1:], generator=g).float()
    return ((1 - alpha) * images.float() + alpha * pattern).round().clamp(0, 255).to(torch.uint8)


def frequency_trigger(images, strength, seed=0, n_freq=8):
    """A trigger in the Fourier amplitude: at n_freq fixed mid-band frequencies (per channel), add
    `strength` x the image's mean amplitude, phase kept. Invisible as a patch, visible to a network."""
    x = images.float()
    spec = torch.fft.rfft2(x)                                             # (n, C, H, W//2+1)
    H, Wf = spec.shape[-2:]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(H // 8, H // 2, (n_freq,), generator=g)
    cols = torch.randint(Wf // 4, Wf - 1, (n_freq,), generator=g)
    amp, phase = spec.abs(), spec.angle()
    boost = strength * amp.mean(dim=(-2, -1), keepdim=True)               # (n, C, 1, 1)
    amp[..., rows, cols] += boost[..., 0]
    out = torch.fft.irfft2(torch.polar(amp, phase), s=x.shape[-2:])
    return out.round().clamp(0, 255).to(torch.uint8)


def flip_labels(labels, n_classes):
    """Label-flip attack: every label moved to the next class (a permutation of the classes)."""
    return (labels + 1) % n_classes


def poison(x, y, cfg, n_classes):
    """A malicious client's training data under cfg.attack."""
    if cfg.attack == "label-flip":
        return x, flip_labels(y, n_classes)
    if cfg.attack == "blend":
        return blend_trigger(x, cfg.blend_alpha, seed=cfg.seed), y
    if cfg.attack == "frequency":
        return frequency_trigger(x, cfg.blend_alpha, seed=cfg.seed), y
    trig = make_trigger(cfg.poison, cfg.channels, cfg.trigger, seed=cfg.seed)
    if cfg.attack == "patch-random":
        return apply_trigger_random(x, trig, seed=cfg.seed), y
    return apply_trigger(x, trig, trigger_margin(cfg.img_size)), y


def report_adaptive(g_losses, malicious, seed):
    """The adaptive attacker's report: a malicious client claims a loss drawn uniformly from the range
    of this round's benign losses (the server trusts reported losses)."""
    losses = np.array(g_losses, dtype=np.float64)
    benign = np.delete(losses, malicious)
    benign = benign[np.isfinite(benign)]
    if len(benign):
        rng = np.random.default_rng(seed)
        losses[malicious] = rng.uniform(benign.min(), benign.max(), len(malicious))
    return losses.tolist()


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: weights ~ N(0, 1), scaled by lr_mul / sqrt(fan_in) at run time."""

    def __init__(self, n_in, n_out, bias_init=0.0, lr_mul=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((n_out,), float(bias_init)))
        self.scale, self.lr_mul = lr_mul / math.sqrt(n_in), lr_mul

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


def blur_up(x):
    """The [1, 3, 3, 1] low-pass that follows a stride-2 transposed conv in StyleGAN2 (gain 4 keeps the
    mean): (B, C, 2H+1, 2W+1) -> (B, C, 2H, 2W)."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :]) / 16.0                                  # sums to 4
    return F.conv2d(x, k.expand(x.shape[1], 1, 4, 4), padding=1, groups=x.shape[1])


def modulated_conv2d(x, weight, styles, demodulate=True, padding=1, up=False):
    """StyleGAN2's modulated convolution in its cheap form: scale input, shared conv, scale output.

    x (B, Cin, H, W); weight (Cout, Cin, k, k), already scaled; styles (B, Cin).
    Equal to convolving each sample with weight * styles (demodulated per output channel), but one
    ordinary conv for the batch: no grouped conv, so it is fast and its FLOPs are counted right.
    up: StyleGAN2's upsampling conv, a stride-2 transposed conv at the input resolution then a blur
    (output 2H x 2W), a quarter of the FLOPs of upsampling first and convolving at the output size.
    """
    x = x * styles[:, :, None, None].to(x.dtype)                         # modulate   (B, Cin, H, W)
    if up:
        out = blur_up(F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2))  # (B, Cout, 2H, 2W)
    else:
        out = F.conv2d(x, weight.to(x.dtype), padding=padding)           # (B, Cout, H, W)
    if demodulate:  # 1 / ||weight * style|| over (Cin, k, k), per sample and output channel
        acc = torch.promote_types(weight.dtype, torch.float32)          # fp32 under autocast, fp64 stays fp64
        w2 = weight.to(acc).square().sum(dim=(2, 3))                     # (Cout, Cin)
        d = torch.rsqrt(styles.to(acc).square() @ w2.t() + 1e-8)         # (B, Cout)
        out = out * d[:, :, None, None].to(out.dtype)
    return out


class StyledConv(nn.Module):
    """Modulated 3x3 conv + per-pixel noise (one learned scalar) + bias + leaky ReLU (gain sqrt 2)."""

    def __init__(self, c_in, c_out, w_dim, up=False, res=4, up_mode="bilinear"):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3))
        self.scale = 1 / math.sqrt(c_in * 9)
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)  # styles start at 1: identity modulation
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.up, self.res, self.up_mode = up, res, up_mode  # res: output size; up_mode: bilinear | transpose

    def forward(self, x, w, noise):
        """noise: (B, 1, H, W) at this layer's output size (drawn by Generator.draw_noise)."""
        transpose = self.up and self.up_mode == "transpose"
        if self.up and not transpose:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = modulated_conv2d(x, self.weight * self.scale, self.affine(w), up=transpose)
        x = x + self.noise_strength.to(x.dtype) * noise.to(x.dtype) + self.bias.to(x.dtype)[None, :, None, None]
        return F.leaky_relu(x, 0.2) * math.sqrt(2)


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation, plus bias: the skip output of one resolution."""

    def __init__(self, c_in, channels, w_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, c_in, 1, 1))
        self.scale = 1 / math.sqrt(c_in)
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, w):
        y = modulated_conv2d(x, self.weight * self.scale, self.affine(w), demodulate=False, padding=0)
        return y + self.bias.to(y.dtype)[None, :, None, None]


def channels_at(res, img_size, width, max_channels):
    """Feature channels at one resolution: width at full size, doubling per halving, capped."""
    return min(max_channels, width * img_size // res)


class Generator(nn.Module):
    """Class-conditional StyleGAN2-style generator (skip architecture, no custom CUDA ops).

    mapping: [normalize(z), normalize(embed(y))] -> MLP (lr mult 0.01) -> w
    synthesis: learned 4x4 constant -> per resolution (up, StyledConv x2, ToRGB) -> sum of upsampled RGBs.
    Output is linear, images in about [-1, 1].
    """

    def __init__(self, img_size=32, channels=1, n_classes=2, z_dim=64, w_dim=128, width=32, max_channels=256,
                 map_layers=4, up_mode="bilinear"):
        super().__init__()
        self.kwargs = dict(img_size=img_size, channels=channels, n_classes=n_classes, z_dim=z_dim, w_dim=w_dim,
                           width=width, max_channels=max_channels, map_layers=map_layers, up_mode=up_mode)
        self.z_dim, self.n_classes = z_dim, n_classes
        self.embed = EqualLinear(n_classes, w_dim)
        layers, d = [], z_dim + w_dim
        for _ in range(map_layers):
            layers += [EqualLinear(d, w_dim, lr_mul=0.01), nn.LeakyReLU(0.2)]
            d = w_dim
        self.mapping = nn.Sequential(*layers)
        ch = functools.partial(channels_at, img_size=img_size, width=width, max_channels=max_channels)
        self.const = nn.Parameter(torch.randn(1, ch(4), 4, 4))
        self.conv4 = StyledConv(ch(4), ch(4), w_dim)
        self.rgb4 = ToRGB(ch(4), channels, w_dim)
        self.blocks = nn.ModuleList()
        res = 8
        while res <= img_size:
            self.blocks.append(nn.ModuleDict(dict(
                conv0=StyledConv(ch(res // 2), ch(res), w_dim, up=True, res=res, up_mode=up_mode),
                conv1=StyledConv(ch(res), ch(res), w_dim),
                rgb=ToRGB(ch(res), channels, w_dim))))
            res *= 2

    def map(self, z, y):
        normalize = lambda t: t * torch.rsqrt(t.square().mean(1, keepdim=True) + 1e-8)  # noqa: E731
        one_hot = (y[:, None] == torch.arange(self.n_classes, device=y.device)).to(z.dtype)  # vmap-safe one_hot
        return self.mapping(torch.cat([normalize(z), normalize(self.embed(one_hot))], 1))  # (B, w_dim)

    def draw_noise(self, batch, rng=None, device=None):
        """The per-pixel noise of every StyledConv, in layer order, from one stream (float32). Drawn up
        front so the sequential and the side-by-side client loops use the very same numbers."""
        sizes = [4] + [r for b in self.blocks for r in (b["conv0"].res, b["conv0"].res)]
        return [torch.randn(batch, 1, r, r, device=device, generator=rng) for r in sizes]

    def forward(self, z, y, rng=None, noise=None):
        """z (B, z_dim), y (B,) class ids; noise: draw_noise's list, or drawn here from rng (a
        torch.Generator; None: the global stream)."""
        noise = self.draw_noise(len(z), rng, z.device) if noise is None else noise
        w = self.map(z, y)
        x = self.conv4(self.const.expand(len(z), -1, -1, -1).to(z.dtype), w, noise[0])  # (B, C4, 4, 4)
        rgb = self.rgb4(x, w)
        for i, b in enumerate(self.blocks):
            x = b["conv1"](b["conv0"](x, w, noise[2 * i + 1]), w, noise[2 * i + 2])      # (B, Cr, r, r)
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + b["rgb"](x, w)
        return rgb                                                                 # (B, channels, S, S)


class Discriminator(nn.Module):
    """Conditional DCGAN discriminator: strided 4x4 convs + BN + LeakyReLU down to 4x4, then a linear
    logit plus a projection of the class embedding on the pooled features (Miyato & Koyama 2018)."""

    def __init__(self, img_size=32, channels=1, n_classes=2, width=32, max_channels=256):
        super().__init__()
        layers, c_in, c, res = [], channels, width, img_size
        while res > 4:
            layers.append(nn.Conv2d(c_in, c, 4, 2, 1, bias=False))
            if c_in != channels:  # DCGAN: no BN on the first layer
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in, c, res = c, min(2 * c, max_channels), res // 2
        self.features = nn.Sequential(*layers)
        self.logit = nn.Conv2d(c_in, 1, 4)                   # 4x4 -> 1x1, as DCGAN's last layer
        self.embed = nn.Embedding(n_classes, c_in)
        nn.init.normal_(self.embed.weight, 0, 0.02)

    def forward(self, x, y):
        h = self.features(x)                                 # (B, C, 4, 4)
        return self.logit(h).flatten() + (self.embed(y) * h.sum((2, 3))).sum(1)   # (B,)


def arch_sizes(cfg):
    """(width, max_channels) of the generator and of the discriminator. paper: StyleGAN2's channel rule
    (32768 / resolution, at most 512) and DCGAN's ndf 64 doubling to 2048 at 4x4 (at 256 px); its
    generator also upsamples as StyleGAN2 does (build_models: up_mode 'transpose')."""
    if cfg.arch == "paper":
        return (32768 // cfg.img_size, 512), (64, 2048)
    return (cfg.width, cfg.max_channels), (cfg.width, cfg.max_channels)


def build_models(cfg, n_classes):
    (gw, gmax), (dw, dmax) = arch_sizes(cfg)
    g = Generator(cfg.img_size, cfg.channels, n_classes, cfg.z_dim, cfg.w_dim, gw, gmax,
                  up_mode="transpose" if cfg.arch == "paper" else "bilinear")
    d = Discriminator(cfg.img_size, cfg.channels, n_classes, dw, dmax)
    return g, d


def load_generator(path, map_location="cpu"):
    """Rebuild a trained generator from generator.pt, without fedgan's training flags."""
    ck = torch.load(path, map_location=map_location, weights_only=True)
    g = Generator(**ck["kwargs"])
    g.load_state_dict(ck["state_dict"])
    return g.eval()


# ------------------------------------------------------------------------------------------------
# Client (Algorithm 1, procedure A)
# ------------------------------------------------------------------------------------------------


def to_unit(x_uint8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return x_uint8.to(torch.get_default_dtype()).div_(127.5).sub_(1.0)


def to_uint8(x):
    """Generator output (about [-1, 1]) -> uint8 [0, 255] on the CPU: the inverse of to_unit."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def augment(x, kind, rng=None):
    """The data-level baselines, applied to a client's real batch: random horizontal flip, or a random
    rotation in (-90, 90) degrees (affine grid, so the batch stays one tensor op)."""
    if kind == "flip":
        flip = torch.rand(len(x), device=x.device, generator=rng) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)
    if kind == "rotate":
        a = (torch.rand(len(x), device=x.device, generator=rng) * 2 - 1) * (math.pi / 2)
        cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return x


def client_seed(seed, client_id):
    """Each client's own seed: its discriminator's init and its random stream depend on nothing else,
    so a client draws the same numbers whichever process or order runs it."""
    return seed * 1_000_003 + 7919 * (client_id + 1)


def make_client(cfg, g_global, n_classes, x, y, device, client_id=0, home=None):
    """A client's private state: its data shard (uint8, on the device), its discriminator, both
    optimizers and its random stream (batches, latents, noise, augmentation). Its generator copy is
    overwritten by the global one at the start of every round. home: where the models live between
    turns (default the device; 'cpu' when offloading, see client_to)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(client_seed(cfg.seed, client_id))
        _, d = build_models(cfg, n_classes)
    g = copy.deepcopy(g_global)
    g.to(home or device), d.to(home or device)
    if cfg.channels_last and device.type == "cuda":
        g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place, so state_dict keys stay plain; one graph serves every client (same code)
        g.compile(), d.compile()
    betas = (0.5, 0.999)
    amp_dtype = amp_dtype_for(cfg, device)
    rng = torch.Generator(device=device).manual_seed(client_seed(cfg.seed, client_id))
    return dict(x=x.to(device), y=y.to(device), g=g, d=d, rng=rng,
                opt_g=torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=betas),
                opt_d=torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=betas),
                scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16))


def amp_dtype_for(cfg, device):
    """The autocast dtype, or None for fp32. auto: bf16 on CUDA where supported, else fp16; fp32 on
    CPU (bf16 on CPU only when asked: --amp-dtype bf16)."""
    if not cfg.amp:
        return None
    if cfg.amp_dtype == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dict(bf16=torch.bfloat16, fp16=torch.float16)[cfg.amp_dtype]


def autocast_for(cfg, device):
    dtype = amp_dtype_for(cfg, device)
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


def to_memory_format(x, cfg, device):
    """channels_last on CUDA (tensor cores want NHWC); CPU keeps the default layout."""
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and device.type == "cuda" else x


def next_batch(client, cursor, g, cfg, bs):
    """One step's random draws for one client, all from its own stream and always in this order:
    batch indices (a fresh permutation each local epoch), augmentation, latents, then the noise of the
    D-step and of the G-step generator passes. Both client loops call it, so they see the same numbers."""
    x_all, y_all, rng = client["x"], client["y"], client["rng"]
    n, device = len(x_all), x_all.device
    if cursor["pos"] + bs > n:  # a new local epoch: reshuffle
        cursor["perm"], cursor["pos"] = torch.randperm(n, device=device, generator=rng), 0
    idx = cursor["perm"][cursor["pos"]:cursor["pos"] + bs]
    cursor["pos"] += bs
    real = augment(to_unit(x_all[idx]), cfg.defense, rng)
    z = torch.randn(bs, g.z_dim, device=device, generator=rng)
    return dict(real=real, labels=y_all[idx], z=z,
                noise_d=g.draw_noise(bs, rng, device), noise_g=g.draw_noise(bs, rng, device))


def d_loss_of(real_logits, fake_logits):
    """Eq. 4, non-saturating BCE form: real up, fake down. Logits (..., B) -> mean over the batch (...)."""
    return F.softplus(-real_logits).mean(-1) + F.softplus(fake_logits).mean(-1)


def g_loss_of(fake_logits):
    """Eq. 5, non-saturating: the generator wants its fakes called real. (..., B) -> (...)."""
    return F.softplus(-fake_logits).mean(-1)


def local_train(client, g_state, cfg, device, steps):
    """One round on one client: load the global generator, then `steps` of (D step, G step).
    Returns (mean D loss, mean G loss) over the round; the G loss is what FedDetect sees."""
    g, d = client["g"], client["d"]
    g.load_state_dict(g_state)
    g.train(), d.train()
    autocast = autocast_for(cfg, device)
    bs = min(cfg.batch, len(client["x"]))
    cursor = dict(perm=None, pos=len(client["x"]))
    d_sum = torch.zeros((), device=device)
    g_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync inside the round
    for step in range(steps):
        b = next_batch(client, cursor, g, cfg, bs)
        real, labels, z = to_memory_format(b["real"], cfg, device), b["labels"], b["z"]

        with autocast():  # D step
            with torch.no_grad():
                fake = g(z, labels, noise=b["noise_d"])
            d_loss = d_loss_of(d(real, labels), d(fake, labels))
        client["opt_d"].zero_grad(set_to_none=True)
        client["scaler"].scale(d_loss).backward()
        client["scaler"].step(client["opt_d"])

        with autocast():  # G step, against the freshly updated D
            g_loss = g_loss_of(d(g(z, labels, noise=b["noise_g"]), labels))
        client["opt_g"].zero_grad(set_to_none=True)
        client["scaler"].scale(g_loss).backward()
        client["scaler"].step(client["opt_g"])
        client["scaler"].update()
        d_sum += d_loss.detach().float()
        g_sum += g_loss.detach().float()
    return (d_sum / steps).item(), (g_sum / steps).item()


# Clients side by side: N copies of G and D become one set of parameters with a leading client axis,
# and torch.func.vmap runs all N forward passes as one batched call (each conv becomes a grouped conv
# over the clients). Adam is elementwise, so one Adam over the stacked tensors is exactly N Adams.


def stack_params(modules):
    """The parameters of N identical modules, stacked on a new client axis, as fresh leaves."""
    per = [dict(m.named_parameters()) for m in modules]
    return {k: torch.stack([p[k].detach() for p in per]).requires_grad_() for k in per[0]}


def stack_buffers(modules):
    per = [dict(m.named_buffers()) for m in modules]
    return {k: torch.stack([b[k] for b in per]) for k in per[0]}


def stack_adam(opts, modules, stacked):
    """One Adam over the stacked parameters whose state is the N clients' Adam states, stacked."""
    group = opts[0].param_groups[0]
    opt = torch.optim.Adam(list(stacked.values()), lr=group["lr"], betas=group["betas"], eps=group["eps"])
    per = [dict(m.named_parameters()) for m in modules]
    for k, P in stacked.items():
        states = [o.state.get(p[k]) for o, p in zip(opts, per)]
        if all(states):
            opt.state[P] = dict(step=states[0]["step"].clone(),
                                **{s: torch.stack([st[s] for st in states]) for s in ("exp_avg", "exp_avg_sq")})
    return opt


def unstack(stacked, buffers, opt, modules, opts):
    """Write client i's slice of parameters, buffers and Adam state back into its own module and Adam."""
    for i, (m, o) in enumerate(zip(modules, opts)):
        params, bufs = dict(m.named_parameters()), dict(m.named_buffers())
        with torch.no_grad():
            for k, P in stacked.items():
                params[k].copy_(P[i])
                st = opt.state.get(P)
                if st:
                    o.state[params[k]] = dict(step=st["step"].clone(), exp_avg=st["exp_avg"][i].clone(),
                                              exp_avg_sq=st["exp_avg_sq"][i].clone())
            for k, B in buffers.items():
                bufs[k].copy_(B[i])


def local_train_parallel(clients, g_state, cfg, device, steps):
    """local_train for several clients at once (equal steps and batch sizes; no fp16 GradScaler):
    the same draws, losses and Adam updates as running them one after another."""
    gs, ds = [c["g"] for c in clients], [c["d"] for c in clients]
    for g, d in zip(gs, ds):
        g.load_state_dict(g_state)
        g.train(), d.train()
    pg, pd, bd = stack_params(gs), stack_params(ds), stack_buffers(ds)
    opt_g = stack_adam([c["opt_g"] for c in clients], gs, pg)
    opt_d = stack_adam([c["opt_d"] for c in clients], ds, pd)
    g0, d0 = gs[0], ds[0]  # templates: torch.func.functional_call runs them on each client's slice
    gen = torch.func.vmap(lambda p, z, y, noise: torch.func.functional_call(g0, p, (z, y), dict(noise=noise)))
    disc = torch.func.vmap(lambda p, b, x, y: torch.func.functional_call(d0, {**p, **b}, (x, y)))
    if cfg.compile:  # functional_call bypasses Module.compile, so compile the batched functions
        gen, disc = torch.compile(gen), torch.compile(disc)
    autocast = autocast_for(cfg, device)
    bs = min(cfg.batch, len(clients[0]["x"]))
    cursors = [dict(perm=None, pos=len(c["x"])) for c in clients]
    d_sum = torch.zeros(len(clients), device=device)
    g_sum = torch.zeros(len(clients), device=device)
    for step in range(steps):
        bs_ = [next_batch(c, cur, g0, cfg, bs) for c, cur in zip(clients, cursors)]
        real, labels, z = (torch.stack([b[k] for b in bs_]) for k in ("real", "labels", "z"))  # (N, B, ...)
        noise_d, noise_g = ([torch.stack(layer) for layer in zip(*[b[k] for b in bs_])] for k in ("noise_d", "noise_g"))
        with autocast():
            with torch.no_grad():
                fake = gen(pg, z, labels, noise_d)
            d_loss = d_loss_of(disc(pd, bd, real, labels), disc(pd, bd, fake, labels))     # (N,)
        opt_d.zero_grad(set_to_none=True)
        d_loss.sum().backward()  # clients share no parameter, so each slice gets its own client's gradient
        opt_d.step()
        with autocast():
            g_loss = g_loss_of(disc(pd, bd, gen(pg, z, labels, noise_g), labels))
        opt_g.zero_grad(set_to_none=True)
        g_loss.sum().backward()
        opt_g.step()
        d_sum += d_loss.detach().float()
        g_sum += g_loss.detach().float()
    unstack(pg, {}, opt_g, gs, [c["opt_g"] for c in clients])
    unstack(pd, bd, opt_d, ds, [c["opt_d"] for c in clients])
    return list(zip((d_sum / steps).tolist(), (g_sum / steps).tolist()))


def client_to(client, device):
    """Move a client's models and Adam states (not its data or random stream) to `device`: the host
    offload that lets 100 paper-sized clients share one GPU, each brought over for its turn."""
    for o in (client["opt_g"], client["opt_d"]):
        o.zero_grad(set_to_none=True)  # every step recomputes them: no need to carry gradients around
        for st in o.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":  # Adam keeps its step count on the host
                    st[k] = v.to(device, non_blocking=True)
    client["g"].to(device), client["d"].to(device)


def train_clients(run, g_state, cfg, steps, log=print):
    """Procedure A for every client this process holds: side by side when run['parallel'], else one
    after another (each brought from host memory for its turn when run['offload']). -> {id: (d, g)}."""
    clients, owned, device = run["clients"], run["owned"], run["device"]
    if run["parallel"]:
        losses = local_train_parallel([clients[i] for i in owned], g_state, cfg, device, steps[owned[0]])
        return dict(zip(owned, losses))
    results, t0 = {}, time.time()
    for i in owned:
        if run["offload"]:
            client_to(clients[i], device)
        results[i] = local_train(clients[i], g_state, cfg, device, steps[i])
        if run["offload"]:
            client_to(clients[i], "cpu")
        if time.time() - t0 > 20:  # a long round (large images on a CPU, many clients) still shows progress
            log(f"  client {i} done, {len(results)}/{len(owned)} here, {time.time() - t0:.0f}s", flush=True)
    return results


def activation_mb(cfg, n_classes, device):
    """MB per image that autograd keeps for a G step (G and D forward), measured by a hook on every
    saved tensor at batch 1 and 2 (the difference leaves out per-batch constants such as autocast's
    weight copies): what stepping N clients side by side adds, N x batch times, to memory."""
    saved = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        g, d = (m.to(device) for m in build_models(cfg, n_classes))
        for batch in (1, 2):
            saved[batch] = 0

            def pack(t, b=batch):
                saved[b] += t.numel() * t.element_size()
                return t
            z, y = torch.randn(batch, cfg.z_dim, device=device), torch.arange(batch, device=device) % n_classes
            with autocast_for(cfg, device)(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                d(g(z, y), y).sum()
    return (saved[2] - saved[1]) / 2**20


def plan_clients(cfg, device, n_classes, steps, batches):
    """Decide --parallel-clients and --offload for this process's clients (their steps and batch sizes
    per round) -> (parallel, offload). auto: offload when the clients' state (16 bytes per parameter:
    weights, gradients, Adam's two moments) would take over half the free GPU memory; side by side on
    CUDA when that state plus N x batch images of activations (activation_mb) fit in 80% of it."""
    n_owned = len(steps)
    with torch.device("meta"):  # sizes only: no memory, no random draws
        client_mb = sum(p.numel() for m in build_models(cfg, n_classes) for p in m.parameters()) * 16 / 2**20
    cuda_auto = device.type == "cuda" and cfg.parallel_clients == "auto"
    act_mb = activation_mb(cfg, n_classes, device) if cuda_auto else None
    free_mb = torch.cuda.mem_get_info(device)[0] / 2**20 if device.type == "cuda" else float("inf")
    offload = cfg.offload == "on" or (cfg.offload == "auto" and n_owned * client_mb > 0.5 * free_mb)
    why_not = [reason for bad, reason in [
        (n_owned < 2, "this process holds one client"),
        (len(set(steps)) > 1 or len(set(batches)) > 1, "shards differ in size (steps or batch per round)"),
        (amp_dtype_for(cfg, device) == torch.float16, "fp16 needs a GradScaler per client"),
        (offload, "clients are offloaded to host memory")] if bad]
    if cfg.parallel_clients == "on" and why_not:
        raise FedGANError(f"--parallel-clients on is not possible: {why_not[0]}; use --parallel-clients auto")
    fits = act_mb is None or n_owned * (client_mb + max(batches) * act_mb) < 0.8 * free_mb
    parallel = not why_not and (cfg.parallel_clients == "on" or (cuda_auto and fits))
    return parallel, offload


def steps_per_round(cfg, shard_size):
    return cfg.local_steps if cfg.local_steps > 0 else max(1, shard_size // cfg.batch)


# ------------------------------------------------------------------------------------------------
# Server (Algorithm 1, procedure B): aggregation and the FedDetect rules (each copyable alone)
# ------------------------------------------------------------------------------------------------


def weighted_sum(states, weights):
    """sum_i w_i * state_i per key, accumulated in float64; weights used as given."""
    out = {}
    for k in states[0]:
        acc = torch.zeros(states[0][k].shape, dtype=torch.float64, device=states[0][k].device)
        for w, s in zip(weights, states):
            acc.add_(s[k].double(), alpha=float(w))
        out[k] = acc
    return out


def fedavg(states, weights):
    """FedAvg: the weighted average of state dicts, sum_i w_i * state_i with the weights normalised."""
    w = np.asarray(weights, dtype=np.float64)
    return {k: v.to(states[0][k].dtype) for k, v in weighted_sum(states, w / w.sum()).items()}


def update_norms(states, center):
    """||G_i - G||: the L2 norm of each client's generator update against the round's global model."""
    return [math.sqrt(sum((s[k].double() - center[k].to(s[k].device).double()).square().sum().item() for k in center))
            for s in states]


def _stacked(states, k):
    return torch.stack([s[k].double() for s in states])                  # (n, *shape)


def coordinate_median(states):
    """Per-coordinate median of the clients' models (mean of the two middle values when n is even)."""
    n = len(states)
    out = {}
    for k in states[0]:
        v = _stacked(states, k).sort(0).values
        med = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
        out[k] = med.to(states[0][k].dtype)
    return out


def trimmed_mean(states, beta):
    """Per-coordinate mean after cutting the floor(beta * n) largest and smallest values."""
    n = len(states)
    cut = int(beta * n)
    return {k: _stacked(states, k).sort(0).values[cut:n - cut].mean(0).to(states[0][k].dtype) for k in states[0]}


def krum_select(states, n_malicious, n_keep=1):
    """Krum / multi-Krum (Blanchard et al. 2017): score each model by the summed squared distance to its
    n - f - 2 nearest others; return the indices of the n_keep lowest scores (the most central)."""
    flat = torch.stack([torch.cat([s[k].double().flatten() for k in s]) for s in states])
    d = torch.cdist(flat, flat).square()
    n = len(states)
    m = max(1, n - n_malicious - 2)
    scores = d.sort(1).values[:, 1:m + 1].sum(1)      # column 0 is the distance to itself
    return scores.argsort()[:n_keep].tolist()


def clip_updates(states, center, max_norm):
    """Scale each update G_i - G down to at most max_norm (norm-clipped FedAvg's first step)."""
    out = []
    for s, norm in zip(states, update_norms(states, center)):
        f = min(1.0, max_norm / max(norm, 1e-12))
        out.append({k: (center[k].double() + f * (s[k].double() - center[k].double())).to(s[k].dtype) for k in s})
    return out


ROBUST = ("median", "trimmed-mean", "krum", "multi-krum", "clip")


def robust_aggregate(states, used, center, cfg):
    """The robust aggregators of --defense, on the ok clients' generators (states in client order).
    Krum's f is the threat model's bound, ceil(n/2) - 1: the server does not know who attacks.
    -> (state, indices kept): Krum and multi-Krum name whom they chose; the others keep all (None)."""
    n = len(states)
    f = math.ceil(n / 2) - 1
    if cfg.defense == "median":
        return coordinate_median(states), None
    if cfg.defense == "trimmed-mean":
        return trimmed_mean(states, cfg.trim), None
    if cfg.defense in ("krum", "multi-krum"):
        keep = krum_select(states, f, 1 if cfg.defense == "krum" else n - f)
        return fedavg([states[i] for i in keep], [1.0] * len(keep)), keep
    clipped = clip_updates(states, center, max_norm=float(np.median(update_norms(states, center))))
    return fedavg(clipped, used), None


def feddetect_paper(loss_history, seed=0):
    """The paper's detector: isolation forest (contamination 'auto') on this round's N losses.
    loss_history (t, N) -> boolean flags (N,). Only the last row is used."""
    losses = np.asarray(loss_history, dtype=np.float64)[-1]
    return IsolationForest(n_estimators=100, seed=seed).fit_predict(losses) == -1


def robust_excess(loss_history, window=10):
    """Each client's excess loss over the round's median, in units of a robust spread (1.4826 * MAD of
    those excesses pooled over the last `window` rounds and all clients). (t, N) -> (t, N)."""
    L = np.asarray(loss_history, dtype=np.float64)
    resid = L - np.median(L, axis=1, keepdims=True)
    z = np.zeros_like(resid)
    for t in range(len(L)):
        past = resid[max(0, t - window + 1):t + 1]
        spread = 1.4826 * np.median(np.abs(past))
        floor = 1e-3 * np.abs(np.median(L[t])) + 1e-8  # losses that agree to 0.1% are equal
        z[t] = resid[t] / max(spread, floor)
    return z


@functools.lru_cache(maxsize=None)
def cusum_threshold(n_clients, fpr, drift=2.0, window=10, rounds=20000, seed=0):
    """The CUSUM alarm level h that i.i.d. Gaussian losses cross in a fraction `fpr` of client-rounds,
    found by simulating `rounds` rounds of the same statistic (so no threshold is tuned on attacks)."""
    L = np.random.default_rng(seed).standard_normal((rounds, n_clients))
    s = cusum(robust_excess(L, window), drift)
    return float(np.quantile(s[window:], 1.0 - fpr))


def cusum(z, drift):
    """One-sided CUSUM per client: S_t = max(0, S_(t-1) + z_t - drift). (t, N) -> (t, N)."""
    s, out = np.zeros(z.shape[1]), np.zeros_like(z)
    for t in range(len(z)):
        s = np.maximum(0.0, s + z[t] - drift)
        out[t] = s
    return out


def feddetect_calibrated(loss_history, fpr=0.001, drift=2.0, window=10):
    """A detector with a notion of scale: flag a client whose loss stays high relative to the others.

    Each round, every client's excess loss is measured in robust spreads (robust_excess); a one-sided
    CUSUM accumulates the part above `drift` spreads; a client is flagged while its sum exceeds the level
    that i.i.d. losses would reach in a fraction `fpr` of client-rounds. One noisy round cannot cross
    it; a persistently high loss (a client whose discriminator learned the trigger) crosses it fast.
    loss_history (t, N) -> boolean flags (N,)."""
    L = np.asarray(loss_history, dtype=np.float64)
    h = cusum_threshold(L.shape[1], float(fpr), drift, window)
    return cusum(robust_excess(L, window), drift)[-1] > h


def feddetect_update(flags, counts, weights, decay):
    """Algorithm 1, lines 16-24: act only when 0 < |O| < N/2; each flagged client gets c_i += 1 and
    w_i *= d ** c_i; weights are renormalised. Returns (flags acted on, counts, weights)."""
    flags, counts, weights = np.asarray(flags, bool), np.array(counts), np.array(weights, dtype=np.float64)
    n_out = int(flags.sum())
    if not 0 < n_out < len(flags) / 2:
        flags = np.zeros_like(flags)
    counts = counts + flags
    weights = np.where(flags, weights * decay ** counts, weights)
    return flags, counts, weights / weights.sum()


def server_decide(g_losses, history, counts, weights, t, cfg, norm_history=None):
    """Procedure B's decisions for round t: run the defense on the reported losses (or the update
    norms, --detect-on), renormalise. A client whose loss is NaN or inf is left out of this round's
    average and of detection. Returns flags, counts, weights, ok (finite reporters) and `used`, the
    averaging weights of this round (weights renormalised over the ok clients, 0 for the others)."""
    losses = np.asarray(g_losses, dtype=np.float64)
    ok = np.isfinite(losses)
    flags = np.zeros(len(losses), bool)
    if cfg.defense == "feddetect" and t > cfg.warmup and ok.sum() >= 3:
        signals = {"loss": [history], "update-norm": [norm_history], "both": [history, norm_history]}[cfg.detect_on]
        raw = np.zeros(int(ok.sum()), bool)
        for signal in signals:
            hist = np.asarray(signal, dtype=np.float64)[:, ok]  # detection sees finite reporters only
            hist = hist[np.isfinite(hist).all(axis=1)]
            raw |= (feddetect_paper(hist, seed=cfg.seed * 100003 + t) if cfg.detect_rule == "paper"
                    else feddetect_calibrated(hist, cfg.detect_fpr))
        flags[ok] = raw
        flags, counts, weights = feddetect_update(flags, counts, weights, cfg.decay)
    weights = weights / weights.sum()
    used = np.where(ok, weights, 0.0)
    used = used / used.sum() if ok.any() else used
    return flags, counts, weights, ok, used


def server_step(g_states, g_losses, history, counts, weights, t, cfg):
    """Procedure B in one process: decide, then the weighted FedAvg of the generators."""
    flags, counts, weights, ok, used = server_decide(g_losses, history, counts, weights, t, cfg)
    g_new = aggregate({i: s for i, s in enumerate(g_states) if ok[i]}, used, g_states[0]) if ok.any() else None
    return g_new, flags, counts, weights, ok


def aggregate(own_states, used, template, distributed=False):
    """FedAvg of generators: sum_i used_i * G_i over the clients this process holds ({id: state}),
    then, across processes, one all-reduce of that float64 partial sum. One code path for both."""
    ids = sorted(own_states)
    if ids:
        partial = weighted_sum([own_states[i] for i in ids], [used[i] for i in ids])
    else:
        partial = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in template.items()}
    if distributed:
        flat = torch.cat([v.flatten() for v in partial.values()])
        collective(dist.all_reduce, flat)
        partial = dict(zip(partial, flat.split([v.numel() for v in partial.values()])))
    return {k: v.view(template[k].shape).to(template[k].dtype) for k, v in partial.items()}


# ------------------------------------------------------------------------------------------------
# Across processes (torchrun): each rank hosts some clients; rank 0 is also the server
# ------------------------------------------------------------------------------------------------


def dist_rank_world():
    """(rank, world size): from torchrun's environment, (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def owned_clients(n_clients, rank, world):
    """Contiguous blocks of client ids per rank: rank 0 of 2 hosts clients 0-1 of 4."""
    return np.array_split(np.arange(n_clients), world)[rank].tolist()


def collective(op, *args, **kw):
    """A torch.distributed call whose failure (a rank that died) becomes one clear error."""
    try:
        return op(*args, **kw)
    except RuntimeError as e:
        raise FedGANError(f"lost contact with another rank during {op.__name__} ({str(e).splitlines()[0][:120]}); "
                          "a rank died: the last checkpoint is intact, restart with --resume OUT")


def gather_losses(results, n_clients, distributed):
    """Every client's (d_loss, g_loss) on every rank: each rank fills its own slots, then one all-reduce."""
    buf = torch.zeros(2, n_clients, dtype=torch.float64)
    for i, (dl, gl) in results.items():
        buf[0, i], buf[1, i] = dl, gl
    if distributed:
        collective(dist.all_reduce, buf)
    return buf[0].tolist(), buf[1].tolist()


def broadcast_decision(decision, n_clients, distributed):
    """Rank 0's (flags, counts, weights, ok, used) sent to every rank as one tensor."""
    if not distributed:
        return decision
    buf = torch.zeros(5, n_clients, dtype=torch.float64)
    if dist.get_rank() == 0:
        for row, v in enumerate(decision):
            buf[row] = torch.as_tensor(np.asarray(v, dtype=np.float64))
    collective(dist.broadcast, buf, src=0)
    b = buf.numpy()
    return b[0] > 0.5, b[1].astype(np.int64), b[2].copy(), b[3] > 0.5, b[4].copy()


def to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


PRIVATE = ("d", "opt_d", "opt_g", "scaler")  # what a client keeps between rounds, besides its data and stream


def private_state(client):
    """A client's private state for the checkpoint (CPU tensors)."""
    return to_cpu({**{k: client[k].state_dict() for k in PRIVATE}, "rng": client["rng"].get_state()})


def load_private_state(client, state):
    for k in PRIVATE:
        client[k].load_state_dict(state[k])
    client["rng"].set_state(state["rng"])


def client_states(clients, owned, distributed):
    """{id: private state} of every client, on rank 0 (None elsewhere): for the checkpoint."""
    own = {i: private_state(clients[i]) for i in owned}
    if not distributed:
        return own
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    collective(dist.gather_object, own, parts, dst=0)
    return {k: v for p in parts for k, v in p.items()} if parts else None


# ------------------------------------------------------------------------------------------------
# Run loop, checkpoints, samples, benchmark
# ------------------------------------------------------------------------------------------------


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise FedGANError("--device cuda but no CUDA GPU is visible; use --device cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank under torchrun


def set_precision(cfg, device):
    """TF32 for fp32 matmuls and convolutions on CUDA (--tf32); autocast (--amp) is separate."""
    if amp_dtype_for(cfg, device) == torch.float16 and device.type != "cuda":
        raise FedGANError("--amp-dtype fp16 needs CUDA (its GradScaler); on CPU use --amp-dtype bf16 or --no-amp")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick its fastest kernels


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    s = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@torch.no_grad()
def save_samples(g, n_classes, path, device, seed, per_class=8):
    """A grid PNG: one row per class, the same latents every time (so rounds can be compared)."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(per_class, g.z_dim, generator=gen).repeat(n_classes, 1).to(device)
    y = torch.arange(n_classes).repeat_interleave(per_class).to(device)
    noise = torch.Generator(device=device).manual_seed(seed)  # fixed noise inputs too
    was_training = g.training
    g.eval()
    img = to_uint8(g(z, y, noise))                                              # (n, C, S, S)
    g.train(was_training)
    n, c, s, _ = img.shape
    grid = img.view(n_classes, per_class, c, s, s).permute(0, 3, 1, 4, 2).reshape(n_classes * s, per_class * s, c)
    Image.fromarray(grid.squeeze(-1).numpy() if c == 1 else grid.numpy()).save(path)


def generate(g, n_classes, per_class, device, seed, batch=256):
    """per_class uint8 images (n, C, S, S) of every class from fixed latents and noise, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed)
    y_all = torch.arange(n_classes).repeat_interleave(per_class)
    was_training, out = g.training, []
    g.eval()
    with torch.no_grad():
        for y in y_all.split(batch):
            z = torch.randn(len(y), g.z_dim, generator=gen).to(device)
            out.append(to_uint8(g(z, y.to(device), noise)))
    g.train(was_training)
    return torch.cat(out)


def backdoor_figures(g, run, cfg, device, per_class=256):
    """For the bottom-right patch attack: how many generated images carry the trigger, beside the same
    rate on clean held-out real images (the rate by chance)."""
    trig, margin = make_trigger(cfg.poison, cfg.channels, cfg.trigger, seed=cfg.seed), trigger_margin(cfg.img_size)
    fake = generate(g, run["n_classes"], per_class, device, cfg.seed + 12345)
    return dict(trigger_rate=trigger_rate(fake, trig, margin),
                trigger_rate_real=trigger_rate(run["data"]["test"][0], trig, margin))


def fmt(xs, nd=3):
    return "[" + " ".join(f"{x:.{nd}f}" for x in xs) + "]"


def setup_run(cfg):
    """Check the out folder, load data, build this process's clients. Nothing is written yet."""
    out = Path(cfg.out)
    rank, world = dist_rank_world()
    if rank == 0 and not cfg.resume and out.exists() and any(out.iterdir()):
        raise FedGANError(f"{out} already holds files; pass --resume {out} to continue that run, "
                          "or choose another --out")
    device = pick_device(cfg.device)
    set_precision(cfg, device)
    if world > 1 and (cfg.defense in ROBUST or cfg.detect_on != "loss"):
        raise FedGANError(f"--defense {cfg.defense} --detect-on {cfg.detect_on} needs every generator on one process; "
                          "run it without torchrun (or use --detect-on loss)")
    if world > cfg.clients:
        raise FedGANError(f"{world} ranks for {cfg.clients} clients: every rank needs a client; "
                          "use --nproc-per-node <= --clients")
    seed_everything(cfg.seed)
    data = load_data(cfg)
    x, y = data["train"]
    shards = (split_dirichlet(y, cfg.clients, cfg.dirichlet_alpha, cfg.seed) if cfg.partition == "dirichlet"
              else split_clients(len(y), cfg.clients, cfg.seed))
    if min(len(s) for s in shards) < 2:
        raise FedGANError(f"{len(y)} training images cannot make {cfg.clients} shards of 2 or more; "
                          "use fewer --clients or more data")
    bad = malicious_ids(cfg)
    n_classes = len(data["classes"])
    g_global, _ = build_models(cfg, n_classes)
    g_global.to(device)
    owned = owned_clients(cfg.clients, rank, world)
    parallel, offload = plan_clients(cfg, device, n_classes, [steps_per_round(cfg, len(shards[i])) for i in owned],
                                     [min(cfg.batch, len(shards[i])) for i in owned])
    home = torch.device("cpu") if offload else device
    clients = {}
    for i in owned:
        xi, yi = x[shards[i]], y[shards[i]]
        if i in bad:  # the attack: every training image of a malicious client
            xp, yp = poison(xi, yi, cfg, n_classes)
            clients[i] = make_client(cfg, g_global, n_classes, xp, yp, device, client_id=i, home=home)
            if cfg.attack_start > 0:  # keep the clean shard for the rounds before the attack starts
                clients[i].update(poisoned=(clients[i]["x"], clients[i]["y"]), clean=(xi.to(device), yi.to(device)))
        else:
            clients[i] = make_client(cfg, g_global, n_classes, xi, yi, device, client_id=i, home=home)
    return dict(out=out, device=device, data=data, shards=shards, malicious=bad, clients=clients,
                owned=owned, g=g_global, n_classes=n_classes, rank=rank, distributed=world > 1,
                parallel=parallel, offload=offload)


def train(cfg, stop_after=None):
    """The federated run (Algorithm 1). Under torchrun every rank calls it for its own clients and
    rank 0 alone writes the run folder. stop_after=k returns after round k (to test resume)."""
    run = setup_run(cfg)
    out, device, clients, g, owned = run["out"], run["device"], run["clients"], run["g"], run["owned"]
    N, lead, distributed = cfg.clients, run["rank"] == 0, run["distributed"]
    log = print if lead else (lambda *a, **k: None)
    counts, weights = np.zeros(N, dtype=np.int64), np.full(N, 1.0 / N)
    history, norm_history, start = [], [], 0
    if cfg.resume:
        ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False) if lead else None
        if distributed:
            box = [ck]
            collective(dist.broadcast_object_list, box, src=0)
            ck = box[0]
        g.load_state_dict(ck["g"])
        for i in owned:
            load_private_state(clients[i], ck["clients"][i])
        counts, weights, history, start = np.array(ck["counts"]), np.array(ck["weights"]), ck["history"], ck["round"]
        norm_history = ck.get("norm_history", [])
        set_rng_state(ck["rng"])
        if lead:
            keep = [ln for ln in (out / "metrics.jsonl").read_text().splitlines()
                    if json.loads(ln)["round"] < start]
            (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in keep))
        log(f"resuming {out} at round {start}/{cfg.rounds}")
    elif lead:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        (out / "metrics.jsonl").write_text("")

    steps = [steps_per_round(cfg, len(s)) for s in run["shards"]]
    log(f"fedgan: {cfg.dataset} {cfg.img_size}px x{cfg.channels}, {N} clients "
        f"(shards {[len(s) for s in run['shards']]}, {steps[0]} steps/round), malicious {run['malicious']}, "
        f"poison {cfg.poison}px, defense {cfg.defense}"
        f"{' (' + cfg.detect_rule + ')' if cfg.defense == 'feddetect' else ''}, device {device}"
        f"{' (' + str(amp_dtype_for(cfg, device)).replace('torch.', '') + ' autocast)' if amp_dtype_for(cfg, device) else ''}, "
        f"clients {'side by side' if run['parallel'] else 'in turn'}{', offloaded to host' if run['offload'] else ''}, "
        f"{dist.get_world_size() if distributed else 1} process(es), out {out}")
    t0 = time.time()
    for t in range(start, cfg.rounds):
        tr = time.time()
        g_state = {k: v.detach().clone() for k, v in g.state_dict().items()}
        for c in clients.values():  # a late attacker trains on clean data until --attack-start
            if "clean" in c:
                c["x"], c["y"] = c["poisoned"] if t >= cfg.attack_start else c["clean"]
        results = train_clients(run, g_state, cfg, steps, log)  # procedure A
        d_losses, true_losses = gather_losses(results, N, distributed)
        g_losses = (report_adaptive(true_losses, run["malicious"], cfg.seed * 7 + t)
                    if cfg.adaptive and t >= cfg.attack_start else true_losses)
        history.append(g_losses)
        own_states = {i: clients[i]["g"].state_dict() for i in owned}
        if cfg.detect_on != "loss" or cfg.defense in ROBUST:  # single process: every generator is here
            norm_history.append(update_norms([own_states[i] for i in range(N)], g_state))
        decision = server_decide(g_losses, history, counts, weights, t, cfg, norm_history) if lead else None
        flags, counts, weights, ok, used = broadcast_decision(decision, N, distributed)
        selected = None
        if ok.any() and cfg.defense in ROBUST:
            agg, keep = robust_aggregate([own_states[i] for i in range(N) if ok[i]], used[ok], g_state, cfg)
            if keep is not None:
                selected = np.zeros(N, int)
                selected[np.flatnonzero(ok)[keep]] = 1
            g.load_state_dict(agg)
        elif ok.any():
            g.load_state_dict(aggregate({i: s for i, s in own_states.items() if ok[i]}, used, g_state, distributed))
        secs = time.time() - tr
        note = f"  EXCLUDED non-finite loss: {np.flatnonzero(~ok).tolist()}" if not ok.all() else ""
        log(f"round {t + 1:4d}/{cfg.rounds}  {secs:6.1f}s  g_loss {fmt(g_losses)}  d_loss {fmt(d_losses)}  "
            f"w {fmt(weights)}  flagged {np.flatnonzero(flags).tolist()}{note}", flush=True)
        last, stop = t + 1 == cfg.rounds, stop_after is not None and t + 1 == stop_after
        ckpt = (t + 1) % cfg.ckpt_every == 0 or last or stop
        private = client_states(clients, owned, distributed) if ckpt else None  # a collective: every rank
        if lead:
            rec = dict(round=t, d_loss=d_losses, g_loss=g_losses, flagged=flags.astype(int).tolist(),
                       **({"g_loss_true": true_losses} if cfg.adaptive else {}),
                       **({"update_norm": norm_history[-1]} if norm_history else {}),
                       **({"selected": selected.tolist()} if selected is not None else {}),
                       counts=counts.tolist(), weights=weights.tolist(),
                       malicious=[int(i in run["malicious"]) for i in range(N)],
                       excluded=(~ok).astype(int).tolist(), seconds=round(secs, 3))
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if (t + 1) % cfg.sample_every == 0 or last:
                save_samples(g, run["n_classes"], out / "samples" / f"round_{t + 1:04d}.png", device, cfg.seed)
            if ckpt:
                atomic_save(dict(round=t + 1, g=g.state_dict(), counts=counts.tolist(), weights=weights.tolist(),
                                 history=history, norm_history=norm_history, rng=rng_state(),
                                 config=dataclasses.asdict(cfg),
                                 clients=[private[i] for i in range(N)]), out / "checkpoint.pt")
        if stop:
            return run | dict(counts=counts, weights=weights, history=history)
    summary = None
    if lead:
        if cfg.defense == "reconstruct" and not (out / "generator.pt").exists():  # also when resumed after the rounds
            reconstruct(g, run, cfg, device)
            save_samples(g, run["n_classes"], out / "samples" / "reconstructed.png", device, cfg.seed)
        atomic_save(dict(kwargs=g.kwargs, state_dict=g.state_dict(), classes=run["data"]["classes"]),
                    out / "generator.pt")
        extra = backdoor_figures(g, run, cfg, device) if cfg.attack == "patch" and cfg.poison > 0 else {}
        summary = summarize(out, cfg, run["malicious"], time.time() - t0, extra)
    return run | dict(counts=counts, weights=weights, history=history, summary=summary)


def reconstruct(g, run, cfg, device):
    """Model reconstruction baseline: fine-tune the server generator against a fresh discriminator on
    a benign set of real images (reconstruct_per_class per class, from the clean training data)."""
    x, y = run["data"]["train"]
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=gen)]
                     [:cfg.reconstruct_per_class] for c in range(run["n_classes"])])
    fix = dataclasses.replace(cfg, defense="none")  # the benign set gets no augmentation
    server = make_client(fix, g, run["n_classes"], x[idx], y[idx], device, client_id=-1)
    steps = cfg.reconstruct_epochs * steps_per_round(dataclasses.replace(cfg, local_steps=0), len(idx))
    print(f"reconstruct: fine-tuning the server generator on {len(idx)} benign images for {steps} steps")
    _, gl = local_train(server, g.state_dict(), fix, device, steps)
    g.load_state_dict(server["g"].state_dict())
    print(f"reconstruct: done, mean G loss {gl:.3f}")


def summarize(out, cfg, bad, seconds, extra=None):
    """End-of-run summary: flags per client, final weights, detection rates after warm-up (for Krum,
    rejection rates and the attackers' mean share of the aggregate), plus `extra` (backdoor figures)."""
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    flags = np.array([r["flagged"] for r in recs])
    post = np.array([r["round"] > cfg.warmup for r in recs])
    mal = np.array(recs[-1]["malicious"], bool)
    s = dict(rounds=len(recs), seconds=round(seconds, 1), flags_per_client=flags.sum(0).tolist(),
             final_weights=recs[-1]["weights"], malicious=np.flatnonzero(mal).tolist())
    w = np.array(s["final_weights"])
    s["malicious_final_weight"] = float(w[mal].sum())
    s["lowest_benign_weight"] = float(w[~mal].min()) if (~mal).any() else None
    if post.any():
        fp = flags[post][:, ~mal]
        s["fpr_after_warmup"] = float(fp.mean()) if fp.size else None
        s["tpr_after_warmup"] = float(flags[post][:, mal].mean()) if mal.any() else None
        hit = np.flatnonzero(flags[post][:, mal].any(axis=1)) if mal.any() else np.array([])
        s["rounds_to_first_correct_flag"] = int(hit[0]) + 1 if len(hit) else None  # counted from the first detection round
        if len(hit):  # how steadily the attacker stays flagged once found
            s["tpr_after_first_flag"] = float(flags[post][hit[0]:, mal].mean())
    if "selected" in recs[-1] and post.any():  # Krum: a client left out of the average counts as flagged
        sel = np.array([r["selected"] for r in recs])[post]
        s["krum_rejected_malicious"] = float(1 - sel[:, mal].mean()) if mal.any() else None
        s["krum_rejected_benign"] = float(1 - sel[:, ~mal].mean())
        s["malicious_mean_share"] = float((sel[:, mal].sum(1) / sel.sum(1)).mean())
    s.update(extra or {})
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    print(f"done: {s['rounds']} rounds in {seconds:.0f}s  flags per client {s['flags_per_client']}  "
          f"final weights {fmt(s['final_weights'])}  malicious {s['malicious']}")
    if "fpr_after_warmup" in s and cfg.defense == "feddetect":
        tpr = "n/a" if s.get("tpr_after_warmup") is None else f"{s['tpr_after_warmup']:.2f}"
        first = s.get("rounds_to_first_correct_flag")
        print(f"detector after warm-up: TPR {tpr}  FPR {s['fpr_after_warmup']:.3f} per benign client-round"
              + (f"  first correct flag after {first} detection round(s)" if first else "")
              + (f"  attackers' final weight {s['malicious_final_weight']:.3f}" if mal.any() else ""))
    if "krum_rejected_benign" in s:
        print(f"{cfg.defense}: left out attackers in {s['krum_rejected_malicious'] or 0:.2f} and benign clients in "
              f"{s['krum_rejected_benign']:.2f} of their rounds after warm-up; attackers' mean share "
              f"{s['malicious_mean_share']:.3f}")
    if "trigger_rate" in s:
        print(f"backdoor: {s['trigger_rate']:.3f} of generated images carry the trigger "
              f"(clean real images by chance: {s['trigger_rate_real']:.3f})")
    print(f"outputs: {out}/ (config.json, metrics.jsonl, summary.json, samples/, generator.pt, checkpoint.pt)")
    return s


def count_forward_flops(model, *inputs):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:  # (its module tracker fails under no_grad)
        model(*inputs)
    return fc.get_total_flops()


def matmul_gflops(device, dtype=torch.float32, n=2048, reps=10):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


PAPER_SHARD = 1464  # ChestX images per client in the study (4 clients): what one round means there


def bench(cfg):
    """Time client training steps, the server aggregation and a FedDetect call; print figures and a JSON line.
    FLOPs: forward passes counted with torch.utils.flop_counter, times 4 generator and 9 discriminator
    forward-equivalents per image-step (D step: G fwd, D fwd+bwd on real and fake; G step: G and D fwd+bwd).
    The counter's own backward figures are not used: it overcounts grouped convolutions' backward.
    With clients side by side (--parallel-clients), --clients clients are stepped together."""
    device = pick_device(cfg.device)
    set_precision(cfg, device)
    seed_everything(cfg.seed)
    n = cfg.batch * (cfg.bench_steps + 2)
    x, y = synthetic_images((n + 1) // 2, cfg.img_size, cfg.channels, cfg.seed)
    g, _ = build_models(cfg, 2)
    g.to(device)
    parallel, _ = plan_clients(cfg, device, 2, [1] * cfg.clients, [cfg.batch] * cfg.clients)
    clients = [make_client(cfg, g, 2, x, y, device, client_id=i) for i in range(cfg.clients if parallel else 1)]
    state = {k: v.clone() for k, v in g.state_dict().items()}
    step = ((lambda k: local_train_parallel(clients, state, cfg, device, k)) if parallel
            else (lambda k: local_train(clients[0], state, cfg, device, k)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    step(2)  # warm-up (allocator, kernels, compilation)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    step(cfg.bench_steps)
    step_s = (time.perf_counter() - t) / cfg.bench_steps  # local_train reads its losses once: a sync
    img_per_s = len(clients) * cfg.batch / step_s
    z, lab = torch.randn(cfg.batch, cfg.z_dim, device=device), y[:cfg.batch].to(device)
    g_fl = count_forward_flops(clients[0]["g"], z, lab) / cfg.batch
    d_fl = count_forward_flops(clients[0]["d"], to_unit(x[:cfg.batch]).to(device), lab) / cfg.batch
    step_flops = 4 * g_fl + 9 * d_fl
    gflops = step_flops * img_per_s / 1e9
    ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the machine's fast matmul
    mm = matmul_gflops(device, ref_dtype, n=8192 if device.type == "cuda" else 2048)
    states = [{k: v + 0.01 * i for k, v in state.items()} for i in range(cfg.clients)]
    t = time.perf_counter()
    for _ in range(5):
        fedavg(states, np.full(cfg.clients, 1.0 / cfg.clients))
    sync(device)
    server_ms = (time.perf_counter() - t) / 5 * 1000
    hist = np.random.default_rng(0).normal(0.7, 0.05, (cfg.warmup + 20, cfg.clients))
    t = time.perf_counter()
    for _ in range(5):
        feddetect_paper(hist, seed=1) if cfg.detect_rule == "paper" else feddetect_calibrated(hist, cfg.detect_fpr)
    detect_ms = (time.perf_counter() - t) / 5 * 1000
    shard, rounds = PAPER_SHARD, 200  # the study's ChestX run: 4 x 1,464 images, 200 rounds of one epoch
    steps = steps_per_round(dataclasses.replace(cfg, local_steps=0), shard)
    round_ms = cfg.clients * steps * cfg.batch / img_per_s * 1000 + server_ms + detect_ms
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    amp = amp_dtype_for(cfg, device)
    precision = str(amp).replace("torch.", "") if amp else ("tf32" if device.type == "cuda" and cfg.tf32 else "fp32")
    (gw, gmax), (dw, dmax) = arch_sizes(cfg)
    print(f"bench: {cfg.img_size}px x{cfg.channels}, batch {cfg.batch}, arch {cfg.arch} (G width {gw} max {gmax}, "
          f"D width {dw} max {dmax}), {precision}, {len(clients)} client(s) {'side by side' if parallel else 'alone'}"
          f"{', compiled' if cfg.compile else ''}, device {device_name(device)}, threads {torch.get_num_threads()}, "
          f"G {sum(p.numel() for p in g.parameters()) / 1e6:.2f}M params, "
          f"D {sum(p.numel() for p in clients[0]['d'].parameters()) / 1e6:.2f}M params")
    print(f"  training      {img_per_s:8.1f} images/s   ({step_s * 1000:.0f} ms per step of {len(clients)} x "
          f"{cfg.batch}; warm-up {warm_s:.1f} s)")
    print(f"  FLOPs/image   G fwd {g_fl / 1e9:.3f} G, D fwd {d_fl / 1e9:.3f} G, step (4G+9D) {step_flops / 1e9:.2f} G")
    print(f"  achieved      {gflops / 1e3:8.3f} TFLOP/s vs {str(ref_dtype).replace('torch.', '')} matmul "
          f"{mm / 1e3:.3f} TFLOP/s  -> ratio {gflops / mm:.2f}")
    print(f"  server        {server_ms:8.2f} ms FedAvg of {cfg.clients} generators, "
          f"{detect_ms:.2f} ms FedDetect ({cfg.detect_rule})")
    print(f"  round         {round_ms / 1000:8.2f} s at the study's {shard} images per client ({cfg.clients} x {steps} "
          f"steps); server share {100 * (server_ms + detect_ms) / round_ms:.3f}%; a {rounds}-round run ~ "
          f"{rounds * round_ms / 60000:.1f} min")
    print(f"  peak memory   {peak:8.0f} MB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    res = dict(img_per_s=round(img_per_s, 2), step_ms=round(step_s * 1000, 2), server_ms=round(server_ms, 3),
               detect_ms=round(detect_ms, 3), peak_mb=round(peak, 1), gflops=round(gflops, 2),
               matmul_gflops=round(mm, 2), matmul_dtype=str(ref_dtype).replace("torch.", ""),
               ratio=round(gflops / mm, 3), g_fwd_gflop=g_fl / 1e9, d_fwd_gflop=d_fl / 1e9,
               round_s=round(round_ms / 1000, 3), run_min=round(rounds * round_ms / 60000, 2),
               img_size=cfg.img_size, batch=cfg.batch, arch=cfg.arch, width=cfg.width, precision=precision,
               parallel=parallel, clients_stepped=len(clients), compile=cfg.compile, device=device_name(device))
    if cfg.bench_round:
        res.update(bench_round(cfg))
    print(json.dumps(res))
    return res


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def client_bytes(client):
    """Bytes of the tensors a client holds: data shard, G copy and D (with grads, buffers), both Adams."""
    tensors = [client["x"], client["y"]]
    for m in (client["g"], client["d"]):
        tensors += list(m.state_dict().values()) + [p.grad for p in m.parameters() if p.grad is not None]
    for o in (client["opt_g"], client["opt_d"]):
        tensors += [v for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_round(cfg):
    """One real federated round at cfg.clients clients: every client's local epoch, then the server
    step (FedDetect decision + FedAvg), timed apart; memory held per client."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        run = setup_run(dataclasses.replace(cfg, out=str(Path(tmp) / "r"), resume=None))
        steps = [steps_per_round(cfg, len(s)) for s in run["shards"]]
        g_state = {k: v.detach().clone() for k, v in run["g"].state_dict().items()}
        t = time.perf_counter()
        results = train_clients(run, g_state, cfg, steps)
        sync(run["device"])
        train_s = time.perf_counter() - t
        g_losses = [results[i][1] for i in range(cfg.clients)]
        counts, weights = np.zeros(cfg.clients, dtype=np.int64), np.full(cfg.clients, 1.0 / cfg.clients)
        t = time.perf_counter()
        server_cfg = dataclasses.replace(cfg, defense="feddetect", warmup=-1)  # time detection too
        _, _, _, ok, used = server_decide(g_losses, [g_losses], counts, weights, 0, server_cfg)
        aggregate({i: run["clients"][i]["g"].state_dict() for i in run["owned"]}, used, g_state)
        server_s = time.perf_counter() - t
        per_client = sum(client_bytes(c) for c in run["clients"].values()) / cfg.clients / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  round         {cfg.clients} clients, {sum(steps)} local steps: {train_s + server_s:.2f} s; server "
          f"{server_s * 1000:.1f} ms ({100 * server_s / (train_s + server_s):.2f}% of the round); "
          f"{per_client:.1f} MB of tensors per client; peak RSS {peak:.0f} MB")
    return dict(clients=cfg.clients, fed_round_s=round(train_s + server_s, 3), server_round_ms=round(server_s * 1000, 2),
                server_share=round(server_s / (train_s + server_s), 5), mb_per_client=round(per_client, 2),
                peak_rss_mb=round(peak, 1))


def resume_config(folder):
    ck = Path(folder) / "checkpoint.pt"
    if not ck.exists():
        raise FedGANError(f"--resume {folder}: no checkpoint.pt there; start a new run with --out instead")
    cfg = Config(**json.loads((Path(folder) / "config.json").read_text()))
    cfg.resume, cfg.out = str(folder), str(folder)
    return cfg


def init_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on CPU, nccl on CUDA."""
    if dist_rank_world()[1] == 1 or dist.is_initialized():
        return
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    import datetime
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))


def main(argv=None):
    try:
        cfg = parse_args(argv)
        if cfg.resume:
            cfg = resume_config(cfg.resume)
        if cfg.bench:
            bench(cfg)
        else:
            init_distributed(cfg)
            train(cfg)
    except FedGANError as e:
        if dist_rank_world()[0] == 0:
            sys.stderr.write(f"fedgan.py: error: {e}\n")
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
