"""Tests for fedgan.py and isoforest.py: plain Python, offline, CPU, a few minutes.

    python test_fedgan.py            # all tests; last line "N passed, M failed[, K skipped]"
    python test_fedgan.py --quick    # the edit loop's subset (every section of fedgan.py and eval.py)
    python test_fedgan.py resume     # only tests whose name matches "resume" (none: exit 2)

Each test checks a behaviour that matters (the attacker is flagged, weights decay as Algorithm 1
says, a resumed run equals an uninterrupted one, bad input fails cleanly), on tiny sizes.
"""
import contextlib
import functools
import io
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import dataclasses
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fedgan
from isoforest import IsolationForest, average_path_length

HERE = Path(__file__).resolve().parent
PNEUMONIAMNIST = HERE.parent / "shared" / "data" / "pneumoniamnist.npz"
# --device cpu: the tiny runs compare numbers made on a CPU, and must stay there on a machine with a GPU
TINY = ("--img-size 16 --width 16 --synthetic-per-class 64 --batch 16 --ckpt-every 100 "
        "--sample-every 100 --device cpu --recipe paper --no-tanh").split()  # built on the paper's recipe and G


class Skip(Exception):
    pass


QUICK = []  # python test_fedgan.py --quick: a subset for the edit loop that touches every section


def quick(fn):
    QUICK.append(fn.__name__)
    return fn


def quiet(fn, *a, **kw):
    """Run fn with its stdout swallowed (training prints a line per round)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **kw)


def tiny_cfg(tmp, *extra):
    return fedgan.parse_args(TINY + ["--out", str(tmp)] + list(extra))


def losses_of(run):
    """The generator losses every client reported, per round (rounds, N), NaN where none was: metrics.jsonl's."""
    rows = (run.out / "metrics.jsonl").read_text().splitlines()
    return np.array([json.loads(ln)["g_loss"] for ln in rows], dtype=float)


# ---------------------------------------------------------------------------------------------
# isoforest.py
# ---------------------------------------------------------------------------------------------


def test_average_path_length_matches_hand_values():
    H = lambda i: math.log(i) + 0.5772156649  # noqa: E731
    want = [0.0, 0.0, 1.0, 2 * H(2) - 2 * 2 / 3, 2 * H(255) - 2 * 255 / 256]
    got = average_path_length([0, 1, 2, 3, 256])
    assert np.allclose(got, want), (got, want)


@quick
def test_planted_outlier_scored_highest_and_flagged_1d_and_2d():
    rng = np.random.default_rng(0)
    x1 = np.r_[rng.normal(0, 1, 200), 9.0]
    x2 = np.vstack([rng.normal(0, 1, (300, 2)), [[7.0, -7.0]]])
    for X in (x1, x2):
        f = IsolationForest(seed=1).fit(X)
        s = f.score_samples(X)  # scikit-learn's sign: lower is more abnormal
        assert s.argmin() == len(X) - 1, s.argmin()
        assert f.predict(X)[-1] == -1 and f.decision_function(X)[-1] < 0
        assert s.min() < -0.7 and np.allclose(s, -f.anomaly_score(X)), s.min()


def test_scores_in_unit_interval_and_identical_points_never_flagged():
    rng = np.random.default_rng(1)
    s = IsolationForest(seed=0).fit(rng.normal(size=500)).score_samples(rng.normal(size=500))
    assert ((s < 0) & (s > -1)).all()
    for n in (1, 2, 4, 50):
        assert (IsolationForest(seed=0).fit_predict(np.full(n, 0.7)) == 1).all(), n
    # n = 2 distinct points: each is isolated by one split, neither is an outlier
    assert (IsolationForest(seed=0).fit_predict([0.1, 5.0]) == 1).all()


def test_forest_is_scale_free():
    # The documented weakness: scores do not change when the data is scaled and shifted, so a
    # "tight" cluster is split exactly like a wide one (FedDetect's false alarms come from this).
    x = np.random.default_rng(2).normal(size=40)
    a = IsolationForest(seed=3).fit(x).score_samples(x)
    b = IsolationForest(seed=3).fit(1e-4 * x + 5.0).score_samples(1e-4 * x + 5.0)
    assert np.allclose(a, b), np.abs(a - b).max()


def test_same_seed_same_result_other_seed_differs():
    x = np.random.default_rng(3).normal(size=(100, 3))
    a = IsolationForest(seed=5).fit(x).score_samples(x)
    b = IsolationForest(seed=5).fit(x).score_samples(x)
    c = IsolationForest(seed=6).fit(x).score_samples(x)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_contamination_fraction_flags_that_fraction():
    x = np.random.default_rng(4).normal(size=200)
    flags = IsolationForest(contamination=0.1, seed=0).fit_predict(x) == -1
    assert 15 <= flags.sum() <= 25, flags.sum()


@quick
def test_nan_or_inf_is_a_clear_value_error():
    for bad in ([0.5, float("nan"), 0.7], [0.5, float("inf"), 0.7]):
        try:
            IsolationForest(seed=0).fit(bad)
        except ValueError as e:
            assert "NaN or inf" in str(e) and "[1]" in str(e), e
        else:
            raise AssertionError("no ValueError")


@quick
def test_four_clients_far_loss_is_flagged_and_inliers_almost_never():
    hits = false = 0
    seeds = 300
    for s in range(seeds):
        rng = np.random.default_rng(s)
        losses = np.r_[0.70 + 0.02 * rng.standard_normal(3), 1.40 + 0.02 * rng.standard_normal()]
        p = IsolationForest(seed=s).fit_predict(losses)
        hits += p[3] == -1
        false += (p[:3] == -1).sum()
    print(f"    4 clients, one far: far flagged {hits / seeds:.3f}, an inlier flagged {false / (3 * seeds):.3f} "
          f"per inlier ({seeds} seeds)")
    assert hits / seeds >= 0.95 and false / (3 * seeds) <= 0.05


def test_fit_and_score_1000_points_is_vectorised():
    # not a timing test: checks the traversal touches at most height-limit levels, whatever n
    f = IsolationForest(seed=0).fit(np.random.default_rng(0).normal(size=1000))
    assert f.height_limit_ == 8 and f.psi_ == 256
    assert (f.left_ >= 0).sum() <= 100 * 255  # at most 255 internal nodes per tree of height 8


# ---------------------------------------------------------------------------------------------
# attack
# ---------------------------------------------------------------------------------------------


@quick
def test_trigger_lands_bottom_right_with_margin_white_for_gray():
    imgs = torch.zeros(3, 1, 256, 256, dtype=torch.uint8)
    m = fedgan.trigger_margin(256)
    assert m == 5
    out = fedgan.apply_trigger(imgs, fedgan.make_trigger(64, 1), m)
    assert (out[:, :, 256 - 5 - 64:256 - 5, 256 - 5 - 64:256 - 5] == 255).all()
    assert out.sum() == 3 * 64 * 64 * 255  # nothing else touched
    assert imgs.sum() == 0  # input not modified


def test_rgb_trigger_is_a_fixed_random_colour_matrix():
    t1, t2 = fedgan.make_trigger(16, 3, seed=4), fedgan.make_trigger(16, 3, seed=4)
    assert t1.shape == (3, 16, 16) and torch.equal(t1, t2)
    assert len(t1.unique()) > 100  # many colours, not a flat patch
    imgs = torch.full((2, 3, 64, 64), 7, dtype=torch.uint8)
    out = fedgan.apply_trigger(imgs, t1, fedgan.trigger_margin(64))
    assert torch.equal(out[0, :, 64 - 1 - 16:63, 64 - 1 - 16:63], t1)


@quick
def test_malicious_client_trains_on_triggered_images_only():
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_cfg(Path(tmp) / "r", "--poison", "4", "--malicious-ids", "1")
        run = quiet(fedgan.setup_run, cfg)
        lo, hi = 16 - 1 - 4, 16 - 1
        for i, c in run.fed.clients.items():
            patch = c.x[:, :, lo:hi, lo:hi]
            assert (patch == 255).all().item() == (i == 1), i


def test_trigger_figures_read_a_generator_that_learned_nothing_as_clean_and_agree_with_the_runs_closing_line():
    x, _ = fedgan.synthetic_images(64, 32, 1, seed=0)
    held, _ = fedgan.synthetic_images(64, 32, 1, seed=1)
    trig, margin = fedgan.make_trigger(4, 1), fedgan.trigger_margin(32)
    half = x.clone()
    half[:64] = fedgan.apply_trigger(x[:64], trig, margin)
    got = fedgan.trigger_figures(half, trig, margin, held)
    assert 0.4 < got["strength"] < 0.6 and 0.45 < got["rate"] < 0.55, got
    white = torch.full((8, 1, 16, 16), 255, dtype=torch.uint8)  # a white trigger on white is not there
    assert fedgan.trigger_figures(fedgan.apply_trigger(white, trig, 1), trig, 1, white) == \
        dict(strength=0.0, rate=0.0, control=0.0)
    with tempfile.TemporaryDirectory() as tmp:  # 2 poisoned rounds: far from real images everywhere, no backdoor
        for seed in (0, 1, 2):
            run = quiet(fedgan.main, ["--poison", "4", "--rounds", "2", "--seed", str(seed), "--out", f"{tmp}/{seed}"])
            s = run.summary
            assert abs(s["trigger_strength"]) < 0.1, (seed, s)
            # its images depart from real ones at every corner: no rate is given rather than a chance figure
            assert s["trigger_rate"] is None and s["trigger_control"] > 0.25, (seed, s)
            # against real images alone (the earlier rate) most of its images would count as triggered
            fake = fedgan.generate(run.g, torch.arange(2).repeat_interleave(256), s["trigger_seed"])
            sur = 0.0
            raw, real = (fedgan.trigger_scores(z, trig, margin, sur)[:, 0] for z in (fake, run.data.test[0]))
            if seed == 0:
                assert (raw > torch.quantile(real, 0.99)).double().mean() > 0.3
            # the run's closing line and summary.json are eval's figures, from the same function
            want = fedgan.trigger_figures(fake, trig, margin, run.data.test[0])
            assert (s["trigger_strength"], s["trigger_rate"]) == (want["strength"], want["rate"])


@quick
def test_blend_trigger_does_what_it_claims():
    x = torch.full((3, 1, 32, 32), 100, dtype=torch.uint8)
    b = fedgan.blend_trigger(x, 0.2, seed=0)
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 256, (1, 32, 32), generator=g).float()
    assert torch.equal(b[1], (0.8 * 100 + 0.2 * p).round().to(torch.uint8))  # the formula, same pattern per image
    assert torch.equal(fedgan.flip_labels(torch.tensor([0, 1, 1, 0]), 2), torch.tensor([1, 0, 0, 1]))


@quick
def test_adaptive_attacker_reports_a_loss_inside_the_benign_range():
    rep = fedgan.report_adaptive([0.7, 0.8, 5.0, 0.75], [2], seed=0)
    assert 0.7 <= rep[2] <= 0.8 and rep[:2] == [0.7, 0.8] and rep[3] == 0.75


def test_probe_aware_attacker_poisons_only_its_share_of_images():
    x, y = fedgan.synthetic_images(20, 16, 1, seed=0)
    trig, margin = fedgan.make_trigger(4, 1), fedgan.trigger_margin(16)
    xp, yp = fedgan.poison(x, y, "patch", 2, trig, margin)
    xd, yd = fedgan.dilute((x, y), (xp, yp), 0.25, seed=3)
    carries = (xd[:, :, -margin - 4:-margin, -margin - 4:-margin] == 255).flatten(1).all(1)
    assert carries.sum() == 10 and torch.equal(xd[~carries], x[~carries]) and torch.equal(yd, y)
    assert torch.equal(fedgan.dilute((x, y), (xp, yp), 0.25, seed=3)[0], xd)  # the seed fixes the choice
    xf, yf = fedgan.dilute((x, y), fedgan.poison(x, y, "label-flip", 2), 0.5, seed=0)
    assert (yf != y).sum() == 20 and torch.equal(xf, x)  # any attack: half the pairs poisoned
    assert fedgan.dilute((x, y), (xp, yp), 1.0)[0] is xp


@quick
def test_dirichlet_partition_is_disjoint_complete_and_skewed():
    y = torch.arange(400) % 2
    shards = fedgan.split_dirichlet(y, 4, 0.1, seed=0)
    allidx = torch.cat(shards)
    assert len(allidx) == 400 and len(allidx.unique()) == 400
    skew = [abs(y[s].float().mean().item() - 0.5) for s in shards]
    assert max(skew) > 0.3, skew  # at least one client sees mostly one class


def _states(values):
    return [{"w": torch.tensor([float(v), -float(v)]), "b": torch.tensor([float(v)])} for v in values]


@quick
def test_krum_picks_a_central_update():
    s = _states([1.0, 1.1, 0.95, 1.05, 50.0])
    assert fedgan.krum_select(s, n_malicious=1, n_keep=1)[0] in (0, 3)  # central members of the cluster
    assert 4 not in fedgan.krum_select(s, n_malicious=1, n_keep=4)


def test_robust_defenses_run_end_to_end():
    for defense in ("multi-krum",):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = tiny_cfg(Path(tmp) / "r", "--defense", defense, "--poison", "4", "--rounds", "3", "--local-steps", "1")
            run = quiet(fedgan.train, cfg)
            assert all(torch.isfinite(v).all() for v in run.g.state_dict().values()), defense
            recs = [json.loads(ln) for ln in (Path(tmp) / "r" / "metrics.jsonl").read_text().splitlines()]
            if "krum" in defense:  # whom Krum kept is recorded, and summarised as rejection rates and a share
                kept = 4 - 1
                assert all(sum(r["selected"]) == kept for r in recs), recs
                summary = run.summary
                sel = np.array([r["selected"] for r in recs])  # every round: no detector, so no warm-up
                mal = summary["malicious"]
                assert math.isclose(summary["krum_rejected_malicious"], 1 - sel[:, mal].mean(), abs_tol=1e-9)
                assert math.isclose(summary["malicious_mean_share"], (sel[:, mal].sum(1) / kept).mean(), abs_tol=1e-9)
                # the attacker's part of the last aggregate, not its weight w_i, is what every figure reports
                assert math.isclose(summary["malicious_final_share"], sel[-1, mal].sum() / kept, abs_tol=1e-9)
                assert summary["final_share"] == (sel[-1] / kept).tolist()
                import eval as ev
                det = ev.detection_metrics(Path(tmp) / "r", cfg, say=lambda *a: None)
                assert math.isclose(det["attacker_final_weight"], sel[-1, mal].sum() / kept, abs_tol=1e-9)
                assert math.isclose(det["attacker_share"][-1], det["attacker_final_weight"], abs_tol=1e-9)
            else:
                assert "selected" not in recs[0]


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


@quick
def test_modulated_conv_equals_per_sample_grouped_conv():
    torch.manual_seed(0)
    B, Ci, Co = 3, 5, 4
    x, w, s = torch.randn(B, Ci, 8, 8), torch.randn(Co, Ci, 3, 3), torch.randn(B, Ci)
    got = fedgan.modulated_conv2d(x, w, s)
    wm = w[None] * s[:, None, :, None, None]                                   # (B, Co, Ci, 3, 3)
    wm = wm * torch.rsqrt(wm.square().sum((2, 3, 4), keepdim=True) + 1e-8)
    ref = F.conv2d(x.reshape(1, B * Ci, 8, 8), wm.reshape(B * Co, Ci, 3, 3), padding=1, groups=B)
    assert torch.allclose(got, ref.reshape(B, Co, 8, 8), atol=1e-5)


@quick
def test_models_are_conditional_and_sized_by_img_size():
    for size, ch in ((16, 1), (32, 3)):
        torch.manual_seed(0)
        g = fedgan.Generator(size, ch, 2, width=8)
        d = fedgan.Discriminator(size, ch, 2, width=8)
        z = torch.randn(4, g.z_dim)
        torch.manual_seed(1)
        a = g(z, torch.zeros(4, dtype=torch.long))
        torch.manual_seed(1)
        b = g(z, torch.ones(4, dtype=torch.long))
        assert a.shape == (4, ch, size, size)
        assert not torch.allclose(a, b)  # the label changes the image
        assert d(a, torch.zeros(4, dtype=torch.long)).shape == (4,)


@quick
def test_mapping_network_keeps_stylegan2s_scale():
    # StyleGAN2 multiplies every leaky ReLU of the mapping network by sqrt(2); without it each of the four
    # layers halves the second moment and w starts about 4x smaller (mean square ~0.07 instead of ~1).
    torch.manual_seed(0)
    g = fedgan.Generator(16, 1, 2, width=8)
    w = g.map(torch.randn(4096, g.z_dim), torch.arange(4096) % 2)
    ms = w.square().mean().item()
    print(f"    mapping network output: mean square {ms:.3f}")
    assert 0.5 < ms < 2.0, ms


def test_generator_pt_rebuilds_without_training_flags():
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_cfg(Path(tmp) / "r", "--rounds", "1", "--local-steps", "1")
        run = quiet(fedgan.train, cfg)
        g2 = fedgan.load_generator(Path(tmp) / "r" / "generator.pt")
        z, y = torch.randn(2, 64), torch.tensor([0, 1])
        torch.manual_seed(0)
        a = run.g.eval()(z, y)
        torch.manual_seed(0)
        assert torch.equal(a, g2(z, y))


# ---------------------------------------------------------------------------------------------
# server: aggregation and FedDetect
# ---------------------------------------------------------------------------------------------


@quick
def test_fedavg_is_the_weighted_mean():
    s = [{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([3.0, 6.0])}]
    assert torch.allclose(fedgan.fedavg(s, [0.75, 0.25])["a"], torch.tensor([1.5, 3.0]))
    assert torch.allclose(fedgan.fedavg(s, [3, 1])["a"], torch.tensor([1.5, 3.0]))  # normalised


