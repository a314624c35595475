"""The detector comparison of docs/results.md, section 6, from run folders named CASE_sSEED.

replay: runs trained with --shadow (nobody acting): each logged detector's gated flags, and the update-space
  detectors' logged scores at other ratios, replayed through Algorithm 1 offline (no feedback on training).
acting: runs where one detector acted: what it did.
record: train a run (fedgan.py's flags after --) saving every client's generator each round in RUN/states/.
probe: recorded runs' generators replayed through today's probe detector at each --levels, then Algorithm 1.
Per case: attacks -> seeds meeting the bar (first flag within 5 detection rounds and final weight < 0.05) and
per seed "first:weight"; clean -> false alarms per benign client-round / lowest benign final weight.
usage: python docs/detector_table.py replay|acting|probe RUNS_DIR [--seeds 0,1] [--warmup 5] [--recover] [--levels 6]
       python docs/detector_table.py record RUN -- FEDGAN_FLAGS"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fedgan  # noqa: E402
from fedgan import feddetect_update  # noqa: E402

RATIOS = (1.2, 1.3, 1.5, 2.0)


def replayed(flags, mal, decay, recover):
    """Algorithm 1 (its 0 < |O| < N/2 gate too) on a list of (N,) flags -> first attacker flag, attackers' final weight, false
    alarms per benign client-round, lowest benign final weight."""
    c, w, first, alarms = np.zeros(len(mal), int), np.full(len(mal), 1 / len(mal)), None, 0
    for k, f in enumerate(flags, 1):
        f, c, w = feddetect_update(f, c, w, decay, recover)
        first = k if first is None and (f & mal).any() else first
        alarms += int((f & ~mal).sum())
    return first, float(w[mal].sum()), alarms / max(1, len(flags) * int((~mal).sum())), float(w[~mal].min())


def acted(recs, mal, warmup):
    det = [r for r in recs if r["round"] - 1 > warmup]
    first = next((k for k, r in enumerate(det, 1) if np.any(np.asarray(r["flagged"], bool) & mal)), None)
    alarms = sum(int((np.asarray(r["flagged"], bool) & ~mal).sum()) for r in det)
    w = np.asarray(recs[-1]["weights"])
    return first, float(w[mal].sum()), alarms / max(1, len(det) * int((~mal).sum())), float(w[~mal].min())


class Recorder(fedgan.Detector):
    """A detector that flags nobody and saves what the server has each round: every client's generator."""
    whole = True

    def __init__(self, folder):
        self.folder = folder

    def __call__(self, r):
        self.folder.mkdir(exist_ok=True)
        fedgan.atomic_save(dict(states=[{k: v.cpu() for k, v in s.items()} for s in r.states],
                                center={k: v.cpu() for k, v in r.center.items()}, losses=r.losses.tolist()),
                           self.folder / f"r{r.t:03d}.pt")
        return np.zeros(len(r.losses), bool)


def probe_scores(run):
    """A recorded run's generators, round by round, through a fresh probe detector (64 latents per class, its
    default): the scores (N,) of its detection rounds; a level L flags scores above L."""
    import torch
    cfg = fedgan.config_from_json(json.loads((run / "config.json").read_text()), run / "config.json")
    det = fedgan.DETECTORS["probe"](dataclasses.replace(cfg, probe_per_class=64),
                                    fedgan.build_models(2, **fedgan.arch_of(cfg))[0])
    for t, f in enumerate(sorted((run / "states").glob("r*.pt"))):
        ck = torch.load(f, weights_only=True)
        ok = np.ones(cfg.clients, bool)
        det(fedgan.Round(t, np.asarray(ck["losses"]), ok * 1.0, ck["states"], ck["center"], ok, t > cfg.warmup))
    return np.asarray(det.history)[cfg.warmup + 1:]


def main():
    if sys.argv[1:2] == ["record"]:  # record RUN -- FEDGAN_FLAGS
        run, flags = Path(sys.argv[2]), sys.argv[sys.argv.index("--") + 1:]
        fedgan.DETECTORS["record"] = lambda cfg, g: Recorder(run / "states")
        return fedgan.main([*flags, "--out", str(run), "--detector", "record"])
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["replay", "acting", "probe"])
    p.add_argument("runs")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--recover", action="store_true")
    p.add_argument("--levels", default="6")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    table = {}
    for d in sorted(Path(a.runs).glob("*_s*")):
        case, seed = d.name.rsplit("_s", 1)
        if not d.is_dir() or int(seed) not in seeds or not (d / "summary.json").exists():
            continue
        recs = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        mal = np.asarray(recs[-1]["malicious"], bool)
        if a.mode == "acting":
            table.setdefault("acting", {}).setdefault(case, []).append(acted(recs, mal, a.warmup))
            continue
        decay = json.loads((d / "config.json").read_text())["decay"]
        if a.mode == "probe":
            scores = probe_scores(d)
            for q in a.levels.split(","):
                table.setdefault(f"probe detector at {q}", {}).setdefault(case, []).append(
                    replayed(list(scores > float(q)), mal, decay, a.recover))
            continue
        det = [r for r in recs if r["round"] - 1 > a.warmup]
        flags = {name: [np.asarray(r["shadow"][name], bool) for r in det] for name in det[0]["shadow"]
                 if name not in ("flame", "freqfed")}  # these two from their scores, at each ratio
        for key in (k for k in ("flame", "freqfed") if f"{k}_score" in det[0]):  # freqfed: recordings at ee844da
            for q in RATIOS:
                flags[f"{key} at {q}"] = [np.nan_to_num(r[f"{key}_score"]) > q for r in det]
        for name, f in flags.items():
            table.setdefault(name, {}).setdefault(case, []).append(replayed(f, mal, decay, a.recover))
    cases = sorted({c for t in table.values() for c in t}, key=lambda c: ("clean" not in c and "dir" not in c, c))
    print("| detector | " + " | ".join(cases) + " |\n|" + "---|" * (len(cases) + 1))
    for name, t in table.items():
        cells = []
        for case in cases:
            rs = t.get(case, [])
            if rs and "clean" not in case and "dir" not in case:
                met = sum(1 for first, w, _, _ in rs if first is not None and first <= 5 and w < 0.05)
                cells.append(f"{met} of {len(rs)}: " + ", ".join(f"{first or '-'}:{w:.2f}" for first, w, _, _ in rs))
            elif rs:
                cells.append(f"{np.mean([r[2] for r in rs]):.3f} / {min(r[3] for r in rs):.2f}")
            else:
                cells.append("")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
