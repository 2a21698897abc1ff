"""Run a function on N CPU ranks, as a job's ranks run: under ``torchrun`` (gloo), one process each.

    results = run_on_ranks(2, "tests.test_x:train_tiny", {"batch_size": 2}, tmp_path)

``target`` is ``module:function``; it is called as ``function(**kwargs)`` on every rank after the
process group is joined (``models.distributed.init``) and must return something JSON can hold;
``results[r]`` is rank r's return value. A rank that raises fails the call with every rank's log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_RANK_MAIN = """
import json, os, sys, importlib
import torch
torch.set_num_threads(1)
from models import distributed
ranks = distributed.current()
distributed.init(ranks)
module, name = sys.argv[1].split(":")
kwargs = json.loads(open(sys.argv[2]).read())
result = getattr(importlib.import_module(module), name)(**kwargs)
with open(os.path.join(sys.argv[3], f"rank-{ranks.rank}.json"), "w") as f:
    f.write(json.dumps(result))
# Leave together and without the interpreter's teardown: a rank that exits with the process group (and
# DeepSpeed's threads) still alive was seen to abort ("terminate called without an active exception")
# after its result was written, on a loaded host.
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


def run_on_ranks(n: int, target: str, kwargs: dict, workdir: Path, timeout: float = 600) -> list:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rank_main.py").write_text(_RANK_MAIN)
    (workdir / "kwargs.json").write_text(json.dumps(kwargs))
    for stale in workdir.glob("rank-*.json"):
        stale.unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           "--max-restarts=0", str(workdir / "rank_main.py"), target, str(workdir / "kwargs.json"),
                           str(workdir)], env=env, capture_output=True, text=True, timeout=timeout, cwd=workdir)
    assert done.returncode == 0, f"{target} on {n} ranks failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return [json.loads((workdir / f"rank-{r}.json").read_text()) for r in range(n)]
