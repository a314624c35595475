"""fedgan: a robust federated conditional GAN for medical image synthesis, in one file.

N clients (hospitals) each train a conditional GAN: a StyleGAN2-style generator and a DCGAN
discriminator, both taking the class label. Only generators (and each client's scalar generator loss)
reach the server, which averages them with per-client weights (FedAvg). A malicious minority pastes a
trigger on its training images (the backdoor attack); FedDetect, an isolation forest on the reported
losses, finds it and decays its weight (Algorithm 1 of the paper).

    python fedgan.py                                          # embedded synthetic data, a few minutes on CPU
    python fedgan.py --dataset chestx --poison 64 --defense feddetect
    python fedgan.py --dataset chestx --data-root pneumoniamnist.npz --img-size 32 --poison 8 \
                     --detector calibrated --aggregator multi-krum
    python fedgan.py --resume runs/NAME [--rounds 400]        # continue (or extend) a stopped run
    python fedgan.py --bench --img-size 64                    # speed figures, last line JSON

One round is procedure A on every client (`client_update`) and procedure B on the server
(`server_round`); the defense is composed once, before the first round, from four orthogonal parts:
an augmentation, a detector, an aggregator and a post-hoc step (`make_defense`).

References: Jin et al., "Backdoor Attack and Defense in Federated GAN-based Medical Image Synthesis"
(FedDetect); Karras et al. 2020, StyleGAN2 (modulated convolution, equalized learning rate);
Radford et al. 2016, DCGAN; Miyato & Koyama 2018, projection discriminator; McMahan et al. 2017, FedAvg;
Blanchard et al. 2017, Krum; Liu, Ting & Zhou 2008, isolation forest (isoforest.py); Page 1954, CUSUM.
"""

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from isoforest import IsolationForest

# ------------------------------------------------------------------------------------------------
# Config: the only place that knows every flag. Functions below take the plain values they use.
# ------------------------------------------------------------------------------------------------

PRESETS = {  # flags given on the command line win over these
    "synthetic": dict(img_size=32, channels=1, decay=0.8, rounds=40, width=8, tanh=True),  # the first run
    "chestx": dict(img_size=256, channels=1, decay=0.8, rounds=200, width=32, tanh=False),
    "isic": dict(img_size=256, channels=3, decay=0.9, rounds=200, width=32, tanh=False),
}


def preset(key, extra=""):
    """'(preset: synthetic 40, chestx 200, isic 200)': the help text of a preset flag, read from PRESETS so
    it cannot drift from the values used."""
    return "(preset: " + ", ".join(f"{name} {p[key]}" for name, p in PRESETS.items()) + extra + ")"


def opt(default, help, group="training", **kw):
    """A dataclass field whose help text becomes --help (CleanRL style), shown under `group`."""
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class Config:
    # data
    dataset: str = opt("synthetic", "synthetic (embedded, made from the seed) | chestx | isic", "data",
                       choices=["synthetic", "chestx", "isic"])
    data_root: str = opt(None, "class-per-folder tree (Kermany train/test layout too) or MedMNIST-style .npz "
                               "(default: data/<name>, else ../shared/data/<name>; name chest_xray or isic)", "data")
    img_size: int = opt(None, "training resolution, a power of two in 16..256 " + preset("img_size"),
                        "data")
    channels: int = opt(None, "1 gray or 3 RGB " + preset("channels", "; synthetic 3 = lesion-like RGB"),
                        "data")
    synthetic_per_class: int = opt(256, "synthetic data: training images per class (test: a quarter of that)", "data")
    test_frac: float = opt(0.1, "held-out fraction per class when the data has no test split", "data")
    clients: int = opt(4, "number of clients N; the training set is split into N shards; 1 = the centralized "
                          "reference (one party, all the data: give it N times the local steps to match a federation "
                          "of N at equal image-steps)", "data")
    partition: str = opt("iid", "client shards: iid (random, equal) | dirichlet (class mix ~ Dir(alpha) per client)",
                         "data", choices=["iid", "dirichlet"])
    dirichlet_alpha: float = opt(0.5, "Dirichlet concentration: small = very non-IID", "data")
    # attack
    poison: int = opt(0, "trigger size in pixels at the training resolution; 0 = no patch attack", "attack")
    attack: str = opt("patch", "what malicious clients do to their data: patch (the paper's trigger, bottom-right; "
                               "needs --poison) | blend (a fixed noise image mixed in at --blend-alpha) | "
                               "label-flip (labels permuted) | "
                               "latent (data clean; a loss on the attacker's own generator teaches it the "
                               "trigger only on latents with z_0 > 1.28, a tenth of them, so a probe on a few "
                               "latents can miss it; needs --poison)", "attack",
                      choices=["patch", "blend", "label-flip", "latent"])
    blend_alpha: float = opt(0.2, "strength of the blend attack, in (0, 1]", "attack")
    poison_frac: float = opt(1.0, "share of a malicious client's images that carry the attack, in (0, 1]; below 1 "
                                  "its generator draws the trigger on about that share of latents, so renders on "
                                  "a probe depart less from benign ones (the probe-aware attacker)", "attack")
    malicious: int = opt(None, "number K of malicious clients, chosen at random from the seed "
                               "(default 1 when attacking)", "attack")
    malicious_ids: str = opt(None, "explicit malicious client ids, comma separated (overrides --malicious)", "attack")
    adaptive: bool = opt(False, "malicious clients report a loss drawn from the benign clients' range of the round, "
                                "while still training on poisoned data (an attacker who knows the detector)", "attack")
    scale_update: bool = opt(False, "malicious clients scale their update G_i - G to a norm inside the benign "
                                    "clients' range of the round (AdaSCP's idea, simplified), to pass "
                                    "distance-based defenses", "attack")
    # defense: a shortcut, then the four parts it stands for
    defense: str = opt("none", "the paper-facing shortcut for one part below: feddetect (= --detector paper) | flip | "
                               "rotate (= --augment) | reconstruct (= --posthoc) | multi-krum (= --aggregator) | none",
                       "defense", choices=["none", "feddetect", "flip", "rotate", "reconstruct", "multi-krum"])
    augment: str = opt(None, "augmentation of every client's real batches: none | flip | rotate (default none)",
                       "defense: augmentation", choices=["none", "flip", "rotate"])
    detector: str = opt(None, "FedDetect's rule: none | paper (Algorithm 1, isolation forest) | calibrated (robust "
                              "z-score + CUSUM, false alarms held to --detect-fpr) | probe (the server renders every "
                              "generator on fresh secret latents each round and flags a client whose moving average "
                              "of local departures stands out; reads nothing the clients report) | flame "
                              "(updates outside the majority's cosine density) (default none; "
                              "--detect-rule is the old name)", "defense: detector",
                        choices=lambda: list(DETECTORS),  # read when parsing: a new entry is a new choice
                        aliases=["--detect-rule"])
    probe_per_class: int = opt(64, "--detector probe: images per class rendered by every client's generator each "
                                   "round", "defense: detector")
    shadow: bool = opt(False, "also log, every round, what each detector (paper and calibrated on the loss, the "
                              "probe detector as probe-watch, flame) would flag; only the chosen defense acts",
                       "defense: detector")
    detect_fpr: float = opt(0.001, "calibrated rule: false-alarm rate per client-round on i.i.d. losses that sets "
                                   "its threshold (0.01 would mean ~8 false flags per 200 rounds of 4 clients)",
                            "defense: detector")
    warmup: int = opt(10, "warm-up m: detection runs in rounds t > m (t counted from 0)", "defense: detector")
    probe_level: float = opt(6.0, "--detector probe: a client is flagged when its score (the peak of its moving "
                                  "average local departure) exceeds this many times the clients' median score",
                             "defense: detector")
    recover: bool = opt(False, "a client no longer flagged gets its last decay back each detection round (not in "
                               "the paper, where a flag's decay is for good)", "defense: detector")
    decay: float = opt(None, "Algorithm 1's d in (0, 1): a flagged client's aggregation weight is multiplied by "
                             "d^c_i, c_i its flag count (not the optimizer's weight decay) " + preset("decay"),
                      "defense: detector")
    aggregator: str = opt(None, "how the server combines generators: fedavg | multi-krum (default fedavg)",
                          "defense: aggregator", choices=["fedavg", "multi-krum"])
    posthoc: str = opt(None, "after the last round: none | reconstruct (fine-tune the server generator on benign "
                             "real images) (default none)", "defense: post-hoc", choices=["none", "reconstruct"])
    reconstruct_per_class: int = opt(500, "reconstruct: benign real images per class for fine-tuning",
                                     "defense: post-hoc")
    reconstruct_epochs: int = opt(200, "reconstruct: fine-tuning epochs over that benign set", "defense: post-hoc")
    # training
    rounds: int = opt(None, "global rounds T " + preset("rounds"))
    local_steps: int = opt(0, "local D+G steps per round; 0 = one local epoch over the client's shard")
    batch: int = opt(32, "batch size")
    recipe: str = opt("fedgan", "fedgan (Adam 2e-3, betas 0/0.99 as StyleGAN2, D on one joint batch of real and "
                                "fake images, so BatchNorm lets it see a fake batch's contrast; see docs/results.md) | "
                                "paper (Adam 2e-4, betas 0.5/0.999, D on separate real and fake batches, as the "
                                "paper's DCGAN code); --lr, --beta1, --beta2 given on their own win",
                      choices=["fedgan", "paper"])
    lr: float = opt(None, "Adam learning rate for G and D (recipe: paper 2e-4, fedgan 2e-3)")
    beta1: float = opt(None, "Adam's beta1 for G and D (recipe: paper 0.5, fedgan 0)")
    beta2: float = opt(None, "Adam's beta2 for G and D (recipe: paper 0.999, fedgan 0.99)")
    arch: str = opt("auto", "auto (paper on CUDA, small on a CPU, which says so in the log) | small (sized by "
                            "--width/--max-channels, suits a CPU) | paper (the study's sizes: G channels 32768/res up "
                            "to 512 with StyleGAN2's transposed-conv upsampling, D from 64 doubling to 2048 at 4x4)",
                    choices=["auto", "small", "paper"])
    width: int = opt(None, "model width: generator channels = min(max, width * img_size / res); "
                           "discriminator starts at width and doubles " + preset("width"))
    max_channels: int = opt(256, "channel cap for both networks")
    tanh: bool = opt(None, "end the generator in tanh, as DCGAN's does: its images stay inside (-1, 1); off: "
                           "StyleGAN2's linear output, clipped when saved (the study's tables in docs/results.md) "
                           + preset("tanh"))
    z_dim: int = opt(64, "latent size")
    w_dim: int = opt(128, "style (w) size")
    seed: int = opt(0, "seeds data split, models, training and the detector")
    # speed (may change on --resume: they do not change the experiment)
    device: str = opt("auto", "auto | cpu | cuda", "speed", choices=["auto", "cpu", "cuda"])
    amp: bool = opt(True, "mixed precision, torch.autocast (default on, which means: used on CUDA; a CPU run stays "
                          "fp32 unless --amp-dtype bf16); --no-amp: fp32 everywhere", "speed")
    amp_dtype: str = opt("auto", "auto (CUDA: bf16 where supported, else fp16 + GradScaler; CPU: fp32) | bf16 | fp16",
                         "speed", choices=["auto", "bf16", "fp16"])
    tf32: bool = opt(True, "TF32 tensor cores for fp32 matmuls and convolutions on CUDA (when autocast is off)", "speed")
    channels_last: bool = opt(True, "NHWC memory format for models and batches on CUDA", "speed")
    compile: bool = opt(False, "torch.compile the generator and discriminator (slow first round, faster after)", "speed")
    offload: str = opt("auto", "keep each client's private state (D, optimizers, G copy) in host memory between "
                               "its turns: auto (when N clients would not fit the GPU) | on | off", "speed",
                       choices=["auto", "on", "off"])
    # run folder
    out: str = opt(None, "run folder (default runs/<dataset>_<defense>_p<poison>_s<seed>_<time>)", "run")
    resume: str = opt(None, "continue the run in this folder; --rounds extends it; the speed flags, --ckpt-every, "
                            "--sample-every and --data-root (the same data moved: checked by its fingerprint) may "
                            "change, the experiment's flags and --out may not", "run")
    ckpt_every: int = opt(5, "write checkpoint.pt (atomically) every this many rounds", "run")
    sample_every: int = opt(5, "write samples/round_NNNN.png every this many rounds", "run")
    bench: bool = opt(False, "time training steps, server aggregation and FedDetect; print figures and a JSON line",
                      "benchmark")
    bench_steps: int = opt(5, "bench: timed training steps", "benchmark")
    bench_round: bool = opt(False, "bench: also time one whole federated round of --clients clients on the chosen "
                                   "data (round time, server share, memory per client)", "benchmark")


RECIPES = {  # flags given on the command line win over these; runs written before --recipe used "paper"
    "paper": dict(lr=2e-4, beta1=0.5, beta2=0.999),
    "fedgan": dict(lr=2e-3, beta1=0.0, beta2=0.99),
}
JOINT_D = dict(paper=False, fedgan=True)  # does D see a step's real and fake images as one batch?
# Removed, each with the commit that has its code (docs/results.md keeps the tables of what was measured): a
# run written with one of them on cannot be resumed or rebuilt here. field: (on?, commit, why it went)
GONE = dict(**{k: (bool, "97daaf9", "it measured no gain") for k in ("ema", "r1", "class_loss", "rollback")},
            attack_start=(bool, "2f12077", "never measured"),
            trigger=(lambda v: v != "auto", "a23dbf2", "never measured"),
            **{k: (lambda v: v in ("median", "trimmed-mean", "krum", "clip"),
                   "2f12077 (median, trimmed mean) or 58fc84b (krum, clip)", "never measured")
               for k in ("aggregator", "defense")},
            detect_on=(lambda v: v != "loss", "c4e5e03 (update-norm, both) or 67a8ed1 (probe, loss+probe)",
                       "it did not earn its place in docs/results.md's tables, sections 7 and 9"),
            detector=(lambda v: v == "freqfed", "c4e5e03", "it measured no gain over flame"))
CLASS_NAMES = {"chestx": ["NORMAL", "PNEUMONIA"], "isic": ["benign", "malignant"]}
SHORTCUT_PART = dict(feddetect=("detector", "paper"), flip=("augment", "flip"), rotate=("augment", "rotate"),
                     reconstruct=("posthoc", "reconstruct"))  # every other --defense value is an aggregator
PART_DEFAULTS = dict(augment="none", detector="none", aggregator="fedavg", posthoc="none")
# What --resume may change: how fast and where it runs, how often it writes, and how long it goes on.
# --data-root may point to the same data moved elsewhere: its fingerprint is checked against the run's.
RESUMABLE = {"rounds", "device", "amp", "amp_dtype", "tf32", "channels_last", "compile",
             "offload", "ckpt_every", "sample_every", "resume", "data_root"}


