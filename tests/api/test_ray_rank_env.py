"""workers/ray_ranks.py without a cluster: the bundles a job asks for, the torch.distributed environment
each rank gets from where Ray placed it, and the job's error when a rank's Ray node is lost. (A real
two-node cluster runs jobs in tests/integration/test_ray_ranks.py.)"""

from __future__ import annotations

import pytest

from models import distributed
from models.vllm_rollout import placement
from workers.ranks import RankFailed, _outcome
from workers.ray_ranks import bundles, rank_envs


def test_one_bundle_per_rank_and_the_rollout_engines_gpus_in_rank_0s():
    assert bundles(3, "GPU") == [{"GPU": 1.0}] * 3
    assert bundles(2, "GPU", rollout_gpus=2) == [{"GPU": 3.0}, {"GPU": 1.0}]
    assert bundles(2, "rank", rollout_gpus=2) == [{"rank": 1.0}, {"rank": 1.0}]  # CPU ranks: no GPUs to add


def test_each_rank_gets_torchruns_environment_from_where_its_actor_runs(monkeypatch):
    # ranks 0 and 1 on host A (rank 0's bundle with one more GPU, for its engine), rank 2 on host B
    where = [{"node": "A", "ip": "10.0.0.2", "gpus": ["3", "4"], "cpus": 32, "port": 29511},
             {"node": "A", "ip": "10.0.0.2", "gpus": ["5"], "cpus": 32, "port": None},
             {"node": "B", "ip": "10.0.0.3", "gpus": ["0"], "cpus": 16, "port": None}]
    envs = rank_envs(where, torch_threads=0)
    assert [(e["RANK"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["GROUP_RANK"]) for e in envs] == [
        ("0", "0", "2", "0"), ("1", "1", "2", "0"), ("2", "0", "1", "1")]
    assert {(e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("3", "10.0.0.2", "29511")}
    # the job's GPUs on each host in local rank order (NCCL sees its peers), then rank 0's engine GPU
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,5,4", "3,5,4", "0"]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["16", "16", "16"]
    assert [e["BEAVER_RAY_NODE"] for e in envs] == ["A", "A", "B"]
    # the rollout engine's placement on one host reads the same environment: rank 0's extra GPU
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    for key in ("CUDA_VISIBLE_DEVICES", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, envs[0][key])
    ranks = distributed.Ranks(rank=0, world_size=3, local_rank=0)
    assert placement(1, None, ranks, trains=True).gpus == ["4"]
    assert placement(0, None, ranks, trains=True).gpus == ["3"]  # colocated: rank 0's own GPU


def test_cpu_ranks_have_no_gpus_and_share_their_hosts_cores():
    where = [{"node": "A", "ip": "127.0.0.1", "gpus": [], "cpus": 2, "port": 4000},
             {"node": "B", "ip": "127.0.0.1", "gpus": [], "cpus": 2, "port": None}]
    envs = rank_envs(where, torch_threads=1)
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in envs)
    assert [(e["LOCAL_RANK"], e["OMP_NUM_THREADS"]) for e in envs] == [("0", "1"), ("0", "1")]
    assert rank_envs(where, torch_threads=0)[0]["OMP_NUM_THREADS"] == "2"


def test_a_rank_whose_ray_node_is_lost_fails_the_job_with_rank_failed(tmp_path):
    with pytest.raises(RankFailed) as failed:
        _outcome(-9, tmp_path, 2, stopped=False, root=(1, None, "lost its Ray actor (ActorDiedError: its node died)"))
    assert failed.value.error["code"] == "rank_failed"
    assert failed.value.error["message"].startswith("rank 1 lost its Ray actor (ActorDiedError")
    with pytest.raises(RankFailed) as failed:
        _outcome(-9, tmp_path, 2, stopped=False, root=(1, -9, None))
    assert failed.value.error["message"].startswith("rank 1 was killed by SIGKILL")
