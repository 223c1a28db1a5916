"""benchmarks/steps_to_target.py: steps to a fixed Recall@1 per loss and seed, from a compare results.json."""

import json

import pytest

from benchmarks import steps_to_target as stt


def _hist(*recalls):
    return [{"epoch": i + 1, "recall@1": r} for i, r in enumerate(recalls)]


def test_first_step_is_the_first_evaluation_at_or_above_the_target():
    hist = _hist(0.2, 0.5, 0.4, 0.6)
    assert stt.first_step(hist, 0.5, 100) == 200  # equal counts as reached
    assert stt.first_step(hist, 0.55, 100) == 400
    assert stt.first_step(hist, 0.1, 50) == 50
    assert stt.first_step(hist, 0.61, 100) is None


def test_table_rows_best_and_summary():
    runs = [dict(entry="pddm", seed=0, history=_hist(0.3, 0.5, 0.45)),
            dict(entry="pddm", seed=1, history=_hist(0.3, 0.35, 0.4)),
            dict(entry="batch-hard", seed=0, history=_hist(0.42, 0.41, 0.41))]
    text = stt.table(runs, [(0.4, "floor"), (0.9, "never")], 100)
    lines = text.splitlines()
    assert "steps to Recall@1 >= 0.400 (floor)" in lines[0] and "(never)" in lines[0]
    assert "| pddm | 0 | 0.4500 | 0.5000 (200) | 200 | not reached |" in lines
    assert "| pddm | 1 | 0.4000 | 0.4000 (300) | 300 | not reached |" in lines
    assert "| batch-hard | 0 | 0.4100 | 0.4200 (100) | 100 | not reached |" in lines
    assert "| pddm | 2 of 2; 250 | 0 of 2 |" in lines  # median of 200 and 300
    assert "| batch-hard | 1 of 1; 100 | 0 of 1 |" in lines
    with pytest.raises(ValueError, match="targets"):
        stt.table(runs, [], 100)


def _results(tmp_path, floor=0.35):
    summary = {"batch": {"p": 8, "k": 4, "batches_per_epoch": 50}, "floor": {"recall@1": floor},
               "losses": {"pddm": {"runs": [{"seed": 1, "history": _hist(0.2, 0.3)},
                                            {"seed": 0, "history": _hist(0.36, 0.3)}]},
                          "batch-hard": {"runs": [{"seed": 0, "history": _hist(0.1, 0.2)}]}}}
    (tmp_path / "results.json").write_text(json.dumps(summary))


def test_cli_default_target_is_results_floor_then_floor_json(tmp_path, capsys):
    _results(tmp_path)
    assert stt.main([str(tmp_path)]) == 0
    text = (tmp_path / "steps_to_target.md").read_text()
    assert "0.350 (floor)" in text
    rows = [line for line in text.splitlines() if line.startswith("| pddm | ")]
    assert rows[0].startswith("| pddm | 0 |") and rows[0].endswith("| 50 |")  # seeds ascending
    assert rows[1].startswith("| pddm | 1 |") and rows[1].endswith("| not reached |")
    (tmp_path / "floor.json").write_text(json.dumps({"floor": {"recall@1": 0.25}}))
    assert stt.main([str(tmp_path)]) == 0
    text = (tmp_path / "steps_to_target.md").read_text()
    assert "0.250 (pretrained features)" in text and "0.350 (raw pixels)" in text
    assert "| pddm | 1 | 0.3000 | 0.3000 (100) | 100 | not reached |" in text
    assert stt.main([str(tmp_path), "--target", "0.15", "x", "--target", "0.3", "y"]) == 0
    text = (tmp_path / "steps_to_target.md").read_text()
    assert "| batch-hard | 0 | 0.2000 | 0.2000 (100) | 100 | not reached |" in text


@pytest.mark.parametrize("args, message", [
    (["--target", "1.5", "x"], "must be in"),
    (["--target", "high", "x"], "not a number"),
    (["--target", "0.5", "a | b"], "contains '|'"),
])
def test_cli_refuses_bad_targets_naming_the_flag(tmp_path, capsys, args, message):
    _results(tmp_path)
    with pytest.raises(SystemExit) as e:
        stt.main([str(tmp_path), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--target" in err and message in err


def test_cli_names_a_missing_results_json(tmp_path, capsys):
    with pytest.raises(SystemExit):
        stt.main([str(tmp_path)])
    assert "results.json" in capsys.readouterr().err


def test_cli_takes_the_results_json_itself_and_names_a_foreign_file(tmp_path, capsys):
    _results(tmp_path)
    assert stt.main([str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "steps_to_target.md").exists()
    for text in ("{", '{"losses": {}}', "[]"):
        (tmp_path / "results.json").write_text(text)
        with pytest.raises(SystemExit) as e:
            stt.main([str(tmp_path)])
        assert e.value.code == 2 and "is not a `pddm-ext compare` results.json" in capsys.readouterr().err
    _results(tmp_path)
    (tmp_path / "floor.json").write_text("{}")
    with pytest.raises(SystemExit):
        stt.main([str(tmp_path)])
    assert "no floor Recall@1" in capsys.readouterr().err
