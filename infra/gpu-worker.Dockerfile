# GPU Celery worker (queue `gpu`): the same project on the CUDA PyTorch build.
# torch 2.14.1 from PyPI is the CUDA 13 build and carries its CUDA runtime and cuDNN as wheels
# (nvidia-*-cu13), so the host needs only the NVIDIA driver and the container toolkit.
FROM python:3.11.13-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipelines ./pipelines
COPY serving ./serving
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM apache/airflow:3.3.2-python3.11 AS cuda-torch
USER airflow
COPY --chown=airflow:root constraints.txt /opt/leukops/constraints.txt
RUN pip install --no-cache-dir -c /opt/leukops/constraints.txt torch==2.14.1 torchvision==0.29.1

FROM cuda-torch
COPY --from=build /wheels /opt/leukops/wheels
RUN pip install --no-cache-dir -c /opt/leukops/constraints.txt /opt/leukops/wheels/leukops-*.whl \
      "apache-airflow-providers-celery" "psycopg2-binary"
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root expectations /opt/leukops/expectations
COPY --chown=airflow:root leukops.yaml /opt/leukops/leukops.yaml
COPY --chown=airflow:root infra/airflow/init.sh /opt/leukops/infra/airflow/init.sh
ENV LEUKOPS_CONFIG_FILE=/opt/leukops/leukops.yaml \
    LEUKOPS_SOURCES_DIR=/opt/leukops/expectations/sources \
    LEUKOPS_SUITE_DIR=/opt/leukops/expectations \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