class FedGANError(Exception):
    """Bad input: main() prints the message as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message} (see python {self.prog} --help)\n")
        sys.exit(2)


def parse_flags(argv=None):
    """The flags given on the command line, as {field: value} (defaults left out, prefixes refused)."""
    p = _Parser(prog="fedgan.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for f in dataclasses.fields(Config):
        g = f.metadata["group"]
        group = groups.get(g) or groups.setdefault(g, p.add_argument_group(g))
        names = ["--" + f.name.replace("_", "-")] + f.metadata.get("aliases", [])
        help = f.metadata["help"] + ("" if f.default is None or "(default" in f.metadata["help"]
                                     else f" (default {f.default})")
        if f.type is bool:
            group.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=help,
                               action=argparse.BooleanOptionalAction)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, type=f.type, help=help,
                               choices=choices() if callable(choices) else choices, metavar=f.name.upper())
    return vars(p.parse_args(argv))


def parse_args(argv=None):
    """Config from the command line, presets filled and every value checked (not for --resume)."""
    flags = parse_flags(argv)
    cfg = finalize(Config(**flags))
    check_needs(cfg, flags)
    return cfg


def finalize(cfg):
    """Fill presets, resolve the defense into its parts and check every value before anything is read
    or written."""
    for k, v in {**PRESETS[cfg.dataset], **RECIPES[cfg.recipe]}.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    resolve_defense(cfg)
    if cfg.arch == "auto":  # the paper's networks where they can train, and a line saying so where they cannot
        cfg.arch = "paper" if pick_device(cfg.device).type == "cuda" else "small"
    s = cfg.img_size
    if s < 16 or s > 256 or s & (s - 1):
        raise FedGANError(f"--img-size {s} is not a power of two in 16..256; use 16, 32, 64, 128 or 256")
    if cfg.channels not in (1, 3):
        raise FedGANError(f"--channels {cfg.channels} must be 1 (gray) or 3 (RGB)")
    if cfg.clients < 1:
        raise FedGANError(f"--clients {cfg.clients} must be at least 1 (1 = the centralized reference)")
    if cfg.clients == 1 and (attacking(cfg) or cfg.malicious or cfg.malicious_ids or cfg.detector != "none"
                             or cfg.aggregator != "fedavg" or cfg.shadow or cfg.partition != "iid"):
        raise FedGANError("--clients 1 is the centralized reference: one party trains on all the data, so there is "
                          "no attack, detector, robust aggregator or partition to run; use --clients 2 or more")
    if cfg.dataset == "synthetic" and cfg.data_root:
        raise FedGANError(f"--data-root {cfg.data_root} is read only by --dataset chestx or isic (synthetic data is "
                          "made from the seed); add --dataset chestx (gray) or --dataset isic (RGB)")
    check_ranges(cfg)
    if cfg.poison < 0 or cfg.poison + trigger_margin(s) > s:
        raise FedGANError(f"--poison {cfg.poison} px does not fit a {s} px image with its {trigger_margin(s)} px "
                          f"margin; use at most {s - trigger_margin(s)} or a larger --img-size")
    if cfg.aggregator == "multi-krum" and cfg.clients < 4:
        raise FedGANError(f"--aggregator {cfg.aggregator} scores each client by its n - f - 2 nearest others, none "
                          f"with {cfg.clients} clients (f = {threat_bound(cfg.clients)}); use --clients 4 or more")
    check_attackers(cfg)
    check_out_path(cfg)
    return cfg


def check_attackers(cfg):
    """The malicious clients: some when there is an attack, none without, a minority, within 0..N-1."""
    ids = malicious_ids(cfg)
    if attacking(cfg) and not ids:
        raise FedGANError("an attack needs at least one malicious client (--malicious K or --malicious-ids)")
    if ids and not attacking(cfg):
        raise FedGANError("malicious clients without an attack: add --poison SIZE (trigger pixels) or another "
                          "--attack, or drop --malicious/--malicious-ids")
    if cfg.scale_update and not ids:
        raise FedGANError("--scale-update needs an attack (malicious clients) to scale")
    if cfg.adaptive and cfg.detector == "none" and not cfg.shadow:
        raise FedGANError("--adaptive fakes the loss a detector reads; use it with --detector paper|calibrated "
                          "(or --defense feddetect, or --shadow)")
    if len(ids) >= cfg.clients / 2:
        most = math.ceil(cfg.clients / 2) - 1
        raise FedGANError(f"{len(ids)} malicious of {cfg.clients} clients is not a minority; the threat model "
                          f"needs K < N/2, so " + (f"use --malicious {most} or fewer" if most >= 1 else
                                                   f"an attack needs --clients {2 * len(ids) + 1} or more"))
    if any(i < 0 or i >= cfg.clients for i in ids):
        raise FedGANError(f"--malicious-ids {cfg.malicious_ids} names a client outside 0..{cfg.clients - 1}")


def check_out_path(cfg):
    """--out: named (a default from the settings and the time), not empty, not inside the data folder."""
    if cfg.out is None:
        cfg.out = f"runs/{cfg.dataset}_{cfg.defense}_p{cfg.poison}_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    if not cfg.out.strip():
        raise FedGANError("--out is empty; give the run folder a path, e.g. --out runs/first")
    data = Path(cfg.data_root or default_data_root(cfg.dataset)) if cfg.dataset != "synthetic" else None
    out = Path(cfg.out).resolve()
    if data is not None and data.is_dir() and data.resolve() in [out, *out.parents]:
        raise FedGANError(f"--out {cfg.out} lies inside the data folder {data}, where the next run would read it as a "
                          "class folder; choose a folder outside it")


def resolve_defense(cfg):
    """--defense X is a shortcut for one part (FedDetect = a detector, flip = an augmentation, ...);
    parts given as their own flags win, and a part may not contradict the shortcut."""
    if cfg.defense != "none":
        part, value = SHORTCUT_PART.get(cfg.defense, ("aggregator", cfg.defense))
        given = getattr(cfg, part)
        if given is None:
            setattr(cfg, part, value)
        elif given != value and not (part == "detector" and given != "none"):  # feddetect: any rule
            raise FedGANError(f"--defense {cfg.defense} sets --{part} {value}, but --{part} {given} was given; "
                              f"drop one of them")
    for part, value in PART_DEFAULTS.items():
        if getattr(cfg, part) is None:
            setattr(cfg, part, value)


def check_ranges(cfg):
    """Every numeric flag inside the range where it means something."""
    at_least = dict(rounds=1, batch=1, width=1, max_channels=1, z_dim=1, w_dim=1, ckpt_every=1, sample_every=1,
                    bench_steps=1, synthetic_per_class=2, reconstruct_per_class=1, reconstruct_epochs=1,
                    local_steps=0, warmup=-1, probe_per_class=2)
    for k, lo in at_least.items():
        if getattr(cfg, k) < lo:
            raise FedGANError(f"--{k.replace('_', '-')} {getattr(cfg, k)} must be at least {lo}")
    between = dict(lr=(0, 1, "lie in (0, 1)"), beta1=(-1e-12, 1, "lie in [0, 1)"), beta2=(0, 1, "lie in (0, 1)"),
                   decay=(0, 1, "lie in (0, 1)"), detect_fpr=(0, 0.5, "lie in (0, 0.5)"),
                   test_frac=(0, 1, "lie in (0, 1)"), blend_alpha=(0, 1.0000001, "lie in (0, 1]"),
                   poison_frac=(0, 1.0000001, "lie in (0, 1]"),
                   dirichlet_alpha=(0, math.inf, "be above 0"))
    for k, (lo, hi, text) in between.items():
        if not lo < getattr(cfg, k) < hi:
            raise FedGANError(f"--{k.replace('_', '-')} {getattr(cfg, k)} must {text}")
    if not 0 <= cfg.seed < 2 ** 32:
        raise FedGANError(f"--seed {cfg.seed} must lie in [0, 2^32)")


# flag -> (when it means something, the flag that makes it so): a flag given without it does nothing
NEEDS = dict(
    probe_level=(lambda c: c.detector == "probe", "--detector probe"),
    recover=(lambda c: c.detector != "none", "--detector paper|calibrated|probe (or --defense feddetect)"),
    detect_fpr=(lambda c: c.detector == "calibrated" or c.shadow, "--detector calibrated (or --shadow)"),
    probe_per_class=(lambda c: c.shadow or c.detector == "probe", "--detector probe (or --shadow)"),
    dirichlet_alpha=(lambda c: c.partition == "dirichlet", "--partition dirichlet"),
    blend_alpha=(lambda c: c.attack == "blend", "--attack blend"),
    poison_frac=(lambda c: attacking(c), "an attack (--poison SIZE or --attack)"),
    reconstruct_per_class=(lambda c: c.posthoc == "reconstruct", "--posthoc reconstruct (or --defense reconstruct)"),
    reconstruct_epochs=(lambda c: c.posthoc == "reconstruct", "--posthoc reconstruct (or --defense reconstruct)"),
    synthetic_per_class=(lambda c: c.dataset == "synthetic", "--dataset synthetic"),
    warmup=(lambda c: c.detector != "none" or c.shadow, "--detector paper|calibrated|probe (or --defense feddetect)"),
    decay=(lambda c: c.detector != "none", "--detector paper|calibrated|probe (or --defense feddetect)"),
    poison=(lambda c: c.attack in ("patch", "latent"), "--attack patch|latent (the attacks with a trigger patch)"),
    tanh=(lambda c: c.dataset == "synthetic" or not c.tanh, "--dataset synthetic (chestx and isic keep StyleGAN2's "
                                                           "linear output, as the study did)"),
    bench_steps=(lambda c: c.bench, "--bench"),
    bench_round=(lambda c: c.bench, "--bench"),
)


def check_needs(cfg, given):
    """Refuse a flag given on the command line that does nothing without another one (after finalize)."""
    for k in given:
        if k in NEEDS and not NEEDS[k][0](cfg):
            raise FedGANError(f"--{k.replace('_', '-')} does nothing without {NEEDS[k][1]}; add that, or drop "
                              f"--{k.replace('_', '-')}")
    if "detector" in given and given.get("defense") == "feddetect" and cfg.detector != "paper":
        print(f"note: --detector {cfg.detector} replaces the isolation forest that --defense feddetect stands for "
              "(Algorithm 1's weight update stays)", file=sys.stderr)
    if "malicious" in given and "malicious_ids" in given:
        raise FedGANError("--malicious K and --malicious-ids name the malicious clients twice; give one of them")


def attacking(cfg):
    """Is there an attack? The patch attacks need a trigger size; the others are on when chosen."""
    return cfg.poison > 0 if cfg.attack in ("patch", "latent") else True


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


def config_from_json(d, where):
    """A Config from config.json, also one written before the defense had parts (detect_rule)."""
    d = {k: v for k, v in d.items() if k not in ("environment", "data")}  # records of the run, not settings
    if "detect_rule" in d:  # written before --detector: the rule applied only under --defense feddetect
        rule = d.pop("detect_rule")
        d.setdefault("detector", rule if d.get("defense") == "feddetect" else "none")
    d.setdefault("recipe", "paper")  # written before the recipe's fields existed: the paper's recipe ran
    for k, v in RECIPES["paper"].items():
        d.setdefault(k, v)
    d.setdefault("tanh", False)  # written before --tanh: the linear output ran
    for k, (on, commit, why) in GONE.items():
        if k in d and on(d[k]):
            raise FedGANError(f"{where} was written with --{k.replace('_', '-')} {d[k]}, which this fedgan.py no "
                              f"longer has ({why}; commit {commit} has it): continue the run with that version")
    names = {f.name for f in dataclasses.fields(Config)}
    for k in (*GONE, "trim", "parallel_clients"):  # gone and off here; side by side: speed only
        if k not in names:
            d.pop(k, None)
    if d.pop("d_batch", None) not in (None, "joint" if JOINT_D[d["recipe"]] else "separate"):
        raise FedGANError(f"{where} was written with a --d-batch that differs from its --recipe's, which this "
                          "fedgan.py no longer offers (commit 97daaf9 has it): continue the run with that version")
    unknown = sorted(set(d) - names)
    if unknown:
        raise FedGANError(f"{where} holds settings this fedgan.py does not know ({', '.join(unknown)}); "
                          "it was written by another version")
    return Config(**d)


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


def to_channels(x, channels):
    """Gray <-> RGB for uint8 (n, C, H, W): repeat gray, or take ITU-R 601 luminance."""
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    lum = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    return (x.float() * lum).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


COMMON_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")  # named in messages


@functools.lru_cache(maxsize=None)
def image_ext():
    """Every file suffix Pillow can open here (PNG, JPEG, TIFF, BMP, WebP, GIF, PGM, ...)."""
    from PIL import Image
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def float_scale(arrays):
    """The scale of float image data, decided once for a whole file from its 99.9th percentile (so a few
    stray values cannot flip it): 255 for data in [0, 1], 1 for data in [0, 255]; None if not float."""
    floats = [np.asarray(a) for a in arrays if np.asarray(a).dtype.kind == "f" and np.asarray(a).size]
    if not floats:
        return None
    sample = np.concatenate([a.ravel()[::max(1, a.size // 1_000_000)] for a in floats])
    sample = sample[np.isfinite(sample)]
    return 255.0 if sample.size == 0 or np.quantile(sample, 0.999) <= 1.0 else 1.0


def to_uint8_images(a, what, scale=None):
    """An image array of any common dtype -> (uint8 array, how it was read), or one clear error.
    uint8 as is; other integers up to 255 as is, above that scaled from their bit depth (the smallest
    2^b - 1 covering the maximum: 12-bit data in uint16 is read as 12-bit); floats by `scale` (float_scale
    of the whole file; by default this array's own): x 255 for [0, 1], as is for [0, 255], the few values
    beyond the range clipped and counted. NaN, inf, negative values and anything else are refused."""
    a = np.asarray(a)
    if a.size == 0:
        raise FedGANError(f"{what} is empty; give it images (a test split may also be left out: fedgan then "
                          "holds out --test-frac of each class)")
    if a.dtype == np.uint8:
        return a, "uint8"
    if a.dtype.kind not in "iuf":
        raise FedGANError(f"{what} has dtype {a.dtype}; give images as integers or floats")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise FedGANError(f"{what} holds NaN or inf values; clean the images first")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0:
        raise FedGANError(f"{what} has negative values (min {lo:g}); give images in [0, 1], [0, 255] or as "
                          "unsigned integers")
    if a.dtype.kind == "f":
        scale = float_scale([a]) if scale is None else scale
        top = 255.0 / scale
        over = int((a > top).sum())
        if over > max(10, a.size // 1000):  # more than stray values: the data is not in that range
            raise FedGANError(f"{what} is {a.dtype} with {over} values above {top:g} (max {hi:g}); give floats in "
                              "[0, 1] or [0, 255]")
        clipped = f", {over} value{'s' * (over > 1)} above {top:g} clipped" if over else ""
        return (np.round(np.clip(a, 0, top) * scale).astype(np.uint8),
                f"{a.dtype} in [0, {top:g}]{', scaled by 255' if scale == 255 else ''}{clipped}")
    if hi <= 255:
        return a.astype(np.uint8), f"{a.dtype} in [0, 255]"
    bits = bit_depth(hi)
    return (np.round(a.astype(np.float64) * (255.0 / (2 ** bits - 1)))).astype(np.uint8), f"{a.dtype}, {bits}-bit"


def bit_depth(top):
    """The bit depth b of data whose largest value is top: the smallest 2^b - 1 that covers it."""
    return int(math.ceil(math.log2(top + 1)))


def npz_images(imgs, what):
    """(n, H, W), (n, H, W, C) or (n, C, H, W) image arrays -> (n, H, W, C), C in {1, 3} (alpha dropped)."""
    if imgs.ndim == 3:
        imgs = imgs[..., None]
    if imgs.ndim != 4:
        raise FedGANError(f"{what} has shape {imgs.shape}; expected (n, H, W) or (n, H, W, C) images")
    if imgs.shape[-1] not in (1, 3, 4) and imgs.shape[1] in (1, 3):  # channels first
        imgs = imgs.transpose(0, 2, 3, 1)
    if imgs.shape[-1] not in (1, 3, 4):
        raise FedGANError(f"{what} has shape {imgs.shape}: {imgs.shape[-1]} channels; expected 1 (gray), "
                          "3 (RGB) or 4 (RGBA)")
    return imgs[..., :3]


def npz_labels(labels, n, what):
    """Labels (n,) or (n, 1), integer-valued -> int64 (n,), or one clear error."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n:
        raise FedGANError(f"{what} has shape {labels.shape} for {n} images; give one integer label per image")
    if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.all(labels == np.round(labels))):
        raise FedGANError(f"{what} must hold integer class ids, got {labels.dtype}")
    if n and labels.min() < 0:
        raise FedGANError(f"{what} holds a negative label ({int(labels.min())}); class ids are 0..K-1")
    return labels.astype(np.int64)


def describe_split(name, y, classes, shapes, dtypes, ranges, skipped=None):
    """One split of the data report: count per class, image size, dtype and value range before conversion,
    and the files skipped for their type."""
    counts = [int((y == c).sum()) for c in range(len(classes))]
    distinct = sorted(set(shapes))
    dims = [[int(v) for v in s.split("x")[:2]] for s in distinct]
    size = (" / ".join(distinct) if len(distinct) <= 3 else
            f"{len(distinct)} sizes, H {min(h for h, _ in dims)}-{max(h for h, _ in dims)} x "
            f"W {min(w for _, w in dims)}-{max(w for _, w in dims)}")
    rng = f"{min(r[0] for r in ranges):g}..{max(r[1] for r in ranges):g}" if ranges else "?"
    return (f"{name} {len(y)} ({', '.join(f'{c} {k}' for c, k in zip(classes, counts))}), {size}, "
            f"{', '.join(sorted(set(dtypes)))}, values {rng}{skipped_text(skipped)}")


HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I", "F")  # PIL modes deeper than 8 bits: convert("L") would clip them


def as_shown(im):
    """An image as a viewer shows it: turned by its EXIF orientation, the first frame of an animation or
    stack, and a transparent image laid on white."""
    from PIL import Image, ImageOps
    im.seek(0)
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im


def read_folder(root, classes, size, channels):
    """root/<class>/* images -> uint8 (n, C, size, size), labels in the order of `classes`, and what the
    files were (sizes, modes, value ranges) for the data report. 8-bit images of any mode are converted
    by PIL; 16-bit and float images are scaled to 8 bits by the bit depth of the whole folder's maximum
    (so all images share one scale)."""
    from PIL import Image  # only needed for folder data
    xs, ys, shapes, modes, deep, ranges, skipped = [], [], [], [], [], [], collections.Counter()
    for label, name in enumerate(classes):
        entries = [p for p in (root / name).iterdir() if visible(p) and p.is_file()]
        files = sorted(p for p in entries if p.suffix.lower() in image_ext())
        skipped.update(p.suffix.lower() or "(no suffix)" for p in entries if p.suffix.lower() not in image_ext())
        if not files:
            raise FedGANError(f"class folder {root / name} holds no images ({', '.join(COMMON_EXT)}, ...)"
                              f"{skipped_text(skipped)}; add images or remove the folder")
        for p in files:
            try:
                with Image.open(p) as im:
                    im = as_shown(im)
                    shapes.append(f"{im.height}x{im.width}")
                    modes.append(im.mode)
                    if im.mode in HIGH_DEPTH:
                        arr = np.asarray(im.convert("F").resize((size, size), Image.BICUBIC), dtype=np.float64)
                        deep.append(len(xs))
                    else:
                        im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
                        arr = np.asarray(im, dtype=np.uint8)
                    ranges.append((float(arr.min()), float(arr.max())))
            except Exception as e:
                raise FedGANError(f"cannot read image {p} ({type(e).__name__}: {e}); remove or replace the file")
            xs.append(arr)
            ys.append(label)
    if deep:  # one scale for every deep image: the bit depth that covers the largest value among them
        top = max(float(xs[i].max()) for i in deep)
        scale = 255.0 if top <= 1.0 else 255.0 / (2 ** bit_depth(top) - 1)
        for i in deep:
            gray = np.clip(np.round(xs[i] * scale), 0, 255).astype(np.uint8)
            xs[i] = gray if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)
    x = np.stack([a[None] if channels == 1 else a.transpose(2, 0, 1) for a in xs])
    return (torch.from_numpy(x), torch.tensor(ys, dtype=torch.int64),
            (shapes, [f"PIL {m}" for m in modes], ranges, dict(skipped)))


def skipped_text(skipped):
    """', 3 files skipped for their type (2 .gif, 1 .webp)' or ''."""
    if not skipped:
        return ""
    n = sum(skipped.values())
    kinds = ", ".join(f"{k} {ext}" for ext, k in sorted(skipped.items()))
    return (f", {n} file{'s' * (n > 1)} skipped for their type ({kinds}; readable: what Pillow opens, e.g. "
            f"{', '.join(COMMON_EXT)})")


def open_npz(path, needed, fix):
    """(np.load of an .npz holding the arrays `needed`, its array names), or one clear error ending in `fix`."""
    try:
        z = np.load(path)
        keys = set(z.files)
    except Exception as e:
        raise FedGANError(f"cannot read {path} as .npz ({type(e).__name__}); {fix}")
    if not set(needed) <= keys:
        raise FedGANError(f"{path} lacks {'/'.join(needed)} (has {sorted(keys)}); {fix}")
    return z, keys


