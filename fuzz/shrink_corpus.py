"""Picks the files shrink-corpus.sh keeps: a greedy set cover over the
coverage edges in a libFuzzer merge control file. Keeps the seed files
(names that are not 40-hex hashes), then the file adding the most new
edges (smallest first on ties), until LIMIT files or no file adds any.
Usage: shrink_corpus.py CONTROL_FILE LIMIT OUT_LIST"""
import os, re, sys
cf, limit, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = open(cf).read().split("\n")
n = int(lines[0]); files = lines[2:2 + n]
cov = {}; size = {}
for l in lines[2 + n:]:
    p = l.split()
    if not p: continue
    if p[0] == "STARTED": size[int(p[1])] = int(p[2])
    elif p[0] in ("COV", "FT"):
        cov.setdefault(int(p[1]), {}).setdefault(p[0], set()).update(p[2:])
def edges(i): return cov.get(i, {}).get("COV", set())
seed = [i for i, f in enumerate(files) if not re.fullmatch(r"[0-9a-f]{40}", os.path.basename(f))]
chosen = list(seed); covered = set()
for i in seed: covered |= edges(i)
alle = set().union(*[edges(i) for i in cov]) if cov else set()
rest = set(range(n)) - set(seed)
while len(chosen) < limit:
    best = max(rest, key=lambda i: (len(edges(i) - covered), -size.get(i, 0)), default=None)
    if best is None or not (edges(best) - covered): break
    chosen.append(best); covered |= edges(best); rest.discard(best)
print(f"{len(chosen)} files ({len(seed)} seeds), {len(covered)}/{len(alle)} edges", file=sys.stderr)
open(out, "w").write("\n".join(files[i] for i in chosen) + "\n")
