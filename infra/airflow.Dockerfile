# Airflow image with leukops installed (CPU): api-server, scheduler, dag-processor, triggerer, CPU worker.
# Stage 1 builds the project wheel; stage 2 installs it on the official Airflow image (non-root `airflow`).
FROM python:3.11.13-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipelines ./pipelines
COPY serving ./serving
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM apache/airflow:3.3.2-python3.11
USER airflow
COPY --chown=airflow:root constraints.txt /opt/leukops/constraints.txt
COPY --from=build /wheels /opt/leukops/wheels
# CPU-only torch keeps this image small; the GPU worker image installs the CUDA build instead.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
      -c /opt/leukops/constraints.txt "torch==2.14.1+cpu" "torchvision==0.29.1+cpu" \
 && pip install --no-cache-dir -c /opt/leukops/constraints.txt /opt/leukops/wheels/leukops-*.whl \
      "apache-airflow-providers-celery" "psycopg2-binary"
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root expectations /opt/leukops/expectations
COPY --chown=airflow:root leukops.yaml /opt/leukops/leukops.yaml
COPY --chown=airflow:root infra/airflow/init.sh /opt/leukops/infra/airflow/init.sh
ENV LEUKOPS_CONFIG_FILE=/opt/leukops/leukops.yaml \
    LEUKOPS_SOURCES_DIR=/opt/leukops/expectations/sources \
    LEUKOPS_SUITE_DIR=/opt/leukops/expectations
