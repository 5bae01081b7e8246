#!/usr/bin/env bash
# On the GPU machine (no package index): make vLLM find our plugin entry point for the source tree on
# PYTHONPATH, by writing the metadata pip would write. Usage: bash scripts/gpu_plugin_dist_info.sh /tmp/site
set -euo pipefail
d="$1/vllm_kvmm-0.1.0.dist-info"
mkdir -p "$d"
printf 'Metadata-Version: 2.1\nName: vllm-kvmm\nVersion: 0.1.0\n' > "$d/METADATA"
printf '[vllm.general_plugins]\nvllm_kvmm = vllm_kvmm.vllm_ext.plugin:register\n' > "$d/entry_points.txt"
: > "$d/RECORD"
