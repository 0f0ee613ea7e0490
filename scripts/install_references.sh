#!/usr/bin/env sh
# Install the reference implementations the parity tests compare samhq against, into the active
# Python environment: the README's test command and CI (.ci/run) both run this first, so the parity
# tests run rather than skip. Each reference is an oracle for the tests only, never a dependency of
# samhq; torchvision/timm, which they import, are stood in for inside the tests (tests/official_ref.py).
set -eu
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps segment-anything-hq==0.3   # official SAM-HQ (v1)
# Meta's SAM 2 (for SAM 2.1 and HQ-SAM 2): an sdist whose build needs torch, so it is built against the
# torch already installed (--no-build-isolation; pip would otherwise fetch another, CUDA, torch) and
# without its CUDA extension; hydra-core and iopath are what it imports, the rest their own needs.
python -m pip install -q setuptools wheel
SAM2_BUILD_CUDA=0 python -m pip install -q --no-deps --no-build-isolation \
  sam2==1.1.0 hydra-core==1.3.8 iopath==0.1.10 "omegaconf>=2.2,<2.4" "antlr4-python3-runtime==4.9.3" portalocker
# transformers (SamHQModel, SamHQProcessor) comes with the package's test extra: pip install -e ".[test]".

# Optional oracles for the web tests, installed where the machine allows; their tests skip otherwise.
if command -v npm >/dev/null 2>&1; then   # onnxruntime-web runs the exported decoder as a browser page would
  npm install -s --no-audit --no-fund --prefix .ci-node onnxruntime-web@1.20.1 >/dev/null 2>&1 \
    || echo "install_references: onnxruntime-web not installed; its test will skip"
fi
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || echo "install_references: chromium not installed; the browser tests will skip"
fi
