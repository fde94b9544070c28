#!/usr/bin/env bash
# Here, before a GPU session (no GPU needed): download the wheels the GPU machine lacks and cut them into
# pieces that each fit one `run` call next to the working tree: .gpu/p1, .gpu/p2, ... (/.gpu/ is in .gitignore).
# README.md beside this file says which call carries which piece.
#
#   bash benchmarks/gpu_check/prepare.sh            # both sets: core (pieces first), then faiss
#   bash benchmarks/gpu_check/prepare.sh core       # only what ORT CUDA, the server and training need
#
# core:  onnxruntime-gpu (CUDA 13 build), open_clip_torch, ftfy + wcwidth, webdataset + braceexpand (training
#        imports them), grpcio + health + reflection and protobuf at the versions our generated stubs require,
#        faiss-cpu (the server imports faiss; the faiss-gpu build stays out of the server's process).
# faiss: faiss-gpu (a CUDA 12 build) with the two CUDA 12 libraries it links: cuBLAS and the runtime. Not cuRAND:
#        nothing in faiss-gpu 1.15.1 links or loads it (checked with readelf and strings), which saves 68 MB.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

CORE=(onnxruntime-gpu==1.31.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2
      braceexpand==0.1.7 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
      faiss-cpu==1.15.1)
FAISS=(faiss-gpu==1.15.1 nvidia-cublas-cu12==12.9.3.13 nvidia-cuda-runtime-cu12==12.9.79)
GROUPS_WANTED=${1:-core faiss}
# The GPU machine: Python 3.12 on x86-64 (DEVICE.md). pip matches each manylinux tag exactly, hence the list.
PLATFORM=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
DOWNLOADS=${GPU_CHECK_DOWNLOADS:-/tmp/gpu_check_wheels}

# A call carries at most 64 MiB, the working tree included (tracked files and untracked ones git does not
# ignore): a piece is what is left, less 2 MiB of slack for files that appear before the calls.
tree_bytes=$(git ls-files -z -c -o --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
piece=$(( 64 * 1024 * 1024 - tree_bytes - 2 * 1024 * 1024 ))
if (( piece < 8 * 1024 * 1024 )); then
    echo "error: the working tree is $(( tree_bytes / 1048576 )) MiB; too little of a call's 64 MiB is left for pieces" >&2
    exit 1
fi

rm -rf .gpu "$DOWNLOADS" && mkdir -p .gpu
n=0
for group in $GROUPS_WANTED; do
    case $group in
        core) wheels=("${CORE[@]}") ;;
        faiss) wheels=("${FAISS[@]}") ;;
        *) echo "error: unknown set '$group' (core or faiss)" >&2; exit 2 ;;
    esac
    mkdir -p "$DOWNLOADS/$group"
    echo "downloading $group: ${wheels[*]}"
    python3 -m pip download -q --disable-pip-version-check "${PLATFORM[@]}" -d "$DOWNLOADS/$group" "${wheels[@]}"
    (cd "$DOWNLOADS/$group" && sha256sum -- *.whl > SHA256SUMS && tar -cf - SHA256SUMS -- *.whl) |
        split -b "$piece" -d -a 2 - "$DOWNLOADS/$group.part."
    parts=("$DOWNLOADS/$group.part."*)
    i=0
    for part in "${parts[@]}"; do
        n=$((n + 1)); i=$((i + 1))
        mkdir -p ".gpu/p$n"
        # Named so the machine can tell when a set is complete: core.tar.03-of-07
        mv "$part" ".gpu/p$n/$group.tar.$(printf %02d $i)-of-$(printf %02d ${#parts[@]})"
    done
    echo "$group: $(du -sh "$DOWNLOADS/$group" | cut -f1) in ${#parts[@]} pieces"
done
rm -rf "$DOWNLOADS"
echo
echo "working tree $(( tree_bytes / 1048576 )) MiB, pieces of $(( piece / 1048576 )) MiB: .gpu/p1 .. .gpu/p$n"
for d in .gpu/p*; do echo "  $d: $(ls "$d")"; done | sort -V
echo "Next: the calls in benchmarks/gpu_check/README.md, one piece each, back to back (the machine keeps /tmp"
echo "only while it is warm, about 30 s after a call)."
