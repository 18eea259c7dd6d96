#!/usr/bin/env bash
# Start vLLM as distillgate's student server (GPU). Usage: deploy/vllm/serve.sh [extra vllm flags]
#
# Adapters are written by the trainer under the adapters directory and published with
# POST /v1/load_lora_adapter {"lora_name": "task@vN", "lora_path": "<dir>"}: the path must be
# visible to this process at the same place (a shared volume), or mapped with the policy's
# student.adapter_root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Defaults from vllm.env; anything already in the environment wins.
while IFS='=' read -r key value; do
  [[ -z "$key" || "$key" == \#* ]] && continue
  [[ -z "${!key:-}" ]] && export "$key=$value"
done < "$here/vllm.env"

exec vllm serve "$STUDENT_BASE_MODEL" \
  --host "$VLLM_HOST" \
  --port "$VLLM_PORT" \
  --enable-lora \
  --max-loras "$VLLM_MAX_LORAS" \
  --max-lora-rank "$VLLM_MAX_LORA_RANK" \
  --max-cpu-loras "$VLLM_MAX_CPU_LORAS" \
  --max-logprobs "$VLLM_MAX_LOGPROBS" \
  --enable-auto-tool-choice \
  --tool-call-parser hermes \
  --generation-config vllm \
  "$@"
