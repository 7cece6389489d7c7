# att3d on a CUDA machine:
#   docker build -t att3d .
#   docker run --gpus all --rm -v "$PWD/runs:/opt/att3d/runs" att3d train experiment=quickstart
# The toolkit of the base image must match torch's CUDA build (CUDA_IMAGE <-> TORCH_CUDA), because
# nerfacc compiles its CUDA kernels against both on first use.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
# GPU architectures for nerfacc's JIT build (no GPU is visible while building the image).
ARG TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;9.0+PTX"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    PATH=/opt/venv/bin:${PATH}

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip \
    && pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
    && pip install ninja

WORKDIR /opt/att3d
COPY pyproject.toml README.md ./
COPY att3d ./att3d
COPY configs ./configs
COPY assets ./assets
COPY scripts ./scripts
# The constraint keeps the CUDA build of torch installed above.
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt . \
    && att3d --version

# The installed package finds the Hydra configs and shipped assets here.
ENV ATT3D_CONFIGS=/opt/att3d/configs
ENTRYPOINT ["att3d"]
CMD ["--help"]
