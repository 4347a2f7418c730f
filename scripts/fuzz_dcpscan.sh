#!/usr/bin/env bash
# The native DCP reader under AddressSanitizer + UndefinedBehaviorSanitizer (see fuzz_dcpscan.py).
#   bash scripts/fuzz_dcpscan.sh [ROUNDS per file, default 40000] [.metadata files...]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-40000}; shift || true
PY=$(python3 -c 'import sys; print(sys.executable)')
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
INC=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
EXT=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -shared -fPIC \
  -I"$INC" pytest_miles/ckpt/dcpscan/vm.c pytest_miles/ckpt/dcpscan/walk.c pytest_miles/ckpt/dcpscan/module.c \
  -o "$BUILD/_dcpscan$EXT"
FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then  # a few real saves: plain, AdamW state (non-tensor items), 2,000 tensors
  $PY - "$BUILD" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
import torch
from tests.helpers.checkpoints import make_state, optimizer_state, save_dcp
root = Path(sys.argv[1])
save_dcp(root / "plain", make_state(0))
save_dcp(root / "adamw", optimizer_state(0))
save_dcp(root / "many", {f"m.layers.{i // 10}.p{i % 10}": torch.full((1 + i % 7,), float(i)) for i in range(2000)})
PY
  FILES=("$BUILD/plain/.metadata" "$BUILD/adamw/.metadata" "$BUILD/many/.metadata")
fi
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
  "$PY" scripts/fuzz_dcpscan.py "$BUILD" "$ROUNDS" "${FILES[@]}"
