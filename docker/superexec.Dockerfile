# The executor that runs this project's ServerApp (coordinating site) or ClientApp (each hospital):
# Flower's official SuperExec image plus the project's dependencies, installed at build time so
# nothing is installed at run time (the SuperLink and SuperNodes run with runtime dependency
# installation off). The app code itself arrives in the FAB that `flwr run` submits.
#
#   docker build -f docker/superexec.Dockerfile -t dsfedmed-superexec .                 # CPU
#   docker build -f docker/superexec.Dockerfile --build-arg TORCH_VARIANT=cu128 -t dsfedmed-superexec:cuda .
#
# Air-gapped sites: build where the registries are reachable, then `docker save` / `docker load`
# the image (docs/deploy.md).
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

# cpu: PyTorch's CPU wheels (small); cu128 (or another CUDA tag): a GPU build for GPU sites
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

WORKDIR /app
RUN python -m pip install --no-cache-dir \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# the project's pinned dependencies (and its weights, e.g. LiteMedSAM's bundled checkpoint);
# flwr[simulation] is dropped: the image already holds Flower, and Ray is for simulation only
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app client_app ./client_app
COPY --chown=app:app server_app ./server_app
COPY --chown=app:app cli ./cli
COPY --chown=app:app bench ./bench
COPY --chown=app:app deploy ./deploy
RUN sed -i 's/"flwr\[simulation\]==[^"]*",//' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && python -c "import monai, diffusers, segment_anything, torch; print('torch', torch.__version__)"

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    OMP_WAIT_POLICY=PASSIVE

ENTRYPOINT ["flower-superexec"]
