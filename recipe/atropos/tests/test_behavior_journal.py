"""The behaviour records' journal (trajectory/behavior_journal.py): what the gateway generated before
the trainer restarted from a checkpoint is known after it, and its groups are stale, never fresh."""

from __future__ import annotations

import subprocess
import textwrap

import numpy as np
from omegaconf import OmegaConf

from recipe.atropos.trajectory.behavior import BehaviorRecords
from recipe.atropos.trajectory.behavior_journal import FOLDER, BehaviorJournal
from recipe.atropos.trajectory.staleness import StalenessFilter, match_sample

from .conftest import PYTHON, REPO_ROOT, repo_env
from .test_staleness import group, recorded, sequence


def journaled_records(directory, keep_versions: int = 3, keep_evicted_versions: int = 2) -> BehaviorRecords:
    records = BehaviorRecords(keep_versions, keep_evicted_versions)
    records.use_journal(BehaviorJournal(directory, keep_versions + keep_evicted_versions))
    return records


def test_groups_generated_before_a_restart_are_dropped_as_stale_whatever_unmatched_samples_says(tmp_path):
    before = journaled_records(tmp_path)
    before.new_version(0)  # a fresh start
    for version in (0, 1, 2, 3):
        before.new_version(version)
        recorded(before, version, [10 + version, 20 + version])
    # Killed after step 3; the checkpoint was step 2. The restarted trainer's gateway opens at 2.
    after = journaled_records(tmp_path)
    after.new_version(2)
    assert after.stats()["restored"] == 4
    fresh = recorded(after, 2, [30, 31])
    for version in (0, 2, 3):  # older than the checkpoint, the checkpoint's own, thrown away by the restart
        old = [10 + version, 20 + version]
        sample = match_sample(after, *sequence([1], (old, True)))
        assert sample.matched and sample.version == version and sample.logprobs_T is None
    assert after.evicted_version([99]) is None  # never generated: still unmatched
    for unmatched in ("keep", "drop"):
        staleness = StalenessFilter(after, max_staleness=8, unmatched=unmatched)
        staleness.add([group(sequence([1], ([13, 23], True)), sequence([1], ([12, 22], True))),
                       group(sequence([1], (fresh, True)), sequence([1], (fresh, True)))])
        selection = staleness.take(2, current_version=2)
        assert selection is not None and selection.dropped_groups == {"stale": 1}
        assert selection.metrics()["atropos/behavior_matched_fraction"] == 1.0


def test_without_the_journal_they_would_train_as_unmatched(tmp_path):
    """What the journal is for: the same groups against a restarted trainer's empty records."""
    before = BehaviorRecords()
    old = recorded(before, 3, [13, 23])
    after = BehaviorRecords()
    after.new_version(2)
    staleness = StalenessFilter(after, max_staleness=8, unmatched="keep")
    staleness.add([group(sequence([1], (old, True)), sequence([1], (old, True)))])
    selection = staleness.take(2, current_version=2)
    assert selection.dropped_groups == {} and selection.metrics()["atropos/behavior_matched_fraction"] == 0.0


def test_a_fresh_start_forgets_an_earlier_run_and_old_versions_are_deleted(tmp_path):
    first = journaled_records(tmp_path, keep_versions=1, keep_evicted_versions=1)
    for version in range(5):
        first.new_version(version)
        recorded(first, version, [version, 7])
    # Versions more than keep_versions + keep_evicted_versions (2) behind the newest are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2.u64", "v3.u64", "v4.u64"]
    assert np.fromfile(tmp_path / "v4.u64", dtype=np.uint64).size == 1
    again = journaled_records(tmp_path)
    again.new_version(0)  # no checkpoint loaded: a new run
    assert again.stats()["restored"] == 0 and list(tmp_path.iterdir()) == []
    assert match_sample(again, *sequence([1], ([4, 7], True))).matched is False


def test_a_completion_is_on_disk_before_its_answer_leaves_even_if_the_process_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from recipe.atropos.trajectory.behavior import BehaviorRecords
        from recipe.atropos.trajectory.behavior_journal import BehaviorJournal
        records = BehaviorRecords(4, 4)
        records.use_journal(BehaviorJournal({str(tmp_path)!r}, 8))
        records.new_version(0)
        records.add(0, [5, 6, 7], [-0.1, -0.2, -0.3])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([PYTHON, "-c", script], cwd=REPO_ROOT, env=repo_env(), timeout=120)
    assert result.returncode == -9
    after = journaled_records(tmp_path)
    after.new_version(1)
    assert after.evicted_version([5, 6, 7]) == 0


def test_the_journal_lives_beside_verl_s_checkpoints_when_the_run_saves_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = BehaviorRecords(10, 64)
    saving = OmegaConf.create({"default_local_dir": "ckpt", "save_freq": 5})
    journal = BehaviorJournal.for_run(saving, records)
    assert journal.directory == tmp_path / "ckpt" / FOLDER and journal.keep_versions == 74
    not_saving = OmegaConf.create({"default_local_dir": "other", "save_freq": -1})
    assert BehaviorJournal.for_run(not_saving, records) is None  # nothing written where nothing is saved
    (tmp_path / "other" / FOLDER).mkdir(parents=True)  # a run it resumes from left one: read it
    assert BehaviorJournal.for_run(not_saving, records) is not None


def test_a_journal_that_cannot_be_written_stops_with_a_warning_and_generation_goes_on(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    records = journaled_records(blocker / "journal")  # cannot be created (a disk full fails the same way)
    with caplog.at_level("WARNING"):
        records.new_version(0)
        recorded(records, 0, [1, 2])
    assert records.lookup([1, 2]).version == 0  # recorded in memory, no error to the gateway's route
    assert records.journal.failed and "journal" in caplog.text and "unmatched_samples" in caplog.text
