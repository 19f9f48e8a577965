# One image for the API and both kinds of worker. TORCH_SPEC picks the torch build:
# the default CUDA wheel for GPU training workers, e.g. "torch==2.13.0 --index-url .../cpu" for CPU-only roles.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY loramill loramill
COPY adapters adapters
COPY merge merge
COPY jobs jobs
COPY serving serving
COPY service service
COPY workers workers
RUN pip install --no-cache-dir ${TORCH_SPEC} && pip install --no-cache-dir '.[postgres]'
ENV LORAMILL_DATA_DIR=/data
EXPOSE 8000
CMD ["loramill", "serve", "--host", "0.0.0.0", "--port", "8000"]
