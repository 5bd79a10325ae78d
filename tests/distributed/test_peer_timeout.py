"""ddp_timeout reaches the process group, and the callback's barrier works, in a gloo world of one (fast).

The 2-process behaviour with a stalled peer is in test_ddp_stall.py.
"""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from compressm_hf.trainer.surgery import (
    apply_ddp_timeout,
    broadcast_objects,
    distributed_barrier,
    process_group_timeout,
)

pytestmark = pytest.mark.distributed


def _world_of_one(tmp_path, **kwargs):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1, **kwargs)


def test_ddp_timeout_replaces_torchs_default(tmp_path):
    assert apply_ddp_timeout(7) is False  # not distributed: nothing to do
    _world_of_one(tmp_path)  # what transformers leaves with use_cpu=True: torch's default
    try:
        assert process_group_timeout() == datetime.timedelta(minutes=30)
        assert apply_ddp_timeout(7) is True
        assert process_group_timeout() == datetime.timedelta(seconds=7)
        assert apply_ddp_timeout(7) is False  # already applied
        distributed_barrier("a test barrier")
        assert broadcast_objects([{"a": 1}, 2], what="a test broadcast") == [{"a": 1}, 2]
    finally:
        dist.destroy_process_group()


def test_an_explicit_process_group_timeout_is_kept(tmp_path):
    _world_of_one(tmp_path, timeout=datetime.timedelta(seconds=3600))
    try:
        assert apply_ddp_timeout(7) is False
        assert process_group_timeout() == datetime.timedelta(seconds=3600)
    finally:
        dist.destroy_process_group()
