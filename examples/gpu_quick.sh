#!/usr/bin/env bash
# A quick GPU check of the paper's CIFAR-10 setup, sized for about 10 minutes on one H100:
# full-width ResNet-18, the four variants and the SN baseline trained side by side on the one GPU
# for a few epochs (the paper's schedule shortened: lr 0.1, /10 at 1/2 and 3/4 of the epochs), then
# SimBA (eps 0.4 in pixel scale) on 100 images for the paper's no-BN models (vanilla, convnorm,
# sn), the Figure 2 spectra, and the tables in $RUNS/RESULTS.md.
#
# Usage (from the repository root):
#   bash examples/gpu_quick.sh                    # the shared CIFAR-10 archive
#   DATA=/path/cifar10.npz RUNS=runs/gpu bash examples/gpu_quick.sh
#   EPOCHS=4 WIDTH=0.5 bash examples/gpu_quick.sh # smaller, if time is short
# Any extra arguments are passed to every train_cifar.py call (e.g. --threads 1 on a CPU).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
PYTHON="${PYTHON:-python}"
RUNS="${RUNS:-runs/gpu_quick}"
EPOCHS="${EPOCHS:-6}"
WIDTH="${WIDTH:-1}"
SIMBA_IMAGES="${SIMBA_IMAGES:-100}"
SIMBA_ITERS="${SIMBA_ITERS:-3072}"
AMP="${AMP:---amp}"
data_args=()
if [[ -n "${DATA:-}" ]]; then data_args=(--data "$DATA"); fi
milestones=("$((EPOCHS / 2))" "$((EPOCHS * 3 / 4))")

mkdir -p "$RUNS"
start=$SECONDS
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

pids=()
for variant in vanilla bn convnorm convnorm_bn sn; do
  "$PYTHON" examples/train_cifar.py --variant "$variant" --seed 0 --width "$WIDTH" --epochs "$EPOCHS" \
    --milestones "${milestones[@]}" $AMP "${data_args[@]}" --out "$RUNS/main_${variant}_s0" "$@" \
    > "$RUNS/main_${variant}_s0.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
tail -n 2 "$RUNS"/main_*_s0.log
echo "training done after $((SECONDS - start)) s"
if [[ $status -ne 0 ]]; then echo "a training run failed; see $RUNS/*.log" >&2; exit 1; fi

pids=()
for variant in vanilla convnorm sn; do
  "$PYTHON" examples/simba.py "$RUNS/main_${variant}_s0/best.pt" --num-images "$SIMBA_IMAGES" \
    --max-iters "$SIMBA_ITERS" "${data_args[@]}" --out "$RUNS/simba_${variant}" > "$RUNS/simba_${variant}.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
cat "$RUNS"/simba_*.log
echo "SimBA done after $((SECONDS - start)) s"
for variant in vanilla convnorm_bn; do
  "$PYTHON" examples/spectra.py "$RUNS/main_${variant}_s0/best.pt" --quiet --out "$RUNS/spectra_${variant}"
done
"$PYTHON" examples/summarize_results.py --runs "$RUNS" --output "$RUNS/RESULTS.md"
echo "all done after $((SECONDS - start)) s; tables in $RUNS/RESULTS.md"
