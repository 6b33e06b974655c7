#!/usr/bin/env bash
# The GPU checks behind the README's "GPU" section, in one run on a machine with a CUDA device and torch,
# lightning, safetensors, matplotlib, scikit-learn, scipy and pytest installed (wandb is not needed):
#   1. the CUDA tests: a GPU fit records and scores what the CPU fit does (float64, exact and projected),
#      bf16/fp16 autocast on the GPU against float32, the pinned non-blocking copy;
#   2. the capture overhead on the GPU: the issue #5 models (96 LM steps, 5 repeats), then the LM at batch 256;
#      torch's default thread count (all cores), as a user's fit has;
#   3. the host time per step in each of the callback's hooks (step_phases.py, the LM).
# Run from the repository root:  bash benchmarks/gpu_check.sh   (logs and JSON lines go to ${OUT:-.})
set -u
out=${OUT:-.}
threads=$(nproc)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_amp.py tests/test_transfer.py -rs 2>&1 \
    | tee "$out/gpu_tests.log" | tail -n 4
python3 benchmarks/capture_overhead.py --accelerator gpu --threads "$threads" --models lm,mlp,cnn --lm-steps 96 \
    --repeats 5 --quiet 0 --no-profile > "$out/gpu_capture.jsonl"
echo "capture_overhead rc=$?"
python3 benchmarks/capture_overhead.py --accelerator gpu --threads "$threads" --models lm --lm-steps 24 \
    --lm-batch 256 --dims 1024 --repeats 3 --quiet 0 --no-profile > "$out/gpu_capture_batch256.jsonl"
echo "capture_overhead batch 256 rc=$?"
python3 benchmarks/step_phases.py --accelerator gpu --threads "$threads" --models lm > "$out/step_phases.jsonl"
echo "step_phases rc=$?"
