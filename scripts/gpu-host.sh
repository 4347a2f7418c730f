#!/usr/bin/env bash
# Steps run on the GPU host (no package index there): see docs/validation/README.md.
#   scripts/gpu-host.sh stash K      copy wheelhouse part K into /tmp/miles-gpu (once per part)
#   scripts/gpu-host.sh install      install the stashed wheels, then this checkout (editable)
#   scripts/gpu-host.sh STEP...      foundation | trainer | engines-<backend> | bench-engines | snapshots |
#                                    leases | suite | caps-<backend> | caps-05b-<backend>   (logs go to $OUT)
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
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 3
  $PY -c "import sglang, megatron.core, pytest_miles; print('sglang', sglang.__version__, 'megatron-core', megatron.core.__version__)"
  exit $?
fi
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
      args=(tests/test_cross_machine_snapshots.py -v -rs -p no:cacheprovider --miles-engine=sglang --miles-require-gpu)
      { echo "== record (--miles-snapshot-update)"; timeout 280 $PY -m pytest "${args[@]}" --miles-snapshot-update
        echo "== a later run: compare"; timeout 280 $PY -m pytest "${args[@]}"; } 2>&1 | tee "$OUT/snapshots.log" || rc=1
      cp fixtures/snapshots/tests/test_cross_machine_snapshots.json "$OUT/" 2>/dev/null ;;
    leases)
      timeout 560 $PY -m pytest tests/gpu/test_gpu_leases.py -x -v -s -rs -p no:cacheprovider --miles-require-gpu \
        2>&1 | tee "$OUT/leases.log" || rc=1 ;;
    followups)
      timeout 580 $PY -m pytest tests/gpu/test_gpu_followups.py -v -s -rs -p no:cacheprovider -p no:randomly \
        --miles-require-gpu 2>&1 | tee "$OUT/followups.log" || rc=1 ;;
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
    suite)
      timeout 580 $PY -m pytest_miles.cli suite -v -rs --miles-engine=sglang --miles-report "$OUT/suite-report.json" \
        2>&1 | tee "$OUT/suite.log" || rc=1 ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
done
exit $rc