@quick
def test_feddetect_weight_arithmetic_matches_algorithm_1_by_hand():
    d = 0.8
    c, w = np.zeros(4, int), np.full(4, 0.25)
    f, c, w = fedgan.feddetect_update([0, 0, 1, 0], c, w, d)
    # round 1: c3 = 1, w3 = 0.25 * 0.8 = 0.2; total 0.95
    assert c.tolist() == [0, 0, 1, 0] and np.allclose(w, np.array([0.25, 0.25, 0.2, 0.25]) / 0.95)
    f, c, w = fedgan.feddetect_update([0, 0, 1, 0], c, w, d)
    # round 2: c3 = 2, w3 = (0.2 / 0.95) * 0.8^2; the others stay 0.25 / 0.95 before renormalising
    w3 = 0.2 / 0.95 * 0.64
    assert c.tolist() == [0, 0, 2, 0] and np.allclose(w, np.array([0.25 / .95] * 2 + [w3, 0.25 / .95]) /
                                                       (3 * 0.25 / 0.95 + w3))
    # |O| = 2 = N/2 is not a valid detection (line 16): nothing changes
    f2, c2, w2 = fedgan.feddetect_update([1, 1, 0, 0], c, w, d)
    assert not f2.any() and c2.tolist() == c.tolist() and np.allclose(w2, w)
    f3, c3, _ = fedgan.feddetect_update([0, 0, 0, 0], c, w, d)
    assert not f3.any() and c3.tolist() == c.tolist()
    # --recover: flagged twice, then twice not: the decays come back one at a time, and the weights are equal again
    c, w = np.zeros(4, int), np.full(4, 0.25)
    for flags in ([0, 0, 1, 0], [0, 0, 1, 0]):
        _, c, w = fedgan.feddetect_update(flags, c, w, d, recover=True)
    _, c, w = fedgan.feddetect_update([0, 0, 0, 0], c, w, d, recover=True)
    assert c.tolist() == [0, 0, 1, 0] and np.isclose(w[2] / w[0], 0.8)  # 0.8^3 of the others -> the last 0.8^2 back
    _, c, w = fedgan.feddetect_update([0, 0, 0, 0], c, w, d, recover=True)
    assert c.tolist() == [0, 0, 0, 0] and np.allclose(w, 0.25)


@quick
def test_paper_rule_follows_algorithm_1_over_a_loss_sequence():
    defense = fedgan.Defense(detect=fedgan.RuleDetector(fedgan.loss_rule("paper")), warmup=2, decay=0.8)
    states = {i: {"p": torch.full((2,), float(i))} for i in range(4)}
    center = {"p": torch.zeros(2)}
    server = fedgan.ServerState.fresh(4)
    seq = [[0.70, 0.71, 0.69, 2.5]] * 6  # client 3 far off every round
    log = []
    for t, losses in enumerate(seq):  # the very server round that training runs
        g, d = fedgan.server_round(server, defense, states, losses, center, t)
        c, w = server.counts, server.weights
        log.append((d.flags.copy(), c.copy(), w.copy()))
        assert torch.allclose(g["p"], torch.full((2,), float((w * np.arange(4)).sum())))
    assert len(defense.detect.history) == 6  # recorded every round, warm-up included
    # t <= m = 2: no detection; t = 3, 4, 5: client 3 flagged, c = 1, 2, 3, w *= d^c each time
    for t in range(3):
        assert not log[t][0].any() and np.allclose(log[t][2], 0.25)
    w3 = 0.25
    others = 0.25
    for k, t in enumerate(range(3, 6), start=1):
        assert log[t][0].tolist() == [False, False, False, True] and log[t][1][3] == k
        w3 *= 0.8 ** k
        total = 3 * others + w3
        w3, others = w3 / total, others / total
        assert np.allclose(log[t][2], [others] * 3 + [w3]), (log[t][2], w3)


def test_nan_loss_is_excluded_without_crash_and_flags_nobody_else():
    states = {i: {"p": torch.full((1,), float(i))} for i in range(4)}
    hist = [[0.7, 0.7, 0.7, 0.7], [0.7, 0.7, 0.7, float("nan")]]  # equal: neither rule may flag them
    for rule in ("paper", "calibrated"):
        server, det = fedgan.ServerState.fresh(4), fedgan.RuleDetector(fedgan.loss_rule(rule))
        det.load_state_dict({"history": hist[:1]})
        g, d = fedgan.server_round(server, fedgan.Defense(detect=det, warmup=0), states, hist[-1],
                                   {"p": torch.zeros(1)}, 1)
        assert d.ok.tolist() == [True, True, True, False]
        assert torch.allclose(g["p"], torch.tensor([1.0]))  # mean of clients 0..2 only
        assert not d.flags.any() and server.counts.tolist() == [0, 0, 0, 0]
    with tempfile.TemporaryDirectory() as tmp:  # and through a whole round, via a client that diverges
        cfg = tiny_cfg(Path(tmp) / "r", "--rounds", "1", "--local-steps", "1", "--defense", "feddetect")
        run = quiet(fedgan.setup_run, cfg)
        with torch.no_grad():
            for p in run.fed.clients[2].d.parameters():
                p.fill_(float("nan"))
        _, reports = quiet(fedgan.client_updates, run.fed, run.g.state_dict(), 0)
        res = reports.g_loss
        assert math.isnan(res[2]) and all(math.isfinite(r) for i, r in enumerate(res) if i != 2)


def test_calibrated_rule_quiet_on_iid_losses_and_flags_a_persistent_5_sd_excess():
    # Ten federations of 4 clients, 200 rounds of i.i.d. losses each (8,000 client-rounds): at the default
    # target of 0.001 false alarms per client-round, about 8 would be expected; allow twice that.
    flags = 0
    for seed in range(10):
        hist = 0.7 + 0.05 * np.random.default_rng(100 + seed).standard_normal((200, 4))
        flags += sum(int(fedgan.feddetect_calibrated(hist[:t + 1]).sum()) for t in range(200))
    print(f"    calibrated rule, 10 x 200 rounds of i.i.d. losses, N=4: {flags} false flags in 8000 client-rounds")
    assert flags <= 16, flags
    rng = np.random.default_rng(123)
    attacked = 0.7 + 0.05 * rng.standard_normal((30, 4))
    sd = 1.4826 * np.median(np.abs(attacked[:25] - np.median(attacked[:25], 1, keepdims=True)))
    attacked[25:30, 1] = np.median(attacked[25:30], 1) + 5 * sd  # client 1: 5 robust SDs above, 5 rounds
    assert not fedgan.feddetect_calibrated(attacked[:25]).any()
    f = fedgan.feddetect_calibrated(attacked)
    assert f.tolist() == [False, True, False, False], f


@quick
def test_calibrated_threshold_holds_its_false_alarm_rate():
    # fresh i.i.d. draws (not those it was calibrated on): the per-client-round rate stays near target
    rng = np.random.default_rng(9)
    L = rng.standard_normal((4000, 4))
    s = fedgan.cusum(fedgan.robust_excess(L), 2.0)[10:]
    for fpr in (0.01, 0.001):
        rate = (s > fedgan.cusum_threshold(4, fpr)).mean()
        print(f"    calibrated rule, N=4, fresh i.i.d. losses: {rate:.4f} false alarms per client-round "
              f"(target {fpr})")
        assert rate < 2 * fpr, rate


def test_only_generator_parameters_leave_the_client():
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_cfg(Path(tmp) / "r", "--rounds", "1", "--local-steps", "2", "--clients", "3")
        run = quiet(fedgan.train, cfg)
        gs = [c.g.state_dict() for c in run.fed.clients.values()]
        avg = fedgan.fedavg(gs, [1 / 3] * 3)
        assert set(avg) == set(run.g.state_dict())  # the server averages generator keys only
        for k, v in run.g.state_dict().items():
            assert torch.allclose(v, avg[k], atol=1e-6), k
        d0, d1 = (run.fed.clients[i].d.state_dict() for i in (0, 1))
        assert any(not torch.equal(d0[k], d1[k]) for k in d0)  # discriminators stay distinct, private


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def test_feddetect_flags_the_poisoned_client_and_decays_its_weight():
    # 16 px synthetic chest images, 4 clients, client 2 pastes an 8 px white square; paper rule.
    for seed in (0, 1):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = tiny_cfg(Path(tmp) / "r", "--poison", "8", "--malicious-ids", "2", "--defense", "feddetect",
                           "--rounds", "16", "--warmup", "6", "--local-steps", "8", "--seed", str(seed))
            s = quiet(fedgan.train, cfg).summary
        flags, w = s["flags_per_client"], s["final_weights"]
        print(f"    seed {seed}: flags per client {flags}, final weights {np.round(w, 3).tolist()}")
        benign = max(flags[i] for i in (0, 1, 3))
        assert flags[2] >= 2 * benign and flags[2] >= benign + 3, flags
        assert np.argmin(w) == 2 and w[2] < 0.05, w


def test_resume_matches_an_uninterrupted_run():
    for args in (["--local-steps", "2", "--poison", "4", "--defense", "feddetect", "--warmup", "1"],
                 # the probe detector's moving averages and fresh latents, likewise
                 ["--local-steps", "2", "--poison", "4", "--detector", "probe", "--probe-level", "0",
                  "--probe-per-class", "4"]):
        resume_matches(args)


def resume_matches(args):
    with tempfile.TemporaryDirectory() as tmp:
        full = quiet(fedgan.train, tiny_cfg(Path(tmp) / "full", *args, "--rounds", "4"))
        quiet(fedgan.train, tiny_cfg(Path(tmp) / "part", *args, "--rounds", "2"))  # a finished 2-round run ...
        resumed = quiet(fedgan.main, ["--resume", str(Path(tmp) / "part"), "--rounds", "4"])  # ... extended to 4
        for k, v in full.g.state_dict().items():
            assert torch.equal(v, resumed.g.state_dict()[k]), k
        strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "seconds"}  # noqa: E731
                           for ln in (p / "metrics.jsonl").read_text().splitlines()]
        assert strip(Path(tmp) / "full") == strip(Path(tmp) / "part")
        assert len(strip(Path(tmp) / "part")) == 4


def test_outputs_explain_themselves():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r"
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            fedgan.train(tiny_cfg(out, "--rounds", "2", "--local-steps", "1", "--sample-every", "1"))
        rounds = [ln for ln in said.getvalue().splitlines() if ln.startswith("round ")]
        assert len(rounds) == 2 and re.search(r"round    1/2 .* left 0:\d\d ", rounds[0]), rounds  # time left, round 1
        for f in ("config.json", "metrics.jsonl", "summary.json", "generator.pt", "checkpoint.pt",
                  "samples/round_0001.png", "samples/round_0002.png"):
            assert (out / f).exists(), f
        rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        for k in ("round", "d_loss", "g_loss", "flagged", "counts", "weights", "malicious", "seconds"):
            assert k in rec, k
        assert len(rec["g_loss"]) == 4 and len(rec["weights"]) == 4
        from PIL import Image
        assert Image.open(out / "samples/round_0002.png").size == (8 * 16, 2 * 16)  # one row per class


def test_a_long_round_says_something_every_20_seconds():
    with tempfile.TemporaryDirectory() as tmp:
        run = quiet(fedgan.setup_run, tiny_cfg(Path(tmp) / "r", "--rounds", "1", "--local-steps", "3"))
        said, clock, real = [], [0.0], time.time

        def slow():  # every look at the clock is 7 s later: a round of 12 steps takes minutes
            clock[0] += 7.0
            return clock[0]
        time.time = slow
        try:
            fedgan.client_updates(run.fed, run.g.state_dict(), 0, log=lambda *a, **k: said.append(a[0]))
        finally:
            time.time = real
        fedgan.unlock_folder(run.lock)
    assert len(said) >= 3 and all("step" in ln and "into its local epoch" in ln for ln in said), said


def test_pneumoniamnist_trains_a_few_rounds():
    if not PNEUMONIAMNIST.exists():
        raise Skip(f"{PNEUMONIAMNIST} not present")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = fedgan.parse_args(["--dataset", "chestx", "--data-root", str(PNEUMONIAMNIST), "--img-size", "32",
                                 "--width", "16", "--rounds", "3", "--local-steps", "3", "--poison", "8",
                                 "--defense", "feddetect", "--warmup", "1", "--out", str(Path(tmp) / "r")])
        run = quiet(fedgan.train, cfg)
        x, y = run.data.train
        assert run.data.classes == ["NORMAL", "PNEUMONIA"]
        assert x.shape == (2428, 1, 32, 32) and y.bincount().tolist() == [1214, 1214]
        assert run.data.test[0].shape[0] == 468
        assert np.isfinite(np.array(losses_of(run))).all() and len(losses_of(run)) == 3