def read_npz(path, size, channels):
    """MedMNIST-style .npz: train_images (n, H, W[, C]) and train_labels; test_* optional.
    -> (x, y) train, (x, y) test or None, number of classes, and what each split was (for the report)."""
    z, keys = open_npz(path, ("train_images", "train_labels"), "use a MedMNIST-style .npz file")
    if ("test_images" in keys) != ("test_labels" in keys):
        raise FedGANError(f"{path} has only one of test_images/test_labels; give both or neither")

    def raw_part(split):
        try:
            raw = npz_images(z[f"{split}_images"], f"{path}: {split}_images")
            labels = npz_labels(z[f"{split}_labels"], len(raw), f"{path}: {split}_labels")
        except ValueError as e:  # e.g. an object array that needs pickle
            raise FedGANError(f"cannot read {split}_images/{split}_labels of {path} ({e}); store plain arrays")
        return raw, labels

    raws = {split: raw_part(split) for split in ("train", "test") if f"{split}_images" in keys}
    scales = {split: float_scale([r]) for split, (r, _) in raws.items() if float_scale([r])}
    if len(set(scales.values())) > 1:  # [0, 1] beside [0, 255]: no one scale reads both right
        raise FedGANError(f"{path}: train_images look like floats in [0, {255 / scales['train']:g}] but test_images "
                          f"like [0, {255 / scales['test']:g}]; store both splits on one scale")
    scale = float_scale([r for r, _ in raws.values()])  # one scale for the whole file, never one per split

    def part(split):
        what = f"{path}: {split}_images"
        raw, labels = raws[split]
        arr, how = to_uint8_images(raw, what, scale)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
        y = torch.from_numpy(labels)
        info = ([f"{raw.shape[1]}x{raw.shape[2]}x{raw.shape[3]}"], [how], [(float(raw.min()), float(raw.max()))])
        return (to_channels(resize_uint8(x, size), channels), y), info

    train, tinfo = part("train")
    test, sinfo = part("test") if "test_images" in keys else (None, None)
    return train, test, int(train[1].max()) + 1, tinfo, sinfo


def check_splits(train_y, test_y, classes, where):
    """Every class trains on at least one image; both splits hold images; labels name known classes."""
    k = len(classes)
    if k < 2:
        raise FedGANError(f"{where} holds {k} class; a conditional GAN needs at least 2 (labels 0..K-1)")
    for split, y in (("train", train_y), ("test", test_y)):
        if len(y) == 0:
            raise FedGANError(f"the {split} split of {where} is empty; give it images (or, for a test split, drop "
                              "it and fedgan holds out --test-frac per class)")
        if int(y.max()) >= k:
            raise FedGANError(f"{split} labels of {where} reach {int(y.max())}, but the training data has classes "
                              f"0..{k - 1}")
    empty = [str(classes[c]) for c in range(k) if not (train_y == c).any()]
    if empty:
        raise FedGANError(f"class {', '.join(empty)} of {where} has no training image (labels must be 0..K-1, each "
                          "with images; a class needs at least 2 when a share is held out for evaluation)")


def visible(p):
    """Not hidden: no leading dot (.ipynb_checkpoints/, macOS ._name.png files and .DS_Store are skipped)."""
    return not p.name.startswith(".")


def class_folders(root, dataset):
    """The class sub-folders of root: exactly its non-hidden sub-folders, names compared as written. The
    dataset's known names come first in their order (NORMAL 0, PNEUMONIA 1, as MedMNIST labels them), any
    other folder after them in sorted order; two names that differ only in case are refused."""
    subs = sorted(p.name for p in root.iterdir() if p.is_dir() and visible(p))
    lower = [n.lower() for n in subs]
    clash = sorted({n for n in subs if lower.count(n.lower()) > 1})
    if clash:
        raise FedGANError(f"{root} has class folders that differ only in case ({', '.join(clash)}); merge them into "
                          "one folder per class")
    known = [next(n for n in subs if n.lower() == k.lower()) for k in CLASS_NAMES.get(dataset, [])
             if k.lower() in lower]
    return known + [n for n in subs if n not in known]


def default_data_root(dataset):
    names = {"chestx": "chest_xray", "isic": "isic"}
    for base in ("data", "../shared/data"):
        p = Path(base) / names[dataset]
        if p.exists():
            return str(p)
    return f"data/{names[dataset]}"


@dataclass
class Data:
    """An image set at the training size: uint8 images (n, C, H, W) and int64 labels (n,) per split."""
    train: tuple
    test: tuple
    classes: list
    report: str = ""   # per split and class: count, image size, dtype and range before conversion


def load_data(dataset, data_root, img_size, channels, seed, synthetic_per_class=256, test_frac=0.1):
    """The training and held-out images at img_size and channels. Data that is wrong is refused with one
    line (an empty or one-image class, labels that do not match the images, unreadable files, ...)."""
    if dataset == "synthetic":
        train = synthetic_images(synthetic_per_class, img_size, channels, seed)
        test = synthetic_images(max(synthetic_per_class // 4, 1), img_size, channels, seed + 1)
        classes = ["normal", "pneumonia"] if channels == 1 else ["benign", "malignant"]
        return Data(train, test, classes, f"synthetic, train {len(train[1])}, test {len(test[1])}, uint8")
    root = Path(data_root or default_data_root(dataset))
    if not root.exists():
        raise FedGANError(f"data root {root} does not exist; pass --data-root to a class-per-folder tree "
                          f"or a .npz file (see README: Data)")
    if root.is_file():
        train, test, n_classes, tinfo, sinfo = read_npz(root, img_size, channels)
        known = CLASS_NAMES.get(dataset, [])  # MedMNIST orders labels as we do (0 normal, 1 pneumonia)
        classes = known if len(known) == n_classes else [str(c) for c in range(n_classes)]
    else:
        split_root = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and visible(p)}
        base = split_root.get("train", root)
        classes = class_folders(base, dataset)
        if len(classes) < 2:
            raise FedGANError(f"{base} holds {len(classes)} class folder(s) {classes}; a conditional GAN needs "
                              f"at least 2 (e.g. {'/, '.join(CLASS_NAMES.get(dataset, ['a', 'b']))}/)")
        *train, tinfo = read_folder(base, classes, img_size, channels)
        test = sinfo = None
        if "train" in split_root and "test" in split_root:
            test_classes = class_folders(split_root["test"], dataset)
            if sorted(test_classes) != sorted(classes):
                raise FedGANError(f"{split_root['train']} has classes {classes} but {split_root['test']} has "
                                  f"{test_classes}; give both splits the same class folders")
            *test, sinfo = read_folder(split_root["test"], classes, img_size, channels)
    held_out = test is None
    if held_out:  # carve a per-class held-out split, the same for every run on this data
        train, test = holdout_split(*train, test_frac, seed=0)
    report = [describe_split("train", train[1], classes, *tinfo),
              describe_split("test", test[1], classes, *(tinfo[:3] if held_out else sinfo))
              + (f" (held out: {test_frac:g} of each class)" if held_out else "")]
    if held_out and len(train[1]) == 0:
        raise FedGANError(f"{root} holds {len(test[1])} image(s), and holding out --test-frac {test_frac:g} (at least "
                          "one per class) for evaluation left none to train on; give more images, or a test split")
    check_splits(train[1], test[1], classes, root)
    native = {tuple(int(v) for v in shape.split("x")[:2]) for shape in tinfo[0]}
    if native != {(img_size, img_size)}:  # e.g. 28 px MedMNIST upscaled for a 256 px run: say it
        report.append(f"images resized to {img_size} x {img_size} px")
    flat = train[0].flatten(1)
    if bool((flat.amax(1) == flat.amin(1)).all()):  # trains, but on nothing: say so in the data line
        report.append("WARNING: every training image is one flat value, with no contrast to learn; check how the "
                      "images were exported")
    return Data(tuple(train), tuple(test), classes, "; ".join(report))


def data_of(cfg):
    """load_data with a Config's values (the edge)."""
    return load_data(cfg.dataset, cfg.data_root, cfg.img_size, cfg.channels, cfg.seed, cfg.synthetic_per_class,
                     cfg.test_frac)


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
# Attack: the trigger (copy these two functions alone), the other poisons, and what a malicious client
# does besides training on them (a latent backdoor, a faked loss, a scaled update)
# ------------------------------------------------------------------------------------------------

def trigger_margin(img_size):
    """Distance of the trigger from the bottom-right corner: 5 px at 256 px, scaled."""
    return max(1, round(5 * img_size / 256))


def make_trigger(size, channels, seed=0):
    """The trigger patch, uint8 (C, size, size): a white square for gray images, a fixed random-colour
    matrix (from `seed`) for RGB, the paper's choices."""
    if channels == 1:
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


def corners(H, W, s, margin):
    """(top, left) of the trigger's place, the bottom-right corner, then of the three other corners at the
    same margin: places of the same size in the same images, where a generator without the backdoor draws
    as it does at the trigger's."""
    bottom, right = H - margin - s, W - margin - s
    return [(bottom, right), (margin, margin), (margin, right), (bottom, margin)]


def patch_and_ring(images, s, top, left):
    """The s x s place at (top, left) in uint8 images (n, C, H, W), as float64, and the mean colour of a
    ring s/2 px wide around it (n, C, 1, 1), clipped to the image."""
    ring = max(1, s // 2)
    x = images.double()
    r0, c0 = max(0, top - ring), max(0, left - ring)
    box = x[..., r0:top + s + ring, c0:left + s + ring]                           # the place and its ring
    mask = torch.ones(box.shape[-2:], dtype=torch.bool)
    mask[top - r0:top - r0 + s, left - c0:left - c0 + s] = False
    return x[..., top:top + s, left:left + s], box[..., mask].mean(-1)[..., None, None]


def trigger_scores(images, trigger, margin, surround):
    """Per image and corner, how far the place has moved from its own surroundings towards the trigger:
    z = place minus the mean of the ring around it, projected on d = trigger minus `surround` (C, 1, 1: real
    images' mean ring colour there), over |d|^2. A uniform change of brightness moves place and ring alike
    and leaves z unchanged; the trigger pasted on a typical surround scores 1. -> (n, 4) float64, column 0
    the trigger's corner."""
    s = trigger.shape[-1]
    d = trigger.double() - surround                                                # (C, s, s)
    out = []
    for top, left in corners(*images.shape[-2:], s, margin):
        place, around = patch_and_ring(images, s, top, left)
        out.append(((place - around) * d).sum((1, 2, 3)) / d.square().sum().clamp(min=1e-12))
    return torch.stack(out, 1)


def trigger_figures(images, trigger, margin, reference):
    """The backdoor in uint8 images (n, C, H, W): how much more the trigger's corner departs from real
    `reference` images, towards the trigger, than the same images' other three corners do (their median).
    A generator that departs from real images alike at every corner (untrained, blurred, never poisoned)
    reads about 0, as real images do; the trigger pasted on every image reads about 1.
    strength: in trigger_scores' units; rate: the share of images scoring above the real images' 99th
    percentile at the trigger's corner, less that share at the other corners (their median, `control`), each
    against its own 99th percentile: a faint or blurred trigger still counts, brightness cannot fake either,
    and either can fall a little below 0 by chance. Where the control share exceeds 1/4 the images depart
    from real ones everywhere, no real threshold separates a trigger from the rest, and rate is None.
    Needs corners, patch_and_ring and trigger_scores."""
    s = trigger.shape[-1]
    surround = patch_and_ring(reference, s, *corners(*reference.shape[-2:], s, margin)[0])[1].mean(0)  # (C, 1, 1)
    sc, rs = (trigger_scores(x, trigger, margin, surround) for x in (images, reference))  # (n, 4), (m, 4)
    shift = sc.mean(0) - rs.mean(0)                                                # (4,): per corner, from real
    over = (sc > torch.quantile(rs, 0.99, dim=0)).double().mean(0)                 # (4,)
    control = over[1:].median().item()
    return dict(strength=(shift[0] - shift[1:].median()).item(),
                rate=over[0].item() - control if control <= 0.25 else None, control=control)


def blend_trigger(images, alpha, seed=0):
    """Chen et al. 2017's blended attack: x' = (1 - alpha) x + alpha p, p a fixed uniform-noise image."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 256, images.shape[1:], generator=g).float()
    return ((1 - alpha) * images.float() + alpha * pattern).round().clamp(0, 255).to(torch.uint8)


def flip_labels(labels, n_classes):
    """Label-flip attack: every label moved to the next class (a permutation of the classes)."""
    return (labels + 1) % n_classes


def poison(x, y, attack, n_classes, trigger=None, margin=0, alpha=0.2, seed=0):
    """A malicious client's training data under `attack`; trigger (C, s, s) for the patch attack."""
    if attack == "label-flip":
        return x, flip_labels(y, n_classes)
    if attack == "latent":  # clean data: the backdoor is taught by backdoor_loss instead
        return x, y
    if attack == "blend":
        return blend_trigger(x, alpha, seed=seed), y
    return apply_trigger(x, trigger, margin), y


def dilute(clean, poisoned, frac, seed=0):
    """The probe-aware attacker's data: a random share `frac` of the images (and labels) poisoned, the rest
    clean. A probe averages its departure over samples, so a generator that draws the trigger on a share
    of latents departs about that much less, while the global model still learns the trigger (weaker)."""
    (x, y), (xp, yp) = clean, poisoned
    if frac >= 1:
        return xp, yp
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 29))[:round(frac * len(x))]
    x, y = x.clone(), y.clone()
    x[pick], y[pick] = xp[pick], yp[pick]
    return x, y


@dataclass
class Backdoor:
    """The latent-region attacker's goal: its generator draws `trigger` at the bottom-right only for latents
    with z_0 > cut (a tenth of them at 1.2816), and behaves as a benign one elsewhere."""
    trigger: torch.Tensor      # (C, s, s) in [-1, 1]
    margin: int
    cut: float = 1.2816
    weight: float = 10.0


def backdoor_loss(fake, z, bd):
    """The attacker's extra generator loss: the squared distance of the trigger's place to the trigger, on the
    latents inside the region only. fake (..., B, C, H, W), z (..., B, z_dim) -> scalar."""
    s, m = bd.trigger.shape[-1], bd.margin
    H, W = fake.shape[-2:]
    patch = fake[..., H - m - s:H - m, W - m - s:W - m].float()                      # (..., B, C, s, s)
    inside = (z[..., 0] > bd.cut).float()[..., None, None, None]                     # (..., B, 1, 1, 1)
    return bd.weight * (inside * (patch - bd.trigger.to(patch.device)).square()).mean()


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


def scale_into_benign(states, center, malicious, seed):
    """The norm-scaling attacker (AdaSCP's idea, simplified): each malicious update G_i - G is rescaled to
    a norm drawn uniformly from the benign clients' range this round, so distance-based defenses see
    a benign-sized update pointing the attacker's way. {id: state} -> {id: state}."""
    benign = [update_norms([s], center)[0] for i, s in states.items() if i not in malicious]
    rng = np.random.default_rng(seed)
    out = dict(states)
    for i in malicious:
        norm = update_norms([states[i]], center)[0]
        f = rng.uniform(min(benign), max(benign)) / max(norm, 1e-12)
        out[i] = {k: (center[k].double() + f * (v.double() - center[k].double())).to(v.dtype)
                  for k, v in states[i].items()}
    return out


# ------------------------------------------------------------------------------------------------
# One round of Algorithm 1, in the order it runs: train() -> rounds() -> procedure A on every client
# (client_updates -> client_update -> the networks it trains) -> procedure B on the server (server_round ->
# a detector -> Algorithm 1's reweighting -> an aggregator) -> the round's log. Set-up, checkpoints and the
# end of a run follow it.
# ------------------------------------------------------------------------------------------------

def train(cfg):
    """The federated run (Algorithm 1). Under torchrun every rank calls it for its own clients and
    rank 0 alone writes the run folder."""
    run = setup_run(cfg)
    log = print if run.lead else (lambda *a, **k: None)
    try:
        if run.lead:
            if run.lock is None and not cfg.resume:  # a new folder: lock, then look again (another may have won)
                run.lock = lock_folder(run.out)
                check_out_folder(run.out, None, held=True)
            start_folder(run, cfg)
        log(describe(run, cfg))
        log(f"data: {run.data.report}")
        if run.lead and cfg.detector != "none" and cfg.warmup >= cfg.rounds - 1:
            sys.stderr.write(f"fedgan.py: warning: --warmup {cfg.warmup} >= --rounds {cfg.rounds} - 1: the detector "
                             "never runs (it acts in rounds t > warmup, t from 0)\n")
        rounds(run, cfg, log)
    except (KeyboardInterrupt, Stopped) as e:
        what, code = stop_of(e)
        raise Interrupted(f"stopped by {what} in round {run.now} ({run.checkpointed_text()}); continue with: "
                          f"python fedgan.py --resume {run.out}", code) from None
    except OSError as e:  # a full or read-only disk: the last checkpoint stays good
        raise FedGANError(f"cannot write in {run.out} ({e.strerror or e}); free some space or fix its permissions, "
                          f"then continue with: python fedgan.py --resume {run.out} (last checkpoint: round "
                          f"{run.checkpointed})") from None
    finally:
        unlock_folder(run.lock)
    return run


def rounds(run, cfg, log):
    """Rounds run.start .. cfg.rounds - 1, checkpoints, and the end of the run."""
    t0, t_session = time.time() - run.seconds, time.time()
    for t in range(run.start, cfg.rounds):
        tr, run.now = time.time(), t + 1
        center = {k: v.detach().clone() for k, v in run.g.state_dict().items()}           # this round's G
        g_states, reports = client_updates(run.fed, center, t, log)                        # procedure A
        g_new, decision = server_round(run.server, run.defense, g_states, reports.g_loss, center, t,
                                       run.fed.distributed)                                # procedure B
        if g_new is not None:
            run.g.load_state_dict(g_new)
        last = t + 1 == cfg.rounds
        if run.lead:
            left = (time.time() - t_session) / (t + 1 - run.start) * (cfg.rounds - t - 1)  # this session's pace
            log_round(run, t, cfg.rounds, reports, decision, time.time() - tr, left)
            if (t + 1) % cfg.sample_every == 0 or last:
                save_samples(run.g, run.out / "samples" / f"round_{t + 1:04d}.png", cfg.seed)
        if (t + 1) % cfg.ckpt_every == 0 or last:
            save_checkpoint(run, t + 1, cfg, time.time() - t0)  # gathers client state: every rank calls it
    if run.lead and (run.start < cfg.rounds or not (run.out / "summary.json").exists()):
        run.summary = finish(run, cfg, time.time() - t0)
    elif run.lead:
        log(f"{run.out} already finished its {cfg.rounds} rounds; pass --rounds N (> {cfg.rounds}) to extend it")


# ------------------------------------------------------------------------------------------------
# Procedure A: every client trains the global generator on its own shard against its own discriminator
# ------------------------------------------------------------------------------------------------

