#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on the GPU machine, saved in bench/.wheels (ignored by git;
# the device call carries the folder). That machine has PyTorch, transformers, tokenizers,
# safetensors, numpy, pyarrow, fsspec, PyYAML and pytest, but no pydantic or polars, and no network.
# gpu_check.py needs only pydantic (config, models): the scoring engine needs no polars.
#
#   bash bench/gpu_wheels.sh               # pydantic and its needs
#
# Versions are those of this checkout's .venv, so the GPU run imports what CI tests. Wheels are
# for the GPU machine's Python (GPU_PYTHON_VERSION, default 3.12: KINDS.md's python3 3.12.3),
# x86-64 manylinux. They travel compressed: gpu_check.py unpacks them there, into a temporary
# folder, and puts it first on sys.path, so nothing unpacked ever lies in the carried folder.
# typing_extensions is carried too: pydantic 2.14 needs >= 4.16, newer than the GPU image may hold.
# The device call's limit is 64 MiB for the working tree and the carried paths together.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
DEST=bench/.wheels
LIMIT_BYTES=$((64 * 1024 * 1024))

if [ $# -gt 0 ]; then
    echo "gpu_wheels.sh: unknown argument '$1' (expected none)" >&2
    exit 2
fi

version_of() {
    "$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"
}

download() {
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$GPU_PYTHON_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$DEST" "$@"
}

# Bytes that travel without the wheels: tracked files and untracked files git does not ignore.
tree_bytes() {
    { git ls-files -z --cached; git ls-files -z --others --exclude-standard; } \
        | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

rm -rf "$DEST"
mkdir -p "$DEST"
pins=()
for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions; do
    pins+=("$name==$(version_of "$name")")
done
download "${pins[@]}"

wheels_bytes=$(du -sb "$DEST" | cut -f1)
total=$(($(tree_bytes) + wheels_bytes))
ls -1 "$DEST"
echo "wheels $((wheels_bytes / 1024)) KiB; with the working tree $((total / 1048576)) MiB of the call's 64 MiB"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "gpu_wheels.sh: over the 64 MiB limit" >&2
    exit 1
fi
