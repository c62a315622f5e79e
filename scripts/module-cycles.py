#!/usr/bin/env python3
"""Module dependencies of src/, read from `use crate::…`, `crate::…` paths and `super::…` paths.

    scripts/module-cycles.py            # prints cycles between top-level modules and between
                                        # the files of each module; exit 1 if there is one

A file's dependencies are the crate modules (and, inside its own module, the sibling files) it
names anywhere in its code, tests included. Comments and strings are ignored.
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
TOP = sorted(p.stem if p.is_file() else p.name for p in SRC.iterdir() if p.name not in ("lib.rs", "main.rs"))


def code(text):
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


def deps():
    top, inner = {}, {}
    for f in sorted(SRC.rglob("*.rs")):
        rel = f.relative_to(SRC)
        if rel.name in ("lib.rs", "main.rs"):
            continue
        mod = rel.parts[0].removesuffix(".rs")
        text = code(f.read_text())
        used = set(re.findall(r"crate::(\w+)", text)) & set(TOP)
        # `use crate::{a, b::c}` groups
        for group in re.findall(r"crate::\{([^}]*)\}", text):
            used |= {g.strip().split("::")[0] for g in group.split(",")} & set(TOP)
        used.discard(mod)
        top.setdefault(mod, set()).update(used)
        if len(rel.parts) == 2:
            me = rel.stem
            sib = set(re.findall(r"super::(\w+)", text)) | {
                m for g in re.findall(r"super::\{([^}]*)\}", text) for m in [x.strip().split("::")[0] for x in g.split(",")]
            }
            sib |= {m for m in re.findall(rf"crate::{mod}::(\w+)", text)}
            siblings = {p.stem for p in (SRC / mod).glob("*.rs")} - {"mod", me}
            inner.setdefault(mod, {})[me] = sib & siblings
    return top, inner


def cycles(graph):
    found, state = [], {}

    def visit(n, path):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(path[path.index(m):] + [m])
            elif m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def main():
    top, inner = deps()
    bad = False
    print("top-level modules:")
    for m in sorted(top):
        print(f"  {m:8} -> {', '.join(sorted(top[m])) or '-'}")
    for c in cycles(top):
        bad = True
        print("cycle between modules: " + " -> ".join(c))
    for mod, g in sorted(inner.items()):
        for c in cycles(g):
            bad = True
            print(f"cycle inside {mod}/: " + " -> ".join(c))
    print("no cycles" if not bad else "cycles found")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
