"""The paper-layout table of docs/results.md, section 2 (rows: arms; columns: the three trigger sizes),
from one eval.py results.json of the grid (`GRID=paper QUICK=1 bash train_chestx.sh`): per figure, each
arm's mean [95% interval] over seeds and its paired differences from vanilla and from the attack at the
same trigger size, Holm over every difference of the table; the attacker's final share per seed.
usage: python docs/paper_table.py RUNS/eval_all/results.json [_r20]"""
import json, sys
r = json.load(open(sys.argv[1]))
suf = sys.argv[2] if len(sys.argv) > 2 else ""          # "" (100 rounds) or "_r20"
S, D, runs = r["summary"], r["differences"], r["runs"]
SIZES = [(16, 2), (32, 4), (64, 8)]                     # trigger at 256 px -> px at 32 px
ROWS = [("vanilla", "vanilla"), ("attack", "attack{}"), ("FedDetect", "feddetect{}"), ("reconstruction", "reconstruct{}"),
        ("flip", "flip{}"), ("rotation", "rotate{}"), ("probe detector", "probe{}"), ("multi-Krum", "multikrum{}")]
def figs(px):
    return [("deep FID (class mean)", "deep FID (class mean)"), ("trigger strength", f"trigger strength ({px} px)"),
            ("trigger rate", f"trigger rate ({px} px)")]
def arm(tmpl, size):
    return (tmpl.format(size) if "{}" in tmpl else tmpl) + suf
tests = []
for size, px in SIZES:
    for label, m in figs(px):
        for name, tmpl in ROWS[1:]:
            a = arm(tmpl, size)
            for b in ("vanilla", f"attack{size}"):
                if a == b + suf or (b.startswith("attack") and name == "attack"):
                    continue
                iv = D.get(b, {}).get(m, {}).get(a)
                if iv and iv.get("p") is not None:
                    tests.append((iv["p"], (b, m, a)))
tests.sort()
kept, k = set(), len(tests)
for i, (p, key) in enumerate(tests):
    if p > 0.05 / (k - i):
        break
    kept.add(key)
def f(v, m):
    if v is None: return "n/a"
    return f"{round(v, -1):,.0f}" if "FID" in m else f"{v:.3f}"
def sgn(v, m):
    s = f(v, m)
    return s if s.startswith("-") or s == "n/a" else "+" + s
def cell(iv, m):
    if not iv or iv.get("mean") is None: return "-"
    return f"{f(iv['mean'], m)} [{f(iv['lo'], m)}, {f(iv['hi'], m)}]"
def diff(iv, m, key):
    if not iv or iv.get("mean") is None: return None
    s = f"{sgn(iv['mean'], m)} [{sgn(iv['lo'], m)}, {sgn(iv['hi'], m)}]"
    if key in kept: return s + " **kept**"
    if iv["lo"] <= 0 <= iv["hi"]: return s + f" (\\|d\\| > {f(max(-iv['lo'], iv['hi']), m)} excluded)"
    return s + " (raw only)"
print(f"Holm over the table's {k} paired differences (every arm against vanilla and against the attack with "
      f"the same trigger, three figures, three sizes); **kept** = kept at 5%.\n")
for label, _ in figs(8):
    noise = r["reference_noise"]["sd"]["deep FID (class mean)"]
    print(f"*{label}*" + (f" (lower is better; rounded to 10, the reference noise is {noise:.0f})" if "FID" in label else
                          " (0 = as real images, 1 = pasted on every image)" if "strength" in label else
                          " (share of generated images past real images' 99th percentile at the trigger)") + ":\n")
    print("| arm | " + " | ".join(f"{px} px trigger ({s} at 256)" for s, px in SIZES) + " |")
    print("|---|---|---|---|")
    for name, tmpl in ROWS:
        row = [name]
        for size, px in SIZES:
            m = dict(figs(px))[label]
            a = arm(tmpl, size)
            if a not in S.get(m, {}):
                row.append(""); continue
            parts = [cell(S[m][a], m)]
            for b, word in (("vanilla", "vs vanilla"), (f"attack{size}", "vs attack")):
                if name in ("vanilla",) or (name == "attack" and word == "vs attack"):
                    continue
                d = diff(D.get(b, {}).get(m, {}).get(a), m, (b, m, a))
                if d: parts.append(f"{word} {d}")
            row.append("<br>".join(parts))
        print("| " + " | ".join(row) + " |")
    print()
print("*attacker's final share of the aggregate* (its weight, or under multi-Krum its part of what was kept; mean (per seed)):\n")
print("| arm | " + " | ".join(f"{px} px" for s, px in SIZES) + " |")
print("|---|---|---|---|")
for name, tmpl in ROWS[1:]:
    row = [name]
    for size, px in SIZES:
        seeds = sorted(k for k in runs if k.rsplit("_s", 1)[0] == arm(tmpl, size))
        if not seeds:
            row.append(""); continue
        fin = [runs[k]["detection"]["attacker_final_weight"] for k in seeds]  # eval's: under Krum, what it kept
        row.append(f"{sum(fin) / len(fin):.3f} (" + ", ".join(f"{v:.2f}" for v in fin) + ")")
    print("| " + " | ".join(row) + " |")
print()
print("Per seed (deep FID / trigger strength / trigger rate), seeds in order:\n")
for size, px in SIZES:
    for name, tmpl in ROWS:
        a = arm(tmpl, size)
        if name == "vanilla" and size != 64: continue
        vals = []
        for s in range(5):
            rr = runs.get(f"{tmpl.format(size) if '{}' in tmpl else tmpl}{suf}_s{s}")
            if not rr: continue
            t = rr["trigger"].get(str(px)) or {}
            vals.append(f"{rr['deep']['fid']['class mean']:,.0f} / {t.get('strength', float('nan')):.2f} / "
                        + ("n/a" if t.get("rate") is None else f"{t['rate']:.2f}"))
        if vals:
            print(f"- {px} px, {name}: " + "; ".join(vals))
