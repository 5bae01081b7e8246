#!/usr/bin/env bash
# The prepared GPU run (issue 15), in parts: each part is one device call of under 10 minutes, the most
# valuable numbers first; every step writes its log and JSON under $OUT as it finishes, so a part cut short
# by its time limit still returns the steps before. docs/benchmarks.md, "The prepared GPU run", says how
# to send it (after ../shared/device/prepare.sh has staged vLLM) and what each part measures.
#
#   bash scripts/gpu_run.sh PART [--cpu]
#     1: tests/gpu; bench stats (one layer's statistics per policy at 8k, torch vs Triton, next to the
#        attention; meda's sampled entropies vs meda-exact; h2o-s4: scores from every 4th row); then
#        bench perf on the LLaVA-1.5-7B shape (8 images, 8k prompts × 48, ρ 0.2): vanilla, the ideal,
#        snapkv, meda
#     2: the same workload for lookm, hae, pyramidkv (vanilla and the ideal again: ratios within one run),
#        then the Qwen2-7B GQA shape (text, 8k × 48) for snapkv and meda
#     3: decode-heavy (vanilla vs h2o, streamingllm, hae's recycle bin; 1k prompts, 4k outputs, dummy
#        weights), then profile-decode (batch-1 ms/token + cProfile; TTFT alone + torch.profiler) of
#        vanilla, snapkv and meda at 8k, then snapkv with one KV-cache group (what 32 groups cost it)
#   --cpu: the rehearsal on this machine: the same steps at tiny dimensions (minutes, not hours).
set -uo pipefail
part="${1:?usage: bash scripts/gpu_run.sh 1|2|3 [--cpu]}"
mode="${2:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/out/gpu_run}"
mkdir -p "$OUT"

if [ "$mode" = "--cpu" ]; then
  py=(.venv/bin/python)
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
  perf=(--scale tiny --ctx 512 --requests 4 --out 8 --images 2)
  gqa=(--scale tiny --ctx 512 --requests 4 --out 8)
  decode=(--prompt 128 --out 96 --requests 2 --interval 16)
  profile=(--scale tiny --ctx 512 --steps 8)
  stats=(--device cpu --kernels torch --tokens 1024 --heads 4 --kv-heads 2 --head-dim 32 --images 2
         --image-tokens 128 --repeats 2)
  tests=(tests/gpu)  # they skip without CUDA: the rehearsal checks the command, not the kernels
  limit=600
else
  # The GPU machine: vLLM staged into /tmp/site by ../shared/device/install.sh, this tree on PYTHONPATH.
  bash scripts/gpu_plugin_dist_info.sh /tmp/site
  export PYTHONPATH="/tmp/site:$root" VLLM_USE_FLASHINFER_SAMPLER=0
  py=(python3)
  perf=(--arch llama2-7b-mha --ctx 8192 --requests 48 --out 128 --images 8)
  gqa=(--arch qwen2-7b-gqa --ctx 8192 --requests 48 --out 128)
  decode=(--dtype bfloat16 --prompt 1024 --out 4096 --requests 32 --interval 64 --graphs --load-format dummy)
  profile=(--arch llama2-7b-mha --ctx 8192 --steps 64)
  stats=(--device cuda --kernels torch,triton --repeats 5)  # 8k tokens, 32 heads × 128, 8 × 576 image tokens
  tests=(tests/gpu)
  limit=560
fi
bench=("${py[@]}" -m vllm_kvmm.cli bench)
# Outside $OUT: a device call brings back at most 8 files, so only logs, JSON and one archive go there.
models="${KVMM_MODELS:-/tmp/kvmm_bench_models}"
started=$(date +%s)

# Files back per part (at most 8; part 1 has exactly 8): summary.txt and each step's .log and .json
# (+ perf's .png, the tests' .xml, the profile's .tgz).
# One step: its own log, bounded by what is left of the part's time, never stopping the steps after it.
step() {
  local name="$1"; shift
  local left=$(( limit - ($(date +%s) - started) ))
  if [ "$left" -lt 30 ]; then echo "[gpu_run] $name: skipped, ${left}s left" | tee -a "$OUT/summary.txt"; return; fi
  echo "[gpu_run] $name (at most ${left}s): $*" | tee -a "$OUT/summary.txt"
  timeout --kill-after=10 "$left" "$@" > "$OUT/$name.log" 2>&1
  echo "[gpu_run] $name: exit $? after $(( $(date +%s) - started ))s" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.log"
}

case "$part" in
  1)
    step gpu_tests "${py[@]}" -m pytest -q "${tests[@]}" --junitxml="$OUT/gpu_tests.xml"
    step stats "${bench[@]}" stats "${stats[@]}" --policies snapkv,meda,meda-exact,lookm,h2o,h2o-s4,hae \
      --out "$OUT/stats.json"
    step perf_llava_a "${bench[@]}" perf "${perf[@]}" --budget 0.2 --policies snapkv,meda \
      --model-root "$models" --json "$OUT/perf_llava_a.json"
    ;;
  2)
    step perf_llava_b "${bench[@]}" perf "${perf[@]}" --budget 0.2 --policies lookm,hae,pyramidkv \
      --model-root "$models" --json "$OUT/perf_llava_b.json"
    step perf_qwen2_gqa "${bench[@]}" perf "${gqa[@]}" --budget 0.2 --policies snapkv,meda \
      --model-root "$models" --json "$OUT/perf_qwen2_gqa.json"
    ;;
  3)
    # Decode-heavy on a dummy-weight Llama-2-7B folder (GPU) or SmolLM2 (CPU rehearsal).
    model=()
    if [ "$mode" != "--cpu" ]; then
      dest=$("${py[@]}" -c "from vllm_kvmm.bench.archs import write_model; print(write_model('$models', 'llama2-7b-mha', images=False).path)")
      model=(--model "$dest")
    fi
    step decode "${bench[@]}" decode "${model[@]}" "${decode[@]}" --budget 0.25
    step profile_decode "${bench[@]}" profile-decode "${profile[@]}" --configs vanilla,snapkv,meda,snapkv/1 \
      --budget 0.2 --model-root "$models" --out /tmp/kvmm_profile
    tar -czf "$OUT/profile.tgz" -C /tmp kvmm_profile 2>/dev/null || true
    ;;
  *) echo "unknown part $part (1, 2 or 3)"; exit 2 ;;
esac
echo "[gpu_run] part $part done in $(( $(date +%s) - started ))s; files under $OUT" | tee -a "$OUT/summary.txt"
