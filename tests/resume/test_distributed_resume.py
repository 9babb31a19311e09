"""The distributed resume check: every leg under real ``torchrun`` with 2 CPU ranks (gloo), an
FSDP2 model checkpointed with ``torch.distributed.checkpoint``.

A correct recipe passes bitwise; one that forgets rank 1's torch RNG is a resume bug whose finding
names rank 1 and the RNG (and is confirmed); saved on 2 ranks it resumes on 1 through DCP's
resharding, each rank's own RNG left out with a note; a rank that hangs is stopped by the timeout.
The same with nccl is GPU-only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from tensorparity.cli import app
from tensorparity.errors import UsageError
from tensorparity.examples.distributed_recipes import DistributedRecipe
from tensorparity.resume import RecipeError, resume_check

EXAMPLES = "tensorparity.examples.distributed_recipes"
RECIPE = f"{EXAMPLES}:DistributedRecipe"
HERE = Path(__file__).resolve()


def test_two_rank_dcp_resume_passes_bitwise() -> None:
    report = resume_check(RECIPE, steps=6, resume_at=3, nproc=2, confirm=False, timeout=180)
    assert report.verdict == "pass" and report.exit_code == 0, report
    assert report.profile == "bitwise" and "torchrun (2 ranks; gloo on CPU)" in report.isolation
    (leg,) = report.legs
    assert [r.step for r in leg.rows] == [4, 5, 6] and all(r.match and r.params_same for r in leg.rows)
    assert report.findings == () and leg.segments[0].notes == ()


def test_forgetting_rank_1s_rng_is_named_and_confirmed() -> None:
    report = resume_check(DistributedRecipe(forget_rng_of_rank=1), steps=6, resume_at=3, nproc=2, timeout=180)
    assert report.verdict == "resume bug" and report.exit_code == 1
    (seg,) = report.legs[0].segments
    assert seg.divergence is not None and seg.divergence.step == 4
    (finding,) = seg.findings  # right after the load: only rank 1's torch RNG
    assert finding.component == "rng.torch" and finding.confirmed is True
    assert finding.message == "rank 1's torch CPU RNG state differs: dropout masks will change"
    assert not any("rank 0" in f.message for f in report.findings)
    assert "rank 1's torch CPU RNG state differs" in report.summary()


def test_under_ddp_too_the_forgotten_rank_is_named() -> None:
    report = resume_check(DistributedRecipe(wrap="ddp", forget_rng_of_rank=1), steps=6, resume_at=3, nproc=2,
                          confirm=False, timeout=180)
    assert report.verdict == "resume bug" and report.exit_code == 1
    (finding,) = report.legs[0].segments[0].findings
    assert finding.message == "rank 1's torch CPU RNG state differs: dropout masks will change"


def test_saved_on_two_ranks_resumes_on_one_through_resharding() -> None:
    result = CliRunner().invoke(app, ["resume-check", f"{EXAMPLES}:ReshardableRecipe", "-n", "6", "--resume-at", "3",
                                      "--nproc", "2", "--resume-nproc", "1", "--no-confirm", "--timeout", "180",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] == "pass" and data["tolerance"]["profile"] == "dtype"
    assert "2 ranks, resumed on 1" in data["isolation"]
    (seg,) = data["legs"][0]["segments"]
    assert [s["step"] for s in seg["steps"]] == [4, 5, 6] and all(s["batch_same"] for s in seg["steps"])
    assert seg["findings"] == [] and seg["end"] == []
    # What cannot be resharded is said, not reported as lost: each rank's own RNG.
    (note,) = seg["notes"]
    assert note.startswith("saved on 2 ranks, resumed on 1: a rank's own state cannot be resharded, so every "
                           "rank's RNG states and data-loader generators were left out of the comparison")
    assert "rng.torch" in note
    assert any("cannot agree bitwise; compared with dtype tolerances" in n for n in data["notes"])


def test_bad_distributed_options_are_refused_before_any_process_starts() -> None:
    with pytest.raises(UsageError) as bitwise:
        resume_check(RECIPE, steps=6, resume_at=3, nproc=2, resume_nproc=1, tolerance="bitwise")
    assert "fix: pass tolerance='dtype' (--tolerance dtype) or leave the tolerance out" in str(bitwise.value)
    with pytest.raises(UsageError) as bad:
        resume_check(RECIPE, steps=6, resume_at=3, nproc=0, resume_nproc=-1)
    assert "nproc must be a positive integer, not 0; resume_nproc must be a positive integer, not -1" in str(bad.value)
    with pytest.raises(RecipeError) as default:
        resume_check("tensorparity.examples.resume_recipes:TinyDefaultRecipe", steps=6, resume_at=3, nproc=2)
    assert "needs the recipe's own save()/load()" in str(default.value)
    assert "torch.distributed.checkpoint" in str(default.value)


class HangsOnRank1(DistributedRecipe):
    """Rank 1 never reaches the collective of its first step: rank 0 waits for it forever."""

    def step(self, objs: Any, batch: Any) -> torch.Tensor:
        import torch.distributed as dist

        if dist.get_rank() == 1:
            time.sleep(3600)
        return super().step(objs, batch)


def test_a_hung_rank_is_stopped_by_the_timeout(tmp_path: Path) -> None:
    began = time.monotonic()
    with pytest.raises(RecipeError) as hung:
        resume_check(f"{HERE}:HangsOnRank1", steps=4, resume_at=2, nproc=2, confirm=False, timeout=20,
                     workdir=tmp_path)
    assert time.monotonic() - began < 50
    assert "did not finish within 20 s and were stopped" in str(hung.value)
    assert "(2 ranks)" in str(hung.value)
    # No rank survives: torchrun puts each in a session of its own, so stopping torchrun's process
    # group alone would leave them running.
    assert _alive_ranks(tmp_path) == []


def _alive_ranks(work: Path) -> list[int]:
    """Live rank processes whose job lies in ``work``."""
    alive = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"tensorparity.resume._dist" in cmd and str(work).encode() in cmd:
            alive.append(int(proc.name))
    return alive


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the nccl variant needs 2 CUDA devices (one per rank)")
def test_nccl_two_rank_resume_names_rank_1() -> None:
    good = resume_check(RECIPE, steps=6, resume_at=3, nproc=2, confirm=False, timeout=300)
    assert good.passed and "nccl" in good.isolation, good
    bad = resume_check(DistributedRecipe(forget_rng_of_rank=1), steps=6, resume_at=3, nproc=2, confirm=False,
                       timeout=300)
    assert not bad.passed
    messages = [f.message for f in bad.legs[0].segments[0].findings]
    assert "rank 1's CUDA RNG state differs: dropout masks and random ops on the GPU will change" in messages
    assert all(m.startswith("rank 1's ") for m in messages)