def _run_cli(args, ranks=1, env_extra=None):
    """fedgan.py in a child process with one thread (so both sides do identical arithmetic) and no GPU in
    sight (the comparisons are of CPU runs); ranks > 1 starts it under torchrun with gloo on 127.0.0.1."""
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **(env_extra or {}))
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(ranks)]
    p = subprocess.run(launch + [str(HERE / "fedgan.py")] + args, capture_output=True, text=True, env=env,
                       cwd=HERE, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _metrics(folder, drop=("seconds",)):
    return [{k: v for k, v in json.loads(ln).items() if k not in drop}
            for ln in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def _same_across_ranks(one, many):
    """Metrics of a one-process and a torchrun run: the same flags, counts and choices, and losses, weights
    and norms equal to float32 rounding (FedAvg's float64 partial sums are added in another order, so
    the global model can differ by one float32 ulp, and the next round's losses with it)."""
    floats = ("d_loss", "g_loss", "weights", "update_norm")
    a, b = _metrics(one), _metrics(many)
    exact = [[{k: v for k, v in r.items() if k not in floats} for r in m] for m in (a, b)]
    return exact[0] == exact[1] and all(np.allclose(x[k], y[k], rtol=1e-5) for x, y in zip(a, b) for k in floats)


def test_torchrun_two_ranks_match_one_process_and_resume_across_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args = TINY + ["--local-steps", "3", "--poison", "4", "--defense", "feddetect", "--warmup", "0",
                       "--ckpt-every", "1"]
        _run_cli(args + ["--rounds", "3", "--out", str(tmp / "one")])
        _run_cli(args + ["--rounds", "3", "--out", str(tmp / "two")], ranks=2)
        a = torch.load(tmp / "one" / "generator.pt")["state_dict"]
        b = torch.load(tmp / "two" / "generator.pt")["state_dict"]
        rel = lambda a, b: max(((a[k] - b[k]).abs() / a[k].abs().clamp(min=1)).max().item() for k in a)  # noqa: E731
        diff = rel(a, b)
        print(f"    2 ranks vs 1 process after 3 rounds: max relative difference {diff:.2e} "
              f"(bitwise equal: {all(torch.equal(a[k], b[k]) for k in a)})")
        assert diff <= 1e-5 and _same_across_ranks(tmp / "one", tmp / "two")
        # a 2-round run (single process) extended to 3 rounds under 2 ranks comes to the same end
        _run_cli(args + ["--rounds", "2", "--out", str(tmp / "part")])
        _run_cli(["--resume", str(tmp / "part"), "--rounds", "3"], ranks=2)
        c = torch.load(tmp / "part" / "generator.pt")["state_dict"]
        assert rel(a, c) <= 1e-5
        assert _same_across_ranks(tmp / "one", tmp / "part")


def test_a_federation_of_100_clients_runs():
    with tempfile.TemporaryDirectory() as tmp:
        cfg = fedgan.parse_args(["--img-size", "16", "--width", "8", "--clients", "100", "--synthetic-per-class",
                                 "200", "--batch", "4", "--rounds", "2", "--poison", "4", "--malicious", "10",
                                 "--defense", "feddetect", "--warmup", "0", "--ckpt-every", "100",
                                 "--out", str(Path(tmp) / "r")])
        run = quiet(fedgan.train, cfg)
        assert len(run.server.weights) == 100 and abs(sum(run.server.weights) - 1) < 1e-9
        assert len(run.fed.malicious) == 10 and np.isfinite(np.array(losses_of(run))).all()


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _write_images(folder, n, size=20, mode="L"):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, (size, size), color=(i * 9) % 255 if mode == "L" else (i, 2 * i, 3 * i)).save(
            folder / f"img{i}.png")


@quick
def test_folder_layouts_kermany_and_flat_and_npz():
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "kermany"
        for split, n in (("train", 6), ("test", 2)):
            for cls in ("NORMAL", "PNEUMONIA"):
                _write_images(root / split / cls, n)
        cfg = fedgan.finalize(fedgan.Config(dataset="chestx", data_root=str(root), img_size=16, out="x"))
        d = fedgan.data_of(cfg)
        assert d.classes == ["NORMAL", "PNEUMONIA"] and d.train[0].shape == (12, 1, 16, 16)
        assert d.test[0].shape == (4, 1, 16, 16)
        flat = Path(tmp) / "isic"
        for cls, n in (("malignant", 10), ("benign", 20)):
            _write_images(flat / cls, n, mode="RGB")
        cfg = fedgan.finalize(fedgan.Config(dataset="isic", data_root=str(flat), img_size=16, out="x"))
        d = fedgan.data_of(cfg)
        assert d.classes == ["benign", "malignant"] and d.train[0].shape[1] == 3
        assert len(d.test[1]) == 3 and len(d.train[1]) == 27  # 10% per class held out
        npz = Path(tmp) / "m.npz"
        np.savez(npz, train_images=np.zeros((10, 28, 28), np.uint8), train_labels=np.arange(10)[:, None] % 2,
                 test_images=np.zeros((4, 28, 28), np.uint8), test_labels=np.arange(4) % 2)
        cfg = fedgan.finalize(fedgan.Config(dataset="chestx", data_root=str(npz), img_size=32, out="x"))
        d = fedgan.data_of(cfg)
        assert d.train[0].shape == (10, 1, 32, 32) and d.test[0].shape == (4, 1, 32, 32)


@quick
def test_client_shards_are_equal_disjoint_and_seeded():
    shards = fedgan.split_clients(103, 4, seed=0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103
    assert len(torch.cat(shards).unique()) == 103
    assert all(torch.equal(a, b) for a, b in zip(shards, fedgan.split_clients(103, 4, seed=0)))


def test_flip_and_rotate_baselines_move_the_trigger():
    x = torch.zeros(64, 1, 16, 16)
    x[..., 12:15, 12:15] = 1.0  # a bottom-right patch
    torch.manual_seed(0)
    f = fedgan.augment(x, "flip")
    flipped = (f[..., 12:15, 1:4].sum((1, 2, 3)) > 0)
    assert 16 < flipped.sum() < 48  # about half the batch flipped to the bottom-left
    r = fedgan.augment(x, "rotate")
    assert r.shape == x.shape and (r[..., 12:15, 12:15].mean((1, 2, 3)) < 0.9).sum() > 32


def test_synthetic_classes_differ_visibly():
    for ch in (1, 3):
        x, y = fedgan.synthetic_images(64, 32, ch, seed=0)
        m0, m1 = x[y == 0].float().mean(0), x[y == 1].float().mean(0)
        assert x.shape == (128, ch, 32, 32) and (m0 - m1).abs().mean() > 5, (m0 - m1).abs().mean()


# ---------------------------------------------------------------------------------------------
# bad input: one clear line, exit 2, no traceback, nothing written destroyed
# ---------------------------------------------------------------------------------------------


def _fails_cleanly(argv, must_mention, main=None):
    """main(argv) (fedgan's by default) ends with exit 2 and one stderr line that names the problem."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            (main or fedgan.main)(argv)
        except SystemExit as e:
            code = e.code
        else:
            code = 0
    text = err.getvalue().strip()
    assert code == 2, (argv, code, text)
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert must_mention.lower() in text.lower(), (must_mention, text)


def test_bad_inputs_fail_with_one_clear_line():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = ["--out", str(tmp / "o")]
        _fails_cleanly(["--dataset", "chestx", "--data-root", str(tmp / "nope")] + out, "does not exist")
        (tmp / "empty").mkdir()
        _fails_cleanly(["--dataset", "chestx", "--data-root", str(tmp / "empty")] + out, "class folder")
        _write_images(tmp / "one" / "NORMAL", 3)
        _fails_cleanly(["--dataset", "chestx", "--data-root", str(tmp / "one")] + out, "at least 2")
        _write_images(tmp / "bad" / "NORMAL", 3)
        _write_images(tmp / "bad" / "PNEUMONIA", 3)
        (tmp / "bad" / "PNEUMONIA" / "broken.png").write_bytes(b"not a png")
        _fails_cleanly(["--dataset", "chestx", "--data-root", str(tmp / "bad"), "--img-size", "16"] + out,
                       "broken.png")
        (tmp / "x.npz").write_bytes(b"junk")
        _fails_cleanly(["--dataset", "chestx", "--data-root", str(tmp / "x.npz")] + out, ".npz")
        _fails_cleanly(["--img-size", "32", "--poison", "40"] + out, "does not fit")
        _fails_cleanly(["--poison", "4", "--malicious", "2"] + out, "minority")
        _fails_cleanly(["--malicious", "1"] + out, "without an attack")
        _fails_cleanly(["--defense", "magic"] + out, "invalid choice")
        _fails_cleanly(["--img-size", "48"] + out, "power of two")
        _fails_cleanly(["--device", "cpu", "--amp-dtype", "fp16"] + out, "needs CUDA")
        _fails_cleanly(["--resume", str(tmp / "empty")], "no config.json")
        keep = tmp / "o" / "precious.txt"
        keep.parent.mkdir()
        keep.write_text("mine")
        _fails_cleanly(out, "already holds files")
        assert keep.read_text() == "mine"
        assert not (tmp / "o" / "config.json").exists()


# ---------------------------------------------------------------------------------------------
# eval.py
# ---------------------------------------------------------------------------------------------


def _random_lpips(seed=0):
    import eval as ev
    torch.manual_seed(seed)
    feats = ev.alexnet_features(None)  # random AlexNet: the formula's properties hold for any weights
    lin = [torch.rand(c) for c in (64, 192, 384, 256, 256)]
    return ev, feats, lin


def test_lpips_is_zero_on_itself_symmetric_and_grows_with_noise():
    ev, feats, lin = _random_lpips()
    torch.manual_seed(1)
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    y = torch.rand(4, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        assert ev.lpips(x, x, feats, lin).abs().max() < 1e-6
        assert torch.allclose(ev.lpips(x, y, feats, lin), ev.lpips(y, x, feats, lin), atol=1e-6)
        d = [ev.lpips(x, (x + s * torch.randn_like(x)).clamp(-1, 1), feats, lin).mean().item()
             for s in (0.05, 0.2, 0.8)]
    assert d[0] < d[1] < d[2], d


def test_lpips_equals_a_hand_computation():
    import eval as ev
    x0 = torch.tensor([0.5, -0.2, 0.1]).view(1, 3, 1, 1).expand(1, 3, 2, 1).clone()
    x1 = torch.tensor([0.1, 0.3, -0.4]).view(1, 3, 1, 1).expand(1, 3, 2, 1).clone()
    x1[0, :, 1, 0] = torch.tensor([0.9, 0.0, 0.2])
    features = lambda x: [x, 2 * x[:, :2]]  # noqa: E731  a two-layer "network" with known maps
    lin = [torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.3, 0.7])]
    shift, scale = np.array([-0.030, -0.088, -0.188]), np.array([0.458, 0.448, 0.450])
    want = 0.0
    for layer, w in ((lambda v: v, [1.0, 2.0, 0.5]), (lambda v: 2 * v[:2], [0.3, 0.7])):
        per_pos = []
        for pos in range(2):
            a = layer((x0[0, :, pos, 0].numpy() - shift) / scale)
            b = layer((x1[0, :, pos, 0].numpy() - shift) / scale)
            a, b = a / (np.linalg.norm(a) + 1e-10), b / (np.linalg.norm(b) + 1e-10)
            per_pos.append(float(np.sum(np.array(w) * (a - b) ** 2)))
        want += np.mean(per_pos)
    got = ev.lpips(x0, x1, features, lin).item()
    assert abs(got - want) < 1e-5, (got, want)


def test_lpips_weight_loader_rejects_wrong_hash_and_names_missing_files():
    import eval as ev
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ev.lpips_weights(tmp)
        except ev.EvalError as e:
            assert ev.ALEXNET_FILE in str(e) and "download.pytorch.org" in str(e), e
        else:
            raise AssertionError("missing weights accepted")
        torch.save({"x": torch.zeros(1)}, Path(tmp) / ev.ALEXNET_FILE)
        torch.save({"x": torch.zeros(1)}, Path(tmp) / ev.LPIPS_FILE)
        try:
            ev.lpips_weights(tmp)
        except ev.EvalError as e:
            assert "SHA-256" in str(e), e
        else:
            raise AssertionError("wrong hash accepted")
    real = HERE.parent / "shared" / "weights" / "lpips" / "alex.pth"
    if real.exists():  # the shipped linear weights pass the full SHA-256 check
        ev.check_sha256(real, ev.LPIPS_SHA256)


def test_study_runs_end_to_end_on_tiny_runs_with_arms_intervals_and_paired_differences():
    import xml.etree.ElementTree as ET
    import eval as ev
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = []
        for arm, flags in (("vanilla", []), ("attack", ["--poison", "4"])):
            for seed in ("0", "1"):
                runs.append(tmp / f"{arm}_s{seed}")
                quiet(fedgan.train, tiny_cfg(runs[-1], "--rounds", "2", "--local-steps", "2", "--seed", seed, *flags))
        out = tmp / "ev"
        quiet(ev.main, [*map(str, runs), "--out", str(out), "--metrics", "fid,kid,pr,trigger,utility",
                        "--baseline", "vanilla", "--n-real", "2,8", "--seeds", "2", "--n-synth", "16", "--epochs", "2",
                        "--fid-epochs", "1", "--classifier", "small", "--match-steps"])
        res = json.loads((out / "results.json").read_text())
        assert {a: v["seeds"] for a, v in res["arms"].items()} == {"vanilla": [0, 1], "attack": [0, 1]}
        kid = res["summary"]["KID x1000 (overall)"]["attack"]
        per_seed = [res["runs"][f"attack_s{s}"]["kid"]["overall"] * 1000 for s in (0, 1)]
        assert math.isclose(kid["mean"], np.mean(per_seed)) and kid["lo"] < kid["mean"] < kid["hi"], kid
        diff = res["differences"]["vanilla"]["KID x1000 (overall)"]["attack"]
        want = np.mean([res["runs"][f"attack_s{s}"]["kid"]["overall"] - res["runs"][f"vanilla_s{s}"]["kid"]["overall"]
                        for s in (0, 1)]) * 1000
        assert math.isclose(diff["mean"], want, rel_tol=1e-9, abs_tol=1e-9), (diff, want)
        # vanilla runs are measured against the attack's trigger: the chance level of the backdoor
        assert set(res["runs"]["vanilla_s0"]["trigger"]) == {"4"}
        assert res["runs"]["attack_s0"]["detection"]["attacker_final_weight"] == 0.25
        u = res["utility"]
        assert list(u["curves"]) == ["real only", "+ vanilla", "+ attack"] and len(u["curves"]["real only"]) == 2
        assert all(0 <= iv["mean"] <= 1 for c in u["curves"].values() for iv in c)
        assert set(u["differences"]) == {"real only", "vanilla"} and "as many optimizer steps" in u["interval_text"]
        assert [ev.steps_per_epoch(n) for n in (4, 33, 34, 64)] == [1, 1, 2, 2]  # what --match-steps equalises
        assert set(res["runs"]["vanilla_s0"]["fid"]) == {"0", "1", "overall", "class mean"}
        assert set(res["runs"]["vanilla_s0"]["deep"]["fid"]) == {"0", "1", "overall", "class mean"}
        assert ev.HEADLINE in res["summary"] and ev.HEADLINE in res["ladder"]["verdict"]
        md = (out / "results.md").read_text()
        assert "Paired difference from **vanilla**" in md and "| attack |" in md and "n real = 8" in md
        assert "differences tested" in md and "Holm keeps" in md and "## The metric ladder" in md
        assert "Lower is better: deep FID" in md and "WARNING:" in md and "too few for per-class FID" in md
        for svg in ("arms.svg", "attacker_share.svg", "utility.svg"):
            ET.fromstring((out / svg).read_text())  # well-formed
        from PIL import Image
        with Image.open(out / "samples.png") as im:  # real, vanilla, attack: 3 blocks of 2 rows of 16 px x 2
            assert im.height == 3 * (2 * 32 + 6), im.size
        assert (out / "utility.svg").read_text().count("<polyline") == 3
    assert ev.arm_label(["synthetic_none_p0_s0_20261207-051200", "synthetic_none_p0_s1_20261207-051311"]) == \
        "synthetic_none_p0"  # fedgan's default folder names: seeds group them, the times do not split them


def test_train_script_runs_the_study_over_seeds_with_short_copies():
    if not (shutil.which("bash") and shutil.which("flock")):
        raise Skip("needs bash and flock")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GRID="study", QUICK="1", ARMS="vanilla attack64", SEEDS="2", ROUNDS="2", SHORT="1",
                   IMG="16", JOBS="2", OUT=str(Path(tmp) / "g"), PYTHON=sys.executable, DEVICE="cpu",
                   EVAL_FLAGS="--n-synth 16 --seeds 1 --epochs 1 --fid-epochs 1 --n-real 2,4")
        first = subprocess.run(["bash", str(HERE / "train_isic.sh")], env=env, capture_output=True, text=True)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        g = Path(tmp) / "g"
        for arm in ("vanilla", "attack64"):
            for s in (0, 1):
                assert json.loads((g / f"{arm}_s{s}" / "config.json").read_text())["rounds"] == 2
                assert json.loads((g / f"{arm}_r1_s{s}" / "config.json").read_text())["rounds"] == 1
        res = json.loads((g / "eval_fidelity" / "results.json").read_text())
        assert {a: v["seeds"] for a, v in res["arms"].items()} == {a: [0, 1] for a in
                                                                 ("vanilla", "attack64", "vanilla_r1", "attack64_r1")}
        assert set(res["lengths"]) == {"vanilla minus vanilla_r1", "attack64 minus attack64_r1"}
        assert "attack64_r1" in res["differences"]["vanilla"]["KID x1000 (overall)"]  # against vanilla_r1
        assert "Paired difference" in (g / "results.md").read_text()
        again = subprocess.run(["bash", str(HERE / "train_isic.sh")], env=env, capture_output=True, text=True)
        assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 4, again.stdout
        other = subprocess.run(["bash", str(HERE / "train_isic.sh")], env=dict(env, IMG="32"), capture_output=True,
                               text=True)  # the same OUT with other settings: not "finished", and nothing trained
        assert other.returncode != 0 and "holds a run with other settings (img_size 16, the grid asks 32" in \
            other.stderr and "finished earlier" not in other.stdout, other.stdout + other.stderr


@quick
def test_detector_table_records_every_generator_and_replays_them_through_the_probe_detector():
    with tempfile.TemporaryDirectory() as tmp:
        run, script = Path(tmp) / "patch_s0", str(HERE / "docs" / "detector_table.py")
        rec = subprocess.run([sys.executable, script, "record", str(run), "--", *TINY, "--poison", "4",
                              "--malicious-ids", "1", "--rounds", "4", "--local-steps", "2", "--warmup", "1"],
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert rec.returncode == 0, rec.stderr[-2000:]
        assert len(list((run / "states").glob("r*.pt"))) == 4  # every round's generators, one file a round
        ck = torch.load(run / "states" / "r003.pt", weights_only=True)
        assert len(ck["states"]) == 4 and all(torch.equal(ck["center"][k], ck["center"][k]) for k in ck["center"])
        out = subprocess.run([sys.executable, script, "probe", tmp, "--seeds", "0", "--levels", "0,1e9"],
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert out.returncode == 0, out.stderr[-2000:]
        rows = {ln.split(" | ")[0].strip("| "): ln for ln in out.stdout.splitlines()}
        assert "0 of 1: -:0.25" in rows["probe detector at 1e9"]  # a level nobody reaches flags nobody
        scores = runpy.run_path(script)["probe_scores"](run)  # detection rounds t = 2, 3 (warm-up 1)
        assert scores.shape == (2, 4) and np.allclose(np.median(scores, axis=1), 1.0)  # over the clients' median


def test_paper_table_pairs_arms_applies_holm_and_reads_the_attackers_share():
    arms = ["vanilla", "attack64", "feddetect64", "multikrum64"]
    fid = "deep FID (class mean)"
    iv = lambda m, lo, hi, p=None: dict(mean=m, lo=lo, hi=hi, p=p)  # noqa: E731
    r = dict(reference_noise={"sd": {fid: 13.6}}, runs={}, summary={fid: {a: iv(150, 110, 190) for a in arms}},
             differences={"vanilla": {fid: {"attack64": iv(470, 1e-9, 900, 1e-6), "feddetect64": iv(10, -30, 50, 0.5),
                                           "multikrum64": iv(330, -400, 1080, 0.3)}},
                          "attack64": {fid: {"feddetect64": iv(-460, -1050, 120, 0.04)}}})
    import eval as ev
    for a in arms:  # eval's detection figure of each run's last round: under Krum, its part of what was kept
        last = dict(weights=[0.25, 0.25 * (a != "feddetect64"), 0.25, 0.25], selected=[1, int(a != "multikrum64"), 1, 1])
        r["runs"][f"{a}_s0"] = {"deep": {"fid": {"class mean": 150}}, "trigger": {},
                                "detection": {"attacker_final_weight": float(ev.aggregation_weights(last)[1])}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.json").write_text(json.dumps(r))
        out = subprocess.run([sys.executable, str(HERE / "docs" / "paper_table.py"), str(Path(tmp) / "results.json")],
                             capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in out.stdout.splitlines() if ln.startswith("| ")}
    assert "Holm over the table's 4 paired differences" in out.stdout and "the reference noise is 14" in out.stdout
    assert "vs vanilla +470 [+0, +900] **kept**" in out.stdout  # p = 1e-6 survives Holm over 4
    assert "vs attack -460 [-1,050, +120] (\\|d\\| > 1,050 excluded)" in out.stdout  # p = 0.04 does not, nor is it raw
    share = [ln for ln in out.stdout.split("final share")[1].splitlines() if ln.startswith("| ")]
    assert any(ln.startswith("| multi-Krum |  |  | 0.000") for ln in share), share  # Krum left it out: 0, not 0.25
    assert any(ln.startswith("| attack |  |  | 0.250") for ln in share) and "FedDetect" in rows


@quick
def test_train_script_lists_the_paper_grid_without_training():
    if not shutil.which("bash"):
        raise Skip("needs bash")
    with tempfile.TemporaryDirectory() as tmp:  # OUT relative to where the user stands, not to the script
        env = dict(os.environ, DRY="1", QUICK="1", OUT="g", PYTHON=sys.executable)
        out = subprocess.run(["bash", str(HERE / "train_chestx.sh")], env=env, capture_output=True, text=True, cwd=tmp)
        assert out.returncode == 0 and not (Path(tmp) / "g").exists(), out.stderr  # nothing trained or written
        assert f"--out {Path(tmp).resolve() / 'g'}/vanilla_s0" in out.stdout.replace(tmp, str(Path(tmp).resolve()))
        odd = subprocess.run(["bash", str(HERE / "train_chestx.sh")], env=dict(env, UTILITY="vanilla nosuch"),
                             capture_output=True, text=True, cwd=tmp)
        assert odd.returncode == 2 and "UTILITY: nosuch is not in the paper grid" in odd.stderr, odd.stderr
    starts = [ln for ln in out.stdout.splitlines() if " --out " in ln]
    runs = {ln.split(" --out ")[1].rsplit("/", 1)[1] for ln in starts}
    arms = {r.rsplit("_s", 1)[0] for r in runs}
    paper = {"vanilla"} | {f"{a}{p}" for p in (16, 32, 64) for a in ("attack", "feddetect", "reconstruct", "flip",
                                                                    "rotate")}
    assert arms == paper | {"probe64", "multikrum64"}, arms  # section 4's 16 runs, the probe detector, multi-Krum
    for arm in arms:  # 5 seeds for vanilla and the largest trigger, 3 for the others
        want = 5 if arm == "vanilla" or arm.endswith("64") else 3
        assert {r for r in runs if r.rsplit("_s", 1)[0] == arm} == {f"{arm}_s{s}" for s in range(want)}, arm
    assert len(starts) == len(runs) == 70 and all("--recipe fedgan" in ln and "--rounds 20" in ln for ln in starts)
    assert out.stdout.count("--resume") == 70  # each run kept at 20 rounds, then extended to 100
    flags = {ln.split(" --out ")[1].rsplit("/", 1)[1]: ln for ln in starts}
    assert "--poison 8 --detector probe" in flags["probe64_s0"] and "--aggregator multi-krum" in flags["multikrum64_s4"]
    assert "--poison 2 --defense flip" in flags["flip16_s2"] and "--poison 4 --defense rotate" in flags["rotate32_s0"]
    assert all(a.startswith("vanilla") or a.startswith("attack64") for a in
               [ln.split(" --out ")[1].rsplit("/", 1)[1] for ln in starts[:2]])  # the most-seeded arms first


def test_arms_group_runs_that_differ_only_by_seed():
    import eval as ev
    base = dict(fedgan.Config().__dict__, seed=0, out="runs/a_s0", environment={"torch": "x"})
    configs = {"a_s0": base, "a_s1": dict(base, seed=1, out="runs/a_s1", device="cuda", environment={"torch": "y"}),
               "b_s0": dict(base, decay=0.9), "b_s1": dict(base, decay=0.9, seed=1)}
    assert ev.group_arms(configs) == {"a": ["a_s0", "a_s1"], "b": ["b_s0", "b_s1"]}
    try:
        ev.group_arms(dict(configs, a_copy=dict(base, out="elsewhere")))
    except ev.EvalError as e:
        assert "same seed 0" in str(e), e
    else:
        raise AssertionError("one arm with the same seed twice accepted")


@quick
def test_interval_of_identical_values_is_zero_width_and_t_based():
    import eval as ev
    iv = ev.interval([0.3, 0.3, 0.3])
    assert iv["mean"] == 0.3 and iv["lo"] == iv["hi"] == 0.3
    iv = ev.interval([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t(0.975, 2) / sqrt(3)
    assert math.isclose(iv["hi"] - 2.0, 4.303 / math.sqrt(3), rel_tol=1e-6)
    assert ev.interval([5.0])["lo"] is None and ev.interval([None, 2.0])["n"] == 1
    assert abs(ev.t975(60) - 2.000) < 2e-3 and abs(ev.t975(120) - 1.980) < 2e-3


@quick
def test_kid_is_about_zero_on_itself_and_grows_with_noise():
    import eval as ev
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=gen)
    b = torch.randn(300, 16, generator=gen)  # the same distribution, other samples
    kid = [ev.kernel_inception_distance(a, b + s * torch.randn(300, 16, generator=gen)) for s in (0.0, 1.0, 2.0)]
    assert abs(ev.kernel_inception_distance(a[:150], a[150:])) < 0.05 * kid[1], kid  # a set against itself, halved
    assert abs(kid[0]) < 0.1 * kid[1] and kid[0] < kid[1] < kid[2], kid
    p, r = ev.precision_recall(a, b)
    assert p > 0.7 and r > 0.7, (p, r)
    p, r = ev.precision_recall(a, b * 0.2)  # a collapsed generator: realistic-looking, no variety
    assert p > 0.9 and r < 0.5, (p, r)


@quick
def test_trigger_figures_cannot_be_faked_by_brightness_and_see_a_blurred_colour_trigger():
    import eval as ev
    x, _ = fedgan.synthetic_images(64, 32, 1, seed=0)
    held, _ = fedgan.synthetic_images(64, 32, 1, seed=1)
    trig, margin = fedgan.make_trigger(8, 1), fedgan.trigger_margin(32)
    real = ev.trigger_figures(x, trig, margin, held)
    assert abs(real["strength"]) < 0.05 and real["rate"] < 0.05, real
    bright = ev.trigger_figures((x.int() + 26).clamp(0, 255).to(torch.uint8), trig, margin, held)
    assert abs(bright["strength"] - real["strength"]) < 0.01 and bright["rate"] < 0.05, bright  # was 0.219 before
    pasted = ev.trigger_figures(fedgan.apply_trigger(x, trig, margin), trig, margin, held)
    assert 0.85 < pasted["strength"] < 1.15 and pasted["rate"] > 0.95, pasted
    elsewhere = fedgan.apply_trigger(x.flip(-1), trig, margin).flip(-1)  # bottom-left
    other = ev.trigger_figures(elsewhere, trig, margin, held)
    assert abs(other["strength"]) < 0.05 and other["rate"] < 0.05, other
    rgb, _ = fedgan.synthetic_images(64, 32, 3, seed=0)
    rgb_held, _ = fedgan.synthetic_images(64, 32, 3, seed=1)
    colour = fedgan.make_trigger(8, 3, seed=0)
    pasted = fedgan.apply_trigger(rgb, colour, margin).float()
    blurred = F.conv2d(F.pad(pasted, (1, 1, 1, 1), mode="replicate"), torch.ones(3, 1, 3, 3) / 9, groups=3)
    blurred = blurred.round().to(torch.uint8)
    seen = ev.trigger_figures(blurred, colour, margin, rgb_held)
    assert seen["rate"] > 0.9 and seen["strength"] > 0.2, seen


def test_precision_recall_sees_every_class_of_a_set_sorted_by_class():
    import eval as ev
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(150, 16, generator=g) - 2, torch.randn(150, 16, generator=g) + 2])
    fake = torch.cat([torch.randn(500, 16, generator=g) - 2, torch.randn(500, 16, generator=g) + 2])
    sorted_pr = ev.precision_recall(real, fake)
    shuffled_pr = ev.precision_recall(real, fake[torch.randperm(1000, generator=g)])
    assert sorted_pr[1] > 0.7 and all(abs(a - b) < 0.08 for a, b in zip(sorted_pr, shuffled_pr)), (sorted_pr,
                                                                                                   shuffled_pr)
    # 'overall' compares the same class mix: a 300/700 real set against 500/500 fakes
    y_real, y_fake = torch.tensor([0] * 150 + [1] * 150), torch.tensor([0] * 500 + [1] * 500)
    a, b = ev.same_class_mix(real, y_real, fake, y_fake, 2, seed=0)
    assert len(a) == len(b) == 300 and torch.allclose(a.sum(0), real.sum(0))  # every real image, once
    assert (b[:, 0].mean().abs() < 0.3), b[:, 0].mean()  # half from each class, as the real set


@quick
def test_t_pvalues_match_the_t_table_and_holm_steps_down():
    import eval as ev
    for df, t in enumerate(ev.T975[:10], start=1):  # the 97.5% quantiles: two-sided p = 0.05
        assert abs(ev.t_pvalue(t, df) - 0.05) < 2e-4, (df, ev.t_pvalue(t, df))
    assert abs(ev.t_pvalue(1.0, 5) - 0.3632175) < 1e-6 and ev.t_pvalue(0.0, 3) == 1.0
    assert ev.holm([0.01, 0.04, None, 0.03, 0.5]) == [True, False, False, False, False]  # 0.03 > 0.05/3
    assert ev.holm([0.001, 0.012, 0.02]) == [True, True, True]  # 0.001 < .05/3, 0.012 < .05/2, 0.02 < .05
    iv = ev.interval([1.0, 2.0, 3.0])
    assert abs(iv["p"] - ev.t_pvalue(2.0 / (1.0 / math.sqrt(3)), 2)) < 1e-12
    lines = ev.holm_table("t", ["a"], ["m1", "m2"], lambda m, r: ev.interval([1.0, 1.1, 0.9] if m == "m1" else
                                                                            [0.1, -0.1, 0.05]))
    text = "\n".join(lines)
    assert "1.000 [0.752, 1.248] *" in text and "excluded)" in text and "2 differences tested" in text, text


def _ladder(n_per_class):
    """The metric ladder on PneumoniaMNIST at 32 px when present, else on the embedded synthetic set."""
    import eval as ev
    npz = HERE.parent / "shared" / "data" / "pneumoniamnist.npz"
    data = (fedgan.load_data("chestx", str(npz), 32, 1, 0) if npz.exists() else
            fedgan.load_data("synthetic", None, 32, 1, 0, synthetic_per_class=256))
    net = ev.train_classifier(*data.train, 2, "small", 5, 0, torch.device("cpu"))
    ref = ev.Reference(*data.test, 2, net, torch.device("cpu"))
    rx, ry = ev.sample_per_class(*data.train, n_per_class, 2, 0)
    return ev.ladder(ref, rx, ry, 0, data.classes), npz.exists()


def test_metric_ladder_the_headline_figure_ranks_real_images_above_every_damage():
    import eval as ev
    lad, real_data = _ladder(500 if (HERE.parent / "shared" / "data" / "pneumoniamnist.npz").exists() else 64)
    verdict = lad["verdict"][ev.HEADLINE]
    print(f"    {'PneumoniaMNIST' if real_data else 'synthetic'}: {verdict}")
    assert all(v in ("sees", "not monotone") for v in verdict.values()), verdict  # never ranks damage above real
    assert all(v == "sees" for k, v in verdict.items() if k != "blobs"), verdict
    # what the ladder was built to expose: the classifier's head scores reduced contrast as better than real
    head = lad["verdict"]["KID x1000 (overall)"]
    assert head["contrast"] == "misranks" or not real_data, head
    md = "\n".join(ev.ladder_markdown(lad, [ev.HEADLINE]))
    assert ev.HEADLINE in md and "class swap" in md


def test_eval_scores_images_from_any_generator_given_as_npz():
    import eval as ev
    x, y = fedgan.synthetic_images(48, 32, 1, seed=5)  # the embedded set's look, other draws than the reference
    noisy = (x.float() + 30 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "real.npz", images=x[:, 0].numpy(), labels=y.numpy())                 # (n, H, W) uint8
        np.savez(tmp / "noisy.npz", images=noisy.permute(0, 2, 3, 1).numpy() / 255.0, labels=y.numpy())  # floats
        quiet(ev.main, [str(tmp / "real.npz"), str(tmp / "noisy.npz"), "--metrics", "fid,kid,pr", "--n-synth", "40",
                        "--fid-epochs", "2", "--out", str(tmp / "ev")])
        res = json.loads((tmp / "ev" / "results.json").read_text())
        assert set(res["arms"]) == {"real", "noisy"} and "detection" not in res["runs"]["real"]
        fid = {a: res["summary"][ev.HEADLINE][a]["mean"] for a in ("real", "noisy")}
        assert fid["real"] < fid["noisy"], fid
        np.savez(tmp / "bad.npz", pictures=x.numpy())
        _fails_cleanly([str(tmp / "bad.npz"), "--metrics", "fid", "--out", str(tmp / "ev2")], "lacks images/labels",
                       main=ev.main)
        _fails_cleanly(["--out", str(tmp / "ev2")], "nothing to score", main=ev.main)
        _fails_cleanly([str(tmp / "real.npz"), "--data-root", str(tmp / "nowhere"), "--out", str(tmp / "ev2")],
                       "--data-root", main=ev.main)
        _fails_cleanly(["--ladder", str(tmp / "missing.npz"), "--out", str(tmp / "ev2")], "no such file", main=ev.main)
        rgb, ry = fedgan.synthetic_images(8, 32, 3, seed=0)
        np.savez(tmp / "rgb.npz", images=rgb.permute(0, 2, 3, 1).numpy(), labels=ry.numpy())
        np.savez(tmp / "gray_data.npz", train_images=x[:, 0].numpy(), train_labels=y.numpy())
        _fails_cleanly([str(tmp / "rgb.npz"), "--data-root", str(tmp / "gray_data.npz"), "--out", str(tmp / "ev2")],
                       "holds RGB images but --data-root", main=ev.main)  # not relabelled as gray
        # MedMNIST's own 28 px: scored at 32 px with a line; a second evaluation into the same folder (--force)
        # leaves none of the first one's figures behind; a table that cannot exist says why in one line
        small = fedgan.resize_uint8(x, 28)
        np.savez(tmp / "m28.npz", images=small[:, 0].numpy(), labels=y.numpy())
        (tmp / "ev" / "arms.svg").write_text("<svg/>")  # as an earlier evaluation with a forest plot left it
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            ev.main([str(tmp / "m28.npz"), "--metrics", "trigger", "--out", str(tmp / "ev"), "--force"])
        assert "28 px images resized to 32 px" in said.getvalue() and "no trigger table" in said.getvalue()
        assert not (tmp / "ev" / "arms.svg").exists() and (tmp / "ev" / "results.md").exists()


def test_noise_generator_has_worse_domain_fid_than_a_trained_one():
    import eval as ev
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_cfg(Path(tmp) / "r", "--rounds", "6", "--local-steps", "8")
        run = quiet(fedgan.train, cfg)
    x, y = run.data.train
    net = ev.train_classifier(x, y, 2, "small", 30, 0, torch.device("cpu"))  # features need a trained net
    assert ev.accuracy(net, *run.data.test, torch.device("cpu")) > 0.9

    class Noise(torch.nn.Module):
        z_dim = 64

        def forward(self, z, y, rng=None):
            return torch.rand(len(z), 1, 16, 16, generator=rng) * 2 - 1

    # scored against the 128 training images: more reals, a steadier covariance than the 32 test ones
    ref = ev.Reference(x, y, 2, net, torch.device("cpu"))
    trained = ev.domain_scores(ref, run.g.eval(), 128, 0)["fid"]["overall"]
    noise = ev.domain_scores(ref, Noise(), 128, 0)["fid"]["overall"]
    print(f"    domain FID: trained 6 rounds {trained:.2f}, uniform noise {noise:.2f}")
    assert noise > 1.5 * trained, (noise, trained)


def test_densenet121_classifier_trains_on_gray_and_rgb():
    import eval as ev
    for ch in (1, 3):
        x, y = fedgan.synthetic_images(4, 32, ch, seed=0)
        net = ev.train_classifier(x, y, 2, "densenet121", 1, 0, torch.device("cpu"), batch=4)
        assert 0.0 <= ev.accuracy(net, x, y, torch.device("cpu")) <= 1.0
        assert ev.recipe("densenet121", ch) == ({"opt": "adam", "lr": 1e-5, "wd": 0.0} if ch == 1 else
                                                {"opt": "sgd", "lr": 1e-3, "wd": 1e-4})


@quick
def test_frechet_distance_of_identical_gaussians_is_near_zero():
    import eval as ev
    a = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    b = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1))
    assert ev.frechet_distance(a, b) < 0.02
    assert abs(ev.frechet_distance(a, b + torch.tensor([2.0, 0, 0])) - 4.0) < 0.2  # |mu diff|^2


# ---------------------------------------------------------------------------------------------
# benchmark and CUDA
# ---------------------------------------------------------------------------------------------


def test_bench_prints_its_figures_as_json():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fedgan.main(["--bench", "--img-size", "16", "--width", "8", "--batch", "8", "--bench-steps", "1"])
    res = json.loads(out.getvalue().strip().splitlines()[-1])
    for k in ("img_per_s", "server_ms", "detect_ms", "peak_mb", "gflops", "matmul_gflops", "ratio", "run_min"):
        assert k in res and res[k] > 0, k
    # the FLOPs per image-step are the counted forward passes times 4 G + 9 D forward-equivalents
    assert math.isclose(res["gflops"], (4 * res["g_fwd_gflop"] + 9 * res["d_fwd_gflop"]) * res["img_per_s"],
                        rel_tol=0.01)


@quick
def test_flop_count_of_one_modulated_conv_matches_its_hand_count():
    B, cin, cout, w_dim, r = 3, 8, 16, 32, 8
    conv = fedgan.StyledConv(cin, cout, w_dim)
    x, w, noise = torch.randn(B, cin, r, r), torch.randn(B, w_dim), torch.randn(B, 1, r, r)
    hand = (2 * B * cout * cin * 9 * r * r     # the 3x3 conv on the modulated input
            + 2 * B * w_dim * cin              # the affine layer: w -> styles
            + 2 * B * cin * cout)              # demodulation: styles^2 @ sum_k(weight^2)^T
    assert fedgan.count_forward_flops(conv, x, w, noise) == hand


def test_paper_arch_has_the_studys_sizes():
    with torch.device("meta"):  # sizes only
        cfg = fedgan.parse_args(["--dataset", "chestx", "--arch", "paper"])
        g, d = fedgan.build_models(2, **fedgan.arch_of(cfg))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(g) / 1e6 - 24.7) < 0.1 and abs(count(d) / 1e6 - 44.7) < 0.1, (count(g), count(d))
    assert max(b["conv1"].weight.shape[0] for b in g.blocks) == 512 and g.blocks[-1]["conv1"].weight.shape[0] == 128
    convs = [m for m in d.features if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 64 and convs[-1].out_channels == 2048
    with torch.device("meta"):  # FLOPs from shapes alone: the study's 90.7 G (generator) and 5.5 G per image
        y = torch.tensor([1])
        g_fl = fedgan.count_forward_flops(g, torch.randn(1, 64), y) / 1e9
        d_fl = fedgan.count_forward_flops(d, torch.randn(1, 1, 256, 256), y) / 1e9
    assert abs(g_fl - 90.7) < 0.2 and abs(d_fl - 5.4) < 0.1, (g_fl, d_fl)


def test_upsampling_modulated_conv_equals_per_sample_transposed_conv():
    torch.manual_seed(0)
    x, w, styles = torch.randn(3, 6, 5, 5), torch.randn(4, 6, 3, 3) / 8, torch.rand(3, 6) + 0.5
    out = fedgan.modulated_conv2d(x, w, styles, up=True)
    assert out.shape == (3, 4, 10, 10)
    for i in range(3):  # StyleGAN2's definition: modulate and demodulate the weights per sample
        wi = w * styles[i][None, :, None, None]
        wi = wi * torch.rsqrt(wi.square().sum((1, 2, 3)) + 1e-8)[:, None, None, None]
        ref = fedgan.blur_up(F.conv_transpose2d(x[i:i + 1], wi.transpose(0, 1), stride=2))
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5)
    flat = fedgan.blur_up(torch.ones(1, 2, 9, 9))  # the blur keeps a constant's level x4 (upsampling gain)
    assert torch.allclose(flat[..., 2:-2, 2:-2], torch.full_like(flat[..., 2:-2, 2:-2], 4.0))


def state_of(run):
    """Every client's G and D, and the global G, as one flat list of tensors."""
    ts = list(run.g.state_dict().values())
    for c in run.fed.clients.values():
        ts += list(c.g.state_dict().values()) + list(c.d.state_dict().values())
    return ts


def max_rel_diff(run_a, run_b):
    """Largest |a - b| / max(1, |a|) over all models: float32 rounding of weights as large as the
    mapping network's (equalized lr stores them x100) is ~1e-5 absolute, so scale by magnitude."""
    return max(((a.double() - b.double()).abs() / a.double().abs().clamp(min=1)).max().item()
               for a, b in zip(state_of(run_a), state_of(run_b)))


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def test_host_offload_trains_bitwise_as_clients_kept_on_the_device():
    with tempfile.TemporaryDirectory() as tmp:
        args = ("--rounds", "2", "--local-steps", "3", "--poison", "4", "--defense", "feddetect", "--warmup", "0")
        kept = quiet(fedgan.train, tiny_cfg(Path(tmp) / "s", *args))
        off = quiet(fedgan.train, tiny_cfg(Path(tmp) / "o", *args, "--offload", "on"))
        assert off.fed.offload and not kept.fed.offload
        assert all(torch.equal(a, b) for a, b in zip(state_of(kept), state_of(off)))


def test_bf16_autocast_on_cpu_trains_without_nan():
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_cfg(Path(tmp) / "r", "--device", "cpu", "--amp-dtype", "bf16", "--rounds", "3", "--local-steps", "3")
        run = quiet(fedgan.train, cfg)
        assert np.isfinite(np.array(losses_of(run))).all()
        assert all(torch.isfinite(v).all() for v in run.g.state_dict().values())
        fp32 = quiet(fedgan.train, tiny_cfg(Path(tmp) / "f", "--rounds", "3", "--local-steps", "3"))
        h, h32 = losses_of(run), losses_of(fp32)
        assert not np.allclose(h, h32)  # autocast really ran in bf16
        assert np.allclose(h, h32, rtol=0.1)  # and stayed close to fp32


def test_compiled_training_matches_eager():
    with tempfile.TemporaryDirectory() as tmp:
        args = ("--rounds", "1", "--local-steps", "2", "--width", "8")
        eager = quiet(fedgan.train, tiny_cfg(Path(tmp) / "e", *args))
        comp = quiet(fedgan.train, tiny_cfg(Path(tmp) / "c", *args, "--compile"))
        assert np.allclose(losses_of(eager), losses_of(comp), atol=1e-4)
        assert max_rel_diff(eager, comp) < 1e-4, max_rel_diff(eager, comp)


def test_demodulation_stays_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    weight, styles = torch.randn(8, 4, 3, 3, generator=g), torch.randn(2, 4, generator=g) + 1
    exact = fedgan.demodulation(weight, styles)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fedgan.demodulation(weight, styles)
        plain_bf16 = torch.rsqrt(styles.square() @ weight.square().sum((2, 3)).t() + 1e-8)  # what autocast does
    assert under.dtype == torch.float32 and torch.equal(under, exact)
    assert plain_bf16.dtype == torch.bfloat16 and not torch.equal(plain_bf16.float(), exact)


@quick
def test_collectives_use_the_backends_device():
    real = fedgan.dist.get_backend
    try:
        fedgan.dist.get_backend = lambda: "gloo"
        assert fedgan.comm_device() == torch.device("cpu")
        fedgan.dist.get_backend = lambda: "nccl"  # nccl moves GPU tensors only
        cur = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0
        try:
            assert fedgan.comm_device() == torch.device("cuda", 0)
        finally:
            torch.cuda.current_device = cur
    finally:
        fedgan.dist.get_backend = real


def test_resume_on_another_precision_or_device_goes_on():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r"
        quiet(fedgan.main, TINY + ["--rounds", "2", "--local-steps", "1", "--ckpt-every", "1", "--out", str(out)])
        # fp32 -> bf16 autocast: the same checkpoint goes on
        quiet(fedgan.main, ["--resume", str(out), "--rounds", "3", "--amp-dtype", "bf16"])
        # a checkpoint whose client streams came from another device type (a CUDA generator's 16-byte state)
        ck = torch.load(out / "checkpoint.pt", weights_only=True)
        for f in (out / ck["clients"]).glob("*.pt"):
            torch.save(dict(torch.load(f, weights_only=True), rng=torch.zeros(16, dtype=torch.uint8)), f)
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            fedgan.main(["--resume", str(out), "--rounds", "4"])
        assert "noise streams re-seeded for cpu" in text.getvalue(), text.getvalue()[-500:]
        assert json.loads((out / "summary.json").read_text())["rounds"] == 4


def test_the_cards_command_says_on_a_cpu_that_it_trains_the_small_networks():
    cfg = fedgan.parse_args(["--dataset", "synthetic", "--img-size", "128", "--device", "cpu"])
    assert cfg.arch == "small"  # auto: the paper's networks only where they can train
    with tempfile.TemporaryDirectory() as tmp:
        run = quiet(fedgan.setup_run, fedgan.parse_args(["--img-size", "128", "--device", "cpu", "--width", "4",
                                                         "--synthetic-per-class", "8", "--out", str(Path(tmp) / "r")]))
        line = fedgan.describe(run, cfg)
    assert "NOTE: on a CPU these are the small networks" in line and "--arch paper" in line, line
    small, paper = (float(v.replace(",", "")) for v in re.findall(r"roughly ([\d,.]+) h here, the paper's networks "
                                                                  r"\(--arch paper, for a GPU\) ([\d,.]+) h", line)[0])
    assert 0 <= small < paper, line  # the run it starts, and what the paper's would cost


def test_tanh_generator_is_the_linear_one_squashed_and_only_the_first_runs_preset():
    torch.manual_seed(0)
    lin = fedgan.Generator(16, 1, 2, width=8)
    squashed = fedgan.Generator(16, 1, 2, width=8, tanh=True)
    squashed.load_state_dict(lin.state_dict())  # tanh adds no parameter
    z, y = torch.randn(6, lin.z_dim), torch.tensor([0, 1] * 3)
    with torch.no_grad():
        for p in (*lin.parameters(), *squashed.parameters()):
            p.mul_(4)  # a generator that overshoots far past the data's range
        a, b = lin(z, y, torch.Generator().manual_seed(1)), squashed(z, y, torch.Generator().manual_seed(1))
    assert a.abs().max() > 2 and torch.equal(b, torch.tanh(a))
    assert fedgan.parse_args(["--out", "x"]).tanh and not fedgan.parse_args(["--dataset", "chestx", "--out", "x"]).tanh
    assert not fedgan.parse_args(["--out", "x", "--no-tanh"]).tanh
    old = {k: v for k, v in dataclasses.asdict(fedgan.parse_args(["--out", "x"])).items() if k != "tanh"}
    assert fedgan.config_from_json(old, "config.json").tanh is False  # a run written before it: linear
    with tempfile.TemporaryDirectory() as tmp:
        run = quiet(fedgan.train, tiny_cfg(Path(tmp) / "t", "--rounds", "1", "--local-steps", "1", "--tanh"))
        g = fedgan.load_generator(Path(tmp) / "t" / "generator.pt")
        assert g.tanh and torch.equal(g(z, y, torch.Generator().manual_seed(1)),
                                      run.g.eval()(z, y, torch.Generator().manual_seed(1)))


def test_a_separate_batch_discriminator_is_blind_to_contrast_and_a_joint_one_is_not():
    torch.manual_seed(0)
    d = fedgan.Discriminator(32, 1, 2, width=8).train()
    x, y = torch.rand(16, 1, 32, 32) * 2 - 1, torch.randint(0, 2, (16,))
    # separate batches: bias-free convs, leaky ReLUs and BatchNorm make D(a x) = D(x) for any a > 0
    _, same = fedgan.d_logits(d, x, x, y, joint=False)
    _, tripled = fedgan.d_logits(d, x, 3 * x, y, joint=False)
    assert (same - tripled).abs().max() < 1e-3 * same.abs().mean()
    _, same = fedgan.d_logits(d, x, x, y, joint=True)  # one batch: the fakes' contrast shows against the reals'
    _, tripled = fedgan.d_logits(d, x, 3 * x, y, joint=True)
    assert (same - tripled).abs().mean() > 0.1 * same.abs().mean()


@quick
def test_recipes_fill_what_is_not_given_and_old_runs_read_as_the_papers():
    paper = fedgan.parse_args(["--recipe", "paper", "--out", "x"])
    assert (paper.lr, paper.beta1, paper.beta2, fedgan.local_of(paper, torch.device("cpu")).joint_d) == \
        (2e-4, 0.5, 0.999, False)
    default = fedgan.parse_args(["--out", "x"])
    assert (default.recipe, default.lr, default.width, default.rounds) == ("fedgan", 2e-3, 8, 40)
    assert fedgan.local_of(default, torch.device("cpu")).joint_d
    ours = fedgan.parse_args(["--recipe", "fedgan", "--lr", "1e-3", "--out", "x"])
    assert (ours.lr, ours.beta1, ours.beta2) == (1e-3, 0.0, 0.99)  # --lr given: it wins
    old = {k: v for k, v in dataclasses.asdict(paper).items() if k not in ("recipe", "beta1", "beta2")}
    again = fedgan.config_from_json(dict(old, d_batch="separate"), "config.json")  # written before these fields
    assert (again.recipe, again.beta1, again.beta2) == ("paper", 0.5, 0.999)
    # what was measured and removed: a run written with it on is refused in one line, off reads as today's
    assert fedgan.config_from_json(dict(old, ema=0.0, r1=0.0, class_loss=0.0, rollback=0), "c").recipe == "paper"
    assert fedgan.config_from_json(dict(old, attack_start=0, trim=0.1, parallel_clients="auto"), "c").recipe == "paper"
    removed = [(k, v, "no longer", "97daaf9") for k, v in (("ema", 2.5), ("r1", 10.0), ("class_loss", 1.0),
                                                            ("rollback", 10), ("d_batch", "joint"))]
    removed += [("detect_on", "update-norm", "its place", "c4e5e03"), ("detector", "freqfed", "no gain", "c4e5e03"),
                ("detect_on", "loss+probe", "its place", "67a8ed1"), ("trigger", "white", "never measured", "a23dbf2")]
    for k, v, why, commit in removed + [(k, v, "never measured", "2f12077") for k, v in
                                        (("attack_start", 5), ("aggregator", "median"), ("defense", "trimmed-mean"))]:
        try:
            fedgan.config_from_json(dict(old, **{k: v}), "config.json")
        except fedgan.FedGANError as e:
            assert why in str(e) and commit in str(e), e
        else:
            raise AssertionError(f"a run written with {k}={v} was read as another run")


def test_cuda_amp_trains_without_nan():
    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bf16", "fp16"):  # fp16 takes the GradScaler path
            cfg = tiny_cfg(Path(tmp) / dtype, "--device", "cuda", "--rounds", "3", "--local-steps", "3",
                           "--amp-dtype", dtype)
            run = quiet(fedgan.train, cfg)
            assert np.isfinite(np.array(losses_of(run))).all(), dtype


# ---------------------------------------------------------------------------------------------
# bad data never trains; every failure is one line; no run folder is stuck
# ---------------------------------------------------------------------------------------------


def _npz(path, train_images, train_labels, test_images=None, test_labels=None, extra_test_images=None):
    parts = dict(train_images=train_images, train_labels=train_labels)
    if extra_test_images is not None:  # test images without labels
        parts["test_images"] = extra_test_images
    if test_images is not None:
        parts.update(test_images=test_images, test_labels=test_labels)
    np.savez(path, **parts)
    return str(path)


def _eight_images():
    """8 random uint8 gray images (8, 16, 16) and labels 0, 1, 0, 1, ..."""
    return np.random.default_rng(0).integers(0, 256, (8, 16, 16)).astype(np.uint8), np.arange(8) % 2


def _load(root, dataset="chestx", size=16, channels=1):
    return fedgan.load_data(dataset, str(root), size, channels, seed=0)


def test_unusual_image_data_loads_right():
    x8, y = _eight_images()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = _load(_npz(tmp / "u8.npz", x8, y)).train[0]
        for name, imgs in [("float01", x8 / 255.0), ("float255", x8.astype(np.float32)),
                           ("uint16", x8.astype(np.uint16) * 257), ("chw", x8[:, None]),
                           ("rgba", np.repeat(x8[..., None], 4, -1))]:
            got = _load(_npz(tmp / f"{name}.npz", imgs, y)).train[0]
            assert torch.equal(got, ref), name
        twelve = np.round(x8.astype(np.float64) * 4095 / 255).astype(np.uint16)  # 12-bit data in uint16
        got = _load(_npz(tmp / "12bit.npz", twelve, y)).train[0]
        assert (got.int() - ref.int()).abs().max() <= 1
        d = _load(_npz(tmp / "float01b.npz", x8 / 255.0, y.astype(np.float64)[:, None]))  # (n, 1) float labels
        assert "float64 in [0, 1], scaled by 255" in d.report and "train 6 (NORMAL 3, PNEUMONIA 3)" in d.report, \
            d.report
        from PIL import Image  # 16-bit PNGs: scaled, not clipped at 255 by PIL's convert("L")
        for cls, value in (("NORMAL", 40000), ("PNEUMONIA", 10000)):
            (tmp / "deep" / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((16, 16), value, np.uint16)).save(tmp / "deep" / cls / f"{i}.png")
        deep = _load(tmp / "deep")
        assert abs(deep.train[0][deep.train[1] == 0].float().mean() - 40000 / 257) < 2, deep.report
        assert abs(deep.train[0][deep.train[1] == 1].float().mean() - 10000 / 257) < 2
        # as a viewer shows them: EXIF orientation applied, transparency on white, any format Pillow opens
        top_dark = np.full((16, 24), 255, np.uint8)
        top_dark[:4] = 0  # a dark band at the top, stored upside down with "rotate 180" in its EXIF
        for cls in ("NORMAL", "PNEUMONIA"):
            (tmp / "view" / cls).mkdir(parents=True)
            exif = Image.Exif()
            exif[0x0112] = 3
            Image.fromarray(top_dark[::-1].copy()).save(tmp / "view" / cls / "turned.jpg", exif=exif, quality=100)
            clear = Image.new("LA", (16, 16), (0, 0))  # black, fully transparent: shown white
            clear.save(tmp / "view" / cls / "clear.png")
            Image.fromarray(top_dark).save(tmp / "view" / cls / "plain.webp", lossless=True)
            Image.fromarray(top_dark).save(tmp / "view" / cls / "plain.pgm")
        view = _load(tmp / "view", size=16)
        imgs = torch.cat([view.train[0], view.test[0]]).float()
        assert len(imgs) == 8 and "skipped" not in view.report, view.report
        assert (imgs.view(8, -1).min(1).values == 255).sum() == 2  # the transparent ones, white
        turned = [im for im in imgs if im.min() < 100]
        assert len(turned) == 6 and all(im[0, :2].mean() < 60 and im[0, -4:].mean() > 200 for im in turned)


def test_bad_data_is_refused_with_one_line_and_nothing_written():
    x8, y = _eight_images()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nan = (x8 / 255.0).copy()
        nan[0, 0, 0] = np.nan
        cases = [  # (data root, what the one line must say)
            (_npz(tmp / "nan.npz", nan, y), "NaN"),
            (_npz(tmp / "neg.npz", x8.astype(np.int16) - 5, y), "negative values"),
            (_npz(tmp / "big.npz", x8 * 2.0, y), "values above 255"),
            (_npz(tmp / "short.npz", x8, y[:6]), "one integer label per image"),
            (_npz(tmp / "neglabel.npz", x8, y - 1), "negative label"),
            (_npz(tmp / "fraclabel.npz", x8, y + 0.5), "integer class ids"),
            (_npz(tmp / "gap.npz", x8, y * 2), "class 1"),
            (_npz(tmp / "flat.npz", x8.reshape(8, -1), y), "expected (n, H, W)"),
            (_npz(tmp / "emptytest.npz", x8, y, x8[:0], y[:0]), "test_images is empty"),
            (_npz(tmp / "testlabel.npz", x8, y, x8[:2], np.array([0, 5])), "reach 5"),
            (_npz(tmp / "onlytest.npz", x8, y, extra_test_images=x8[:2]), "test_labels"),
        ]
        _write_images(tmp / "single" / "NORMAL", 5)
        _write_images(tmp / "single" / "PNEUMONIA", 1)  # one image: it would go to the held-out split
        cases.append((tmp / "single", "PNEUMONIA"))
        _write_images(tmp / "hollow" / "NORMAL", 5)
        (tmp / "hollow" / "PNEUMONIA").mkdir(parents=True)
        cases.append((tmp / "hollow", "holds no images"))
        for split, names in (("train", ("NORMAL", "PNEUMONIA")), ("test", ("NORMAL", "VIRAL"))):
            for cls in names:
                _write_images(tmp / "mismatch" / split / cls, 3)
        cases.append((tmp / "mismatch", "same class folders"))
        for root, words in cases:
            out = tmp / "out"
            _fails_cleanly(["--dataset", "chestx", "--data-root", str(root), "--img-size", "16", "--out", str(out)],
                           words)
            assert not out.exists(), root


def test_every_user_mistake_is_one_line_without_traceback():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "file").write_text("x")
        _fails_cleanly(["--out", str(tmp / "file")], "is a file")
        _fails_cleanly(["--out", str(tmp / "file" / "sub")], "cannot write")
        for flag, value in (("--lr", "-1"), ("--batch", "0"), ("--detect-fpr", "0.7"), ("--blend-alpha", "2"),
                            ("--trim", "0.5"), ("--test-frac", "1"), ("--rounds", "0"), ("--dirichlet-alpha", "0")):
            _fails_cleanly([flag, value, "--out", str(tmp / "o")], flag)
        run = tmp / "run"
        quiet(fedgan.train, tiny_cfg(run, "--rounds", "2", "--local-steps", "1"))
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        (run / "checkpoint.pt").write_bytes(b"\x80\x02garbage" * 10)  # random bytes where the checkpoint was
        _fails_cleanly(["--resume", str(run), "--rounds", "3"], "cannot read")
        (run / "checkpoint.pt").write_bytes(before["checkpoint.pt"][:1000])  # a truncated copy
        _fails_cleanly(["--resume", str(run), "--rounds", "3"], "cannot read")
        (run / "checkpoint.pt").write_bytes(before["checkpoint.pt"])
        (run / "config.json").write_text("{not json")
        _fails_cleanly(["--resume", str(run), "--rounds", "3"], "not valid JSON")
        assert all((run / n).read_bytes() == b for n, b in before.items() if n not in ("checkpoint.pt", "config.json"))


def test_no_run_folder_is_stuck_and_resumed_runs_keep_their_books():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        straight = tmp / "straight"
        quiet(fedgan.train, tiny_cfg(straight, "--rounds", "3", "--local-steps", "1", "--sample-every", "1"))
        # a run that died before its first checkpoint: config.json, no checkpoint -> --resume starts it over
        stuck = tmp / "stuck"
        quiet(fedgan.train, tiny_cfg(stuck, "--rounds", "3", "--local-steps", "1", "--sample-every", "1"))
        (stuck / "checkpoint.pt").unlink()
        (stuck / "metrics.jsonl").write_text('{"round": 1, "g_loss": [1')  # a line cut by the kill
        quiet(fedgan.main, ["--resume", str(stuck)])
        assert _metrics(stuck) == _metrics(straight)
        # rounds are counted from 1 in the log, metrics.jsonl and the sample files alike
        rounds = [r["round"] for r in _metrics(straight)]
        assert rounds == [1, 2, 3] and (straight / "samples" / "round_0003.png").exists()
        before = torch.load(straight / "checkpoint.pt", weights_only=True)["seconds"]  # the first session's
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fedgan.main(["--resume", str(straight), "--rounds", "4", "--sample-every", "1"])
        assert "round    4/4" in out.getvalue() and (straight / "samples" / "round_0004.png").exists()
        # the summary counts the time of every session (the same run's, not another's: no timing race); config.json
        # says what ran
        s = json.loads((straight / "summary.json").read_text())
        assert s["rounds"] == 4 and s["seconds"] > before > 0, (s["seconds"], before)
        env = json.loads((straight / "config.json").read_text())["environment"]
        assert env["device"].startswith("cpu") and env["precision"] == "fp32" and env["torch"] == torch.__version__
        assert json.loads((straight / "config.json").read_text())["aggregator"] == "fedavg"
        # a NaN loss is written as null: metrics.jsonl stays JSON
        assert fedgan.json_safe([1.0, float("nan"), float("inf")]) == [1.0, None, None]


def test_a_detector_that_would_never_run_is_announced():
    with tempfile.TemporaryDirectory() as tmp:
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            fedgan.train(tiny_cfg(Path(tmp) / "r", "--rounds", "2", "--local-steps", "1", "--defense", "feddetect"))
        assert "never runs" in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1


@quick
def test_eval_refuses_bad_inputs_before_any_work():
    import eval as ev

    fails = functools.partial(_fails_cleanly, main=ev.main)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        quiet(fedgan.train, tiny_cfg(run, "--rounds", "1", "--local-steps", "1"))
        fails([str(run), "--n-real", "0", "--out", str(tmp / "e")], "--n-real 0")
        fails([str(run), "--seeds", "0", "--out", str(tmp / "e")], "--seeds")
        (tmp / "file").write_text("x")
        t = time.time()
        fails([str(run), "--metrics", "fid", "--out", str(tmp / "file")], "is a file")
        assert time.time() - t < 5  # refused before any model was trained
        good = [str(run), "--metrics", "fid", "--n-synth", "8", "--fid-epochs", "1", "--out", str(tmp / "e")]
        quiet(ev.main, good)
        fails(good, "--force")
        quiet(ev.main, good + ["--force"])
        broken = tmp / "broken"
        broken.mkdir()
        (broken / "config.json").write_text((run / "config.json").read_text())
        (broken / "generator.pt").write_bytes((run / "generator.pt").read_bytes()[:500])
        fails([str(broken), "--metrics", "fid", "--out", str(tmp / "e2")], "cannot read")
        fails([str(run), "--metrics", "utility", "--classifier", "densenet121", "--out", str(tmp / "e3")],
              "needs images of 32 px or more, these are 16 px")
        real_eval = ev.evaluate
        ev.evaluate = lambda a: (_ for _ in ()).throw(KeyboardInterrupt)  # Ctrl-C in the middle of the work
        try:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as said:
                try:
                    ev.main([str(run), "--weights-dir", str(tmp), "--out", str(tmp / "e4")])
                except SystemExit as e:
                    assert e.code == 130, e.code
            assert len(err.getvalue().splitlines()) == 1 and "stopped by Ctrl-C" in err.getvalue(), err.getvalue()
            # LPIPS is in the default metrics only where its weights are: otherwise one line says it is skipped
            assert "LPIPS skipped" in said.getvalue() and not (tmp / "e4").exists()
        finally:
            ev.evaluate = real_eval
    # a class missing from the real split: its FID is n/a, the rest is computed
    net = ev.SmallCNN(1, 2).eval()
    g = fedgan.Generator(16, 1, 2, width=8)
    x, y = fedgan.synthetic_images(8, 16, 1, seed=0)
    res = ev.domain_scores(ev.Reference(x[y == 0], y[y == 0], 2, net, torch.device("cpu")), g, 8, 0)
    for space in (res, res["pixel"], res["deep"]):
        for m in ("fid", "kid", "precision", "recall"):
            assert space[m]["1"] is None and space[m]["0"] is not None and space[m]["overall"] is not None, m
            assert space[m]["class mean"] is None, m  # a mean over classes that misses one is not given


# ---------------------------------------------------------------------------------------------
# integrity: nothing trains, resumes or scores silently on the wrong thing
# ---------------------------------------------------------------------------------------------


def _start(args):
    """fedgan.py in a child process (one thread), its output in pipes; returns the Popen."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # the child gets Ctrl-C as from a terminal: a suite started in the background by a shell without job
    # control ignores SIGINT, children inherit that, and Python then keeps ignoring it (seen in CI-like runs)
    return subprocess.Popen([sys.executable, str(HERE / "fedgan.py")] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=HERE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _holding(folder, p, timeout=120):
    """Wait until process p holds folder's lock and has trained a round."""
    t = time.time()
    while time.time() - t < timeout:
        lock, metrics = Path(folder) / ".lock", Path(folder) / "metrics.jsonl"
        if (lock.exists() and f"pid {p.pid}" in lock.read_text() and metrics.exists()
                and metrics.read_text().strip()):
            return
        assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    raise AssertionError("the run never took its folder")


def _cli_fails(args, must_mention, code=2):
    p = subprocess.run([sys.executable, str(HERE / "fedgan.py")] + args, capture_output=True, text=True, cwd=HERE,
                       env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), timeout=600)
    err = p.stderr.strip()
    assert p.returncode == code and len(err.splitlines()) == 1 and "Traceback" not in err, (p.returncode, err)
    assert must_mention.lower() in err.lower(), (must_mention, err)
    return err


