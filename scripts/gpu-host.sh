#!/usr/bin/env bash
# Steps run on the GPU host (no package index there): see docs/validation/README.md.
#   scripts/gpu-host.sh stash K      copy wheelhouse part K into /tmp/miles-gpu (once per part)
#   scripts/gpu-host.sh install      install the stashed wheels, then this checkout (editable)
#   scripts/gpu-host.sh STEP...      foundation | trainer | engines-<backend> | bench-engines | snapshots |
#                                    leases | ownership | loop | iterations | suite | caps-<backend> | caps-05b-<backend> |
#                                    parity | locate   (logs go to $OUT)
#   scripts/gpu-host.sh te-stash K   copy TransformerEngine kit part K (.te/, ../shared/gpu/build-te.sh) to /tmp/miles-te
#   scripts/gpu-host.sh te-install   build/install TE 2.17.1 into /tmp/miles-te/site, environment in /tmp/miles-te/env.sh
#   scripts/gpu-host.sh te-trainer | te-serve | te-cells | te-cells-0.5b | te-fused   (issue #16; after te-install on the same host)
#   scripts/gpu-host.sh cudnn-stash K, then te-fused-cudnn   (TE fused attention with a carried newer cuDNN)
#   scripts/gpu-host.sh served-weights | served-weights-fp8, then served-weights-wait | served-weights-fp8-inline   (issue #16)
#   [PYTEST_MILES_MODEL=DIR] scripts/gpu-host.sh te-cells-model   (issue #16: the matrix on an HF dir via --miles-model)
set -uo pipefail
cd "$(dirname "$0")/.."
STASH=/tmp/miles-gpu
OUT=${OUT:-/tmp/miles-out}
mkdir -p "$OUT"
export PYTHONPATH=$STASH/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=python3

if [ "${1:-}" = stash ]; then
  bash ".gpu-wheels/part-$2/install-wheelhouse.sh" "$STASH" ".gpu-wheels/part-$2"; exit $?
fi
if [ "${1:-}" = install ]; then
  part=$(ls -d .gpu-wheels/part-* | head -n1)
  bash "$part/install-wheelhouse.sh" "$STASH" || exit 1
  # The wheelhouse installs with --no-compile; pip installs byte-compile, so a CI runner's first SGLang start
  # finds the bytecode. Compiled here (all cores, a few seconds) so that a cold suite measures kernel caches,
  # not five server processes compiling sglang's sources side by side at their first import.
  $PY -m compileall -q -j 0 "$STASH/site" > /dev/null 2>&1 || echo "compileall: some files did not compile (kept as sources)"
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 3
  $PY -c "import sglang, megatron.core, pytest_miles; print('sglang', sglang.__version__, 'megatron-core', megatron.core.__version__)"
  exit $?
fi
TE_STASH=/tmp/miles-te
if [ "${1:-}" = te-stash ]; then
  bash ".te/part-$2/install-te.sh" "$TE_STASH" ".te/part-$2"; exit $?
fi
if [ "${1:-}" = te-install ]; then
  [ -e "$TE_STASH/files/install-te.sh" ] || { echo "nothing stashed in $TE_STASH: run te-stash 1..5 first"; exit 1; }
  bash "$TE_STASH/files/install-te.sh" "$TE_STASH" > "$TE_STASH/install.log" 2>&1; rc=$?
  tail -n 5 "$TE_STASH/install.log"; [ $rc = 0 ] || exit $rc
  grep '^export ' "$TE_STASH/install.log" > "$TE_STASH/env.sh"
  . "$TE_STASH/env.sh"
  $PY -c "import torch, transformer_engine.pytorch, transformer_engine as te, megatron.core as m; print('te', te.__version__, 'megatron-core', m.__version__, 'cudnn', torch.backends.cudnn.version())"
  exit $?
