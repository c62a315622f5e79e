#!/usr/bin/env python3
"""The results table of seed groups, from each group's summary.json (and its runs' metrics.csv
for the steps, the top decoder and the wall time); written to OUT and printed. python3 only,
no third-party modules.

    scripts/summary_table.py OUT LABEL=GROUP_DIR ...
    scripts/summary_table.py runs/results/summary.md SimCLR=runs/results/simclr_…/simclr_…-seeds-…
"""
import json, pathlib, sys
if len(sys.argv) < 3 or any("=" not in p for p in sys.argv[2:]):
    sys.exit("usage: scripts/summary_table.py OUT LABEL=GROUP_DIR ...")
out, pairs = sys.argv[1], sys.argv[2:]
rows = ["| method | seeds | steps | linear top-1 | kNN top-1 | online kNN at the end | final loss (top decoder) | train wall time (mean) |",
        "|---|---|---|---|---|---|---|---|"]
def pm(st, scale=100.0, digits=2):
    if not st:
        return "–"
    sd = st.get("std")
    return f'{scale * st["mean"]:.{digits}f} ± {scale * sd:.{digits}f}' if sd is not None else f'{scale * st["mean"]:.{digits}f}'
for p in pairs:
    label, group = p.split("=", 1)
    s = json.loads((pathlib.Path(group) / "summary.json").read_text())
    ev, end = s["eval"], s["at_end"]
    lin = next((v for k, v in ev.items() if k.startswith("linear ")), None)
    knn = next((v for k, v in ev.items() if k.startswith("knn ")), None)
    secs, steps, top = [], None, None
    for r in s["runs"]:
        m = (pathlib.Path(group) / r / "metrics.csv").read_text().strip().splitlines()
        header = m[0].split(",")
        row = dict(zip(header, m[-1].split(",")))
        secs.append(float(row["elapsed_s"]))
        steps = int(row["step"])
        # metrics.csv has one column per loss in graph order: the last is the top decoder's.
        losses = [k for k in header if k in end and k != "knn_top1"]
        top = losses[-1] if losses else None
    rows.append(f'| {label} | {len(s["runs"])} | {steps} | {pm(lin)} | {pm(knn)} | {pm(end.get("knn_top1"))} '
                f'| {pm(end.get(top), 1.0, 3) if top else "–"} ({top}) | {sum(secs) / len(secs) / 60:.1f} min |')
text = "\n".join(rows) + "\n"
pathlib.Path(out).write_text(text)
print(text, end="")
