"""From nothing to a segmented scan at full size, as a new user runs it: a full-size official UniSeg container
(the release's nnU-Net v1 format, numpy 1.x pickle; random weights with every key and shape of
``../shared/fixtures/official_uniseg/official_upstream_state_dict_keys.txt``) -> ``uniseg weights --url`` into a
copy of the pretrain bundle -> ``uniseg predict --task all --modality CT`` on a real CT from
``../shared/data/real_samples``. Prints each step's wall time and peak RSS (each step a subprocess, ``wait4``).

    python benchmarks/pretrained_end_to_end.py                                  # ct_abdomen_3mm_crop (122x101x30)
    python benchmarks/pretrained_end_to_end.py --ct ../shared/data/real_samples/totalseg_examples/ct_abdomen_3mm.nii.gz
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
KEYS = SHARED / "fixtures" / "official_uniseg" / "official_upstream_state_dict_keys.txt"
DEFAULT_CT = SHARED / "data" / "real_samples" / "totalseg_examples" / "ct_abdomen_3mm_crop.nii.gz"


def write_container(path: Path) -> None:
    """The full-size official container, written by this benchmark's own subprocess (its memory not counted)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from nnunet_v1 import nnunet_v1_container, save_nnunet_v1

    torch.manual_seed(0)
    state = {}
    for line in KEYS.read_text().splitlines():
        key, shape, _ = line.split("\t")
        state[key] = torch.randn(*[int(v) for v in re.findall(r"\d+", shape)]) * 0.01
    save_nnunet_v1(nnunet_v1_container(state), path, "numpy1")


def timed(name: str, cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd``; its wall time and peak RSS (GiB)."""
    print(f"$ {' '.join(cmd)}", flush=True)
    tic = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=cwd)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - tic
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {"step": name, "wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT, help="a CT (NIfTI / NRRD / DICOM folder)")
    parser.add_argument("--part", choices=["container"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "container":
        write_container(args.out)
        return
    uniseg = [sys.executable, "-m", "uniseg_monai"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        container = work / "model_final_checkpoint.model"
        rows = [timed("write the full-size official container", [sys.executable, __file__, "--part", "container",
                                                                 "--out", str(container)], work)]  # fmt: skip
        bundle = shutil.copytree(ROOT / "bundles" / "uniseg_pretrain", work / "uniseg_pretrain",
                                 ignore=shutil.ignore_patterns("*.pt", "eval"))  # fmt: skip
        rows.append(timed("uniseg weights --url", [*uniseg, "weights", "--bundle", str(bundle), "--url",
                                                   container.as_uri()], work))  # fmt: skip
        rows.append(timed("uniseg predict --task all --modality CT", [*uniseg, "predict", "-i", str(args.ct), "-o",
                          "seg", "--task", "all", "--modality", "CT", "--bundle", str(bundle), "--device", "cpu"],
                          work))  # fmt: skip
        outputs = sorted(p.name for p in (work / "seg").glob("*.nii.gz"))
        sizes = [f"{f.name} {f.stat().st_size / 2**20:.0f} MiB" for f in (container, bundle / "models" / "model.pt")]
        print(f"\n{', '.join(sizes)}; {len(outputs)} maps: {outputs}")
    print(f"CT: {args.ct}\n\n| step | wall (s) | peak RSS (GiB) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {row['wall_s']:.1f} | {row['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
