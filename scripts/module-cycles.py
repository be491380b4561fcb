#!/usr/bin/env python3
"""Lists import circles between the modules of a Rust crate.

Usage: scripts/module-cycles.py CRATE_SRC_DIR   (e.g. client/src)

Each .rs file below the directory (src/bin excepted) is one module: lib.rs
is the crate root, a/mod.rs and a.rs are `a`, a/b.rs is `a::b`. A module
uses another when its code (comments and string literals left out, tests
included) names it: `crate::a::b::Item` (the longest module prefix),
`super::x` and `self::x` relative to the file, and a child module by its
bare name (`watch::run`, `pub use policy::Pick`). A `mod x;` declaration is
not a use. Prints each group of modules that use each other in a circle,
with the edges between them, and exits 1 if there is one.
"""

import os
import re
import sys


def module_of(src, path):
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel == ["lib"] or rel == ["main"]:
        return ()
    if rel[-1] == "mod":
        rel = rel[:-1]
    return tuple(rel)


def strip(code):
    # Comments (line and block) and string literals, so doc links and
    # messages do not count as uses.
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.S)
    code = re.sub(r'r(#*)".*?"\1', '""', code, flags=re.S)
    code = re.sub(r'"(\\.|[^"\\])*"', '""', code, flags=re.S)
    code = re.sub(r"//[^\n]*", "", code)
    code = re.sub(r"'(\\.|[^'\\])'", "' '", code)
    # `pub(in crate::a)` is a visibility, not a use.
    code = re.sub(r"pub\(in [^)]*\)", "pub", code)
    return code


def inline_depths(code):
    """For each offset of `code`, how many inline `mod x { ... }` enclose it."""
    opens = {mt.end() - 1 for mt in re.finditer(r"\bmod\s+\w+\s*\{", code)}
    depths, level, mods, current = [], 0, [], 0
    for i, ch in enumerate(code):
        if ch == "{":
            level += 1
            if i in opens:
                mods.append(level)
                current += 1
        elif ch == "}":
            if mods and mods[-1] == level:
                mods.pop()
                current -= 1
            level -= 1
        depths.append(current)
    return depths


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "src"
    files = {}
    for root, dirs, names in os.walk(src):
        dirs[:] = [d for d in dirs if not (root == src and d == "bin")]
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(root, n)
                files[module_of(src, p)] = strip(open(p, encoding="utf-8").read())
    modules = set(files)

    def longest(path):
        for k in range(len(path), 0, -1):
            if tuple(path[:k]) in modules:
                return tuple(path[:k])
        return None

    uses = {m: set() for m in modules}
    for m, code in files.items():
        for rest in re.findall(r"\bcrate((?:::\w+)+)", code):
            target = longest(rest.strip(":").split("::"))
            if target and target != m:
                uses[m].add(target)
        # `super::` counts from the module it is written in: the file's,
        # or an inline `mod tests { ... }` inside it.
        inline = inline_depths(code)
        for hit in re.finditer(r"\b((?:super::)+)((?:\w+::)*(?:\w+|\*))", code):
            depth = hit.group(1).count("super::") - inline[hit.start()]
            if depth <= 0:
                continue  # the file itself
            base = list(m)[: max(len(m) - depth, 0)]
            target = longest(base + hit.group(2).split("::"))
            if target and target != m:
                uses[m].add(target)
        children = {c[-1] for c in modules if len(c) == len(m) + 1 and c[: len(m)] == m}
        for child in children:
            # `child::` not preceded by `::` (a bare path from the parent),
            # `{child::` in grouped imports included.
            if re.search(r"(?<![:\w])" + child + r"::", code):
                uses[m].add(m + (child,))

    # Strongly connected components (Tarjan).
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in uses[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    name = lambda m: "::".join(m) or "crate"
    circles = [c for c in comps if len(c) > 1]
    for c in circles:
        print("circle:", ", ".join(sorted(name(m) for m in c)))
        for m in sorted(c):
            for w in sorted(uses[m] & set(c)):
                print(f"  {name(m)} -> {name(w)}")
    edges = sum(len(u) for u in uses.values())
    print(f"{len(modules)} modules, {edges} uses, {len(circles)} circles")
    return 1 if circles else 0


if __name__ == "__main__":
    sys.exit(main())