def test_one_process_per_run_folder_and_signals_end_in_one_line():
    import eval as ev
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        long = ["--img-size", "16", "--width", "8", "--local-steps", "1", "--rounds", "500", "--ckpt-every", "2"]
        a = _start(long + ["--out", out])
        _holding(out, a)
        _cli_fails(long + ["--seed", "2", "--out", out], f"in use by pid {a.pid}")       # a second new run
        _cli_fails(["--resume", out, "--rounds", "600"], f"in use by pid {a.pid}")       # a resume beside it
        _fails_cleanly([out, "--metrics", "fid", "--out", str(Path(tmp) / "e")], "still training", main=ev.main)
        a.send_signal(signal.SIGTERM)
        _, err = a.communicate(timeout=120)
        assert a.returncode == 143 and len(err.strip().splitlines()) == 1, (a.returncode, err)
        assert "stopped by SIGTERM" in err and f"--resume {out}" in err and "Traceback" not in err, err
        assert not list(Path(out).glob("*.tmp")) and (Path(out) / ".lock").read_text() == ""
        b = _start(["--resume", out])                                                     # the other order
        _holding(out, b)
        _cli_fails(long + ["--out", out], f"in use by pid {b.pid}")
        b.send_signal(signal.SIGINT)                                                      # Ctrl-C
        _, err = b.communicate(timeout=120)
        assert b.returncode == 130 and "stopped by Ctrl-C" in err and "Traceback" not in err, err
        c = _start(["--resume", out])
        _holding(out, c)
        c.kill()                                                                          # SIGKILL: no clean end
        c.communicate()
        d = _start(["--resume", out])  # takes the lock SIGKILL left behind, then is stopped (no need to finish)
        _holding(out, d)
        d.send_signal(signal.SIGTERM)
        text, err = d.communicate(timeout=120)
        assert d.returncode == 143 and f"taking over the lock left by pid {c.pid}" in text, text[-1000:] + err
        assert len(err.strip().splitlines()) == 1 and "stopped by SIGTERM" in err, err  # also while setting up