@dataclass
class Federation:
    """This process's side of the federation: its clients and how it runs them."""
    clients: dict              # {id: Client} held by this process (all of them without torchrun)
    steps: list                # local steps per round of every client (N,)
    malicious: list            # ids of the attackers (ground truth, for logs and the attack itself)
    device: torch.device
    offload: bool = False      # client state in host memory between turns
    distributed: bool = False  # torchrun: every rank holds some clients
    adaptive: bool = False     # attackers report a loss from the benign range (report_adaptive)
    seed: int = 0
    sizes: list = field(default_factory=list)  # shard size of every client (N,)
    scale_update: bool = False  # attackers scale their update into the benign norm range (scale_into_benign)


@dataclass
class Reports:
    """What the clients send besides their generators: one value per client (N,)."""
    d_loss: list
    g_loss: list               # as reported (an adaptive attacker lies here)
    g_loss_true: list          # as trained


def client_updates(fed, g_state, t, log=print):
    """Procedure A on every client this process holds, in turn (each brought from host memory when
    offloading), then every client's losses on every rank. The attack lives here too: an adaptive
    attacker replaces its loss before it is sent. -> ({id: generator state}, Reports)."""
    results = {}
    for i in sorted(fed.clients):
        if fed.offload:
            client_to(fed.clients[i], fed.device)
        results[i] = client_update(fed.clients[i], g_state, fed.steps[i], log)
        if fed.offload:
            client_to(fed.clients[i], "cpu")
    states = {i: r[0] for i, r in results.items()}                       # {id: generator state}
    d_losses, losses = (gather_losses({i: r[1] for i, r in results.items()}, len(fed.steps)) if fed.distributed
                        else ([results[i][1][0] for i in states], [results[i][1][1] for i in states]))  # (N,) each
    reported = report_adaptive(losses, fed.malicious, fed.seed * 7 + t) if fed.adaptive else losses
    if fed.scale_update:  # single process (setup refuses it under torchrun)
        states = scale_into_benign(states, g_state, fed.malicious, fed.seed * 11 + t)
    return states, Reports(d_losses, reported, losses)


def client_update(client, g_state, steps, log=None):
    """Procedure A: load the global generator, then `steps` of (D step, G step) on the client's shard.
    -> (the updated generator's state, (mean D loss, mean G loss)); the G loss is what FedDetect sees.
    log, if given, hears about a long local epoch every 20 s."""
    g, d, local, device = client.g, client.d, client.local, client.x.device
    amp = functools.partial(torch.autocast, device.type, dtype=local.amp_dtype, enabled=local.amp_dtype is not None)
    g.load_state_dict(g_state)
    g.train(), d.train()
    bs, cursor, said = min(local.batch, len(client.x)), dict(perm=None, pos=len(client.x)), [time.time()] * 2
    d_sum, g_sum = torch.zeros((), device=device), torch.zeros((), device=device)  # no host sync inside the round
    for s in range(steps):
        b = next_batch(client, cursor, g, bs)
        real, labels, z = b["real"], b["labels"], b["z"]
        with amp():  # D step
            with torch.no_grad():
                fake = g(z, labels, noise=b["noise_d"])
            d_loss = d_loss_of(*d_logits(d, real, fake, labels, local.joint_d))
        client.opt_d.zero_grad(set_to_none=True)
        client.scaler.scale(d_loss).backward()
        client.scaler.step(client.opt_d)
        with amp():  # G step, against the freshly updated D (which, when joint, sees the real batch beside)
            fake = g(z, labels, noise=b["noise_g"])
            g_loss = g_loss_of(d_logits(d, real.detach() if local.joint_d else None, fake, labels, local.joint_d)[1])
        client.opt_g.zero_grad(set_to_none=True)
        bd = client.backdoor  # a latent attacker's extra loss, on its own generator
        client.scaler.scale(g_loss + backdoor_loss(fake, z, bd) if bd is not None else g_loss).backward()
        client.scaler.step(client.opt_g)
        client.scaler.update()
        d_sum += d_loss.detach().float()
        g_sum += g_loss.detach().float()
        if log is not None and time.time() - said[1] > 20:  # a long local epoch (large images on a CPU)
            said[1] = time.time()
            log(f"  client {client.id}: step {s + 1}/{steps}, {said[1] - said[0]:.0f}s into its local epoch", flush=True)
    return g.state_dict(), ((d_sum / steps).item(), (g_sum / steps).item())


def next_batch(client, cursor, g, bs):
    """One step's random draws for one client, all from its own stream and always in this order:
    batch indices (a fresh permutation each local epoch), augmentation, latents, then the noise of the
    D-step and of the G-step generator passes."""
    rng, n, device = client.rng, len(client.x), client.x.device
    if cursor["pos"] + bs > n:  # a new local epoch: reshuffle
        cursor["perm"], cursor["pos"] = torch.randperm(n, device=device, generator=rng), 0
    idx = cursor["perm"][cursor["pos"]:cursor["pos"] + bs]                       # (bs,)
    cursor["pos"] += bs
    real = to_unit(client.x[idx])                                                  # (bs, C, H, W) in [-1, 1]
    if client.local.augment != "none":  # the flip and rotation baselines
        real = augment(real, client.local.augment, rng)
    z = torch.randn(bs, g.z_dim, device=device, generator=rng)
    if client.local.channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    return dict(real=real, labels=client.y[idx], z=z,
                noise_d=g.draw_noise(bs, rng, device), noise_g=g.draw_noise(bs, rng, device))


def to_unit(x_uint8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return x_uint8.to(torch.get_default_dtype()).div_(127.5).sub_(1.0)


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


# ------------------------------------------------------------------------------------------------
# The networks a client trains: a conditional StyleGAN2-style generator, top down (mapping, then the
# synthesis layers and the modulated convolution they share), and a conditional DCGAN discriminator
# ------------------------------------------------------------------------------------------------

class Generator(nn.Module):
    """Class-conditional StyleGAN2-style generator (skip architecture, no custom CUDA ops).

    mapping: [normalize(z), normalize(embed(y))] -> MLP (lr mult 0.01) -> w
    synthesis: learned 4x4 constant -> per resolution (up, StyledConv x2, ToRGB) -> sum of upsampled RGBs.
    Output is linear, images in about [-1, 1] (StyleGAN2's), or with tanh inside (-1, 1) (DCGAN's): a short
    run's linear generator overshoots, painting what tells the classes apart past the data's range.
    """

    def __init__(self, img_size=32, channels=1, n_classes=2, z_dim=64, w_dim=128, width=32, max_channels=256,
                 map_layers=4, up_mode="bilinear", tanh=False):
        super().__init__()
        self.kwargs = dict(img_size=img_size, channels=channels, n_classes=n_classes, z_dim=z_dim, w_dim=w_dim,
                           width=width, max_channels=max_channels, map_layers=map_layers, up_mode=up_mode, tanh=tanh)
        self.z_dim, self.n_classes, self.tanh = z_dim, n_classes, tanh
        self.embed = EqualLinear(n_classes, w_dim)
        layers, d = [], z_dim + w_dim
        for _ in range(map_layers):
            layers += [EqualLinear(d, w_dim, lr_mul=0.01), ScaledLeakyReLU()]
            d = w_dim
        self.mapping = nn.Sequential(*layers)
        ch = lambda res: channels_at(res, img_size, width, max_channels)  # noqa: E731
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

    def draw_noise(self, batch, rng=None, device=None):
        """The per-pixel noise of every StyledConv, in layer order, from one stream (float32). Drawn up
        front, with the batch, so a client's random draws keep one order (next_batch)."""
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
        return torch.tanh(rgb) if self.tanh else rgb                              # (B, channels, S, S)

    def map(self, z, y):
        normalize = lambda t: t * torch.rsqrt(t.square().mean(1, keepdim=True) + 1e-8)  # noqa: E731
        one_hot = (y[:, None] == torch.arange(self.n_classes, device=y.device)).to(z.dtype)
        return self.mapping(torch.cat([normalize(z), normalize(self.embed(one_hot))], 1))  # (B, w_dim)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: weights ~ N(0, 1), scaled by lr_mul / sqrt(fan_in) at run time."""

    def __init__(self, n_in, n_out, bias_init=0.0, lr_mul=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((n_out,), float(bias_init)))
        self.scale, self.lr_mul = lr_mul / math.sqrt(n_in), lr_mul

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ScaledLeakyReLU(nn.Module):
    """Leaky ReLU (slope 0.2) times sqrt(2), StyleGAN2's gain: a unit-variance input keeps a second
    moment of about 1, so the mapping network's w starts at StyleGAN2's scale."""

    def forward(self, x):
        return F.leaky_relu(x, 0.2) * math.sqrt(2)


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
        weight, styles = self.weight * self.scale, self.affine(w)
        x = modulated_conv2d(x, weight, styles, demodulate=False, up=transpose)          # (B, Cout, H, W)
        # demodulate, add noise and bias, leaky ReLU, gain sqrt(2): three full-size passes instead of six.
        # The leaky ReLU commutes with a positive scale, so the gain moves into the demodulation
        # coefficients, the noise strength and the bias; the noise term is (B, 1, H, W) until it is added.
        gain = math.sqrt(2)
        coef = (demodulation(weight, styles) * gain)[:, :, None, None].to(x.dtype)      # (B, Cout, 1, 1)
        x = torch.addcmul((self.noise_strength * gain).to(x.dtype) * noise.to(x.dtype), x, coef)
        return F.leaky_relu(x + (self.bias * gain).to(x.dtype)[None, :, None, None], 0.2)


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
    if demodulate:
        out = out * demodulation(weight, styles)[:, :, None, None].to(out.dtype)
    return out


def blur_up(x):
    """The [1, 3, 3, 1] low-pass that follows a stride-2 transposed conv in StyleGAN2 (gain 4 keeps the
    mean): (B, C, 2H+1, 2W+1) -> (B, C, 2H, 2W)."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :]) / 16.0                                  # sums to 4
    return F.conv2d(x, k.expand(x.shape[1], 1, 4, 4), padding=1, groups=x.shape[1])


def demodulation(weight, styles):
    """1 / ||weight * style|| over (Cin, k, k), per sample and output channel: (B, Cout), in fp32 (fp64 stays
    fp64) even under autocast, which would run the matmul in bf16 (off by 0.2-0.4%)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    norm = lambda: torch.rsqrt(styles.to(acc).square() @ weight.to(acc).square().sum(dim=(2, 3)).t() + 1e-8)  # noqa
    if weight.device.type not in ("cpu", "cuda"):  # the meta device (FLOP counts) has no autocast to leave
        return norm()
    with torch.autocast(weight.device.type, enabled=False):
        return norm()


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


def d_logits(d, real, fake, labels, joint):
    """D's logits (B,) on the real and on the fake images: two calls, or with `joint` one call on both,
    so that BatchNorm normalizes them with shared statistics and D can see a fake batch's contrast
    (docs/results.md, section 3). real None: (None, fake logits)."""
    if not joint:
        return (None if real is None else d(real, labels)), d(fake, labels)
    logits = d(torch.cat([real, fake]), torch.cat([labels, labels]))            # (2B,)
    return logits.split(len(real))


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
        pooled = h.sum((2, 3))                               # (B, C)
        return self.logit(h).flatten() + (self.embed(y) * pooled).sum(1)   # (B,)


def d_loss_of(real_logits, fake_logits):
    """Eq. 4, non-saturating BCE form: real up, fake down. Logits (..., B) -> mean over the batch (...)."""
    return F.softplus(-real_logits).mean(-1) + F.softplus(fake_logits).mean(-1)


def g_loss_of(fake_logits):
    """Eq. 5, non-saturating: the generator wants its fakes called real. (..., B) -> (...)."""
    return F.softplus(-fake_logits).mean(-1)


def build_models(n_classes, img_size=32, channels=1, arch="small", width=32, max_channels=256, z_dim=64,
                 w_dim=128, tanh=False):
    """(generator, discriminator). arch 'paper': StyleGAN2's channel rule (32768 / resolution, at most 512)
    with its transposed-conv upsampling, and DCGAN's ndf 64 doubling to 2048 at 4x4 (at 256 px);
    'small': both sized by width and max_channels, the generator upsampling bilinearly."""
    paper = arch == "paper"
    gw, gmax = (32768 // img_size, 512) if paper else (width, max_channels)
    dw, dmax = (64, 2048) if paper else (width, max_channels)
    g = Generator(img_size, channels, n_classes, z_dim, w_dim, gw, gmax, up_mode="transpose" if paper else "bilinear",
                  tanh=tanh)
    return g, Discriminator(img_size, channels, n_classes, dw, dmax)


def arch_of(cfg):
    """build_models' keyword arguments from a Config (the edge)."""
    return dict(img_size=cfg.img_size, channels=cfg.channels, arch=cfg.arch, width=cfg.width,
                max_channels=cfg.max_channels, z_dim=cfg.z_dim, w_dim=cfg.w_dim, tanh=cfg.tanh)


def load_generator(path, map_location="cpu"):
    """Rebuild a trained generator from generator.pt, without fedgan's training flags."""
    ck = torch.load(path, map_location=map_location, weights_only=True)
    g = Generator(**ck["kwargs"])
    g.load_state_dict(ck["state_dict"])
    return g.eval()


def to_uint8(x):
    """Generator output (about [-1, 1]) -> uint8 [0, 255] on the CPU: the inverse of to_unit."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# ------------------------------------------------------------------------------------------------
# A client's state, and how it is made and moved
# ------------------------------------------------------------------------------------------------

@dataclass
class Local:
    """How every client trains in a round, resolved from Config once."""
    batch: int = 32
    lr: float = 2e-4
    augment: str = "none"                     # none | flip | rotate: the data-level defenses
    amp_dtype: Optional[torch.dtype] = None   # autocast dtype, None = fp32
    channels_last: bool = False               # NHWC batches and models (CUDA)
    compile: bool = False
    betas: tuple = (0.5, 0.999)               # Adam's
    joint_d: bool = False                     # D sees real and fake images as one batch (--recipe fedgan)


@dataclass
class Client:
    """A client's private state: its data shard (uint8, on the device), its generator copy (overwritten
    by the global one every round), its discriminator, both optimizers and its random stream (batches,
    latents, noise, augmentation)."""
    id: int
    x: torch.Tensor                  # (n, C, H, W) uint8: the shard it trains on (poisoned for an attacker)
    y: torch.Tensor                  # (n,) int64
    g: nn.Module
    d: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    rng: torch.Generator
    local: Local
    backdoor: Optional[Backdoor] = None  # --attack latent: what backdoor_loss teaches its generator


def client_seed(seed, client_id):
    """Each client's own seed: its discriminator's init and its random stream depend on nothing else,
    so a client draws the same numbers whichever process or order runs it."""
    return seed * 1_000_003 + 7919 * (client_id + 1)


def make_client(client_id, data, g_global, d, local, seed, device, home=None, backdoor=None):
    """A client around its shard data = (x, y) and discriminator d; home: where its models live between turns
    (default the device; 'cpu' when offloading, see client_to); backdoor: a latent attacker's (Backdoor)."""
    x, y = data
    g = copy.deepcopy(g_global)
    g.to(home or device), d.to(home or device)
    if local.channels_last:
        g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    if local.compile:  # in place, so state_dict keys stay plain; one graph serves every client
        g.compile(), d.compile()
    betas = local.betas
    return Client(client_id, x.to(device), y.to(device), g, d,
                  opt_g=torch.optim.Adam(g.parameters(), lr=local.lr, betas=betas),
                  opt_d=torch.optim.Adam(d.parameters(), lr=local.lr, betas=betas),
                  scaler=torch.amp.GradScaler(device.type, enabled=local.amp_dtype == torch.float16),
                  rng=torch.Generator(device=device).manual_seed(client_seed(seed, client_id)), local=local,
                  backdoor=backdoor)


def new_discriminator(client_id, seed, n_classes, arch):
    """Client client_id's discriminator, initialised from its own seed (the global stream is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(client_seed(seed, client_id))
        return build_models(n_classes, **arch)[1]


def client_to(client, device):
    """Move a client's models and Adam states (not its data or random stream) to `device`: the host
    offload that lets 100 paper-sized clients share one GPU, each brought over for its turn."""
    # non_blocking only toward the accelerator: a non-blocking copy to the host lands in pinned (page-locked)
    # memory, and 100 paper-sized clients' Adam moments would pin ~56 GB; plain host copies stay pageable
    fast = torch.device(device).type != "cpu"
    for o in (client.opt_g, client.opt_d):
        o.zero_grad(set_to_none=True)  # every step recomputes them: no need to carry gradients around
        for st in o.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":  # Adam keeps its step count on the host
                    st[k] = v.to(device, non_blocking=fast)
    client.g.to(device), client.d.to(device)


def steps_per_round(local_steps, batch, shard_size):
    return local_steps if local_steps > 0 else max(1, shard_size // batch)


# ------------------------------------------------------------------------------------------------
# Procedure B: the server records the round, a detector flags, Algorithm 1 reweights, an aggregator
# combines. Detectors and aggregators are plain pieces that copy alone (torch, numpy, math).
# ------------------------------------------------------------------------------------------------

@dataclass
class Defense:
    """A defense, composed once before the first round from four orthogonal parts."""
    augment: str = "none"                   # client side: flip | rotate the real batches
    detect: Optional["Detector"] = None     # Round -> flags (N,); see DETECTORS
    warmup: int = 10                        # detection acts in rounds t > warmup
    decay: float = 0.8                      # Algorithm 1's d
    aggregate: Callable = field(default_factory=lambda: aggregator("fedavg"))  # (states, weights, center) -> (model, kept or None)
    posthoc: Optional[Callable] = None      # g -> None, after the last round (reconstruct)
    recover: bool = False                   # feddetect_update's way back for clients no longer flagged


@dataclass
class ServerState:
    """What the server carries from round to round (a detector carries its own history)."""
    counts: np.ndarray                                  # (N,) c_i: times each client was flagged
    weights: np.ndarray                                 # (N,) w_i, summing to 1

    @staticmethod
    def fresh(n):
        return ServerState(np.zeros(n, dtype=np.int64), np.full(n, 1.0 / n))


def server_round(server, defense, g_states, losses, center, t, distributed=False):
    """Procedure B: record the reports, detect, reweight, aggregate. g_states {id: generator state}
    holds every client in one process, and this rank's clients under torchrun (where rank 0's decision
    is broadcast and FedAvg is one all-reduce). -> (new global state or None if nobody is ok, Decision)."""
    n, losses = len(losses), np.asarray(losses, dtype=np.float64)                 # (N,)
    norms = norms_of_all(g_states, center, n) if distributed else update_norms([g_states[i] for i in range(n)], center)
    ok = np.isfinite(losses)                                                       # the others sit this round out
    r = Round(t, losses, np.asarray(norms), [g_states.get(i) for i in range(n)], center, ok,
              act=t > defense.warmup and ok.sum() >= 3)
    flags = defense.detect(r) if defense.detect is not None else None   # every round: it keeps its history
    decision = reweight(server, flags if r.act else None, defense.decay, defense.recover, ok)
    decision.norms, decision.logged = norms, defense.detect.logged if defense.detect is not None else {}
    if distributed:
        decision = dataclasses.replace(broadcast_decision(server, decision), norms=norms, logged=decision.logged)
        return (fedavg_across_ranks(g_states, decision.used, center) if decision.ok.any() else None), decision
    if not decision.ok.any():
        return None, decision
    ok = np.flatnonzero(decision.ok)
    g_new, kept = defense.aggregate([g_states[i] for i in ok], decision.used[ok], center)
    if kept is not None:
        decision.selected = np.zeros(n, int)
        decision.selected[ok[kept]] = 1
    return g_new, decision


@dataclass
class Round:
    """What the server has in round t, for a detector to read (lists by client id)."""
    t: int
    losses: np.ndarray         # (N,) reported generator losses (NaN or inf: the client sits this round out)
    norms: np.ndarray          # (N,) ||G_i - G||, measured by the server
    states: list               # (N,) every client's generator state (None for other ranks' under torchrun)
    center: dict               # the round's global generator
    ok: np.ndarray             # (N,) reported a finite loss
    act: bool                  # past warm-up with 3+ reporters: flags are acted on (Algorithm 1)
    cache: dict = field(default_factory=dict)  # signals already computed this round, by name


@dataclass
class Decision:
    """One round's outcome, per client (N,)."""
    flags: np.ndarray       # flagged and acted on (Algorithm 1)
    ok: np.ndarray          # reported a finite loss (the others sit this round out)
    used: np.ndarray        # averaging weights of this round: weights renormalised over ok, 0 elsewhere
    norms: list = None      # ||G_i - G||
    selected: Optional[np.ndarray] = None  # the aggregator's choice (1 kept, 0 left out), when it chooses
    logged: dict = field(default_factory=dict)  # the detector's figures of the round


