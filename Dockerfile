# syntax=docker/dockerfile:1
# Serving image: onnxruntime-gpu (CUDA 13 + cuDNN 9 build) on NVIDIA's runtime image; no torch.
# On a machine without a GPU the same image runs on CPU (CLASSIFIER_PROVIDER=auto falls back).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- build stage: a virtual environment with the locked serving dependencies ----
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
COPY requirements/serve.lock /tmp/serve.lock
RUN /opt/venv/bin/pip install --require-hashes --only-binary=:all: -r /tmp/serve.lock

# ---- runtime stage: python, the venv, the code and the model; no compilers, no pip cache ----
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin classifier
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY classifier_core/ /app/classifier_core/
COPY service/ /app/service/
COPY exported_models/ /app/exported_models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLASSIFIER_MODEL_DIR=/app/exported_models/default \
    CLASSIFIER_PROVIDER=auto
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
