#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one table of training step s/it (fp32, AMP bf16, AMP bf16 + compile) and
# peak GPU memory at batch 2 x 192x192x64, all-task vs per-task window time and `uniseg predict --device cuda` of
# one real CT, with the official reference points beside them. At most 8 minutes on one GPU.
#
# For a machine with Python 3.12 and a CUDA build of torch 2.11 but without monai, nibabel, pytorch-ignite or fire
# and without internet: it first installs those from the pure-Python wheels in benchmarks/wheels/ (`make
# gpu-wheels` downloads them, ~5.4 MB; no torch, no itk: the check reads NIfTI only). The machine gets a copy of
# this repository only, so copy one CT into the ignored folder benchmarks/data/ and take it along, e.g.
#   mkdir -p benchmarks/data && cp ../shared/data/real_samples/totalseg_examples/ct_abdomen_3mm.nii.gz benchmarks/data/
#   benchmarks/gpu_check.sh benchmarks/data/ct_abdomen_3mm.nii.gz
# Extra arguments go to gpu_check.py (`--cpu --tiny`: the CPU path CI runs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c "import monai, nibabel, ignite, fire" 2>/dev/null; then
    "$python" -m pip install --quiet --no-index --find-links "$here/wheels" monai nibabel pytorch-ignite fire tqdm
fi
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" "$here/gpu_check.py" "$@"
