# megatron_esft on an NGC PyTorch image (GPU: CUDA, cuDNN, NCCL, Transformer Engine and apex come with the image).
#
#   docker build -t megatron-esft .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it --rm \
#       -v /path/to/checkpoints:/ckpt megatron-esft
#
# Why 25.11: it is the image Megatron-LM's own CI uses for megatron-core 0.16.x (docker/.ngc_version.dev at tags
# core_v0.16.0/core_v0.16.1), it has Python 3.12 (Ubuntu 24.04, like every NGC release since 25.01), PyTorch 2.10 and
# Transformer Engine 2.9, inside megatron-core 0.16.1's pin transformer-engine>=2.9.0a0,<2.12.0. The build checks that
# pin and fails if a different BASE_IMAGE carries an incompatible TE. Details and what was not tested: docs/docker.md.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron_esft

# Record the image's torch and TE before installing anything, to prove below that nothing replaced them.
RUN python - <<'EOF'
import importlib.metadata as md
versions = {name: md.version(name) for name in ("torch", "transformer_engine")}
open("/tmp/base_versions.txt", "w").write(repr(versions))
print("base image:", versions)
EOF

# Dependencies of setup.py's install_requires, minus torch (the image's CUDA build stays). The image's pip constraint
# file (/etc/pip/constraint.txt) stays active, so pip refuses rather than silently replaces a package the image pins.
# megatron-core's own requirements (torch, numpy, packaging) are already in the image: --no-deps keeps pip from
# resolving torch at all.
RUN pip install --no-deps "megatron-core==0.16.1" && \
    pip install \
        "transformers==5.23.0" \
        "safetensors>=0.4" \
        "tokenizers>=0.20" \
        "sentencepiece>=0.2" \
        "numpy>=1.26,<2.5" \
        "packaging>=24.2" \
        "psutil>=5.9" \
        "tensorboard>=2.15" \
        "tqdm>=4.60" \
        "matplotlib>=3.8" \
        "pytest>=8" \
        "pytest-timeout>=2.3" \
        "pytest-xdist>=3.5" \
        "triton>=3.4,<3.7" \
        "accelerate>=1.0"

# The package itself, editable, without dependency resolution (everything it needs is installed above).
COPY . /workspace/megatron_esft
RUN pip install --no-deps --no-build-isolation -e .

# Build-time checks that need no GPU: torch/TE untouched, TE inside megatron-core 0.16.1's range, our CLIs start.
RUN python - <<'EOF'
import ast
import importlib.metadata as md
from packaging.version import Version

before = ast.literal_eval(open("/tmp/base_versions.txt").read())
after = {name: md.version(name) for name in before}
assert before == after, f"the install replaced base packages: {before} -> {after}"
te = Version(Version(after["transformer_engine"]).base_version)
assert Version("2.9.0") <= te < Version("2.12.0"), f"TE {te} is outside megatron-core 0.16.1's >=2.9,<2.12"
assert md.version("megatron-core") == "0.16.1"
print("ok:", after, "megatron-core", md.version("megatron-core"))
EOF
RUN python tools/evaluate.py --help > /dev/null && python -c "import megatron_esft.eval.intent"

CMD ["/bin/bash"]
