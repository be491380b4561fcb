#!/bin/bash
# Shrinks fuzz/corpus/TARGET to at most LIMIT files (default 200) after
# `cargo fuzz cmin`: keeps the hand-written seeds (files not named by a
# 40-hex hash), then greedily the files that cover the most edges not yet
# covered. Needs the target built: `cargo fuzz build -s none TARGET`.
# Usage: fuzz/shrink-corpus.sh TARGET [LIMIT]
set -euo pipefail
t=$1
limit=${2:-200}
cd "$(dirname "$0")"
bin=target/x86_64-unknown-linux-gnu/release/$t
w=$(mktemp -d)
mkdir -p "$w/in" "$w/out"
cp corpus/"$t"/* "$w/in/"
# A merge run records each file's coverage in the control file.
nice "$bin" -merge=1 -merge_control_file="$w/cf" -use_counters=0 "$w/out" "$w/in" >"$w/merge.log" 2>&1
python3 shrink_corpus.py "$w/cf" "$limit" "$w/list"
rm -rf corpus/"$t"
mkdir corpus/"$t"
while read -r f; do [ -n "$f" ] && cp "$f" corpus/"$t"/; done <"$w/list"
rm -rf "$w"
echo "corpus/$t: $(ls corpus/"$t" | wc -l) files, $(cat corpus/"$t"/* | wc -c) bytes"
