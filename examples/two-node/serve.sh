#!/bin/sh
# The inference node of examples/two-node: two vLLM servers (ports 8000 and 8001) for the
# trainer node's `oapl train examples/two-node/trainer.yaml`. Both take the trainer's weights
# over the gloo backend (CPU servers; oapl must be installed here too, for vLLM's plugin).
# On GPUs: `vllm serve MODEL_DIR ... --weight-transfer-config '{"backend": "nccl"}'`, one
# GPU per server (CUDA_VISIBLE_DEVICES), without the CPU flags and variables.
#   examples/two-node/serve.sh MODEL_DIR
# Stop with Ctrl-C (both servers stop).
set -e
MODEL_DIR=${1:?usage: serve.sh MODEL_DIR}
PYTHON=${PYTHON:-python}
trap 'kill 0' INT TERM EXIT
for PORT in 8000 8001; do
  VLLM_SERVER_DEV_MODE=1 VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1 \
    "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --host 0.0.0.0 --port "$PORT" --seed 0 --dtype bfloat16 --max-model-len 32 \
    --logprobs-mode processed_logprobs --gpu-memory-utilization 0.1 \
    --kv-cache-memory-bytes 67108864 --enforce-eager \
    --weight-transfer-config '{"backend": "gloo"}' > "server$PORT.log" 2>&1 &
done
wait
