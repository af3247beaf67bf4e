#!/usr/bin/env bash
# Installs what `omniforge serve` and the server tests need: Triton's Python clients and the
# tritonserver bundled in the nvidia-pytriton wheel. nvidia-pytriton pins numpy<2, which the rest
# of omniforge does not need: it is installed without its dependencies (`omniforge serve` gives
# the server's Python-backend stub the numpy it expects in a folder of its own).
set -euo pipefail
python -m pip install -q "tritonclient[grpc,http]>=2.50,<3"
python -m pip install -q --no-deps "nvidia-pytriton>=0.7,<0.8"
