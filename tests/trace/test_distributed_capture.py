"""Capture under torchrun (gloo, 2 CPU ranks): FSDP2 DTensors in full and stats mode, local or
gathered, assembled back into one trace; the gradients the optimizer steps on (after DDP's
all-reduce), local ones kept apart; wrapper-free names (DDP, torch.compile); a capture that fails
on one rank fails on all. One torchrun launch runs every distributed scenario (the machine is
small); the tests read what it wrote."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorparity.checkpoint.tracefolder._dtensor import assemble_tensor
from tensorparity.checkpoint.tracefolder.format import TraceError
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.errors import TensorParityError
from tensorparity.trace import capture
from tensorparity.trace.align import align_layers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h + a)


def batch(seed):
    return torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(seed))
'''

WORKER = '''
import json, os, sys, torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import Tiny, batch
import tensorparity.trace as tt
from tensorparity.trace import capture

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
facts = {}

def fsdp_model():
    m = Tiny()
    fully_shard(m.attn)
    fully_shard(m)
    return m

for name, mode, how in (("fsdp-full", "full", "local"), ("fsdp-stats", "stats", "local"),
                        ("fsdp-gather", "full", "gather")):
    m = fsdp_model()
    with capture(m, out=f"{out}/{name}", mode=mode, dtensor=how):
        m(batch(0)).sum().backward()   # the same data on both ranks: FSDP's averaged grads = 1 process's

for name, sync in (("ddp-sync", True), ("ddp-nosync", False)):
    ddp = DDP(Tiny())
    x = batch(10 + rank)                # different data per rank
    with capture(ddp, out=f"{out}/{name}", local_grads=True):
        if sync:
            ddp(x).sum().backward()
        else:
            with ddp.no_sync():
                ddp(x).sum().backward()
    g = ddp.module.head.weight.grad.clone()
    facts[name] = g[0, 0].item()
    # what each rank computed alone, and the average the optimizer must step on
    alone = Tiny()
    alone(x).sum().backward()
    local = alone.head.weight.grad.clone()
    avg = local.clone()
    dist.all_reduce(avg)
    facts[name + "-local"], facts[name + "-avg"] = local[0, 0].item(), (avg / 2)[0, 0].item()

m = DDP(Tiny())
try:
    with capture(m, out=f"{out}/fails"):
        m(batch(0)).sum().backward()
        if rank == 1:
            raise RuntimeError("boom on rank 1")
except Exception as exc:
    facts["fails"] = f"{type(exc).__name__}: {exc}"

with open(f"{out}/facts-{rank}.json", "w") as f:
    json.dump(facts, f)
dist.barrier()  # a rank that leaves first leaves the other in gloo's teardown
dist.destroy_process_group()
# gloo's threads can abort the interpreter's teardown (torch: "terminate called without an active
# exception", one run in three here): leave without it, everything written and flushed.
sys.stdout.flush()
os._exit(0)
'''


def _tiny():
    namespace: dict = {}
    exec(compile(MODEL, "tiny_model.py", "exec"), namespace)  # the model the workers import
    return namespace["Tiny"], namespace["batch"]


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict]]:
    root = tmp_path_factory.mktemp("dist")
    (root / "tiny_model.py").write_text(MODEL)
    (root / "worker.py").write_text(textwrap.dedent(WORKER))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), str(root / "worker.py"),
                           str(root / "out")], capture_output=True, text=True, timeout=240, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = {r: json.loads((root / "out" / f"facts-{r}.json").read_text()) for r in (0, 1)}
    return root / "out", facts


def _one_process(**kw):
    Tiny, batch = _tiny()
    m = Tiny()
    with capture(m, **kw) as trace:
        m(batch(0)).sum().backward()
    return trace


def test_fsdp2_full_capture_records_local_shards_with_placement(dist_run):
    out, _ = dist_run
    assert Trace.ranks(out / "fsdp-full") == [0, 1]
    r1 = Trace.open(out / "fsdp-full", rank=1)
    rec = r1.get("head/0/param_grad/weight")
    assert rec.shape == (1, 8) and rec.stored  # 3 rows over 2 ranks, as torch.chunk: 2 + 1
    assert rec.placement == {"mesh": [2], "placements": ["Shard(0)"], "global_shape": [3, 8], "offset": [2, 0],
                             "coordinate": [1]}
    assert r1.provenance["dtensor"] == "local" and r1.provenance["param_grads_read"] == "end of backward"


def test_fsdp2_trace_assembles_and_compares_with_one_process(dist_run):
    out, _ = dist_run
    ref = _one_process()
    whole = Trace.open(out / "fsdp-full")  # no rank: the DTensor shards are assembled
    assert whole.provenance["ranks"] == [0, 1] and "assembled" in whole.provenance
    for key in ("head/0/param_grad/weight", "attn/0/param_grad/in_proj_weight", "attn.out_proj/0/param_grad/weight",
                "embed/0/param/weight", "head/0/output"):
        got, want = whole.load(key), ref.load(key)
        assert got.shape == want.shape, key
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)
    assert whole.get("head/0/param_grad/weight").shape == (3, 8)
    from tensorparity.trace._compare import compare_traces

    report = compare_traces(ref, out / "fsdp-full")
    assert report.alignment == "name"
    assert report.passed, report.verdict
    assert not report.params_only_a and not report.params_only_b


def test_fsdp2_gather_records_full_tensors(dist_run):
    out, _ = dist_run
    ref = _one_process()
    r0 = Trace.open(out / "fsdp-gather", rank=0)
    rec = r0.get("head/0/param_grad/weight")
    assert rec.shape == (3, 8) and rec.placement["gathered"] is True
    torch.testing.assert_close(r0.load(rec), ref.load("head/0/param_grad/weight"), rtol=1e-5, atol=1e-6)


def test_fsdp2_stats_capture_merges_shard_statistics(dist_run):
    out, _ = dist_run
    ref = _one_process(mode="stats")
    whole = Trace.open(out / "fsdp-stats")
    got, want = whole.get("head/0/param_grad/weight").stats, ref.get("head/0/param_grad/weight").stats
    assert got.numel == want.numel == 24 and got.hash == ""  # a fingerprint of shards cannot be merged
    for field in ("min", "max", "mean", "std", "norm"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-5, abs=1e-7), field


def test_ddp_records_the_all_reduced_gradient_and_the_local_one(dist_run):
    out, facts = dist_run
    f0 = facts[0]
    assert f0["ddp-sync-local"] != pytest.approx(f0["ddp-sync-avg"])  # the data really differ per rank
    sync = Trace.open(out / "ddp-sync", rank=0)
    final = sync.load("head/0/param_grad/weight")[0, 0].item()
    local = sync.load("head/0/param_grad_local/weight")[0, 0].item()
    assert final == pytest.approx(f0["ddp-sync-avg"], rel=1e-5) and final == pytest.approx(f0["ddp-sync"], rel=1e-6)
    assert local == pytest.approx(f0["ddp-sync-local"], rel=1e-5)
    nosync = Trace.open(out / "ddp-nosync", rank=0)
    assert nosync.load("head/0/param_grad/weight")[0, 0].item() == pytest.approx(f0["ddp-nosync-local"], rel=1e-5)


def test_ddp_without_sync_compares_different_and_names_the_gradients(dist_run):
    out, _ = dist_run
    from tensorparity.trace._compare import compare_traces

    report = compare_traces(out / "ddp-sync" / "rank-0", out / "ddp-nosync" / "rank-0")
    assert not report.passed
    failing = " ".join(p.key for p in report.params if not p.passed)
    for name in ("head", "attn.out_proj", "embed"):
        assert f"{name}/0/param_grad/weight" in failing or f"{name}.weight" in failing, failing
    assert all(layer.forward_passed is not False for layer in report.layers)  # only the gradients differ


def test_one_process_against_ddp_rank0_aligns_by_name(dist_run):
    out, _ = dist_run
    Tiny, batch = _tiny()
    m = Tiny()
    with capture(m) as one:
        m(batch(10)).sum().backward()
    ddp = Trace.open(out / "ddp-sync", rank=0)
    assert ddp.provenance["name_prefixes_removed"] == ["module."]
    assert not [r.module for r in ddp.records if r.module.startswith("module")]
    alignment = align_layers(one.records, ddp.records)
    assert alignment.method == "name" and not alignment.only_a and not alignment.only_b
    names = {m.a.name for m in alignment.matches}
    assert "attn.out_proj" in names  # called by no one (MHA uses its weight): paired by name all the same


def test_capture_failing_on_one_rank_fails_on_all(dist_run):
    out, facts = dist_run
    assert facts[1]["fails"] == "RuntimeError: boom on rank 1"
    assert "capture failed on rank 1" in facts[0]["fails"] and "fix:" in facts[0]["fails"]
    for r in (0, 1):
        assert not (out / "fails" / f"rank-{r}" / "manifest.json").exists()
        with pytest.raises(TraceError, match="did not finish"):
            Trace.open(out / "fails", rank=r)


def test_assembly_refuses_missing_ranks(dist_run, tmp_path):
    out, _ = dist_run
    import shutil

    shutil.copytree(out / "fsdp-full" / "rank-0", tmp_path / "t" / "rank-0")
    with pytest.raises(TraceError, match=r"captured on 2 ranks but rank 1 is missing.*fix: copy every rank"):
        Trace.open(tmp_path / "t")


def test_assemble_tensor_refuses_shards_that_do_not_tile():
    p = {"global_shape": [4, 2], "offset": [0, 0], "placements": ["Shard(0)"]}
    with pytest.raises(TensorParityError, match=r"do not tile the tensor \[4, 2\]: 4 of 8 elements.*fix:"):
        assemble_tensor([(0, p, torch.ones(2, 2)), (1, p, torch.ones(2, 2))], key="w")


def test_order_alignment_pairs_modules_that_only_hold_parameter_gradients():
    # MultiheadAttention never calls out_proj (it uses its weight): that layer has parameter
    # gradients and no forward output. Aligned by order, it is paired inside its paired parent.
    Tiny, batch = _tiny()
    m = Tiny()
    with capture(m) as t:
        m(batch(0)).sum().backward()
    renamed = [dataclasses.replace(r, module=f"net.{r.module}" if r.module else "") for r in t.records]
    alignment = align_layers(t.records, renamed, method="order")
    pairs = {(x.a.name, x.b.name) for x in alignment.matches}
    assert ("attn.out_proj", "net.attn.out_proj") in pairs and not alignment.only_a and not alignment.only_b


def test_torch_compile_prefix_removed():
    Tiny, batch = _tiny()
    plain, compiled = Tiny(), torch.compile(Tiny(), backend="eager")
    with capture(plain) as a:
        plain(batch(0)).sum().backward()
    with capture(compiled) as b:
        compiled(batch(0)).sum().backward()
    assert b.provenance["name_prefixes_removed"] == ["_orig_mod."]
    assert {r.key for r in a.records} == {r.key for r in b.records}
    alignment = align_layers(a.records, b.records)
    assert alignment.method == "name" and not alignment.only_a and not alignment.only_b
    torch.testing.assert_close(b.load("head/0/param_grad/weight"), a.load("head/0/param_grad/weight"))


def test_checkpoint_wrapper_prefix_removed_and_live_checkpoint_keys():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    import tensorparity

    Tiny, batch = _tiny()
    m = Tiny()
    m.attn = checkpoint_wrapper(m.attn)
    with capture(m) as t:
        m(batch(0)).sum().backward()
    assert "_checkpoint_wrapped_module." in t.provenance["name_prefixes_removed"]
    assert "attn/0/param_grad/in_proj_weight" in {r.key for r in t.records}
    ckpt = tensorparity.open(torch.compile(Tiny(), backend="eager"))
    assert "head.weight" in set(ckpt.keys()) and ckpt.provenance["name_prefixes_removed"] == ["_orig_mod."]


def test_a_module_named_module_keeps_its_name():
    model = nn.Sequential()
    model.add_module("module", nn.Linear(2, 2))
    with capture(model) as t:
        model(torch.ones(1, 2)).sum().backward()
    assert "module/0/output" in {r.key for r in t.records} and t.provenance["name_prefixes_removed"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs an accelerator (NCCL); this machine has none")
def test_fsdp1_prefix_removed(tmp_path):  # pragma: no cover - GPU only
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        Tiny, batch = _tiny()
        m = FSDP(Tiny().cuda(), use_orig_params=True)
        with capture(m) as t:
            m(batch(0).cuda()).sum().backward()
        assert "_fsdp_wrapped_module." in t.provenance["name_prefixes_removed"]
        assert not [r.key for r in t.records if "_fsdp_wrapped_module" in r.key]
    finally:
        dist.destroy_process_group()