def test_a_signal_during_a_checkpoint_waits_for_it():
    """Checkpoints are written with SIGINT and SIGTERM held, and the signal is delivered right after."""
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: fedgan.on_sigterm}
    old = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        for s, expected in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, fedgan.Stopped)):
            got = []
            try:
                with fedgan.signals_held():
                    os.kill(os.getpid(), s)
                    time.sleep(0.05)
                    got.append("the block went on")
                raise AssertionError(f"signal {s} was lost")
            except expected:  # delivered once the block ended, to the handler it had before
                assert got == ["the block went on"], got
            assert signal.getsignal(s) is handlers[s]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_flags_that_do_nothing_alone_are_refused_and_advice_is_not_circular():
    cases = [(["--poison", "4", "--probe-level", "3"], "--probe-level does nothing without --detector probe"),
             (["--recover"], "--recover does nothing"), (["--trim", "0.2"], "unrecognized arguments"),
             (["--dirichlet-alpha", "0.3"], "--partition dirichlet"), (["--blend-alpha", "0.5"], "--attack blend"),
             (["--poison", "4", "--detector", "paper", "--detect-fpr", "0.01"], "--detector calibrated"),
             (["--poison", "4", "--malicious", "0", "--malicious-ids", "1"], "give one of them"),
             (["--reconstruct-epochs", "3"], "--posthoc reconstruct"), (["--poison-frac", "0.5"], "an attack"),
             (["--data-root", "x.npz"], "--dataset chestx"), (["--seed", "-5"], "[0, 2^32)"),
             (["--seed", "99999999999999999999"], "[0, 2^32)"),
             (["--clients", "2", "--poison", "4"], "--clients 3 or more"),
             # flags that do nothing, or an attack that never happens
             (["--poison", "4", "--attack", "label-flip"], "--poison does nothing without --attack patch|latent"),
             (["--warmup", "3"], "--warmup does nothing without --detector"),
             (["--poison", "4", "--decay", "0.5"], "--decay does nothing without --detector"),
             (["--dataset", "chestx", "--data-root", "x.npz", "--tanh"], "--tanh does nothing without --dataset synth"),
             (["--poison", "4", "--attack-start", "5"], "unrecognized arguments"),
             (["--aggregator", "multi-krum", "--clients", "3"], "use --clients 4 or more"),
             (["--out", " "], "--out is empty")]
    with tempfile.TemporaryDirectory() as tmp:
        for argv, words in cases:
            _fails_cleanly(argv + ([] if "--out" in argv else ["--out", str(Path(tmp) / "r")]), words)
            assert not (Path(tmp) / "r").exists(), argv
        (Path(tmp) / "data" / "a").mkdir(parents=True)  # a run folder inside the data tree is refused
        _fails_cleanly(["--dataset", "chestx", "--data-root", str(Path(tmp) / "data"), "--out",
                        str(Path(tmp) / "data" / "run")], "inside the data folder")
        err = io.StringIO()  # a shortcut and a part that overrides it: accepted, with one line saying which wins
        with contextlib.redirect_stderr(err):
            assert fedgan.parse_args(["--defense", "feddetect", "--detector", "calibrated", "--out", "x"]).detector == \
                "calibrated"
        assert "replaces the isolation forest" in err.getvalue() and len(err.getvalue().splitlines()) == 1
    # with what they need, they are accepted
    fedgan.parse_args(["--poison", "4", "--detector", "calibrated", "--recover",
                       "--detect-fpr", "0.01", "--partition", "dirichlet", "--dirichlet-alpha", "0.3"])


