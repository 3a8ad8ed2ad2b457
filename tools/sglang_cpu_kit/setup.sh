#!/usr/bin/env bash
# Create (or verify) the SGLang CPU kit: a SEPARATE virtualenv holding sglang==0.5.23 for CPU-only machines,
# for tests and laptops. The trainer never imports from it; it only runs `python -m sglang.launch_server`.
#
#   bash tools/sglang_cpu_kit/setup.sh            # -> .venv-sglang at the repository root
#   SGLANG_KIT_VENV=/path/venv bash tools/sglang_cpu_kit/setup.sh
#
# Idempotent: a stamp file records the hash of this script, the requirements and the stand-ins; when they are
# unchanged and the venv imports sglang, the script exits in seconds. Otherwise it rebuilds from scratch.
# What goes in (see README.md here for the why of each piece):
#   1. torch 2.13.0 CPU build (sglang pins the CUDA torch 2.14.1; its CPU engine runs on 2.13 CPU)
#   2. sglang==0.5.23 --no-deps, triton 3.7 --no-deps, and the pure-Python import needs (requirements-cpu.txt)
#   3. the stand-ins in standins/ copied into site-packages (sgl_kernel, torchvision import stub, the
#      routed-experts unpinned-buffer fix loaded through a .pth file)
#   4. sglang-router 0.3.2 (prebuilt Rust wheel, ~20 MB) for rollout.sglang.router=true
set -euo pipefail
KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$KIT/../.." && pwd)"
VENV="${SGLANG_KIT_VENV:-$REPO/.venv-sglang}"
PY="${SGLANG_KIT_PYTHON:-python3}"
SGLANG_VERSION=0.5.23
SGLANG_ROUTER_VERSION=0.3.2
STAMP="$VENV/.kit-stamp"
HASH=$(cat "$KIT/setup.sh" "$KIT/requirements-cpu.txt" $(find "$KIT/standins" -type f -name '*.py' -o -type f -name '*.pth' | sort) \
       | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && "$VENV/bin/python" -c "import sglang, sgl_kernel, sglang_router" 2>/dev/null; then
  echo "sglang kit: $VENV is up to date ($HASH)"
  exit 0
fi

T0=$(date +%s)
echo "sglang kit: building $VENV from scratch (sglang==$SGLANG_VERSION, CPU)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# pip's notices that are expected here: unusable extra-index folders of some machines' pip config, and the
# dependency-conflict report about sglang's CUDA pins (we install it with --no-deps on purpose)
NOISE="^WARNING: Location 'file:|^ERROR: pip's dependency resolver|^sglang $SGLANG_VERSION requires"
pip_install() {
  "$VENV/bin/python" -m pip install --quiet --no-input "$@" 2>&1 | { grep -v -E "$NOISE" || true; }
  return "${PIPESTATUS[0]}"
}
pip_install --upgrade pip

# 1. CPU torch. PyPI's Linux torch wheels are CUDA builds (several GB with their nvidia-* dependencies): take a
#    local CPU wheel when pip's find-links has one (--no-index), else the PyTorch CPU index.
if pip_install --no-index --no-deps 'torch==2.13.0+cpu' >/dev/null; then
  pip_install 'torch==2.13.0+cpu'  # then its pure-Python dependencies from the index
else
  echo "sglang kit: no local torch 2.13.0+cpu wheel; using the PyTorch CPU index"
  pip_install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple 'torch==2.13.0+cpu'
fi

# 2. sglang without its CUDA-heavy dependency tree, then what its import graph needs. --no-deps on triton and
#    sglang keeps pip from replacing the CPU torch with the CUDA one.
pip_install --no-deps "sglang==$SGLANG_VERSION" 'triton==3.7.*'
pip_install -r "$KIT/requirements-cpu.txt"
# 4. the optional router in front of several servers (its dependencies are already there from step 2)
pip_install "sglang-router==$SGLANG_ROUTER_VERSION"

# 3. stand-ins: copied (not linked) so the venv works wherever the repository moves afterwards
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r "$KIT/standins/sgl_kernel" "$KIT/standins/torchvision" "$SITE/"
cp "$KIT/standins/sglang_cpu_fixes.py" "$KIT/standins/sglang_cpu_fixes.pth" "$SITE/"

"$VENV/bin/python" - <<PYEOF
import importlib.metadata as md
import torch
assert "+cpu" in torch.__version__, f"expected a CPU torch build, got {torch.__version__}"
assert md.version("sglang") == "$SGLANG_VERSION", md.version("sglang")
import sgl_kernel, sglang_cpu_fixes  # noqa: F401  the stand-ins
import sglang_router  # noqa: F401
assert md.version("sglang-router") == "$SGLANG_ROUTER_VERSION", md.version("sglang-router")
print("torch", torch.__version__, "sglang", md.version("sglang"), "sglang-router", md.version("sglang-router"),
      "transformers", md.version("transformers"))
PYEOF
echo "$HASH" > "$STAMP"
echo "sglang kit: installed in $(( $(date +%s) - T0 )) s; size $(du -sh "$VENV" | cut -f1)"