fi
# A step's limit: 580 s fits one device call; gpu-validate.sh's detached tracks raise it (MILES_STEP_TIMEOUT).
STEP_TIMEOUT=${MILES_STEP_TIMEOUT:-580}
CUDNN_STASH=/tmp/miles-cudnn  # a newer nvidia-cudnn-cu13 wheel, carried in parts (.cudnn/part-K, split -b 60M)
if [ "${1:-}" = cudnn-stash ]; then
  mkdir -p "$CUDNN_STASH/parts" && cp .cudnn/part-"$2"/* "$CUDNN_STASH/parts/" && ls "$CUDNN_STASH/parts" | wc -l; exit $?
fi
te_env() { [ -e "$TE_STASH/env.sh" ] && . "$TE_STASH/env.sh" || echo "no $TE_STASH/env.sh: run te-stash 1..5 and te-install on this host first"; }
te_pytest() {  # te_pytest NAME -k EXPR [ARGS...]: tests/gpu/test_gpu_te.py with TE's environment
  local name=$1; shift
  ( te_env  # MILES_CUDNN: a cuDNN dir both torch and TE load (preloaded: torch's own lookup would find its 9.19 first)
    [ -z "${MILES_CUDNN:-}" ] || export CUDNN_PATH=$MILES_CUDNN LD_LIBRARY_PATH=$MILES_CUDNN/lib:$LD_LIBRARY_PATH \
      LD_PRELOAD=$MILES_CUDNN/lib/libcudnn.so.9${LD_PRELOAD:+ $LD_PRELOAD}
    timeout "$STEP_TIMEOUT" $PY -m pytest tests/gpu/test_gpu_te.py -v -s -rs -p no:cacheprovider -p no:randomly \
      --miles-require-gpu --miles-engine-timeout 900 "$@" ) 2>&1 | tee "$OUT/$name.log"
}
SW=/tmp/miles-served-weights  # served-weights-fp8 runs detached; served-weights-wait reads it here
rc=0
for step in "$@"; do
  case "$step" in
    foundation)
      { nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
        echo "== pytest-miles doctor (ambient environment)"; $PY -m pytest_miles.cli doctor
        echo "== pytest-miles doctor (deterministic environment exported)"
        env NCCL_ALGO=Ring NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 CUBLAS_WORKSPACE_CONFIG=:4096:8 \
          $PY -m pytest_miles.cli doctor --attention-backend flashinfer
        echo "== pytest-miles fingerprint --json"; $PY -m pytest_miles.cli fingerprint --json
        echo "== pytest -m hopper"; $PY -m pytest tests/gpu/test_host_markers.py -m hopper -v -rs -s -p no:cacheprovider
        echo "== pytest -m blackwell"; $PY -m pytest tests/gpu/test_host_markers.py -m blackwell -v -rs -p no:cacheprovider
      } 2>&1 | tee "$OUT/foundation.log" ;;
    trainer)
      timeout 560 $PY -m pytest tests/gpu/test_gpu_trainer.py -x -v -s -rs -p no:cacheprovider --miles-require-gpu \
        2>&1 | tee "$OUT/trainer.log" || rc=1 ;;
    engines-*)
      backend=${step#engines-}
      timeout 580 $PY -m pytest tests/gpu/test_gpu_engines.py -k "$backend" -x -v -s -rs -p no:cacheprovider \
        --miles-require-gpu --basetemp=/tmp/miles-bt-$backend 2>&1 | tee "$OUT/engines-$backend.log" || rc=1
      cp /tmp/miles-bt-$backend/engine-logs*/*.log "$OUT/" 2>/dev/null ;;
    bench-engines)
      timeout 580 $PY benchmarks/batch_invariance_vs_sglang_tool.py 2>&1 | tee "$OUT/bench-engines.log" || rc=1 ;;
    snapshots)
      args=(tests/snapshots/test_cross_machine_snapshots.py -v -rs -p no:cacheprovider --miles-engine=sglang --miles-require-gpu)
      { echo "== record (--miles-snapshot-update)"; timeout 280 $PY -m pytest "${args[@]}" --miles-snapshot-update
        echo "== a later run: compare"; timeout 280 $PY -m pytest "${args[@]}"; } 2>&1 | tee "$OUT/snapshots.log" || rc=1
      cp fixtures/snapshots/tests/snapshots/test_cross_machine_snapshots.json "$OUT/" 2>/dev/null ;;
    iterations)
      timeout 580 $PY -m pytest tests/gpu/test_gpu_iterations.py -x -v -s -rs -p no:cacheprovider --miles-require-gpu \
        2>&1 | tee "$OUT/iterations.log" || rc=1 ;;
    leases)
      timeout 560 $PY -m pytest tests/gpu/test_gpu_leases.py -x -v -s -rs -p no:cacheprovider --miles-require-gpu \
        2>&1 | tee "$OUT/leases.log" || rc=1 ;;
    ownership)
      timeout 290 $PY -m pytest tests/gpu/test_gpu_ownership.py -v -s -rs -p no:cacheprovider -p no:randomly \
        --miles-require-gpu 2>&1 | tee "$OUT/ownership.log" || rc=1 ;;
    followups)
      timeout 580 $PY -m pytest tests/gpu/test_gpu_followups.py -v -s -rs -p no:cacheprovider -p no:randomly \
        --miles-require-gpu 2>&1 | tee "$OUT/followups.log" || rc=1 ;;
    loop)
      timeout 590 $PY -m pytest tests/gpu/test_gpu_loop.py -x -v -s -rs -p no:cacheprovider -p no:randomly \
        --miles-require-gpu --basetemp=/tmp/miles-bt-loop 2>&1 | tee "$OUT/loop.log" || rc=1
      cp /tmp/miles-bt-loop/engine-logs*/*.log "$OUT/" 2>/dev/null ;;
    caps-triton|caps-flashinfer)  # issue 13: the suite's rollout part, tiny model, CUDA graphs on (2 launches)
      backend=${step#caps-}
      timeout 560 $PY -m pytest_miles.cli suite -v -rsxX -p no:randomly --miles-engine=sglang --miles-engine-timeout 420 \
        --miles-attention-backend=$backend -k "test_negative_control or test_batch_invariance" \
        --miles-report "$OUT/caps-$backend.json" --basetemp=/tmp/miles-bt-caps-$backend 2>&1 | tee "$OUT/caps-$backend.log" || rc=1
      cp /tmp/miles-bt-caps-$backend/engine-logs*/*.log "$OUT/" 2>/dev/null
      MILES_CAPS_REPORTS=$OUT $PY -m pytest tests/gpu/test_gpu_capabilities.py -k "tiny and $backend" -v -s -rs \
        -p no:cacheprovider 2>&1 | tee -a "$OUT/caps-$backend.log" || rc=1 ;;
    caps-05b-triton|caps-05b-flashinfer)  # issue 13: Qwen2.5-0.5B shape: greedy negative controls (+ cost on triton)
      backend=${step#caps-05b-}
      sel="test_negative_control"; [ "$backend" = triton ] && sel="test_negative_control or test_rollout_cost"
      timeout 560 $PY -m pytest_miles.cli suite -v -rsxX -p no:randomly --miles-engine=sglang --miles-engine-timeout 420 \
        --miles-attention-backend=$backend --miles-model-shape qwen2.5-0.5b -k "$sel" \
        --miles-report "$OUT/caps-05b-$backend.json" --basetemp=/tmp/miles-bt-05b-$backend 2>&1 | tee "$OUT/caps-05b-$backend.log" || rc=1
      MILES_CAPS_REPORTS=$OUT $PY -m pytest tests/gpu/test_gpu_capabilities.py -k "realistic and $backend" -v -s -rs \
        -p no:cacheprovider 2>&1 | tee -a "$OUT/caps-05b-$backend.log" || rc=1 ;;
    multigpu)  # issue 19, on nvidia-h200-x2: TP/DP 2 over NCCL, SGLang --tp 2, the split loop, leases on 2 GPUs
      timeout 590 $PY -m pytest tests/gpu/test_gpu_multigpu.py -v -s -rsx -p no:cacheprovider -p no:randomly \
        --miles-require-gpu --miles-gpu-lease on 2>&1 | tee "$OUT/multigpu.log" || rc=1
      timeout 300 $PY -m pytest tests/gpu/test_gpu_leases.py -v -s -rs -p no:cacheprovider --miles-require-gpu \
        2>&1 | tee -a "$OUT/multigpu.log" || rc=1 ;;
    parity|locate)  # tiny128 bf16, SGLang x megatron-core (local fp32; TE bf16 when te-install ran): parity | locator
      # one SGLang start each (locate: the tensor-dump engine); every cell: scripts/gpu-steps/parity-next.steps
      sel="tiny128-bf16 and not locate and not planted"; [ "$step" = locate ] && sel="tiny128-bf16 and (locate or planted)"
      mkdir -p "$OUT/$step"
      ( [ -e "$TE_STASH/env.sh" ] && . "$TE_STASH/env.sh"
        timeout "$STEP_TIMEOUT" $PY -m pytest tests/gpu/test_gpu_parity.py -k "$sel" -v -s -rs -p no:cacheprovider \
          -p no:randomly --miles-require-gpu --miles-report "$OUT/$step/report.json" --basetemp=/tmp/miles-bt-$step
      ) 2>&1 | tee "$OUT/$step.log" || rc=1
      cp /tmp/miles-bt-$step/engine-logs*/*.log "$OUT/" 2>/dev/null ;;
    suite)
      timeout 580 $PY -m pytest_miles.cli suite -v -rs --miles-engine=sglang --miles-report "$OUT/suite-report.json" \
        2>&1 | tee "$OUT/suite.log" || rc=1 ;;
    te-trainer)  # TE bf16 and FP8 block-wise, each twice bitwise equal; MXFP8 refused on Hopper (~3 min)
      te_pytest te-trainer -k "twice_bitwise_equal or mxfp8_refused" || rc=1 ;;
    te-fused)  # TE's own attention choice (cuDNN fused attention; expected to xfail on cuDNN 9.19) (~1 min)
      te_pytest te-fused -k "attention_backend_te_picks" || rc=1 ;;
    te-fused-cudnn)  # te-fused with the carried cuDNN (after cudnn-stash 1..N): torch and TE both load it (~2 min)
      if [ ! -d "$CUDNN_STASH/site/nvidia/cudnn" ]; then
        ( cd "$CUDNN_STASH" && cat parts/chunk.* > parts/"$(cut -d' ' -f3 parts/SHA256)" && cd parts && sha256sum -c SHA256 ) \
          && $PY -m zipfile -e "$CUDNN_STASH/parts/$(cut -d' ' -f3 "$CUDNN_STASH/parts/SHA256")" "$CUDNN_STASH/site" \
          || { echo "cudnn wheel incomplete: run cudnn-stash 1..N first"; rc=1; continue; }
      fi
      MILES_CUDNN=$CUDNN_STASH/site/nvidia/cudnn te_pytest te-fused-cudnn -k "attention_backend_te_picks" || rc=1 ;;
    te-serve)  # SGLang serves the block-wise FP8 checkpoint with its FP8 kernels (~3 min: two engine starts)
      te_pytest te-serve tests/models/test_quantized_checkpoints.py -k "fp8_checkpoint_served or sglang_parses" \
        --basetemp=/tmp/miles-bt-te-serve || rc=1
      cp /tmp/miles-bt-te-serve/engine-logs*/*.log "$OUT/" 2>/dev/null ;;
    te-cells)  # the precision matrix end to end on tiny128: 3 Hopper cells measured, the rest refused/skipped (~5 min)
      te_pytest te-cells -k "cell_end_to_end and tiny128" --miles-report "$OUT/te-cells-report.json" || rc=1 ;;
    te-cells-0.5b)  # the same on the 0.5B shape (needs issue #13's SHAPES; ~8 min)
      te_pytest te-cells-0.5b -k "cell_end_to_end and 0.5b" --miles-report "$OUT/te-cells-0.5b-report.json" || rc=1 ;;
    te-cells-model)  # the matrix on YOUR HF Qwen2 dir, as docs/precision-matrix.md shows: PYTEST_MILES_MODEL=DIR; unset,
      # the embedded tiny128 is written to /tmp/miles-user-model and passed as --miles-model (~5 min)
      model=${PYTEST_MILES_MODEL:-/tmp/miles-user-model}
      [ -n "${PYTEST_MILES_MODEL:-}" ] || $PY -c "from pytest_miles.models.embedded import write_shape; write_shape('$model', 'tiny128')"
      te_pytest te-cells-model -k "cell_end_to_end_on_miles_model" --miles-model "$model" \
        --miles-report "$OUT/te-cells-model-report.json" || rc=1 ;;
    served-weights)  # SGLang's /get_weights_by_name == the tiny128 bf16 checkpoint and a trainer session's own state
      # dict (TE bf16 after te-install, else the local spec), through SGLang's Qwen2 and Llama classes (~4 min: 2 engines)
      ( te_env >/dev/null 2>&1; timeout "$STEP_TIMEOUT" $PY -m pytest tests/gpu/test_gpu_served_weights.py -k bf16 -v -s -rsx \
          -p no:cacheprovider -p no:randomly --miles-require-gpu --miles-engine-timeout 900 \
          --basetemp=/tmp/miles-bt-served ) 2>&1 | tee "$OUT/served-weights.log" || rc=1
      cp /tmp/miles-bt-served/engine-logs*/*.log "$OUT/" 2>/dev/null ;;
    served-weights-fp8-inline)  # served-weights-fp8 in the foreground, for gpu-validate.sh's detached tracks
      ( te_env >/dev/null 2>&1; timeout "$STEP_TIMEOUT" $PY -m pytest tests/gpu/test_gpu_served_weights.py -k fp8 -v -s -rsx \
          -p no:cacheprovider -p no:randomly --miles-require-gpu --miles-engine-timeout 900 \
          --basetemp=/tmp/miles-bt-served-fp8 ) 2>&1 | tee "$OUT/served-weights-fp8.log" || rc=1
      cp /tmp/miles-bt-served-fp8/engine-logs*/*.log "$OUT/" 2>/dev/null ;;
    served-weights-fp8)  # the same for the block-wise FP8 checkpoint, DETACHED (with DeepGEMM's start-up precompile
      # on, SGLANG_JIT_DEEPGEMM_PRECOMPILE=1, a first FP8 start can pass one command's limit). Returns at once; then run
      # served-weights-wait (again) until it prints the exit code. Test timeout 1500 s, two engine starts.
      mkdir -p "$SW"; rm -f "$SW/rc"
      ( te_env >/dev/null 2>&1
        setsid nohup bash -c "timeout 1500 $PY -m pytest tests/gpu/test_gpu_served_weights.py -k fp8 -v -s -rsx \
          -p no:cacheprovider -p no:randomly --miles-require-gpu --miles-engine-timeout 900 --basetemp=$SW/bt > $SW/fp8.log 2>&1; echo \$? > $SW/rc" \
          < /dev/null > /dev/null 2>&1 & echo $! > "$SW/pid" )
      echo "served-weights-fp8 started (pid $(cat "$SW/pid")), log $SW/fp8.log: run served-weights-wait" ;;
    served-weights-wait)  # waits up to 570 s for served-weights-fp8; copies its log (and engine logs) to $OUT
      for _ in $(seq 1 114); do [ -e "$SW/rc" ] && break; sleep 5; done
      cp "$SW/fp8.log" "$OUT/served-weights-fp8.log" 2>/dev/null; cp "$SW"/bt/engine-logs*/*.log "$OUT/" 2>/dev/null
      tail -n 40 "$SW/fp8.log" 2>/dev/null || echo "no $SW/fp8.log: run served-weights-fp8 first"
      if [ -e "$SW/rc" ]; then echo "served-weights-fp8 exit code $(cat "$SW/rc")"; [ "$(cat "$SW/rc")" = 0 ] || rc=1
      else echo "served-weights-fp8 still running: run served-weights-wait again"; rc=3; fi ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
done
exit $rc
