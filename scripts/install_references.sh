#!/usr/bin/env bash
# Install the SAM 2 reference implementations the parity tests compare against, into the active
# virtual environment (which already has CPU torch and samhq[test]). They are oracles for the tests
# only; their torchvision imports are stood in for by tests/sam2_ref.py.
#
# Meta's sam2 is an sdist whose build needs torch: build it against the torch already installed
# (--no-build-isolation; pip would otherwise fetch another, CUDA, torch) and without its CUDA
# extension. hydra-core and iopath are what sam2 imports; the rest are their own dependencies
# (`pip check` is clean for them afterwards, except torchvision, which is never installed).
set -euo pipefail
python -m pip install -q setuptools wheel
SAM2_BUILD_CUDA=0 python -m pip install -q --no-deps --no-build-isolation \
  sam2==1.1.0 hydra-core==1.3.8 iopath==0.1.10 \
  "omegaconf>=2.2,<2.4" "antlr4-python3-runtime==4.9.3" portalocker