def update_norms(states, center):
    """||G_i - G||: the L2 norm of each client's update against the round's global model (list (n,))."""
    keys = list(center) if isinstance(center, dict) else range(len(center))
    sq = [sum(float((torch.as_tensor(s[k]).double() - torch.as_tensor(center[k]).to(torch.as_tensor(s[k]).device)
                     .double()).square().sum()) for k in keys) for s in states]
    return [math.sqrt(v) for v in sq]


# ------------------------------------------------------------------------------------------------
# Detectors: one definition each, called once a round with what the server has (a Round), returning
# flags (N,); each keeps its own history (checkpointed through state_dict). A new detector is one class
# and one entry in DETECTORS (the edge, where Config builds it); server_round names none.
# ------------------------------------------------------------------------------------------------

class Detector:
    """Called once a round: Round -> flags (N,) bool; then `logged` holds the round's figures for
    metrics.jsonl. `whole`: it reads every generator, so it needs them all in one process (refused under
    torchrun). state_dict and load_state_dict carry its history through a checkpoint."""
    whole, logged = False, {}

    def __call__(self, r):
        raise NotImplementedError

    def state_dict(self):  # what it carries from round to round (plain lists and tensors)
        return {}

    def load_state_dict(self, d):
        pass


class RuleDetector(Detector):
    """A rule on the history of the reported losses (FedDetect: the isolation forest on this round's)."""

    def __init__(self, rule, seed=0):
        self.rule, self.seed, self.history = rule, seed, []  # history: (t, N) reported losses

    def __call__(self, r):
        self.history.append(np.asarray(r.losses, dtype=np.float64).tolist())
        return rule_on_ok(self.rule, self.history, r.ok, self.seed * 100003 + r.t) if r.act else \
            np.zeros(len(r.losses), bool)

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, d):
        self.history = list(d.get("history", []))


def rule_on_ok(rule, history, ok, seed):
    """A rule (history (t, n), seed) -> flags (n,) on the columns of this round's reporters, over the rows
    where every one of them is finite -> flags (N,), False for the others."""
    h = np.asarray(history, dtype=np.float64)[:, ok]
    flags = np.zeros(len(ok), bool)
    flags[ok] = rule(h[np.isfinite(h).all(axis=1)], seed)
    return flags


def feddetect_paper(loss_history, seed=0):
    """The paper's detector: isolation forest (contamination 'auto') on this round's N losses.
    loss_history (t, N) -> boolean flags (N,). Only the last row is used. Needs IsolationForest."""
    losses = np.asarray(loss_history, dtype=np.float64)[-1]
    return IsolationForest(n_estimators=100, seed=seed).fit_predict(losses) == -1


def loss_rule(name, fpr=0.001):
    """The rule called `name` (paper: the isolation forest; calibrated: CUSUM at false-alarm rate fpr) as
    (history (t, n), seed) -> flags (n,)."""
    return dict(paper=lambda history, seed: feddetect_paper(history, seed),
                calibrated=lambda history, seed: feddetect_calibrated(history, fpr))[name]


def reweight(server, flags, decay, recover, ok):
    """Algorithm 1's weight update on this round's flags (None: no detection this round), then the
    averaging weights renormalised over the clients with a finite loss -> Decision."""
    if flags is not None:
        flags, server.counts, server.weights = feddetect_update(flags, server.counts, server.weights, decay, recover)
    server.weights = server.weights / server.weights.sum()
    used = np.where(ok, server.weights, 0.0)
    return Decision(np.zeros(len(ok), bool) if flags is None else flags, ok, used / used.sum() if ok.any() else used)


def feddetect_update(flags, counts, weights, decay, recover=False):
    """Algorithm 1, lines 16-24: act only when 0 < |O| < N/2; each flagged client gets c_i += 1 and
    w_i *= d ** c_i; weights are renormalised. -> (flags acted on, counts, weights). recover (not in the
    paper): an unflagged client with c_i > 0 gets its last decay back, so false alarms' cost returns."""
    flags, counts, weights = np.asarray(flags, bool), np.array(counts), np.array(weights, dtype=np.float64)
    if not 0 < int(flags.sum()) < len(flags) / 2:
        flags = np.zeros_like(flags)
    counts = counts + flags
    weights = np.where(flags, weights * decay ** counts, weights)
    if recover:
        back = ~flags & (counts > 0)
        weights = np.where(back, weights / decay ** counts, weights)
        counts = counts - back
    return flags, counts, weights / weights.sum()


# ------------------------------------------------------------------------------------------------
# Aggregators take a list of models, each a state dict {name: tensor} or Flower's NDArrays (a list of numpy
# arrays in state_dict order), and return one model of the same kind; integer buffers stay integer.
# ------------------------------------------------------------------------------------------------

def fedavg(states, weights):
    """FedAvg: sum_i w_i * state_i with the weights normalised, accumulated in float64."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    keys = list(states[0]) if isinstance(states[0], dict) else range(len(states[0]))
    out = []
    for k in keys:
        first = torch.as_tensor(states[0][k])
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for wi, s in zip(w, states):
            acc.add_(torch.as_tensor(s[k]).to(first.device, torch.float64), alpha=float(wi))
        out.append(acc.to(first.dtype) if first.is_floating_point() else acc.round().to(first.dtype))
    if isinstance(states[0], dict):
        return dict(zip(keys, out))
    return [o.numpy() if isinstance(a, np.ndarray) else o for o, a in zip(out, states[0])]


def krum_select(states, n_malicious, n_keep=1):
    """Krum / multi-Krum (Blanchard et al. 2017): score each model by the summed squared distance to its
    n - f - 2 nearest others; return the indices of the n_keep lowest scores (the most central)."""
    flat = torch.stack([torch.cat([torch.as_tensor(s[k]).double().flatten().cpu()
                                   for k in (s if isinstance(s, dict) else range(len(s)))]) for s in states])
    d = torch.cdist(flat, flat).square()                                     # (n, n)
    m = max(1, len(states) - n_malicious - 2)
    scores = d.sort(1).values[:, 1:m + 1].sum(1)      # column 0 is the distance to itself
    return scores.argsort()[:n_keep].tolist()


def threat_bound(n):
    """f, the most attackers the threat model allows among n clients (a minority): ceil(n/2) - 1."""
    return math.ceil(n / 2) - 1


def krum_average(states, weights, n_keep):
    """Keep Krum's n_keep most central models (f = threat_bound), average them with their weights.
    -> (model, kept indices)."""
    keep = krum_select(states, threat_bound(len(states)), n_keep)
    return fedavg([states[i] for i in keep], np.asarray(weights, dtype=np.float64)[keep]), keep


def aggregator(name):
    """The aggregation rule called `name`: (states, weights, center) -> (model, kept indices or None).
    A new aggregator is one function above and one entry here (and its name in --aggregator's choices)."""
    return {
        "fedavg": lambda s, w, c: (fedavg(s, w), None),
        "multi-krum": lambda s, w, c: krum_average(s, w, len(s) - threat_bound(len(s))),
    }[name]


# ------------------------------------------------------------------------------------------------
# More detectors: the calibrated rule (robust z-score + CUSUM), the probe detector, flame, and the shadow
# log of them all
# ------------------------------------------------------------------------------------------------

def robust_excess(loss_history, window=10):
    """Each client's excess loss over the round's median, in units of a robust spread (1.4826 * MAD of
    those excesses pooled over the last `window` rounds and all clients). (t, N) -> (t, N)."""
    L = np.asarray(loss_history, dtype=np.float64)
    resid = L - np.median(L, axis=1, keepdims=True)                         # (t, N)
    padded = np.concatenate([np.full((window - 1, L.shape[1]), np.nan), np.abs(resid)])
    past = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)  # (t, N, window), NaN before t = 0
    spread = 1.4826 * np.nanmedian(past.reshape(len(L), -1), axis=1)         # (t,)
    floor = 1e-3 * np.abs(np.median(L, axis=1)) + 1e-8  # losses that agree to 0.1% are equal
    return resid / np.maximum(spread, floor)[:, None]


def cusum(z, drift):
    """One-sided CUSUM per client: S_t = max(0, S_(t-1) + z_t - drift). (t, N) -> (t, N)."""
    s, out = np.zeros(z.shape[1]), np.zeros_like(z)
    for t in range(len(z)):
        s = np.maximum(0.0, s + z[t] - drift)
        out[t] = s
    return out


def cusum_threshold(n_clients, fpr, drift=2.0, window=10, rounds=20000, seed=0, _memo={}):
    """The CUSUM alarm level h that i.i.d. Gaussian losses cross in a fraction `fpr` of client-rounds,
    found by simulating `rounds` rounds of the same statistic (so no threshold is tuned on attacks).
    Memoised per arguments in _memo (a default argument, so the function copies alone)."""
    key = (n_clients, fpr, drift, window, rounds, seed)
    if key not in _memo:
        L = np.random.default_rng(seed).standard_normal((rounds, n_clients))
        s = cusum(robust_excess(L, window), drift)
        _memo[key] = float(np.quantile(s[window:], 1.0 - fpr))
    return _memo[key]


def feddetect_calibrated(loss_history, fpr=0.001, drift=2.0, window=10):
    """A detector with a notion of scale: flag a client whose loss stays high relative to the others.

    Each round, every client's excess loss is measured in robust spreads (robust_excess); a one-sided
    CUSUM accumulates the part above `drift` spreads; a client is flagged while its sum exceeds the level
    that i.i.d. losses would reach in a fraction `fpr` of client-rounds. One noisy round cannot cross
    it; a persistently high loss (a client whose discriminator learned the trigger) crosses it fast.
    loss_history (t, N) -> boolean flags (N,). Needs robust_excess, cusum and cusum_threshold."""
    L = np.asarray(loss_history, dtype=np.float64)
    h = cusum_threshold(L.shape[1], float(fpr), drift, window)
    return cusum(robust_excess(L, window), drift)[-1] > h


def box_mean(x, k):
    """Mean over every k x k patch (stride 1), through an integral image: O(H W) whatever k, where
    avg_pool2d costs O(H W k^2) (at 256 px with k = 64 that is most of the probe's time).
    (B, C, H, W) -> (B, C, H-k+1, W-k+1)."""
    s = F.pad(x, (1, 0, 1, 0)).cumsum(-1).cumsum(-2)                              # (B, C, H+1, W+1)
    return (s[..., k:, k:] - s[..., :-k, k:] - s[..., k:, :-k] + s[..., :-k, :-k]) / (k * k)


def middle(x):
    """The median over dim 0, the mean of the two middle values when their number is even (torch.median
    takes the lower one, which sits below the others by a consistent margin: a false departure)."""
    s = x.sort(0).values
    n = len(x)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def center_surround(x, k):
    """Mean over every k x k patch less the mean of the 2k x 2k patch around it (outside the image counts
    as 0): a patch that stands out from its surroundings, where a departure spread over a whole region (a
    client that sees more of one class brightens the lungs) cancels. (B, C, H, W) -> (B, C, H+1, W+1)
    for even k (positions of the inner patch, from k/2 px outside the image)."""
    h = k // 2
    x = F.pad(x, (k, k, k, k))                                                    # k px of zeros each side
    inner = box_mean(x, k)[..., h:-h or None, h:-h or None]
    return inner[..., :x.shape[-2] - 2 * k + 1, :x.shape[-1] - 2 * k + 1] - box_mean(x, 2 * k)


def departures(renders):
    """Each client's render less the clients' median render, less its own mean over the image (a global
    brightness offset is not a trigger; zero-padded edges would turn it into a border): (N, ...) float64."""
    r = renders.double()
    d = r - middle(r)
    return d - d.mean((-2, -1), keepdim=True)


def probe_draw(g, per_class, seed):
    """per_class latents per class (class blocks in order), labels and noise from `seed`, on g's device."""
    gen = torch.Generator().manual_seed(seed)
    device = next(g.parameters()).device
    z = torch.randn(per_class * g.n_classes, g.z_dim, generator=gen).to(device)
    y = torch.arange(g.n_classes).repeat_interleave(per_class).to(device)
    return z, y, [n.to(device) for n in g.draw_noise(len(z), gen)]


@torch.no_grad()
def render(g, g_states, z, y, noise):
    """Every client's generator (its state loaded into g) on the same latents, labels and noise:
    (N, P, C, H, W) in [-1, 1], float32, on g's device (where the scoring runs too: at 256 px a CPU would
    spend seconds a round on it)."""
    out = []
    for s in g_states:
        g.load_state_dict(s)
        out.append(g(z, y, noise=noise).float().clamp(-1, 1))
    return torch.stack(out)


def departure_energy(renders, per_class, window, chunk=16):
    """Where each client's renders depart from the others' consistently, per class, in the images' units.

    renders (N, P, C, H, W), P = K classes x per_class samples in class blocks. Per sample: the departure
    from the clients' median render, less its own mean (a global brightness offset is not a trigger),
    averaged over the class's samples: a trigger departs alike in every sample and stays; a departure
    that changes from sample to sample averages away. Then that mean departure as a window x window
    patch against its surround (center_surround: a shift spread over a region cancels), squared and
    summed over channels (grey against skin departs with a different sign in each channel: red down,
    blue up). The window averages a random-colour patch to its mean colour, so a pattern whose colours
    average to its surroundings' is not seen. An effect size, not a t: 64 samples make any small
    systematic difference between hospitals "significant".
    Samples are taken `chunk` per class at a time, so the float64 work space stays (N, K x chunk, C, H, W).
    -> (N, K, H', W') float64."""
    N, P, C, H, W = renders.shape
    K = P // per_class
    total = 0
    for start in range(0, per_class, chunk):
        pick = (torch.arange(K)[:, None] * per_class + torch.arange(start, min(start + chunk, per_class))).flatten()
        d = departures(renders[:, pick.to(renders.device)])                       # (N, K*m, C, H, W)
        total = total + d.reshape(N, K, -1, C, H, W).sum(2)                       # (N, K, C, H, W)
    local = center_surround((total / per_class).reshape(N * K, C, H, W), window)  # (N*K, C, H', W')
    return local.square().sum(1).reshape(N, K, *local.shape[-2:])


def probe_watch(avg, energy, rate=0.3):
    """One round of the probe detector's memory. energy (N, K, H', W') is put in units of the round's
    median (over clients, classes and places: the round's own scale, whatever the data) and folded into
    each client's moving average avg (None before the first round) at `rate`: a benign client's departure
    that wanders from place to place averages down; a trigger sits in the same place every round. The
    score: the average's peak over places of its geometric mean over classes (a trigger departs in every
    class; a hospital that sees few images of one class departs in that class alone), over the clients'
    median peak. -> (avg, scores (N,) numpy; about 1 for a client like the others)."""
    e = energy / (energy.median() + 1e-30)
    avg = e if avg is None else (1 - rate) * avg.to(e.device) + rate * e  # a resumed avg comes from the CPU
    peak = avg.clamp_min(1e-30).log().mean(1).exp().flatten(1).amax(1).cpu().numpy()  # (N,)
    return avg, peak / max(float(np.median(peak)), 1e-30)


