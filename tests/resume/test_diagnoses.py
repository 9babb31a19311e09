"""Diagnoses that must name the right reason, not just the right key: an adapter-only checkpoint
whose base load() re-initialised, optimizer hyper-parameters a config overwrote after the load,
and buffers registered with ``persistent=False``. Each is a real recipe through the real check
(fresh processes, confirmation re-runs)."""

from __future__ import annotations

from resume_test_recipes import spec

from tensorparity.resume import resume_check

STEPS = 6  # 6 batches per epoch: step 3 is mid-epoch


def test_adapter_only_checkpoint_whose_base_load_reinitialised() -> None:
    report = resume_check(spec("LoraRebuiltOnLoad"), steps=STEPS, resume_at=3)
    assert report.verdict == "resume bug"
    (leg,) = report.legs
    seg = leg.failing
    assert seg is not None and [f.component for f in seg.findings] == ["model"], seg.findings
    message = seg.findings[0].message
    assert message.startswith("load_state_dict(strict=False) skipped 16 keys the checkpoint does not hold, and load() "
                              "re-initialised them differently (net.decoder.bias, net.decoder.weight and "
                              "net.layers.0.ffn.0.bias ...): they no longer hold the values build() gave them, which "
                              "the uninterrupted run still has (they are frozen: never trained)"), message
    assert "the checkpoint holds only the 4 trainable (adapter) weights (net.layers.0.self_attn.q_proj.lora_a" \
        in message
    assert message.endswith("fix: save and load the base weights too, or re-create them in load() from the same seed "
                            "as build()")
    assert "keep their freshly built values" not in str(report)
    assert seg.findings[0].confirmed is True
    # The LayerNorms load() reset to the same ones and zeros: skipped, equal, harmless.
    (note,) = seg.notes
    assert note.startswith("load_state_dict(strict=False) skipped 7 keys the checkpoint does not hold") and \
        "nothing was lost" in note


def test_optimizer_moments_restored_but_param_groups_overwritten_after_the_load() -> None:
    report = resume_check(spec("ConfigOverwritesOptimizer"), steps=STEPS, resume_at=3)
    (leg,) = report.legs
    seg = leg.failing
    assert seg is not None and [f.component for f in seg.findings] == ["optimizer"], seg.findings
    message = seg.findings[0].message
    assert message.startswith("optimizer moments were restored (exp_avg, exp_avg_sq and step of 22 parameters match "
                              "the uninterrupted run), but its param_groups hyper-parameters differ: param group 0 lr "
                              "is 0.003, expected 0.0024; param group 0 weight_decay is 0.05, expected "
                              "0.00625"), message
    assert message.endswith("fix: load the optimizer state after the config sets lr and weight_decay, or do not "
                            "overwrite param_groups after optimizer.load_state_dict")
    assert "was not restored" not in message and "optimizer state was not restored" not in report.summary()
    assert seg.findings[0].confirmed is True
    assert message in report.summary()


def test_non_persistent_buffers_are_named() -> None:
    report = resume_check(spec("NonPersistentStats"), steps=STEPS, resume_at=3)
    (leg,) = report.legs
    seg = leg.failing
    assert seg is not None and [f.component for f in seg.findings] == ["buffers"], seg.findings
    finding = seg.findings[0]
    assert finding.message == (
        "non-persistent buffers input_norm.running_mean and input_norm.running_var differ from the uninterrupted "
        "run's: registered with persistent=False, they are not saved in state_dict(), so the checkpoint does not hold "
        "them and the resumed run starts from the freshly built values; fix: register them with persistent=True, or "
        "recompute them in load()")
    assert finding.keys == ("buffers.input_norm.running_mean", "buffers.input_norm.running_var")
    assert finding.confirmed is True
    assert [(c.components, c.passed) for c in leg.confirmations] == [(("buffers",), True)]
    assert "cannot see" not in str(report) and seg.notes == ()


def test_non_persistent_cache_rebuilt_on_first_use_is_a_note_not_a_bug() -> None:
    report = resume_check(spec("NonPersistentCache"), steps=STEPS, resume_at=3, confirm=False)
    assert report.passed, report
    seg = report.legs[0].segments[0]
    assert seg.findings == ()
    assert seg.notes == ("non-persistent buffer scale_cache differs from the uninterrupted run's right after the load, "
                         "yet the run matches at every step and at the end: recomputed before use (a cache)",)
