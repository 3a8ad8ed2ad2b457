# H100 image for megatron_sapo: NGC PyTorch (CUDA, PyTorch, NCCL, Transformer Engine and Apex preinstalled)
# + megatron-core + this package; SGLang in its own virtualenv, /opt/sglang, because sglang 0.5.23 pins
# torch==2.14.1 and transformers==5.19.0, which the trainer's environment (NGC's torch, transformers<5)
# cannot take. The trainer starts the servers with that interpreter (rollout.sglang.python, set by the
# Qwen3-30B-A3B recipes; examples/slurm/sglang_servers.sbatch uses it too).
#
#   docker build -t megatron-sapo:h100 .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /shared:/shared -v /models:/models \
#       megatron-sapo:h100 megatron-sapo plan examples/qwen3_30b_a3b_sapo.yaml
#   SLURM with pyxis/enroot: enroot import -o megatron-sapo.sqsh dockerd://megatron-sapo:h100, then
#       CONTAINER_IMAGE=$PWD/megatron-sapo.sqsh sbatch examples/slurm/train_multinode.sbatch
#
# The package is installed from the build context (rebuild after code changes). SGLang's PyPI torch is a
# CUDA 13 build: the hosts' driver must support CUDA 13. No credentials are needed or stored; the image runs
# as whoever starts it (enroot maps the calling user).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

ARG SGLANG_VERSION=0.5.23
RUN pip install uv==0.13.8 \
    && uv venv --python "$(command -v python)" /opt/sglang \
    && env -u PIP_CONSTRAINT uv pip install --python /opt/sglang/bin/python --no-cache "sglang==${SGLANG_VERSION}"

# The trainer on the image's torch, Transformer Engine and Apex. Not the [gpu] extra: TE and Apex come with
# the base image (PyPI's "apex" is an unrelated package) and sglang lives in /opt/sglang.
WORKDIR /opt/megatron_sapo
COPY setup.py pyproject.toml README.md ./
COPY megatron_sapo ./megatron_sapo
RUN pip install ".[data,wandb]" \
    && python -c "import importlib.util as u; assert all(u.find_spec(m) for m in ('megatron.core', 'transformer_engine', 'apex', 'megatron_sapo'))"
COPY examples ./examples
COPY tools ./tools