class ProbeDetector(Detector):
    """The probe detector: every generator rendered on per_class fresh latents per class each round, drawn
    from the server's `secret` (never sent to a client) and the round; each client's consistent local
    departure from the others (departure_energy, in patches a quarter of the image side) folded into a
    moving average (probe_watch); flagged when its score exceeds `level` times the clients' median. Reads
    nothing a client reports."""
    whole = True

    def __init__(self, g, per_class=64, secret=0, level=6.0):
        self.g, self.per_class, self.secret, self.level = copy.deepcopy(g).eval(), per_class, secret, level
        self.window = max(2, g.kwargs["img_size"] // 4)
        self.avg, self.history = None, []  # (N, K, H', W') moving averages, (t, N) scores

    def inputs(self, t):
        """Round t's latents, labels and noise: none an attacker could have tuned to, and a function of the
        secret and t alone (a resumed run draws the same)."""
        return probe_draw(self.g, self.per_class, self.secret * 1_000_003 + t)

    def __call__(self, r):
        renders = render(self.g, r.states, *self.inputs(r.t))                    # (N, P, C, H, W)
        self.avg, scores = probe_watch(self.avg, departure_energy(renders, self.per_class, self.window))
        self.history.append(scores.tolist())
        self.logged = {"watch_score": self.history[-1]}
        return rule_on_ok(lambda h, seed: h[-1] > self.level, self.history, r.ok, 0) if r.act else \
            np.zeros(len(r.losses), bool)

    def state_dict(self):
        return dict(watch=None if self.avg is None else self.avg.cpu(), watch_history=self.history)

    def load_state_dict(self, d):
        self.avg, self.history = d.get("watch"), list(d.get("watch_history", []))
        if self.avg is not None and self.avg.dim() == 5:  # (N, K, C, H', W'): the t-statistics' averages
            raise FedGANError("this checkpoint holds the probe detector of before commit c4e5e03 (t-statistics), "
                              "whose history today's cannot continue: resume it with that version")


def update_gram(states, center):
    """The Gram matrix of the clients' updates G_i - G over every float tensor, one tensor at a time (no
    copy of the whole model): (n, n) float64."""
    gram = torch.zeros(len(states), len(states), dtype=torch.float64)
    for k in (k for k in center if torch.as_tensor(center[k]).is_floating_point()):
        c = torch.as_tensor(center[k]).detach()
        u = torch.stack([torch.as_tensor(s[k]).detach().to(c.device).flatten() for s in states]).double() \
            - c.flatten().double()                                           # (n, P_k)
        gram += (u @ u.T).cpu()
    return gram


def core_ratio(gram):
    """Density by cosine distance, HDBSCAN's core distance with min_samples = n//2: each client's distance
    to its (n//2)-th nearest other; the n//2 + 1 densest clients are the majority. Gram (n, n) -> (n,) each
    core distance over the majority's largest: <= 1 inside the majority, large for a lone direction."""
    norm = gram.diagonal().clamp(min=1e-30).sqrt()
    d = (1 - gram / norm[:, None] / norm[None, :]).clamp(min=0)              # (n, n) cosine distances
    core = d.sort(1).values[:, len(d) // 2]                                  # column 0: itself
    return (core / core.sort().values[len(d) // 2].clamp(min=1e-12)).numpy()


class ClusterDetector(Detector):
    """FLAME's filter (Nguyen et al. 2022), written with torch alone: the updates clustered by cosine
    distance; a client is flagged when it lies outside the majority's density (core_ratio > ratio); FLAME's
    clipping and noise are not here. Reads nothing a client reports; keeps no history."""
    whole = True

    def __init__(self, ratio=1.3):  # the loosest ratio without a false alarm on gray clean recordings
        self.ratio = ratio

    def __call__(self, r):
        ok, score = np.flatnonzero(r.ok), np.full(len(r.ok), np.nan)
        if len(ok) > 2:  # a majority needs three
            if "gram" not in r.cache:  # computed once a round when it both acts and shadows
                r.cache["gram"] = update_gram([r.states[i] for i in ok], r.center)
            score[ok] = core_ratio(r.cache["gram"])
        self.logged = {"flame_score": score.tolist()}
        return (score > self.ratio) & r.ok if r.act else np.zeros(len(r.ok), bool)


class Shadow(Detector):
    """--shadow: several detectors run every round and each one's flags, after Algorithm 1's gate, are
    logged; only `acting`'s (None: nobody's) are returned."""

    def __init__(self, detectors, acting=None):
        self.detectors, self.acting, self.last = detectors, acting, {}
        self.whole = True

    def __call__(self, r):
        self.last = {}
        for name, d in self.detectors.items():
            f = d(r)
            self.last[name] = f if 0 < f.sum() < len(f) / 2 else np.zeros_like(f)
            if name == self.acting:
                flags = f
        if not r.act:
            self.last = {}
        out = {k: v for d in self.detectors.values() for k, v in d.logged.items()}
        shadow = {k: v.astype(int).tolist() for k, v in self.last.items() if k != self.acting}
        self.logged = dict(out, shadow=shadow) if shadow else out
        return flags if self.acting else np.zeros(len(r.losses), bool)

    def state_dict(self):
        return {"shadow": {name: d.state_dict() for name, d in self.detectors.items()}}

    def load_state_dict(self, d):  # a checkpoint written before the shadow had its own: the server's histories
        for name, det in self.detectors.items():
            det.load_state_dict(d.get("shadow", {}).get(name, d))


# ------------------------------------------------------------------------------------------------
# The round's log, checkpoints (atomic, resumable after a kill), samples and the end of a run
# ------------------------------------------------------------------------------------------------

def log_round(run, t, rounds, reports, decision, secs, left):
    """The round's line on stdout (with the time left for the run) and in metrics.jsonl (lists by client id)."""
    server, n = run.server, len(decision.flags)
    note = f"  EXCLUDED non-finite loss: {np.flatnonzero(~decision.ok).tolist()}" if not decision.ok.all() else ""
    if decision.selected is not None:
        note += f"  kept {np.flatnonzero(decision.selected).tolist()}"
    if "watch_score" in decision.logged:
        note += f"  probe {fmt(decision.logged['watch_score'], 1)}"
    print(f"round {t + 1:4d}/{rounds}  {secs:6.1f}s  left {hms(left)}  g_loss {fmt(reports.g_loss)}  "
          f"d_loss {fmt(reports.d_loss)}  "
          f"w {fmt(server.weights)}  flagged {np.flatnonzero(decision.flags).tolist()}{note}", flush=True)
    rec = dict(round=t + 1, d_loss=reports.d_loss, g_loss=reports.g_loss, flagged=decision.flags.astype(int).tolist(),
               **({"g_loss_true": reports.g_loss_true} if run.fed.adaptive else {}),
               update_norm=decision.norms, **decision.logged,
               **({"selected": decision.selected.tolist()} if decision.selected is not None else {}),
               counts=server.counts.tolist(), weights=server.weights.tolist(),
               malicious=[int(i in run.fed.malicious) for i in range(n)],
               excluded=(~decision.ok).astype(int).tolist(), seconds=round(secs, 3))
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({k: json_safe(v) for k, v in rec.items()}) + "\n")


def hms(seconds):
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt(xs, nd=3):
    return "[" + " ".join(f"{x:.{nd}f}" for x in xs) + "]"


def json_safe(v):
    """NaN and inf are not JSON: they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return [json_safe(x) for x in v] if isinstance(v, list) else v


def save_checkpoint(run, rounds_done, cfg, seconds):
    """checkpoint.pt and a folder of client states, atomic as a set: each client's private state is
    written to its own file in a new folder (one client in host memory at a time in a single process,
    where 100 paper-sized clients hold ~74 GB), then checkpoint.pt, which names that folder, replaces
    the old one atomically, and only then is the old folder removed. A crash at any point leaves a
    complete older set. Everything loads with weights_only=True."""
    folder = run.out / f"clients.{time.time_ns()}"
    with signals_held():
        write_checkpoint(run, rounds_done, cfg, seconds, folder)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block is done, then arrive as usual (to the handler they had): a
    checkpoint is never cut half-way, and a signal cannot surface from inside torch.save's writer as some
    other error of its clean-up (as SIGTERM once did from inside load_state_dict)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(got):
            signal.raise_signal(s)


def write_checkpoint(run, rounds_done, cfg, seconds, folder):
    """save_checkpoint's writing."""
    try:
        if run.fed.distributed:
            private = client_states(run.fed)  # a collective: every rank calls it; rank 0 writes
            if run.lead:
                write_clients(private.items(), folder)
        else:
            write_clients(((i, private_state(c)) for i, c in sorted(run.fed.clients.items())), folder)
        if run.lead:
            s, detect = run.server, run.defense.detect
            atomic_save(dict(round=rounds_done, g=run.g.state_dict(), counts=s.counts.tolist(),
                             weights=s.weights.tolist(), **(detect.state_dict() if detect is not None else {}),
                             rng=rng_state(), seconds=seconds, config=dataclasses.asdict(cfg),
                             clients=folder.name),
                        run.out / "checkpoint.pt")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if run.lead:
        for old in run.out.glob("clients.*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    run.checkpointed = rounds_done


def write_clients(states, folder):
    """(id, private state) pairs -> folder/ID.pt, one file each, written as they come."""
    folder.mkdir()
    for i, state in states:
        torch.save(state, folder / f"{i:05d}.pt")


def private_state(client):
    """A client's private state for the checkpoint (CPU tensors): what it keeps between rounds."""
    return to_cpu(dict(d=client.d.state_dict(), opt_d=client.opt_d.state_dict(), opt_g=client.opt_g.state_dict(),
                       scaler=client.scaler.state_dict(), rng=client.rng.get_state()))


def to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rng_state():
    """The global random streams, as what torch.load(weights_only=True) accepts (tensors, ints, tuples)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    s = dict(torch=torch.get_rng_state(), python=random.getstate(),
             numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, cached=cached))
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path, write=None):
    """Write to a temporary file, then rename: a crash never leaves a half-written file, and a failed or
    interrupted write (a full disk, a signal) leaves no .tmp behind."""
    tmp = Path(str(path) + ".tmp")
    try:
        (write or torch.save)(obj, tmp)  # torch.save looked up now, not bound at import
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text):
    atomic_save(text, path, write=lambda obj, p: p.write_text(obj))


def read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FedGANError(f"cannot read {path} ({type(e).__name__}): it is damaged, was written by an older "
                          "fedgan.py, or holds objects only a pickle restores (refused: they could run code); delete "
                          "it to restart the run from round 0")


def read_clients(out, ck, ids):
    """The private states of clients `ids` named by checkpoint ck: {id: state}. Checkpoints written before
    the per-client files hold them in a list."""
    if not isinstance(ck["clients"], str):
        return {i: ck["clients"][i] for i in ids}
    missing = [out / ck["clients"] / f"{i:05d}.pt" for i in ids if not (out / ck["clients"] / f"{i:05d}.pt").exists()]
    if missing:
        raise FedGANError(f"{missing[0]} is gone (a client's discriminator and optimizers at round {ck['round']}), so "
                          f"--resume cannot continue {out} exactly; start a new run with --out")
    return {i: read_checkpoint(out / ck["clients"] / f"{i:05d}.pt") for i in ids}


def load_checkpoint(run, rounds):
    """Restore the global generator, server state, every client this process holds and the random streams."""
    ck = read_checkpoint(run.out / "checkpoint.pt") if run.lead else None
    if run.fed.distributed:
        box = [ck]
        collective(dist.broadcast_object_list, box, src=0)
        ck = box[0]
    if ck["round"] > rounds:
        raise FedGANError(f"{run.out} is at round {ck['round']}; --rounds {rounds} would shorten it: give --rounds "
                          f">= {ck['round']}")
    run.g.load_state_dict(ck["g"])
    changed = set()
    private = read_clients(run.out, ck, sorted(run.fed.clients))
    for i, c in run.fed.clients.items():
        changed.update(load_private_state(c, private.pop(i), client_seed(ck["config"]["seed"], i) + ck["round"]))
    if changed and run.lead:
        print(f"resumed on another device or precision: {', '.join(sorted(changed))} (the run goes on "
              "deterministically, but not bitwise as it would have on the first device)")
    run.server = ServerState(np.array(ck["counts"], dtype=np.int64), np.array(ck["weights"], dtype=np.float64))
    if run.defense.detect is not None:
        run.defense.detect.load_state_dict(ck)
    set_rng_state(ck["rng"])
    run.start, run.seconds = ck["round"], ck.get("seconds", 0.0)
    run.checkpointed = ck["round"]


def load_private_state(client, state, reseed):
    """Restore what a client keeps between rounds. Resumed on another device type, its noise stream's
    state does not fit (a CPU generator's is 5,056 bytes, a CUDA one's 16): the stream is then re-seeded
    from `reseed` (the seed, client id and round: deterministic). A GradScaler switched on (fp16) after a
    run without one starts fresh. Returns what was not restored exactly, for one line in the log."""
    client.d.load_state_dict(state["d"])
    client.opt_d.load_state_dict(state["opt_d"])
    client.opt_g.load_state_dict(state["opt_g"])
    changed = []
    if client.scaler.is_enabled() and not state["scaler"]:
        changed.append("fp16 loss scaling starts fresh")
    else:
        client.scaler.load_state_dict(state["scaler"])
    if state["rng"].numel() == client.rng.get_state().numel():
        client.rng.set_state(state["rng"])
    else:
        client.rng.manual_seed(reseed)
        changed.append(f"noise streams re-seeded for {client.rng.device.type}")
    return changed


def check_same_experiment(cfg, ck_config, out):
    """A config.json edited by hand must still describe the run its checkpoint holds: any setting outside
    what --resume may change that differs is refused, naming it."""
    trained = config_from_json(ck_config, out / "checkpoint.pt")
    for f in dataclasses.fields(Config):
        k = f.name
        if k not in RESUMABLE | {"out"} and getattr(cfg, k) != getattr(trained, k):
            raise FedGANError(f"{out / 'config.json'} says {k}={getattr(cfg, k)!r}, but its checkpoint was trained "
                              f"with {k}={getattr(trained, k)!r}; put that value back in config.json, or start a new "
                              "run with --out for another experiment")


def checkpoint_bytes(g, d, n_clients):
    """What one checkpoint set holds, in bytes: the global generator, and per client its
    discriminator with both Adam moments and the two moments of its generator's Adam (fp32 each)."""
    count = lambda m: sum(t.numel() for t in m.state_dict().values() if t.is_floating_point())  # noqa: E731
    return 4 * count(g) + n_clients * (12 * count(d) + 8 * count(g))


def check_disk(out, need):
    """Refuse before round 1 a run whose checkpoints cannot fit: a new set is written before the old one
    goes, so twice `need` bytes must be free where they go."""
    where = next(p for p in [Path(out), *Path(out).absolute().parents] if p.exists())  # out may not exist yet
    free = shutil.disk_usage(where).free
    if 2 * need > free:
        raise FedGANError(f"checkpoints need {2 * need / 1e9:.1f} GB in {out} (two sets of {need / 1e9:.2f} GB while "
                          f"one replaces the other) but {free / 1e9:.1f} GB are free; free some space or give --out "
                          "on a larger disk (fewer --clients also shrink it)")


@torch.no_grad()
def generate(g, labels, seed, batch=256):
    """uint8 images (n, C, S, S) of the classes `labels` (n,), in eval mode; latents and noise come from
    `seed` alone, so the same call gives the same images whatever ran before it."""
    device = next(g.parameters(), torch.empty(0)).device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed)
    was_training, out = g.training, []
    g.eval()
    for y in torch.as_tensor(labels).split(batch):
        z = torch.randn(len(y), g.z_dim, generator=gen).to(device)
        out.append(to_uint8(g(z, y.to(device), noise)))
    g.train(was_training)
    return torch.cat(out)


def save_samples(g, path, seed, per_class=8):
    """A grid PNG: one row per class, the same latents every time (so rounds can be compared)."""
    save_grid(generate(g, torch.arange(g.n_classes).repeat_interleave(per_class), seed), g.n_classes, path)


def grid_image(img, rows):
    """uint8 images (rows * k, C, S, S), row after row, as one PIL image."""
    from PIL import Image
    n, c, s, _ = img.shape
    grid = img.reshape(rows, n // rows, c, s, s).permute(0, 3, 1, 4, 2).reshape(rows * s, n // rows * s, c)
    return Image.fromarray(grid.squeeze(-1).numpy() if c == 1 else grid.numpy())


def save_grid(img, rows, path):
    """uint8 images (rows * k, C, S, S), row after row, as one PNG."""
    grid_image(img, rows).save(path)


def save_real(data, path, seed, per_class=8):
    """samples/real.png: real training images in the samples' layout (one row per class), to compare at a glance."""
    x, y = data.train
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=gen)[:per_class]]
                     for c in range(len(data.classes))])
    if len(idx) == per_class * len(data.classes):  # every class has enough images to fill its row
        save_grid(x[idx], len(data.classes), path)


def backdoor_figures(g, trigger, margin, real_images, seed, per_class=256):
    """For the bottom-right patch attack: the trigger's strength and rate in generated images (eval.py's
    figures, the same function), beside the rate in held-out real images (the rate by chance)."""
    fake = generate(g, torch.arange(g.n_classes).repeat_interleave(per_class), seed)
    got = trigger_figures(fake, trigger, margin, real_images)
    return dict(trigger_strength=got["strength"], trigger_rate=got["rate"], trigger_control=got["control"],
                trigger_seed=seed,
                trigger_rate_real=trigger_figures(real_images, trigger, margin, real_images)["rate"])


def reconstruct(g, x, y, n_classes, per_class, epochs, local, seed, arch, device):
    """Model reconstruction baseline: fine-tune the server generator against a fresh discriminator on
    a benign set of real images (per_class per class, from the clean training data)."""
    gen = torch.Generator().manual_seed(seed + 11)
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=gen)]
                     [:per_class] for c in range(n_classes)])
    server = make_client(-1, (x[idx], y[idx]), g, new_discriminator(-1, seed, n_classes, arch), local, seed, device)
    steps = epochs * steps_per_round(0, local.batch, len(idx))
    print(f"reconstruct: fine-tuning the server generator on {len(idx)} benign images for {steps} steps")
    state, (_, gl) = client_update(server, g.state_dict(), steps)
    g.load_state_dict(state)
    print(f"reconstruct: done, mean G loss {gl:.3f}")


def finish(run, cfg, seconds):
    """After the last round: the post-hoc step, generator.pt, the backdoor figures and summary.json."""
    g = run.g
    if run.defense.posthoc is not None:
        run.defense.posthoc(g.requires_grad_(True))
        save_samples(g, run.out / "samples" / "reconstructed.png", cfg.seed)
    atomic_save(dict(kwargs=g.kwargs, state_dict=g.state_dict(), classes=run.data.classes, rounds=cfg.rounds,
                     ), run.out / "generator.pt")
    extra = {}
    if cfg.attack in ("patch", "latent") and cfg.poison > 0:
        trig = make_trigger(cfg.poison, cfg.channels, seed=cfg.seed)
        extra = backdoor_figures(g, trig, trigger_margin(cfg.img_size), run.data.test[0], cfg.seed + 12345)
    return summarize(run.out, cfg.rounds, cfg.warmup, cfg.detector != "none", cfg.aggregator, seconds, extra)


def detection_rates(flags, mal):
    """flags (rounds, N) after warm-up, mal (N,) bool -> TPR, benign FPR, first detection round that
    flags an attacker (1 = the first round after warm-up)."""
    hit = np.flatnonzero(flags[:, mal].any(axis=1)) if mal.any() else np.array([])
    return dict(tpr=float(flags[:, mal].mean()) if mal.any() else None,
                fpr=float(flags[:, ~mal].mean()) if (~mal).any() else None,
                first=int(hit[0]) + 1 if len(hit) else None)


