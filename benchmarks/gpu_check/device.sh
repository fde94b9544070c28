#!/usr/bin/env bash
# On the GPU machine, from the repository root (each `run` call lays the working tree anew; /tmp stays while
# the machine is warm). README.md beside this file has the sequence of calls.
#
#   bash benchmarks/gpu_check/device.sh probe          GPU, Python, the packages that matter, pieces held
#   bash benchmarks/gpu_check/device.sh stash          keep the pieces this call carried (.gpu/pN) in /tmp;
#                                                      a set whose last piece arrives is installed at once
#   bash benchmarks/gpu_check/device.sh run [ARGS]     stash, install, then run.py ARGS (JSON to $OUT)
#
# core installs into /tmp/site (on PYTHONPATH for everything), faiss into /tmp/fsite (only run.py's faiss
# worker puts it on its path, with its CUDA 12 libraries: see faiss_env in run.py).
set -uo pipefail
STATE=/tmp/gpu_check
PARTS=$STATE/parts
mkdir -p "$PARTS"
for f in .gpu/p*/*; do
    [ -f "$f" ] && cp "$f" "$PARTS/"
done

complete() {  # all pieces of set $1 are here
    local first total
    first=$(ls "$PARTS/$1".tar.* 2>/dev/null | head -1)
    [ -n "$first" ] || return 1
    total=${first##*-of-}
    [ "$(ls "$PARTS/$1".tar.*-of-"$total" | wc -l)" -eq "$((10#$total))" ]
}

install_set() {  # set, target folder
    local set=$1 target=$2
    [ -f "$target/.installed" ] && return 0
    if ! complete "$set"; then
        echo "gpu_check: set $set: $(ls "$PARTS/$set".tar.* 2>/dev/null | wc -l) piece(s) here, not complete: not installed"
        return 1
    fi
    local started=$SECONDS
    rm -rf "${STATE:?}/$set" && mkdir -p "$STATE/$set"
    cat "$PARTS/$set".tar.* | tar -x -C "$STATE/$set" || return 1
    (cd "$STATE/$set" && sha256sum -c --quiet SHA256SUMS) || { echo "gpu_check: set $set: checksum mismatch"; return 1; }
    python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$target" "$STATE/$set"/*.whl || return 1
    rm -rf "${STATE:?}/$set" "$PARTS/$set".tar.*
    touch "$target/.installed"
    echo "gpu_check: set $set installed in $target ($((SECONDS - started)) s)"
}

install_complete_sets() {
    complete core && install_set core /tmp/site
    complete faiss && install_set faiss /tmp/fsite
    echo "gpu_check: pieces held: $(ls "$PARTS" | tr '\n' ' ')"
    echo "gpu_check: installed: $(ls /tmp/site/.installed /tmp/fsite/.installed 2>/dev/null | tr '\n' ' ')"
}

case "${1:-stash}" in
    probe)
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
        python3 --version
        python3 -m pip list --disable-pip-version-check 2>/dev/null |
            grep -iE '^(torch|torchvision|onnx|onnxruntime|onnxruntime-gpu|onnxscript|open.clip.torch|timm|faiss.*|grpcio.*|protobuf|numpy|tokenizers|tensorboard|webdataset|ftfy|cryptography) '
        df -h /tmp | tail -1
        install_complete_sets
        ;;
    stash)
        install_complete_sets
        ;;
    run)
        shift
        install_complete_sets
        [ -f /tmp/site/.installed ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        export TANDEM_FAISS_SITE=/tmp/fsite PYTHONUNBUFFERED=1
        python3 benchmarks/gpu_check/run.py --work-dir "$STATE/work" "$@"
        code=$?
        if [ -n "${OUT:-}" ]; then  # worker and server logs (not the models) come back with the JSON
            tar -czf "$OUT/gpu_check_logs.tgz" -C "$STATE/work" --exclude=models --exclude=serve-models \
                --exclude=server-data . 2>/dev/null
        fi
        exit $code
        ;;
    *)
        echo "usage: bash benchmarks/gpu_check/device.sh probe | stash | run [run.py arguments]" >&2
        exit 2
        ;;
esac