def test_a_hand_edited_config_json_is_refused_on_resume_naming_the_setting():
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "r"
        quiet(fedgan.train, tiny_cfg(folder, "--rounds", "1", "--local-steps", "1", "--ckpt-every", "1"))
        original = (folder / "config.json").read_text()
        for k, v in (("clients", 5), ("lr", 0.01), ("poison", 4), ("seed", 3)):
            (folder / "config.json").write_text(json.dumps(dict(json.loads(original), **{k: v})))
            _fails_cleanly(["--resume", str(folder), "--rounds", "2"], f"says {k}={v!r}, but its checkpoint")
        (folder / "config.json").write_text(original)
        ck = torch.load(folder / "checkpoint.pt", weights_only=True)
        gone = folder / ck["clients"] / "00002.pt"
        kept = gone.read_bytes()
        gone.unlink()  # a client's checkpoint file deleted by hand: named, and no resume from a partial set
        _fails_cleanly(["--resume", str(folder), "--rounds", "2"], "00002.pt is gone")
        gone.write_bytes(kept)
        assert quiet(fedgan.main, ["--resume", str(folder), "--rounds", "2"]).summary["rounds"] == 2  # as written


def test_float_data_has_one_scale_per_file_and_classes_are_the_folders_on_disk():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x, y = _eight_images()
        train = x.astype(np.float32) / 255
        train[0, 0, 0] = 1.004  # one stray value above 1 must not flip the split's scale
        data = _load(_npz(tmp / "f.npz", train, y, x.astype(np.float32) / 255, y))
        assert torch.equal(data.train[0][1:], data.test[0][1:]) and int(data.train[0].max()) == 255
        assert "1 value above 1 clipped" in data.report, data.report
        for bad, words in ((dict(test=x.astype(np.float32) / 255, train=x.astype(np.float32)), "one scale"),
                           (dict(train=x, labels=np.zeros_like(y)), "needs at least 2")):
            path = _npz(tmp / "bad.npz", bad.get("train", x), bad.get("labels", y), bad.get("test"),
                        None if bad.get("test") is None else y)
            try:
                _load(path)
            except fedgan.FedGANError as e:
                assert words in str(e), e
            else:
                raise AssertionError(f"{words}: accepted")
        assert "every training image is one flat value" in _load(_npz(tmp / "flat.npz", np.full_like(x, 77), y)).report
        assert "images resized to 16 x 16 px" not in _load(_npz(tmp / "same.npz", x, y)).report  # 16 px: as they are
        assert "images resized to 32 x 32 px" in _load(_npz(tmp / "same.npz", x, y), size=32).report
        try:  # one image per class and no test split: the hold-out takes them all
            _load(_npz(tmp / "tiny.npz", x[:2], y[:2]))
        except fedgan.FedGANError as e:
            assert "left none to train on" in str(e), e
        else:
            raise AssertionError("an .npz the hold-out emptied was accepted")
        # NORMAL/PNEUMONIA/COVID19: three classes, the known two first; hidden things skipped, other types counted
        for name in ("NORMAL", "PNEUMONIA", "COVID19"):
            _write_images(tmp / "three" / name, 4)
        _write_images(tmp / "three" / ".ipynb_checkpoints", 2)
        (tmp / "three" / "NORMAL" / "._img0.png").write_bytes(b"\x00\x05\x16\x07 not an image")
        (tmp / "three" / "NORMAL" / "notes.txt").write_text("not an image")
        data = _load(tmp / "three")
        assert data.classes == ["NORMAL", "PNEUMONIA", "COVID19"] and len(data.train[1]) + len(data.test[1]) == 12
        assert "1 file skipped for their type (1 .txt" in data.report, data.report
        _write_images(tmp / "three" / "normal", 4)
        try:
            _load(tmp / "three")
        except fedgan.FedGANError as e:
            assert "differ only in case" in str(e), e
        else:
            raise AssertionError("NORMAL/ beside normal/ accepted")