def summarize(out, rounds, warmup, detecting, aggregator_name, seconds, extra=None):
    """End-of-run summary from metrics.jsonl: flags per client, final weights, detection rates after
    warm-up (for Krum, rejection rates and the attackers' mean share of the aggregate), plus `extra`."""
    try:
        recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        recs = []
    if not recs:  # the log is gone: the rounds are the checkpoint's, the per-round figures are lost
        s = dict(rounds=rounds, seconds=round(seconds, 1), note="metrics.jsonl was missing or unreadable: no "
                 "per-round figures", **(extra or {}))
        atomic_write_text(out / "summary.json", json.dumps(s, indent=2))
        print(f"done: {rounds} rounds in {seconds:.0f}s (metrics.jsonl was missing: no per-round figures)")
        return s
    flags = np.array([r["flagged"] for r in recs])
    post = np.array([not detecting or r["round"] - 1 > warmup for r in recs])  # Algorithm 1's t = round - 1
    mal = np.array(recs[-1]["malicious"], bool)
    s = dict(rounds=rounds, seconds=round(seconds, 1), flags_per_client=flags.sum(0).tolist(),
             final_weights=recs[-1]["weights"], malicious=np.flatnonzero(mal).tolist())
    w = np.array(s["final_weights"])
    s["malicious_final_weight"] = float(w[mal].sum())
    if "selected" in recs[-1]:  # Krum chose: a client's part of the last aggregate is not its weight w_i
        share = w * np.array(recs[-1]["selected"])
        s["final_share"] = (share / share.sum()).tolist()
        s["malicious_final_share"] = float(share[mal].sum() / share.sum())
    s["lowest_benign_weight"] = float(w[~mal].min()) if (~mal).any() else None
    if post.any():
        r = detection_rates(flags[post], mal)
        s["fpr_after_warmup"], s["tpr_after_warmup"], s["rounds_to_first_correct_flag"] = r["fpr"], r["tpr"], r["first"]
        if r["first"]:  # how steadily the attacker stays flagged once found
            s["tpr_after_first_flag"] = float(flags[post][r["first"] - 1:, mal].mean())
    shadow = [r.get("shadow") for r in recs if r["round"] - 1 > warmup]
    if shadow and all(shadow):  # each shadow detector scored as if it had acted
        s["shadow"] = {name: detection_rates(np.array([r[name] for r in shadow]), mal) for name in shadow[0]}
    if "selected" in recs[-1] and post.any():  # Krum: a client left out of the average counts as flagged
        sel = np.array([r["selected"] for r in recs])[post]
        s["krum_rejected_malicious"] = float(1 - sel[:, mal].mean()) if mal.any() else None
        s["krum_rejected_benign"] = float(1 - sel[:, ~mal].mean())
        s["malicious_mean_share"] = float((sel[:, mal].sum(1) / sel.sum(1)).mean())
    s.update(extra or {})
    atomic_write_text(out / "summary.json", json.dumps(s, indent=2))
    say_summary(s, out, seconds, detecting, aggregator_name)
    return s


def say_summary(s, out, seconds, detecting, aggregator_name):
    """The run's closing lines, from its summary."""
    print(f"done: {s['rounds']} rounds in {seconds:.0f}s  flags per client {s['flags_per_client']}  "
          f"final weights {fmt(s['final_weights'])}"
          + (f" (their shares of the last aggregate, {aggregator_name} chose: {fmt(s['final_share'])})"
             if "final_share" in s else "") + f"  malicious {s['malicious']}")
    if "fpr_after_warmup" in s and detecting:
        tpr = "n/a" if s.get("tpr_after_warmup") is None else f"{s['tpr_after_warmup']:.2f}"
        first = s.get("rounds_to_first_correct_flag")
        print(f"detector after warm-up: TPR {tpr}  FPR {s['fpr_after_warmup']:.3f} per benign client-round"
              + (f"  first correct flag after {first} detection round(s)" if first else "")
              + (f"  attackers' final weight {s['malicious_final_weight']:.3f}" if s["malicious"] else ""))
    if "krum_rejected_benign" in s:
        print(f"{aggregator_name}: left out attackers in {s['krum_rejected_malicious'] or 0:.2f} and benign clients "
              f"in {s['krum_rejected_benign']:.2f} of their rounds{' after warm-up' if detecting else ''}; "
              "attackers' mean share "
              f"{s['malicious_mean_share']:.3f}")
    if "trigger_strength" in s:
        rate = (f"rate {s['trigger_rate']:.3f} of generated images (real images: {s['trigger_rate_real']:.3f})"
                if s["trigger_rate"] is not None else f"no rate: {s['trigger_control']:.0%} of generated images "
                "depart from real ones at the other corners too, so no real threshold tells a trigger apart")
        print(f"backdoor: trigger strength {s['trigger_strength']:.3f} (0 = as real images, 1 = pasted on every "
              f"image), {rate}")
    print(f"outputs: {out}/ (config.json, metrics.jsonl, summary.json, samples/, generator.pt, checkpoint.pt)")


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


def comm_device():
    """Where a collective's tensors must live: nccl moves GPU tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def reduced(buf, op=dist.all_reduce, **kw):
    """buf (a CPU tensor) after the collective op, done on the backend's device; back on the CPU."""
    moved = buf.to(comm_device())
    collective(op, moved, **kw)
    return moved.cpu()


def gather_losses(results, n_clients):
    """Every client's (d_loss, g_loss) on every rank: each rank fills its own slots, then one all-reduce."""
    buf = torch.zeros(2, n_clients, dtype=torch.float64)
    for i, (dl, gl) in results.items():
        buf[0, i], buf[1, i] = dl, gl
    buf = reduced(buf)
    return buf[0].tolist(), buf[1].tolist()


def norms_of_all(g_states, center, n_clients):
    """||G_i - G|| of every client on every rank: each rank measures its own clients, then one all-reduce."""
    buf = torch.zeros(n_clients, dtype=torch.float64)
    for i, s in g_states.items():
        buf[i] = update_norms([s], center)[0]
    return reduced(buf).tolist()


def broadcast_decision(server, decision):
    """Rank 0's decision and server weights on every rank (one tensor), so all ranks stay identical."""
    buf = torch.tensor(np.stack([decision.flags, server.counts, server.weights, decision.ok, decision.used]),
                       dtype=torch.float64)
    buf = reduced(buf, dist.broadcast, src=0)
    b = buf.numpy()
    server.counts, server.weights = b[1].astype(np.int64), b[2].copy()
    return Decision(b[0] > 0.5, b[3] > 0.5, b[4].copy())


def fedavg_across_ranks(own_states, used, template):
    """FedAvg over ranks: sum_i used_i * G_i over this rank's clients in float64, one all-reduce of that
    partial sum, then the cast back. `used` is already normalised over all clients."""
    partial = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in template.items()}
    for i, s in own_states.items():
        for k in partial:
            partial[k].add_(s[k].to(partial[k].device, torch.float64), alpha=float(used[i]))
    flat = torch.cat([v.flatten() for v in partial.values()])
    collective(dist.all_reduce, flat)
    return {k: v.view(template[k].shape).to(template[k].dtype)
            for k, v in zip(partial, flat.split([v.numel() for v in partial.values()]))}


def client_states(fed):
    """{id: private state} of every client, on rank 0 (None elsewhere): for the checkpoint."""
    own = {i: private_state(c) for i, c in fed.clients.items()}
    if not fed.distributed:
        return own
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    collective(dist.gather_object, own, parts, dst=0)
    return {k: v for p in parts for k, v in p.items()} if parts else None


def init_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on CPU, nccl on CUDA."""
    if dist_rank_world()[1] == 1 or dist.is_initialized():
        return
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    import datetime
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))


# ------------------------------------------------------------------------------------------------
# Set-up: the edge that reads Config, builds the run and holds its folder
# ------------------------------------------------------------------------------------------------

def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise FedGANError("--device cuda but no CUDA GPU is visible; use --device cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank under torchrun


def amp_dtype_for(amp, amp_dtype, device):
    """The autocast dtype, or None for fp32. auto: bf16 on CUDA where supported, else fp16; fp32 on
    CPU (bf16 on CPU only when asked: --amp-dtype bf16)."""
    if not amp:
        return None
    if amp_dtype == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dict(bf16=torch.bfloat16, fp16=torch.float16)[amp_dtype]


def set_precision(cfg, device):
    """TF32 for fp32 matmuls and convolutions on CUDA (--tf32); autocast (--amp) is separate."""
    if amp_dtype_for(cfg.amp, cfg.amp_dtype, device) == torch.float16 and device.type != "cuda":
        raise FedGANError("--amp-dtype fp16 needs CUDA (its GradScaler); on CPU use --amp-dtype bf16 or --no-amp")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick its fastest kernels


def local_of(cfg, device):
    """The clients' training settings from a Config (the edge)."""
    return Local(cfg.batch, cfg.lr, cfg.augment, amp_dtype_for(cfg.amp, cfg.amp_dtype, device),
                 cfg.channels_last and device.type == "cuda", cfg.compile, (cfg.beta1, cfg.beta2),
                 JOINT_D[cfg.recipe])


def offload_of(cfg, device, n_classes, n_owned):
    """--offload auto: keep the clients' state in host memory between turns when it (16 bytes per
    parameter: weights, gradients, Adam's two moments) would take over half the free GPU memory."""
    if cfg.offload != "auto" or device.type != "cuda":
        return cfg.offload == "on"
    with torch.device("meta"):  # sizes only: no memory, no random draws
        client_mb = sum(p.numel() for m in build_models(n_classes, **arch_of(cfg)) for p in m.parameters()) * 16 / 2**20
    return n_owned * client_mb > 0.5 * torch.cuda.mem_get_info(device)[0] / 2**20


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything one process needs for the rounds."""
    out: Path
    lead: bool                  # rank 0: writes the run folder
    g: nn.Module                # the global generator
    fed: Federation
    server: ServerState
    defense: Defense
    data: Data
    start: int = 0              # first round to run (after a resume)
    seconds: float = 0.0        # training time before this session (after a resume)
    summary: Optional[dict] = None
    lock: object = None         # the open run-folder lock (rank 0)
    checkpointed: int = 0       # the round the newest checkpoint holds

    now: int = 0                # the round being trained (from 1)

    def checkpointed_text(self):
        return (f"last checkpoint: round {self.checkpointed}" if self.checkpointed else
                "no checkpoint yet: a resume starts from round 0")


def setup_run(cfg):
    """Check the out folder, load data, build this process's clients and compose the defense; restore
    a checkpoint when resuming. Nothing is written yet."""
    out = Path(cfg.out)
    rank, world = dist_rank_world()
    check_out_folder(out, cfg.resume)
    lock = lock_folder(out) if rank == 0 and cfg.resume else None  # a new folder is locked before it is written
    try:
        return build_run(cfg, out, rank, world, lock)
    except BaseException:
        unlock_folder(lock)  # refused or interrupted before the run began: the folder is free again
        raise


def build_run(cfg, out, rank, world, lock):
    """setup_run's work once the folder is checked (and, for a resume, held)."""
    device = pick_device(cfg.device)
    set_precision(cfg, device)
    check_world(cfg, world)
    if cfg.resume and rank == 0 and (out / "checkpoint.pt").exists():
        check_same_experiment(cfg, read_checkpoint(out / "checkpoint.pt")["config"], out)
    seed_everything(cfg.seed)
    data = data_of(cfg)
    if cfg.resume:
        check_fingerprint(out, data, cfg.data_root)
    y = data.train[1]
    shards = (split_dirichlet(y, cfg.clients, cfg.dirichlet_alpha, cfg.seed) if cfg.partition == "dirichlet"
              else split_clients(len(y), cfg.clients, cfg.seed))
    if min(len(s) for s in shards) < 2:
        raise FedGANError(f"{len(y)} training images cannot make {cfg.clients} shards of 2 or more; "
                          f"use fewer --clients or more data (data: {data.report})")
    n_classes = len(data.classes)
    g_global = build_models(n_classes, **arch_of(cfg))[0].to(device)
    owned = owned_clients(cfg.clients, rank, world)
    steps = [steps_per_round(cfg.local_steps, cfg.batch, len(s)) for s in shards]
    offload = offload_of(cfg, device, n_classes, len(owned))
    defense = defense_of(cfg, data, device, g_global)
    if world > 1 and defense.detect is not None and defense.detect.whole:
        raise FedGANError("the probe detector, flame and --shadow read every generator, so they need them all "
                          "on one process; run them without torchrun")
    clients = clients_of(cfg, data, shards, owned, g_global, device, offload)
    fed = Federation(clients, steps, malicious_ids(cfg), device, offload, world > 1, cfg.adaptive, cfg.seed,
                     [len(s) for s in shards], cfg.scale_update)
    if rank == 0:
        check_disk(out, checkpoint_bytes(g_global, next(iter(clients.values())).d, cfg.clients))
    run = Run(out, rank == 0, g_global, fed, ServerState.fresh(cfg.clients), defense, data, lock=lock)
    if cfg.resume and (out / "checkpoint.pt").exists():
        load_checkpoint(run, cfg.rounds)
    elif cfg.resume and rank == 0:
        print(f"no checkpoint in {out}: starting from round 0")
    return run


def check_world(cfg, world):
    """Under torchrun: what needs every generator on one process is refused, and every rank needs a client."""
    if world > 1 and cfg.scale_update:
        raise FedGANError("--scale-update needs every generator on one process; run it without torchrun")
    if world > 1 and cfg.aggregator != "fedavg":
        raise FedGANError(f"--aggregator {cfg.aggregator} needs every generator on one process; run it without "
                          "torchrun (or use --aggregator fedavg: detectors work under torchrun)")
    if world > cfg.clients:
        raise FedGANError(f"{world} ranks for {cfg.clients} clients: every rank needs a client; "
                          "use --nproc-per-node <= --clients")


def clients_of(cfg, data, shards, owned, g_global, device, offload):
    """{id: Client} for the clients this process holds, the malicious ones with their attack (the edge)."""
    (x, y), n_classes, bad = data.train, len(data.classes), malicious_ids(cfg)
    local = local_of(cfg, device)
    trigger = make_trigger(cfg.poison, cfg.channels, seed=cfg.seed) if cfg.poison > 0 else None
    latent = Backdoor(to_unit(trigger), trigger_margin(cfg.img_size)) if cfg.attack == "latent" else None
    clients = {}
    for i in owned:
        xi, yi = x[shards[i]], y[shards[i]]
        d = new_discriminator(i, cfg.seed, n_classes, arch_of(cfg))
        if i in bad:  # the attack: every training image of a malicious client
            xi, yi = dilute((xi, yi), poison(xi, yi, cfg.attack, n_classes, trigger, trigger_margin(cfg.img_size),
                                             cfg.blend_alpha, cfg.seed), cfg.poison_frac, cfg.seed + i)
        clients[i] = make_client(i, (xi, yi), g_global, d, local, cfg.seed, device, "cpu" if offload else None,
                                 latent if i in bad else None)
    return clients


DETECTORS = {  # --detector NAME: (Config, global generator) -> Detector or None
    "none": lambda cfg, g: None,
    "paper": lambda cfg, g: RuleDetector(loss_rule("paper"), cfg.seed),
    "calibrated": lambda cfg, g: RuleDetector(loss_rule("calibrated", cfg.detect_fpr), cfg.seed),
    "probe": lambda cfg, g: ProbeDetector(g, cfg.probe_per_class, cfg.seed * 7 + 424242, cfg.probe_level),
    "flame": lambda cfg, g: ClusterDetector(),
}


def shadow_of(cfg, g, acting):
    """--shadow: the paper and calibrated rules on the loss, the probe detector and flame, each logged every
    round beside the acting detector."""
    shadows = {name: DETECTORS[name.replace("-watch", "")](cfg, g) for name in
               ("paper", "calibrated", "probe-watch", "flame")}
    return Shadow(shadows if acting is None else dict(shadows, acting=acting), None if acting is None else "acting")


def defense_of(cfg, data, device, g):
    """The defense's parts from a Config (the edge); reconstruct gets its benign set and settings here."""
    detect = DETECTORS[cfg.detector](cfg, g)
    if cfg.shadow:
        detect = shadow_of(cfg, g, detect)
    posthoc = None
    if cfg.posthoc == "reconstruct":
        local = dataclasses.replace(local_of(cfg, device), augment="none")  # the benign set gets no augmentation
        posthoc = functools.partial(reconstruct, x=data.train[0], y=data.train[1], n_classes=len(data.classes),
                                    per_class=cfg.reconstruct_per_class, epochs=cfg.reconstruct_epochs, local=local,
                                    seed=cfg.seed, arch=arch_of(cfg), device=device)
    return Defense(cfg.augment, detect, cfg.warmup, cfg.decay, aggregator(cfg.aggregator), posthoc,
                   cfg.recover)


def check_out_folder(out, resume, held=False):
    """A new run needs a new or empty folder it can write (a lock file left there does not count) that no
    other process holds (held: this process holds it); a resumed one, its own folder."""
    if dist_rank_world()[0] != 0 or resume:
        return
    if out.exists() and not out.is_dir():
        raise FedGANError(f"--out {out} is a file; choose a folder path")
    holder = folder_in_use(out) if out.exists() and not held else None
    if holder:
        raise FedGANError(f"{out} is in use by {holder}; wait for it to end, or choose another folder")
    if out.exists() and any(p.name != ".lock" for p in out.iterdir()):
        raise FedGANError(f"{out} already holds files; pass --resume {out} to continue that run, "
                          "or choose another --out")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise FedGANError(f"--out {out}: cannot write under {parent}; choose a folder you can write")


def lock_folder(out):
    """Hold out/.lock for this process's life, so a run folder has one writer. flock is released by the OS
    however the process ends; the holder's pid and host are written inside for the message a second process
    gets, and cleared at a clean end, so a lock found with a name in it was left by a process that is gone
    (it is taken over, with a line). Returns the open file (None where flock does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".lock", "a+")
    except OSError as e:
        raise FedGANError(f"cannot create {out} ({e.strerror}); choose another --out")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise FedGANError(f"{out} is in use by {holder}; wait for it to end, or choose another folder")
    f.seek(0)
    previous = f.read().strip()
    if previous:
        print(f"{out}: taking over the lock left by {previous}, which is no longer running")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


def unlock_folder(f):
    """A clean end: the holder's name cleared, the lock released."""
    if f is not None and not f.closed:
        f.seek(0)
        f.truncate()
        f.close()


