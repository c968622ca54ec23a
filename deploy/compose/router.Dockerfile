# vLLM's router (a Rust binary in a Python wheel), the version tests/gateway/test_upstream.py runs.
FROM python:3.11-slim
RUN pip install --no-cache-dir vllm-router==0.1.17
