# Serving API: FastAPI + uvicorn, CPU torch, non-root user.
FROM python:3.11.13-slim-bookworm AS build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
      -c constraints.txt "torch==2.14.1+cpu" "torchvision==0.29.1+cpu"
COPY pyproject.toml README.md ./
COPY pipelines ./pipelines
COPY serving ./serving
RUN pip install --no-cache-dir -c constraints.txt .

FROM python:3.11.13-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 leukops
COPY --from=build /opt/venv /opt/venv
COPY --chown=leukops leukops.yaml /opt/leukops/leukops.yaml
ENV PATH=/opt/venv/bin:$PATH \
    LEUKOPS_CONFIG_FILE=/opt/leukops/leukops.yaml \
    LEUKOPS_STATE_DIR=/home/leukops/state
USER leukops
WORKDIR /home/leukops
EXPOSE 8000
CMD ["leukops", "serve", "--host", "0.0.0.0", "--port", "8000"]