def test_resume_finds_moved_data_keeps_its_books_and_refuses_other_data():
    npz = Path(tempfile.mkdtemp())
    try:
        x, y = np.random.default_rng(0).integers(0, 256, (64, 16, 16)).astype(np.uint8), np.arange(64) % 2
        _npz(npz / "d.npz", x, y)
        common = ["--dataset", "chestx", "--img-size", "16", "--width", "8", "--local-steps", "1", "--ckpt-every", "1"]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            p = subprocess.run([sys.executable, str(HERE / "fedgan.py"), *common, "--data-root", "d.npz", "--rounds",
                                "2", "--out", str(out)], cwd=npz, capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            assert p.returncode == 0, p.stderr
            saved = json.loads((out / "config.json").read_text())
            assert saved["data"]["path"] == str((npz / "d.npz").resolve()) and set(saved["data"]["fingerprint"]) == {
                "train", "test"}
            # resumed from another directory: the relative root is found through the recorded path
            text = _run_cli(["--resume", str(out), "--rounds", "3"]).stdout
            assert "using the run's recorded" in text, text
            # the data moved: --data-root may point to it; other data is refused
            shutil.copy(npz / "d.npz", npz / "moved.npz")
            _run_cli(["--resume", str(out), "--rounds", "4", "--data-root", str(npz / "moved.npz")])
            _npz(npz / "other.npz", 255 - x, y)
            _cli_fails(["--resume", str(out), "--rounds", "5", "--data-root", str(npz / "other.npz")],
                       "differs from the data")
            # the log deleted: the summary's rounds come from the checkpoint
            (out / "metrics.jsonl").unlink()
            _run_cli(["--resume", str(out), "--rounds", "5"])
            assert json.loads((out / "summary.json").read_text())["rounds"] == 5
            # the checkpoint deleted: said, and the run starts over
            (out / "checkpoint.pt").unlink()
            text = _run_cli(["--resume", str(out), "--rounds", "2"]).stdout
            assert f"no checkpoint in {out}: starting from round 0" in text, text
    finally:
        shutil.rmtree(npz)


def test_a_full_disk_ends_in_one_line_and_leaves_no_tmp():
    real = torch.save

    def full(obj, path, *a, **kw):
        if str(path).endswith("checkpoint.pt.tmp"):
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        fedgan.torch.save = full
        try:
            _fails_cleanly(TINY + ["--rounds", "2", "--out", str(Path(tmp) / "r")], "No space left on device")
        finally:
            fedgan.torch.save = real
        assert not list(Path(tmp, "r").glob("*.tmp")) and (Path(tmp) / "r" / ".lock").read_text() == ""


def test_eval_refuses_stale_or_mixed_runs_and_scores_a_run_without_its_log():
    import eval as ev
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, large = tmp / "a_s0", tmp / "b_s0"
        quiet(fedgan.train, tiny_cfg(small, "--rounds", "1", "--local-steps", "1"))
        quiet(fedgan.train, tiny_cfg(large, "--rounds", "1", "--local-steps", "1", "--img-size", "32"))
        _fails_cleanly([str(small), str(large), "--metrics", "fid", "--out", str(tmp / "e")], "different data",
                       main=ev.main)
        cfg = json.loads((small / "config.json").read_text())
        being_extended = tmp / "c_s0"
        shutil.copytree(small, being_extended)
        (being_extended / "config.json").write_text(json.dumps(dict(cfg, rounds=60)))
        _fails_cleanly([str(being_extended), "--metrics", "fid", "--out", str(tmp / "e")], "is from round 1",
                       main=ev.main)
        (small / "metrics.jsonl").unlink()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ev.main([str(small), "--metrics", "fid", "--n-synth", "8", "--fid-epochs", "1", "--out", str(tmp / "e")])
        assert "scored without detection figures" in out.getvalue()


@quick
def test_help_says_what_the_flags_do():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            fedgan.parse_flags(["--help"])
        except SystemExit:
            pass
    text = " ".join(out.getvalue().split())
    assert "--out may not" in text and "(default True)" not in text.split("--amp")[1][:300]
    assert "not the optimizer's weight decay" in text
    for flag in ("rounds", "width", "decay", "img_size"):  # each preset's help says the values it fills in
        name = flag.replace("_", "-")
        shown = re.search(rf"--{name} {name.upper().replace('-', '_')} [^[]*?\(preset: ([^)]*)\)", text).group(1)
        assert shown == ", ".join(f"{k} {p[flag]}" for k, p in fedgan.PRESETS.items()), (flag, shown)
        assert fedgan.parse_args(["--out", "x"]).__dict__[flag] == fedgan.PRESETS["synthetic"][flag]
    import eval as ev
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            ev.parse_args(["--help"])
        except SystemExit:
            pass
    assert "(default: )" not in out.getvalue() and "where the networks run" in out.getvalue()


# ---------------------------------------------------------------------------------------------
# the probe detector: the server looks at what the generators draw
# ---------------------------------------------------------------------------------------------


@quick
def test_box_mean_is_the_patch_average():
    x = torch.randn(3, 2, 13, 11, dtype=torch.float64)
    for k in (1, 4, 11):
        assert torch.allclose(fedgan.box_mean(x, k), torch.nn.functional.avg_pool2d(x, k, stride=1), atol=1e-12)


def test_norm_scaling_attacker_lands_inside_the_benign_range():
    center = {"w": torch.zeros(10)}
    states = {i: {"w": torch.full((10,), float(v))} for i, v in enumerate([1.0, 1.2, 0.9, 8.0])}
    out = fedgan.scale_into_benign(states, center, [3], seed=0)
    norms = fedgan.update_norms([out[i] for i in range(4)], center)
    benign = norms[:3]
    assert min(benign) <= norms[3] <= max(benign) and torch.equal(out[0]["w"], states[0]["w"])
    assert torch.allclose(out[3]["w"] / out[3]["w"].norm(), states[3]["w"] / states[3]["w"].norm())  # same direction


def test_shadow_detectors_are_logged_and_scored_but_do_not_act():
    with tempfile.TemporaryDirectory() as tmp:
        run = quiet(fedgan.train, tiny_cfg(Path(tmp) / "r", "--poison", "4", "--malicious-ids", "1", "--rounds", "4",
                                           "--local-steps", "2", "--warmup", "1", "--shadow", "--scale-update",
                                           "--probe-per-class", "4"))
        recs = [json.loads(ln) for ln in (Path(tmp) / "r" / "metrics.jsonl").read_text().splitlines()]
        names = {"paper", "calibrated", "probe-watch", "flame"}
        assert all(set(r["shadow"]) == names for r in recs[2:]) and "shadow" not in recs[0]
        assert all(len(r[k]) == 4 for r in recs for k in ("watch_score", "flame_score"))
        assert all(r["weights"] == [0.25] * 4 for r in recs)  # nobody acted: no detector was chosen
        assert set(run.summary["shadow"]) == names and all(0 <= v["fpr"] <= 1 for v in run.summary["shadow"].values())


@quick
def test_a_new_detector_is_one_definition_and_one_entry_and_trains():
    text = (HERE / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class Farthest" in b)
    exec(code, dict(vars(fedgan)))  # README's example: one class and its DETECTORS entry, nothing else changed
    assert "farthest" in fedgan.DETECTORS and "farthest" in fedgan.Config.__dataclass_fields__["detector"].metadata[
        "choices"]()  # a new --detector choice
    try:
        args = ["--detector", "farthest", "--poison", "4", "--malicious-ids", "1", "--local-steps", "2",
                "--warmup", "0"]
        with tempfile.TemporaryDirectory() as tmp:
            run = quiet(fedgan.train, tiny_cfg(Path(tmp) / "r", *args, "--rounds", "3"))
            recs = [json.loads(ln) for ln in (Path(tmp) / "r" / "metrics.jsonl").read_text().splitlines()]
        assert all(len(r["farthest"]) == 4 for r in recs)  # its figure is logged every round
        assert sum(recs[0]["flagged"]) == 0 and all(sum(r["flagged"]) == 1 for r in recs[1:])  # acts after warm-up
        hit = np.flatnonzero(recs[-1]["counts"])
        assert run.server.weights[hit].max() < 0.25 < run.server.weights.max()  # Algorithm 1 decayed whom it flagged
        resume_matches(args)  # its history went through the checkpoint: the resumed run equals the straight one
    finally:
        del fedgan.DETECTORS["farthest"]


@quick
def test_flame_flags_a_lone_direction_and_not_a_clean_round():
    u = torch.randn(3, 7, dtype=torch.float64)
    assert np.allclose(fedgan.core_ratio(u @ u.T), fedgan.core_ratio((2 * u) @ (2 * u).T))  # scale-free
    g = torch.Generator().manual_seed(0)
    center = {"w": torch.zeros(8, 64), "steps": torch.tensor(3)}  # an integer buffer is not an update
    common = torch.randn(8, 64, generator=g)

    def round_of(lone, ok=(True,) * 5):
        states = [{"w": common + 0.6 * torch.randn(8, 64, generator=g), "steps": torch.tensor(9)} for _ in range(5)]
        if lone is not None:
            states[lone]["w"] = torch.randn(8, 64, generator=g) * common.norm() / 22.6  # as long, another direction
        return fedgan.Round(12, np.ones(5), np.ones(5), states, center, np.array(ok), act=True)
    det = fedgan.DETECTORS["flame"](None, None)
    assert det.whole and list(det(round_of(3))) == [False, False, False, True, False]
    assert max(det.logged["flame_score"]) > 2 * sorted(det.logged["flame_score"])[2]
    assert not det(round_of(None)).any()  # five alike: nobody stands out
    flags = det(round_of(3, ok=(True, True, True, True, False)))  # a client sitting out gets no score
    assert flags[3] and not flags[4] and np.isnan(det.logged["flame_score"][4])


def test_probe_detector_refuses_torchrun_with_one_line():
    for flags in (["--detector", "flame"], ["--detector", "probe"]):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = tiny_cfg(Path(tmp) / "r", *flags)
            old = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
            os.environ.update(RANK="0", WORLD_SIZE="2")
            try:
                fedgan.setup_run(cfg)
            except fedgan.FedGANError as e:
                assert "without torchrun" in str(e) and "\n" not in str(e)
            else:
                raise AssertionError("the probe ran across ranks")
            finally:
                for k, v in old.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_fresh_probe_latents_are_the_servers_secret_and_reproducible():
    g = fedgan.Generator(16, 1, 2, width=8)
    a, b = fedgan.ProbeDetector(g, 4, 11), fedgan.ProbeDetector(g, 4, 11)
    za, ya, na = a.inputs(3)
    zb, yb, nb = b.inputs(3)
    assert torch.equal(za, zb) and torch.equal(ya, yb) and all(torch.equal(x, y) for x, y in zip(na, nb))
    assert ya.tolist() == [0] * 4 + [1] * 4
    assert not torch.equal(a.inputs(4)[0], za)                        # new latents each round
    assert not torch.equal(fedgan.ProbeDetector(g, 4, 12).inputs(3)[0], za)  # another secret


def _renders(n_rounds, seed=0, N=4, P=32, K=2):
    """Constructed renders (round, N, K*P, 1, 16, 16): every client the same smooth image per sample plus
    its own noise, which a real client's training changes from round to round."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n_rounds, 1, K * P, 1, 4, 4, generator=gen)
    base = torch.nn.functional.interpolate(base.flatten(0, 2), size=16, mode="bilinear").reshape(
        n_rounds, 1, K * P, 1, 16, 16)
    return 0.5 * base + 0.05 * torch.randn(n_rounds, N, K * P, 1, 16, 16, generator=gen)


def _watch(renders, per_class, rounds=None):
    avg, out = None, []
    for r in renders[:rounds]:
        avg, sc = fedgan.probe_watch(avg, fedgan.departure_energy(r, per_class, 4))
        out.append(sc)
    return np.array(out)


def test_probe_detector_flags_a_colour_patch_and_a_held_spot_not_benign_drift_a_wandering_or_one_class_one():
    gen = torch.Generator().manual_seed(1)
    drift = torch.nn.functional.interpolate(torch.randn(6 * 4, 3, 4, 4, generator=gen), size=16, mode="bilinear")
    skin = torch.tensor([0.4, -0.2, -0.3])[:, None, None]
    R = _renders(6) + skin + 0.15 * drift.reshape(6, 4, 1, 3, 16, 16)  # (round, N, K*P, 3, 16, 16): skin-coloured;
    assert (_watch(R, 32)[-1] < 6).all()  # every client drifts its own way each round, alike in every sample
    colour = R.clone()  # client 1 paints the RGB trigger, random colours in [-1, 1], on every sample: it departs
    colour[:, 1, :, :, 11:15, 11:15] = torch.rand(3, 4, 4, generator=gen) * 2 - 1  # by its mean colour from skin
    S = _watch(colour, 32)
    print(f"    scores, last round: {np.round(S[-1], 1).tolist()} (client 1 paints a colour patch)")
    assert (S[-1] > 6).tolist() == [False, True, False, False], S[-1]
    moved, held, one = R.clone(), R.clone(), R.clone()
    for t, (r, c) in enumerate([(0, 0), (10, 10), (0, 10), (10, 0), (5, 5), (0, 5)]):
        moved[t, 3, :, :, r:r + 4, c:c + 4] += 0.4  # client 3: a spot in another place each round ...
        held[t, 3, :, :, 0:4, 5:9] += 0.4          # ... or the same spot held in one place
    one[:, 2, 32:, :, 3:7, 8:12] += 0.5  # client 2: its class-1 renders differ (it sees few images of that class)
    assert (_watch(held, 32)[-1] > 6).tolist() == [False, False, False, True]
    for case in (moved, one):
        assert (_watch(case, 32)[-1] < 6).all(), _watch(case, 32)[-1]
    old = {"watch": torch.zeros(4, 3, 1, 13, 13), "watch_n": 3}
    try:  # a checkpoint of the t-statistic detector (averages (N, K, C, H', W')) is refused in one line
        fedgan.ProbeDetector(fedgan.Generator(16, 1, 2, width=8)).load_state_dict(old)
    except fedgan.FedGANError as e:
        assert "c4e5e03" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("an old probe history was taken for today's")


def test_latent_attacker_teaches_the_trigger_only_inside_its_region():
    trig = fedgan.to_unit(fedgan.make_trigger(4, 1))
    bd = fedgan.Backdoor(trig, margin=1)
    fake = torch.zeros(6, 1, 16, 16, requires_grad=True)
    z = torch.zeros(6, 8)
    z[:2, 0] = 2.0                                              # two latents inside the region
    fedgan.backdoor_loss(fake, z, bd).backward()
    moved = fake.grad.abs().flatten(1).sum(1)
    assert (moved[:2] > 0).all() and (moved[2:] == 0).all()     # outside the region: nothing is taught
    assert (fake.grad[:2, :, 11:15, 11:15] != 0).all() and fake.grad[:2, :, :11].abs().sum() == 0
    done = torch.zeros(2, 1, 16, 16)
    done[:, :, 11:15, 11:15] = trig
    assert fedgan.backdoor_loss(done, z[:2], bd).item() == 0   # a generator that draws it pays nothing
    with tempfile.TemporaryDirectory() as tmp:
        run = quiet(fedgan.train, tiny_cfg(Path(tmp) / "r", "--attack", "latent", "--poison", "4", "--malicious-ids",
                                           "1", "--rounds", "1", "--local-steps", "1"))
        c = run.fed.clients[1]
        assert c.backdoor is not None and run.fed.clients[0].backdoor is None
        x0 = fedgan.load_data("synthetic", None, 16, 1, 0, 64).train[0]
        assert not (c.x[:, :, 11:15, 11:15] == 255).all()       # its data stays clean: its very shard
        assert torch.equal(c.x, x0[fedgan.split_clients(len(x0), 4, 0)[1]])


# ---------------------------------------------------------------------------------------------
# shape: golden runs, copyable pieces, composable defenses, resume
# ---------------------------------------------------------------------------------------------

# A refactor must not change a bit of what these runs write (one thread). First recorded with the code
# before the one-round refactor (046c8e2), which reproduced them bitwise; re-recorded only where a
# commit changes results on purpose (the mapping network's sqrt(2) gain, StyleGAN2's; metrics.jsonl's
# rounds counted from 1, which changed the metrics hashes and no generator; StyledConv's gain folded into its
# demodulation, noise and bias, which rounds differently, re-recorded on an Intel Xeon; the probe detector's
# statistic, which changed fg_probe's logged scores and not its generator). On another CPU or
# torch build the arithmetic may round differently, so there only the last round's losses are compared,
# to 2%. Re-record: run these flags and take the two sha256s and the losses (see the test).
GOLDEN_MACHINE = ("2.14.1+cu130", "AVX512", "Intel(R) Xeon(R) Processor")
GOLDEN_ARGS = ("--img-size 16 --width 16 --synthetic-per-class 64 --batch 16 --local-steps 3 --ckpt-every 100 "
               "--sample-every 100 --poison 4 --malicious-ids 1 --device cpu --recipe paper --no-tanh").split()
GOLDEN = {  # name: (flags, metrics keys compared, sha256 of those metrics, sha256 of generator.pt's tensors, last g_loss)
    "feddetect_resume": (["--defense", "feddetect", "--warmup", "1"], "counts d_loss excluded flagged g_loss malicious round weights",
                         "59bbb7c3d88666c9fa1fdd16402621f0fc0609f3d9e1c87e3e1c2169dfc75169",
                         "d41da1307151df4fb60ca7494f4cb101ad3f0223a8a28ef5e74a258442a90eee",
                         [1.3747304677963257, 1.4197696447372437, 1.334578037261963, 1.1010864973068237]),
    "multikrum": (["--defense", "multi-krum", "--rounds", "3"],
                  "counts d_loss excluded flagged g_loss malicious round selected update_norm weights",
                  "cd4020cdc1c898f679af6c9f4a7e2cdec979de046674b2ab29620c29d956704a",
                  "0f2cb0ae27c06c04523dee9a093b223fec683769e76f666dce4fd945799df82e",
                  [1.2632790803909302, 1.2342710494995117, 1.1762170791625977, 0.9802792072296143]),
    "fg_attack": (['--recipe', 'fedgan', '--rounds', '3'],
        "counts d_loss excluded flagged g_loss malicious round update_norm weights",
        "6e56e2fe62a4f043cba3a072617acd1f6fd7bba1fe4ab8b25d2e417038b61042",
        "881ee435f2a38c8df006f65828c40a29e9de90bb686423d7e4401a42fe00e25d",
        [4.267971515655518, 4.2319111824035645, 4.27805757522583, 5.017691135406494]),
    "fg_feddetect": (['--recipe', 'fedgan', '--defense', 'feddetect', '--warmup', '1', '--rounds', '3'],
        "counts d_loss excluded flagged g_loss malicious round update_norm weights",
        "cfa187fcec85600b061eb1a435417ed84a48c501c6a321fc3fea4b82fccba7a3",
        "8231434a904f73486f926888e4dccd7337b121280f2376f0be3d621339ee9751",
        [4.267971515655518, 4.2319111824035645, 4.27805757522583, 5.017691135406494]),
    "fg_flip": (['--recipe', 'fedgan', '--defense', 'flip', '--rounds', '2'],
        "counts d_loss excluded flagged g_loss malicious round update_norm weights",
        "6215194428cdd08cf43d9150c02061bdeabe9ecbeb04d4d00d2f04346dc6ed3f",
        "d266fa219bc1d08e9cad47cf1261ce0772c3ba1efbc0259fef822183980f5f78",
        [3.6651735305786133, 3.6738662719726562, 3.6805660724639893, 4.067913055419922]),
    "fg_rotate": (['--recipe', 'fedgan', '--defense', 'rotate', '--rounds', '2'],
        "counts d_loss excluded flagged g_loss malicious round update_norm weights",
        "80988476eddd65f941d803cba6ecbd3147a29821879a63a07e47e30591b3bdb3",
        "31ab2a5483514867ff3175a7bc232d57df255c40177e51c11d3ccbe1459d67a1",
        [3.7930877208709717, 3.8170814514160156, 3.7268950939178467, 4.186605930328369]),
    "fg_reconstruct": (['--recipe', 'fedgan', '--defense', 'reconstruct', '--reconstruct-epochs', '1',
                        '--reconstruct-per-class', '16', '--rounds', '2'],
        "counts d_loss excluded flagged g_loss malicious round update_norm weights",
        "fb254d432999faf6b2ad98f6112fbc94e04d2d6bc20b51dd37ad47af7b038104",
        "c85e8c747a3d7ecc368b1cac39c24bf668d59de9a7fa0940d1c0857e72b23370",
        [3.690464973449707, 3.8214597702026367, 3.902906656265259, 4.194395065307617]),
    "fg_probe": (['--recipe', 'fedgan', '--detector', 'probe', '--probe-per-class', '8', '--warmup', '1',
                  '--rounds', '3'],
        "counts d_loss excluded flagged g_loss malicious round update_norm watch_score weights",
        "75bcddb89dbb422762a7247045324c0471f769908c07f32208c5fafa0b7ac0b3",
        "881ee435f2a38c8df006f65828c40a29e9de90bb686423d7e4401a42fe00e25d",
        [4.267971515655518, 4.2319111824035645, 4.27805757522583, 5.017691135406494]),
    "fg_multikrum": (['--recipe', 'fedgan', '--aggregator', 'multi-krum', '--rounds', '3'],
        "counts d_loss excluded flagged g_loss malicious round selected update_norm weights",
        "7875a4be0c218d0a7a645c655af82e693d88a61e2a94391d0ca87918368163d4",
        "f600e444420df784378f5d9ae2c6518a9cdb87f60f072dce52a21c7bd21bfced",
        [4.273352146148682, 4.198414325714111, 4.261629104614258, 5.095332622528076]),
}


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    return torch.__version__, torch.backends.cpu.get_cpu_capability(), cpu


def sha256_of_state(state):
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@quick
def test_golden_runs_are_bitwise_unchanged():
    import hashlib
    same_machine = machine() == GOLDEN_MACHINE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, (flags, keys, metrics_sha, g_sha, last_loss) in GOLDEN.items():
                out = str(Path(tmp) / name)
                if name.endswith("resume"):  # 2 rounds, then extended to 4 by --resume
                    quiet(fedgan.main, GOLDEN_ARGS + flags + ["--rounds", "2", "--out", out])
                    quiet(fedgan.main, ["--resume", out, "--rounds", "4"])
                else:
                    quiet(fedgan.main, GOLDEN_ARGS + flags + ["--out", out])
                rows = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
                if not same_machine:
                    assert np.allclose(rows[-1]["g_loss"], last_loss, rtol=0.02), (name, rows[-1]["g_loss"])
                    continue
                got = hashlib.sha256(json.dumps([{k: r[k] for k in keys.split()} for r in rows],
                                                sort_keys=True).encode()).hexdigest()
                assert got == metrics_sha, (name, "metrics.jsonl changed", rows[-1])
                assert sha256_of_state(torch.load(Path(out) / "generator.pt")["state_dict"]) == g_sha, name
    finally:
        torch.set_num_threads(threads)
    if not same_machine:
        print(f"    recorded on {GOLDEN_MACHINE}, this is {machine()}: compared losses to 2%, not bits")


def copy_alone(*names, module=None):
    """The named functions/classes exec'd from their source into a namespace holding only torch, nn, F,
    np, math: what a user gets by copying them into a fresh file."""
    import inspect
    import torch.nn as nn
    ns = dict(torch=torch, nn=nn, F=F, np=np, math=math)
    for n in names:
        exec(inspect.getsource(getattr(module or fedgan, n)), ns)
    return ns


FOREST = ("average_path_length", "_as_2d", "IsolationForest")


@quick
def test_every_piece_readme_names_copies_alone():
    import isoforest
    torch.manual_seed(0)
    ns = copy_alone("EqualLinear", "ScaledLeakyReLU", "blur_up", "modulated_conv2d", "demodulation", "StyledConv",
                    "ToRGB", "channels_at", "Generator")
    for up in ("bilinear", "transpose"):
        g = ns["Generator"](16, 1, 2, width=8, up_mode=up)
        assert g(torch.randn(3, g.z_dim), torch.tensor([0, 1, 1])).shape == (3, 1, 16, 16)
    d = copy_alone("Discriminator")["Discriminator"](16, 3, 2, width=8)
    assert d(torch.randn(2, 3, 16, 16), torch.tensor([0, 1])).shape == (2,)
    forest = copy_alone(*FOREST, module=isoforest)["IsolationForest"]
    assert forest(seed=0).fit_predict([0.70, 0.69, 0.71, 0.70, 3.0]).tolist() == [1, 1, 1, 1, -1]
    ns = copy_alone(*FOREST, module=isoforest)
    exec(__import__("inspect").getsource(fedgan.feddetect_paper), ns)
    assert ns["feddetect_paper"]([[0.70, 0.69, 0.71, 0.70, 3.0]], seed=0).tolist() == [0, 0, 0, 0, 1]
    ns = copy_alone("box_mean", "middle", "departures", "center_surround", "departure_energy", "probe_watch")
    R = _renders(6)
    R[:, 1, :, :, 11:15, 11:15] += 0.3
    avg = None
    for rnd in R:
        avg, scores = ns["probe_watch"](avg, ns["departure_energy"](rnd, 32, 4))
    assert (scores > 6).tolist() == [False, True, False, False]
    ns = copy_alone("robust_excess", "cusum", "cusum_threshold", "feddetect_calibrated")
    hist = 0.7 + 0.05 * np.random.default_rng(0).standard_normal((30, 4))
    hist[20:, 2] += 1.0
    assert ns["feddetect_calibrated"](hist).tolist() == [False, False, True, False]
    f, c, w = copy_alone("feddetect_update")["feddetect_update"]([0, 1, 0, 0], [0] * 4, [0.25] * 4, 0.8)
    assert c.tolist() == [0, 1, 0, 0] and np.isclose(w[1], 0.2 / 0.95)
    s = [{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([3.0, 6.0])}, {"a": torch.tensor([2.0, 100.0])}]
    assert torch.allclose(copy_alone("fedavg")["fedavg"](s, [2, 1, 1])["a"], torch.tensor([1.75, 27.5]))
    assert sorted(copy_alone("krum_select")["krum_select"](s, 0, 2)) == [0, 1]  # the far model left out
    ns = copy_alone("trigger_margin", "make_trigger", "apply_trigger", "corners", "patch_and_ring", "trigger_scores",
                    "trigger_figures", "blend_trigger", "flip_labels")
    x = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    trig = ns["make_trigger"](4, 1)
    held = torch.full((8, 1, 32, 32), 60, dtype=torch.uint8)
    assert ns["trigger_figures"](ns["apply_trigger"](held, trig, 1), trig, 1, held)["rate"] == 1.0
    assert ns["blend_trigger"](x, 0.5).float().mean() > 50
    assert ns["flip_labels"](torch.tensor([0, 1]), 2).tolist() == [1, 0]
    assert ns["trigger_figures"](torch.full_like(held, 90), trig, 1, held)["strength"] == 0.0  # brighter: no trigger


DOCS = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]


def _commands(text, program):
    """Every `python PROGRAM ...` command in the fenced code blocks of a markdown text, as argv lists:
    continuation lines joined, comments cut, optional parts ([...]) and alternatives dropped, placeholder
    values in capitals (S, N, PX) read as 1; a command marked '# at commit ABCDEF0' is left out."""
    import shlex
    out = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            if re.search(r"# at commit [0-9a-f]{7}", line):  # made by an earlier fedgan.py, which that commit has
                continue
            line = line.split(" # ")[0].strip()
            m = re.search(rf"python {re.escape(program)}(.*)", line)
            if not m:
                continue
            rest = m.group(1)
            while re.search(r"\[[^\[\]]*\]", rest):
                rest = re.sub(r"\[[^\[\]]*\]", " ", rest)
            argv = [("1" if re.fullmatch(r"[A-Z]{1,3}", w) else w) for w in shlex.split(rest)]
            out.append(argv)
    return out


def test_every_documented_command_parses_and_every_link_exists():
    import eval as ev
    seen = 0
    for doc in DOCS:
        text = doc.read_text()
        for argv in _commands(text, "fedgan.py"):
            try:
                fedgan.parse_flags(argv)
            except SystemExit:
                raise AssertionError(f"{doc.name}: python fedgan.py {' '.join(argv)} no longer parses")
            seen += 1
        for argv in _commands(text, "eval.py"):
            try:
                ev.build_parser().parse_args(argv)
            except SystemExit:
                raise AssertionError(f"{doc.name}: python eval.py {' '.join(argv)} no longer parses")
            seen += 1
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{doc.name} links to {target}, which does not exist"
    assert seen >= 8, seen  # the check found the commands


@quick
def test_every_interval_in_readmes_results_stands_in_docs_results():
    readme, docs = (HERE / "README.md").read_text(), (HERE / "docs" / "results.md").read_text()
    results = readme[readme.index("## Results in brief"):readme.index("## References")]
    intervals = re.findall(r"\[[-+]?[\d,.]+, [-+]?[\d,.]+\]", results)
    assert len(intervals) >= 10, intervals  # the check found the figures
    missing = [iv for iv in intervals if iv not in docs]
    assert not missing, f"README's results quote intervals no table in docs/results.md holds: {missing}"


def test_the_worked_example_in_readme_runs():
    text = (HERE / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def drop_largest" in b)
    ns = dict(vars(fedgan))
    exec(code, ns)
    s = [{"a": torch.tensor([1.0, 0.0])}, {"a": torch.tensor([5.0, 0.0])}, {"a": torch.tensor([2.0, 0.0])}]
    out, kept = ns["drop_largest"](s, [1.0, 1.0, 1.0], {"a": torch.zeros(2)})
    assert torch.allclose(out["a"], torch.tensor([1.5, 0.0])) and kept == [0, 2]  # the largest update left out


@quick
def test_aggregators_take_flower_ndarrays_and_keep_integer_buffers():
    nd = [[np.array([1.0, 2.0], np.float32), np.array([3], np.int64)],
          [np.array([3.0, 6.0], np.float32), np.array([4], np.int64)],
          [np.array([2.0, 100.0], np.float32), np.array([9], np.int64)]]
    avg = fedgan.fedavg(nd, [2, 1, 1])
    assert isinstance(avg, list) and isinstance(avg[0], np.ndarray) and avg[0].dtype == np.float32
    assert np.allclose(avg[0], [1.75, 27.5]) and avg[1].dtype == np.int64 and avg[1].tolist() == [5]  # 4.75 -> 5
    assert fedgan.krum_select(nd, n_malicious=0, n_keep=2) == fedgan.krum_select(
        [{"w": torch.as_tensor(a), "n": torch.as_tensor(b)} for a, b in nd], n_malicious=0, n_keep=2)
    # a state dict's int64 buffer (BatchNorm's num_batches_tracked) is rounded, not truncated
    sd = [{"n": torch.tensor(3)}, {"n": torch.tensor(4)}]
    assert fedgan.fedavg(sd, [0.3, 0.7])["n"].item() == 4 and fedgan.fedavg(sd, [0.3, 0.7])["n"].dtype == torch.int64


def test_defense_parts_compose_and_contradictions_are_refused():
    cfg = fedgan.parse_args(["--defense", "feddetect", "--aggregator", "multi-krum", "--out", "x"])
    assert (cfg.augment, cfg.detector, cfg.aggregator, cfg.posthoc) == ("none", "paper", "multi-krum", "none")
    cfg = fedgan.parse_args(["--defense", "feddetect", "--detect-rule", "calibrated", "--out", "x"])  # old name
    assert cfg.detector == "calibrated" and cfg.aggregator == "fedavg"
    assert fedgan.parse_args(["--defense", "rotate", "--out", "x"]).augment == "rotate"
    assert fedgan.parse_args(["--out", "x"]).aggregator == "fedavg"
    with tempfile.TemporaryDirectory() as tmp:
        _fails_cleanly(["--defense", "multi-krum", "--aggregator", "fedavg", "--out", tmp + "/a"], "drop one")
        _fails_cleanly(["--defense", "feddetect", "--detector", "none", "--out", tmp + "/a"], "drop one")
        _fails_cleanly(["--round", "3", "--out", tmp + "/a"], "unrecognized")  # no prefix guessing
        run = quiet(fedgan.train, tiny_cfg(Path(tmp) / "r", "--poison", "4", "--malicious-ids", "1", "--rounds", "4",
                                           "--local-steps", "2", "--warmup", "0", "--defense", "feddetect",
                                           "--aggregator", "multi-krum"))
        recs = [json.loads(ln) for ln in (Path(tmp) / "r" / "metrics.jsonl").read_text().splitlines()]
        assert all(sum(r["selected"]) == 3 for r in recs) and "fpr_after_warmup" in run.summary
    # the choices in --aggregator and --detector are exactly the rules that exist
    for name in next(f for f in fields(fedgan.Config) if f.name == "aggregator").metadata["choices"]:
        fedgan.aggregator(name)
    assert next(f for f in fields(fedgan.Config) if f.name == "detector").metadata["choices"]() == \
        list(fedgan.DETECTORS)


def test_resume_extends_a_finished_run_and_refuses_experiment_flags():
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--local-steps", "2", "--poison", "4", "--defense", "reconstruct", "--reconstruct-epochs", "1",
                "--reconstruct-per-class", "8"]
        straight = quiet(fedgan.train, tiny_cfg(Path(tmp) / "six", *args, "--rounds", "6"))
        quiet(fedgan.train, tiny_cfg(Path(tmp) / "three", *args, "--rounds", "3"))
        folder = str(Path(tmp) / "three")
        _fails_cleanly(["--resume", folder, "--seed", "5"], "--seed cannot change")
        _fails_cleanly(["--resume", folder, "--defense", "multi-krum"], "--defense cannot change")
        _fails_cleanly(["--resume", folder, "--rounds", "2"], "shorten")
        summary = (Path(folder) / "summary.json").read_text()
        quiet(fedgan.main, ["--resume", folder])  # finished, nothing to extend: nothing rewritten
        assert (Path(folder) / "summary.json").read_text() == summary
        extended = quiet(fedgan.main, ["--resume", folder, "--rounds", "6", "--sample-every", "2"])
        for k, v in straight.g.state_dict().items():  # the post-hoc step ran once more, on the 6-round model
            assert torch.equal(v, extended.g.state_dict()[k]), k
        assert _metrics(Path(tmp) / "six") == _metrics(folder)
        assert json.loads((Path(folder) / "config.json").read_text())["rounds"] == 6
        assert json.loads((Path(folder) / "summary.json").read_text())["rounds"] == 6


def test_resume_after_sigkill_matches_an_uninterrupted_run():
    import signal
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args = TINY + ["--rounds", "6", "--local-steps", "4", "--poison", "4", "--defense", "feddetect",
                       "--warmup", "1", "--ckpt-every", "1"]
        _run_cli(args + ["--out", str(tmp / "full")])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.Popen([sys.executable, str(HERE / "fedgan.py")] + args + ["--out", str(tmp / "cut")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE)
        deadline = time.time() + 300
        while not (tmp / "cut" / "checkpoint.pt").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere inside a later round
        p.send_signal(signal.SIGKILL)
        p.wait()
        done = torch.load(tmp / "cut" / "checkpoint.pt", weights_only=True)["round"]
        print(f"    killed after checkpoint of round {done} of 6")
        _run_cli(["--resume", str(tmp / "cut")])
        a = torch.load(tmp / "full" / "generator.pt")["state_dict"]
        b = torch.load(tmp / "cut" / "generator.pt")["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert _metrics(tmp / "full") == _metrics(tmp / "cut")


def test_checkpoints_are_one_file_per_client_atomic_as_a_set_and_sized_before_round_1():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r"
        quiet(fedgan.main, TINY + ["--rounds", "3", "--local-steps", "1", "--ckpt-every", "1", "--out", str(out)])
        ck = torch.load(out / "checkpoint.pt", weights_only=True)
        sets = list(out.glob("clients.*"))
        assert sets == [out / ck["clients"]] and len(list(sets[0].glob("*.pt"))) == 4  # the old sets are gone
        state = torch.load(sets[0] / "00002.pt", weights_only=True)
        assert set(state) == {"d", "opt_d", "opt_g", "scaler", "rng"}
        # the estimate checked before round 1 is what one set takes on disk, to 5%
        run = quiet(fedgan.train, tiny_cfg(Path(tmp) / "s", "--rounds", "1", "--local-steps", "1"))
        on_disk = sum(f.stat().st_size for f in (Path(tmp) / "s").glob("clients.*/*.pt")) + \
            sum(t.numel() * 4 for t in run.g.state_dict().values() if t.is_floating_point())
        est = fedgan.checkpoint_bytes(run.g, run.fed.clients[0].d, 4)
        assert abs(est - on_disk) < 0.05 * on_disk, (est, on_disk)
        # a write that fails half-way through the clients leaves the last complete set and no stray folder
        real, calls = torch.save, []

        def full(obj, path, *a, **kw):
            calls.append(path)
            if str(path).endswith("00002.pt"):
                raise OSError(28, "No space left on device")
            return real(obj, path, *a, **kw)
        fedgan.torch.save = full
        try:
            _fails_cleanly(["--resume", str(out), "--rounds", "4"], "No space left on device")
        finally:
            fedgan.torch.save = real
        assert list(out.glob("clients.*")) == sets and torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 3
        quiet(fedgan.main, ["--resume", str(out), "--rounds", "4"])  # and the run goes on from it
        # too little disk: refused before round 1, with the numbers
        real_usage = fedgan.shutil.disk_usage
        fedgan.shutil.disk_usage = lambda p: real_usage(p)._replace(free=1000)
        try:
            _fails_cleanly(TINY + ["--rounds", "1", "--out", str(Path(tmp) / "t")], "checkpoints need")
        finally:
            fedgan.shutil.disk_usage = real_usage


def test_offloaded_clients_live_in_pageable_host_memory():
    with tempfile.TemporaryDirectory() as tmp:
        run = quiet(fedgan.train, tiny_cfg(Path(tmp) / "r", "--rounds", "1", "--local-steps", "1", "--offload", "on"))
        c = run.fed.clients[0]
        moments = [v for o in (c.opt_g, c.opt_d) for st in o.state.values() for k, v in st.items() if k != "step"]
        assert moments and all(v.device.type == "cpu" for v in moments)
        if torch.cuda.is_available():  # pinning needs a CUDA driver to ask
            assert not any(v.is_pinned() for v in moments)


def test_checkpoint_loads_weights_only_and_refuses_a_pickle():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r"
        quiet(fedgan.train, tiny_cfg(out, "--rounds", "1", "--local-steps", "1"))
        ck = torch.load(out / "checkpoint.pt", weights_only=True)  # plain values and tensors only
        assert ck["round"] == 1 and set(ck["rng"]) >= {"torch", "python", "numpy"}
        import argparse
        torch.save(dict(ck, round=0, extra=argparse.Namespace(x=1)), out / "checkpoint.pt")  # code could hide here
        _fails_cleanly(["--resume", str(out), "--rounds", "2"], "cannot read")


def test_eval_numbers_do_not_depend_on_which_runs_came_before():
    import eval as ev
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, seed in (("A", "0"), ("B", "1")):
            quiet(fedgan.train, tiny_cfg(tmp / name, "--rounds", "1", "--local-steps", "2", "--seed", seed))
        common = ["--metrics", "fid", "--n-synth", "16", "--fid-epochs", "1"]
        quiet(ev.main, [str(tmp / "A"), str(tmp / "B"), "--out", str(tmp / "ab")] + common)
        quiet(ev.main, [str(tmp / "B"), str(tmp / "A"), "--out", str(tmp / "ba")] + common)
        ab, ba = (json.loads((tmp / o / "results.json").read_text())["runs"] for o in ("ab", "ba"))
        assert ab["A"] == ba["A"] and ab["B"] == ba["B"], (ab, ba)
    g = fedgan.Generator(16, 1, 2, width=8)
    y = torch.tensor([0, 1, 1])
    first = fedgan.generate(g, y, seed=3)
    torch.randn(100)  # the global stream moves; generate does not care
    assert torch.equal(first, fedgan.generate(g, y, seed=3)) and not torch.equal(first, fedgan.generate(g, y, seed=4))


@quick
def test_bench_times_the_detector_warm():
    real = fedgan.loss_rule

    def cold_first(name, fpr=0.001):  # a rule whose first call pays a one-off cost, as the calibrated one does
        calls = []

        def rule(history, seed):
            if not calls:
                time.sleep(0.5)
            calls.append(1)
            return np.zeros(np.asarray(history).shape[1], bool)
        return rule
    fedgan.loss_rule = cold_first
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fedgan.main(["--bench", "--img-size", "16", "--width", "8", "--batch", "8", "--bench-steps", "1",
                         "--detector", "calibrated"])
    finally:
        fedgan.loss_rule = real
    res = json.loads(out.getvalue().strip().splitlines()[-1])
    assert res["detect_ms"] < 50, res["detect_ms"]  # the 500 ms first call is not in the figure


# ---------------------------------------------------------------------------------------------


def main():
    args = sys.argv[1:]
    only_quick = "--quick" in args
    patterns = [a for a in args if a != "--quick"]
    if len(patterns) > 1 or any(a.startswith("-") for a in patterns):
        sys.exit(f"usage: python test_fedgan.py [--quick] [PATTERN] (got {' '.join(args)})")
    pattern = patterns[0] if patterns else ""  # a regular expression over test names
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f) and re.search(pattern, n)
             and (not only_quick or n in QUICK)]
    if not tests:
        print(f"no test matches {pattern!r}{' among the --quick ones' if only_quick else ''}; "
              "see the test names with: grep '^def test_' test_fedgan.py", file=sys.stderr)
        sys.exit(2)
    passed = failed = skipped = 0
    t_all = time.time()
    for name, fn in tests:
        t = time.time()
        try:
            fn()
        except Skip as e:
            skipped += 1
            print(f"SKIP {name}: {e}")
            continue
        except Exception:
            failed += 1
            print(f"FAIL {name} ({time.time() - t:.1f}s)")
            traceback.print_exc()
            continue
        passed += 1
        print(f"ok   {name} ({time.time() - t:.1f}s)", flush=True)
    print(f"({time.time() - t_all:.0f}s)")
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