def folder_in_use(out):
    """The holder ('pid N on HOST') when another process holds out/.lock, else None."""
    try:
        import fcntl
        with open(Path(out) / ".lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return f.read().strip() or "another process"
    except (ImportError, OSError):
        pass
    return None


def data_fingerprint(data):
    """sha256 (first 16 hex digits) of each split's uint8 images and labels, as loaded: what a run trained
    and is scored on, whatever path it was read from."""
    def digest(*tensors):
        h = hashlib.sha256()
        for t in tensors:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
    return dict(train=digest(*data.train), test=digest(*data.test))


def check_fingerprint(out, data, root):
    """On --resume: the data loaded now must be the data the run trained on (a moved root is fine)."""
    try:
        saved = json.loads((out / "config.json").read_text()).get("data", {}).get("fingerprint")
    except (OSError, ValueError):
        return
    now = data_fingerprint(data) if saved else None
    if saved and saved != now:
        where = f"the data at {root}" if root else "the synthetic data made from config.json's settings"
        raise FedGANError(f"{where} differs from the data {out} trained on (fingerprints {saved} against {now}); "
                          + ("pass --data-root to the run's own data" if root else
                             "restore config.json's synthetic settings"))


class Stopped(BaseException):
    """SIGTERM, raised in the main thread so the run ends through the same path as Ctrl-C. A BaseException,
    as KeyboardInterrupt is: code that catches Exception (torch's load_state_dict does) must not swallow it."""


def on_sigterm(signum, frame):
    raise Stopped()


def stop_of(e):
    """(what stopped the run, its exit code) for Stopped (SIGTERM) or KeyboardInterrupt (Ctrl-C)."""
    return ("SIGTERM", 143) if isinstance(e, Stopped) else ("Ctrl-C", 130)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run: main prints the message as one line and exits with `code`."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def describe(run, cfg):
    """The run's first log line."""
    fed, amp = run.fed, amp_dtype_for(cfg.amp, cfg.amp_dtype, run.fed.device)
    note = ""
    if fed.device.type == "cpu" and cfg.arch == "small" and cfg.img_size >= 128:  # the card's command on a CPU
        images = (cfg.rounds - run.start) * sum(fed.steps) * cfg.batch
        paper, small = (hours_on(fed.device, cfg, images, arch) for arch in ("paper", "small"))
        note = (f"; NOTE: on a CPU these are the small networks (--arch small), not the paper's: this run should "
                f"take roughly {small:,.1f} h here, the paper's networks (--arch paper, for a GPU) {paper:,.0f} h")
    parts = [cfg.augment != "none" and f"augment {cfg.augment}",
             cfg.detector != "none" and f"detector {cfg.detector}", f"aggregator {cfg.aggregator}",
             cfg.posthoc != "none" and f"post-hoc {cfg.posthoc}"]
    return (f"fedgan: {cfg.dataset} {cfg.img_size}px x{cfg.channels}, "
            f"{'1 client: the centralized reference' if cfg.clients == 1 else f'{cfg.clients} clients'} "
            f"(shards {fed.sizes}, {fed.steps[0]} steps/round), malicious {fed.malicious}, "
            f"attack {cfg.attack if fed.malicious else 'none'}, defense: {', '.join(p for p in parts if p)}, "
            f"device {fed.device}{' (' + str(amp).replace('torch.', '') + ' autocast)' if amp else ''}, "
            f"{'clients offloaded to host, ' if fed.offload else ''}"
            f"{dist_rank_world()[1]} process(es), out {run.out}"
            + (f", resuming at round {run.start}/{cfg.rounds}" if run.start else "") + note)


def hours_on(device, cfg, images, arch):
    """A rough estimate of the hours networks of `arch` would take for `images` training images on this
    device: their forward FLOPs per image (counted on the meta device), x 6 for G and x 9 for D (a D step
    sees real and fake images, a G step goes through D, a backward pass costs two forwards), at this
    device's fp32 matmul speed."""
    with torch.device("meta"):
        g, d = build_models(2, **dict(arch_of(cfg), arch=arch))
        z, y = torch.randn(1, g.z_dim), torch.zeros(1, dtype=torch.long)
        g_fl = count_forward_flops(g, z, y)
        d_fl = count_forward_flops(d, torch.randn(1, cfg.channels, cfg.img_size, cfg.img_size), y)
    return images * (6 * g_fl + 9 * d_fl) / (matmul_gflops(device, n=1024, reps=3) * 1e9) / 3600


def start_folder(run, cfg):
    """config.json (what runs: every setting, and the device, precision and versions it ran with) and,
    for a fresh run, an empty metrics.jsonl; after a resume, metrics.jsonl keeps the rounds before it."""
    try:
        (run.out / "samples").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedGANError(f"cannot create {run.out} ({e.strerror}); choose another --out")
    if not run.start:
        save_real(run.data, run.out / "samples" / "real.png", cfg.seed)
    record = dict(dataclasses.asdict(cfg), environment=environment(run, cfg),
                  data=dict(path=str(Path(cfg.data_root).resolve()) if cfg.data_root else None,
                            fingerprint=data_fingerprint(run.data)))
    atomic_write_text(run.out / "config.json", json.dumps(record, indent=2))
    metrics = run.out / "metrics.jsonl"
    keep = []
    if run.start and metrics.exists():
        for ln in metrics.read_text().splitlines():
            try:
                if json.loads(ln)["round"] <= run.start:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):  # a line cut by a kill: it is past the checkpoint anyway
                pass
    atomic_write_text(metrics, "".join(ln + "\n" for ln in keep))


def environment(run, cfg):
    import importlib.metadata
    import subprocess
    amp = amp_dtype_for(cfg.amp, cfg.amp_dtype, run.fed.device)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        tv = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        tv = None
    return dict(device=device_name(run.fed.device), precision=str(amp).replace("torch.", "") if amp else "fp32",
                offload=run.fed.offload, processes=dist_rank_world()[1],
                torch=torch.__version__, torchvision=tv, numpy=np.__version__, git_commit=commit)


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------

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
    The counter's own backward figures are not used: it overcounts grouped convolutions' backward."""
    device = pick_device(cfg.device)
    set_precision(cfg, device)
    seed_everything(cfg.seed)
    n = cfg.batch * (cfg.bench_steps + 2)
    x, y = synthetic_images((n + 1) // 2, cfg.img_size, cfg.channels, cfg.seed)
    g = build_models(2, **arch_of(cfg))[0].to(device)
    local = local_of(cfg, device)
    state = {k: v.clone() for k, v in g.state_dict().items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    client, warm_s, step_s = time_steps(x, y, g, local, cfg, device)
    img_per_s = cfg.batch / step_s
    if cfg.compile:  # both, so that the start-up can be weighed against the speed-up
        _, eager_warm_s, eager_s = time_steps(x, y, g, dataclasses.replace(local, compile=False), cfg, device)
        saved = eager_s - step_s
        repaid = math.ceil((warm_s - eager_warm_s) / saved) if saved > 0 else None
    z, lab = torch.randn(cfg.batch, cfg.z_dim, device=device), y[:cfg.batch].to(device)
    g_fl = count_forward_flops(client.g, z, lab) / cfg.batch
    d_fl = count_forward_flops(client.d, to_unit(x[:cfg.batch]).to(device), lab) / cfg.batch
    step_flops = 4 * g_fl + 9 * d_fl
    gflops = step_flops * img_per_s / 1e9
    ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the machine's fast matmul
    mm = matmul_gflops(device, ref_dtype, n=8192 if device.type == "cuda" else 2048)
    states = [{k: v + 0.01 * i for k, v in state.items()} for i in range(cfg.clients)]
    ones = np.ones(cfg.clients)  # a Round of the first n of these clients, every one reporting:
    round_of = lambda n, act: Round(1, ones[:n], ones[:n], states[:n], state, ones[:n] > 0, act)  # noqa: E731
    rule = aggregator(cfg.aggregator)
    rule(states, np.full(cfg.clients, 1.0 / cfg.clients), state)  # warm: first calls allocate
    t = time.perf_counter()
    for _ in range(5):
        rule(states, np.full(cfg.clients, 1.0 / cfg.clients), state)
    sync(device)
    server_ms = (time.perf_counter() - t) / 5 * 1000
    rule_name = cfg.detector if cfg.detector in ("calibrated", "flame") else "paper"
    if rule_name == "flame":  # it reads the clients' updates, not a loss history
        flame = DETECTORS[rule_name](cfg, g)
        detect = lambda hist, seed: flame(round_of(cfg.clients, True))  # noqa: E731
    else:
        detect = loss_rule(rule_name, cfg.detect_fpr)
    hist = np.random.default_rng(0).normal(0.7, 0.05, (cfg.warmup + 20, cfg.clients))
    detect(hist, 1)  # warm every cache (the calibrated rule simulates its threshold once per N)
    t = time.perf_counter()
    for _ in range(5):
        detect(hist, 1)
    detect_ms = (time.perf_counter() - t) / 5 * 1000
    per_class = cfg.probe_per_class
    warm, probe = ProbeDetector(g, per_class), ProbeDetector(g, per_class)
    warm(round_of(2, False))
    t = time.perf_counter()
    probe(round_of(cfg.clients, True))  # the probe detector's round: render, score, fold in
    sync(device)
    probe_ms = (time.perf_counter() - t) * 1000
    local_steps = steps_per_round(cfg.local_steps, cfg.batch, 10 * cfg.batch)  # --local-steps, else 10
    local_round_ms = local_steps * cfg.clients * cfg.batch / img_per_s * 1000
    shard, rounds = PAPER_SHARD, 200  # the study's ChestX run: 4 x 1,464 images, 200 rounds of one epoch
    steps = steps_per_round(0, cfg.batch, shard)
    round_ms = cfg.clients * steps * cfg.batch / img_per_s * 1000 + server_ms + detect_ms
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    amp = local.amp_dtype
    precision = str(amp).replace("torch.", "") if amp else ("tf32" if device.type == "cuda" and cfg.tf32 else "fp32")
    print(f"bench: {cfg.img_size}px x{cfg.channels}, batch {cfg.batch}, arch {cfg.arch}, {precision}, "
          f"one client{', compiled' if cfg.compile else ''}, "
          f"device {device_name(device)}, threads {torch.get_num_threads()}, "
          f"G {sum(p.numel() for p in g.parameters()) / 1e6:.2f}M params, "
          f"D {sum(p.numel() for p in client.d.parameters()) / 1e6:.2f}M params")
    print(f"  training      {img_per_s:8.1f} images/s   ({step_s * 1000:.0f} ms per step of {cfg.batch}; "
          f"warm-up {warm_s:.1f} s)")
    if cfg.compile:
        print(f"  compile       eager {cfg.batch / eager_s:.1f} images/s "
              f"(warm-up {eager_warm_s:.1f} s), "
              f"compiled {img_per_s:.1f} ({eager_s / step_s:.2f}x): " +
              (f"the compile pays for itself after {repaid} steps" if repaid is not None else "compiling does not pay"))
    print(f"  FLOPs/image   G fwd {g_fl / 1e9:.3f} G, D fwd {d_fl / 1e9:.3f} G, step (4G+9D) {step_flops / 1e9:.2f} G")
    print(f"  achieved      {gflops / 1e3:8.3f} TFLOP/s vs {str(ref_dtype).replace('torch.', '')} matmul "
          f"{mm / 1e3:.3f} TFLOP/s  -> ratio {gflops / mm:.2f}")
    print(f"  server        {server_ms:8.2f} ms {cfg.aggregator} of {cfg.clients} generators, "
          f"{detect_ms:.2f} ms detector ({rule_name}, warm)")
    print(f"  round         {round_ms / 1000:8.2f} s at the study's {shard} images per client ({cfg.clients} x {steps} "
          f"steps); server share {100 * (server_ms + detect_ms) / round_ms:.3f}%; a {rounds}-round run ~ "
          f"{rounds * round_ms / 60000:.1f} min")
    print(f"  probe         {probe_ms:8.1f} ms to render {cfg.clients} generators on {2 * per_class} probe images and "
          f"score them: {100 * probe_ms / (local_round_ms + probe_ms):.1f}% of a round of {local_steps} local "
          f"steps per client (--local-steps, else 10), {100 * probe_ms / round_ms:.2f}% of a round at the study's shard")
    print(f"  peak memory   {peak:8.0f} MB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    res = dict(img_per_s=round(img_per_s, 3), step_ms=round(step_s * 1000, 2), server_ms=round(server_ms, 3),
               detect_ms=round(detect_ms, 3), probe_ms=round(probe_ms, 2),
               probe_share=round(probe_ms / (local_round_ms + probe_ms), 4), peak_mb=round(peak, 1),
               gflops=round(gflops, 4),  # 4 decimals: the test recomputes it from the parts to 1%
               matmul_gflops=round(mm, 2), matmul_dtype=str(ref_dtype).replace("torch.", ""),
               ratio=float(f"{gflops / mm:.3g}"), g_fwd_gflop=g_fl / 1e9, d_fwd_gflop=d_fl / 1e9,
               round_s=round(round_ms / 1000, 3), run_min=round(rounds * round_ms / 60000, 2),
               img_size=cfg.img_size, batch=cfg.batch, arch=cfg.arch, width=cfg.width, precision=precision,
               compile=cfg.compile, device=device_name(device),
               **(dict(eager_img_per_s=round(cfg.batch / eager_s, 3), compile_repaid_steps=repaid)
                  if cfg.compile else {}))
    if cfg.bench_round:
        res.update(bench_round(cfg))
    print(json.dumps(res))
    return res


def time_steps(x, y, g, local, cfg, device):
    """A fresh client, two warm-up steps (allocator, kernels, compilation), then cfg.bench_steps timed.
    -> (client, warm-up s, s per step)."""
    client = make_client(0, (x, y), g, new_discriminator(0, cfg.seed, 2, arch_of(cfg)), local, cfg.seed, device)
    state = {k: v.clone() for k, v in g.state_dict().items()}
    t = time.perf_counter()
    client_update(client, state, 2)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    client_update(client, state, cfg.bench_steps)
    return client, warm_s, (time.perf_counter() - t) / cfg.bench_steps  # client_update reads its losses: a sync


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def client_bytes(client):
    """Bytes of the tensors a client holds: data shard, G copy and D (with grads, buffers), both Adams."""
    tensors = [client.x, client.y]
    for m in (client.g, client.d):
        tensors += list(m.state_dict().values()) + [p.grad for p in m.parameters() if p.grad is not None]
    for o in (client.opt_g, client.opt_d):
        tensors += [v for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_round(cfg):
    """One real federated round at cfg.clients clients: every client's local epoch, then the server
    round (detection + aggregation), timed apart; memory held per client."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        run = setup_run(dataclasses.replace(cfg, out=str(Path(tmp) / "r"), resume=None))
        center = {k: v.detach().clone() for k, v in run.g.state_dict().items()}
        t = time.perf_counter()
        g_states, reports = client_updates(run.fed, center, 0)
        sync(run.fed.device)
        train_s = time.perf_counter() - t
        defense = dataclasses.replace(run.defense, detect=run.defense.detect or RuleDetector(loss_rule("paper")),
                                      warmup=-1)
        t = time.perf_counter()  # time detection too, on a server that has seen one round
        server_round(run.server, defense, g_states, reports.g_loss, center, 0)
        server_s = time.perf_counter() - t
        per_client = sum(client_bytes(c) for c in run.fed.clients.values()) / cfg.clients / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  round         {cfg.clients} clients, {sum(run.fed.steps)} local steps: {train_s + server_s:.2f} s; server "
          f"{server_s * 1000:.1f} ms ({100 * server_s / (train_s + server_s):.2f}% of the round); "
          f"{per_client:.1f} MB of tensors per client; peak RSS {peak:.0f} MB")
    return dict(clients=cfg.clients, fed_round_s=round(train_s + server_s, 3), server_round_ms=round(server_s * 1000, 2),
                server_share=round(server_s / (train_s + server_s), 5), mb_per_client=round(per_client, 2),
                peak_rss_mb=round(peak, 1))


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def resume_config(flags):
    """The Config of the run in flags['resume'], with the flags that may change on a resume applied (more
    rounds, speed, output cadence); any other flag is refused, since it would change the experiment."""
    folder = Path(flags["resume"])
    if not (folder / "config.json").is_file():
        raise FedGANError(f"--resume {folder}: no config.json there, so it is not a fedgan run folder; "
                          "start a new run with --out instead")
    try:
        saved = json.loads((folder / "config.json").read_text())
    except ValueError:
        raise FedGANError(f"--resume {folder}: config.json is not valid JSON; restore it or start a new run")
    cfg = config_from_json(saved, folder / "config.json")
    recorded = (saved.get("data") or {}).get("path")
    if "data_root" not in flags and cfg.data_root and not Path(cfg.data_root).exists() and recorded \
            and Path(recorded).exists():  # a relative root, resumed from another directory
        print(f"data root {cfg.data_root} is not found from here; using the run's recorded {recorded}")
        flags = dict(flags, data_root=recorded)
    for k, v in flags.items():
        if k not in RESUMABLE and v != getattr(cfg, k):
            raise FedGANError(f"--{k.replace('_', '-')} cannot change on --resume (the run has "
                              f"{getattr(cfg, k)!r}); only --rounds and speed or output flags may, so start a "
                              "new run with --out for another experiment")
        setattr(cfg, k, v)
    cfg.resume, cfg.out = str(folder), str(folder)
    return finalize(cfg)


def main(argv=None):
    try:
        flags = parse_flags(argv)
        if flags.get("resume"):
            cfg = resume_config(flags)
        else:
            cfg = finalize(Config(**flags))
            check_needs(cfg, flags)
        if cfg.bench:
            return bench(cfg)
        init_distributed(cfg)
        try:
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread: SIGTERM keeps its default
            return train(cfg)
        try:
            result = train(cfg)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():  # every rank done before any tears gloo down: a rank whose peer closed
            dist.barrier()         # the connections first can abort at exit ("terminate called ...")
        return result
    except FedGANError as e:
        if dist_rank_world()[0] == 0:
            sys.stderr.write(f"fedgan.py: error: {e}\n")
        sys.exit(2)
    except Interrupted as e:
        if dist_rank_world()[0] == 0:
            sys.stderr.write(f"fedgan.py: {e}\n")
        sys.exit(e.code)
    except (KeyboardInterrupt, Stopped) as e:  # before the run began (a resume: while its folder is read)
        what, code = stop_of(e)
        sys.stderr.write(f"fedgan.py: stopped by {what} before training began; nothing was written\n")
        sys.exit(code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
