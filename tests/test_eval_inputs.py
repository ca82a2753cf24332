"""Eval inputs checked record by record (issue 16, items 2 and 5): a bad ``--generations`` record or
``--data`` row is one ``error:`` line naming where it is (exit code 2, nothing written); uneven
sample counts, questions without samples and skipped records are warnings counted in results.md;
the pass@k-versus-k plot is written next to results.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dyjr_verl.eval.__main__ import load_questions, main
from dyjr_verl.eval.metrics import pass_at_k

PNG = b"\x89PNG\r\n\x1a\n"


def record(index: int, samples, benchmark: str = "toy", gold: str = "7", **extra) -> dict:
    return {"benchmark": benchmark, "index": index, "prompt": [], "ground_truth": gold, "data_source": benchmark,
            "ability": "math", "extra_info": {}, "greedy": "\\boxed{7}", "samples": samples, **extra}


def write(path, lines) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


GOOD = record(0, ["\\boxed{7}", "\\boxed{8}"])


@pytest.mark.parametrize("bad,message", [
    ('{"benchmark": "toy", "index": 1, ', "2: not a JSON line"),
    ('["a list"]', "2: a record is a JSON object, got list"),
    ({k: v for k, v in record(1, ["x"]).items() if k not in ("ground_truth", "samples")},
     "2: missing key(s) ground_truth, samples"),
    # a string was scored character by character: 9 "samples" '\boxed{7}' -> 9 wrong answers
    (record(1, "\\boxed{7}"), "2: samples must be a list of strings (the sampled responses), got str"),
    (record(1, ["\\boxed{7}", None, 3]), "2: samples must be a list of strings (the sampled responses), "
                                         "got a list holding NoneType, int"),
    (record(1, ["x"], greedy=["x"]), "2: greedy must be a string or null, got list"),
    (record(1, ["x"], gold=""), "2: empty ground_truth ''"),
    (record(0, ["x"]), "2: benchmark 'toy' index 0 again (first at line 1)"),
    ({**record(1, ["x"]), "index": "1"}, "2: index must be an integer, got '1'"),
    (record(1, ["x"], ability="code"), "2: ability 'code' has no default reward"),
])
def test_bad_generations_record_is_one_line_with_file_and_line(tmp_path, capsys, bad, message):
    gens = write(tmp_path / "generations.jsonl", [GOOD, bad])
    assert main(["--generations", gens, "--out", str(tmp_path / "out")]) == 2
    err = one_error(capsys)
    assert err.startswith(f"error: {gens}:{message}"), err
    assert not (tmp_path / "out").exists()


def test_unknown_ability_is_fine_with_an_explicit_reward(tmp_path):
    gens = write(tmp_path / "g.jsonl", [record(0, ["\\boxed{7}", "x"], ability="code")])
    assert main(["--generations", gens, "--reward", "dyjr_verl.rewards.math", "--out", str(tmp_path / "o")]) == 0
    assert "| toy | 1 | 100.0 | 50.0 |" in (tmp_path / "o" / "results.md").read_text()


def test_empty_generations_file_is_one_line(tmp_path, capsys):
    gens = write(tmp_path / "g.jsonl", ["", "  "])
    assert main(["--generations", gens, "--out", str(tmp_path / "o")]) == 2
    assert one_error(capsys) == f"error: --generations {gens}: no record to score"


@pytest.mark.parametrize("flags,named", [
    (["--data", "x=a.parquet"], "--data applies"),
    (["--samples", "4", "--temperature", "0.6"], "--samples, --temperature apply"),
    (["--rank-k", "8"], "--rank-k applies"),
    (["--limit", "3"], "--limit applies"),
])
def test_generation_flags_with_generations_are_refused(tmp_path, capsys, flags, named):
    gens = write(tmp_path / "g.jsonl", [GOOD])
    assert main(["--generations", gens, "--out", str(tmp_path / "o"), *flags]) == 2
    assert one_error(capsys).startswith(f"error: {named} to --model only")


def test_uneven_sample_counts_keep_every_sample(tmp_path, capsys):
    """Today's code cut every question to the shortest (2 here) without a word."""
    right, wrong = "\\boxed{7}", "\\boxed{8}"
    gens = write(tmp_path / "g.jsonl", [
        record(0, [wrong, wrong, wrong, right]),  # correct only in the samples beyond the shortest count
        record(1, [right, wrong]),
        record(2, [wrong, right, right, right, wrong, right, wrong, wrong]),
    ])
    out = tmp_path / "out"
    assert main(["--generations", gens, "--ks", "1", "2", "4", "--out", str(out)]) == 0
    warn = capsys.readouterr().err
    assert "eval: warning: toy: sample counts differ between questions (2 to 8)" in warn
    md = (out / "results.md").read_text()
    assert "| benchmark | questions | greedy | mean@2-8 | maj@2-8 | pass@1 | pass@2 | distinct_correct |" in md
    assert "pass@4" not in md  # beyond the smallest n: not every question could take part
    assert "* toy: sample counts differ between questions (2 to 8); mean@2-8 and maj@2-8 are over each " \
           "question's own samples, pass@k only up to k = 2 (the smallest n)" in md
    mean = (1 / 4 + 1 / 2 + 4 / 8) / 3  # the cut to 2 samples gave (0 + 1/2 + 1/2) / 3
    pass2 = (pass_at_k(4, 1, 2) + pass_at_k(2, 1, 2) + pass_at_k(8, 4, 2)) / 3
    row = next(line for line in md.splitlines() if line.startswith("| toy |"))
    maj = (0 + 1 / 2 + 1 / 2) / 3  # 3 x "8" beat one "7"; 1:1 and 4:4 are ties
    assert row.split(" | ")[3:7] == [f"{100 * mean:.1f}", f"{100 * maj:.1f}", f"{100 * mean:.1f}", f"{100 * pass2:.1f}"]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [len(s["samples"]) for s in scores] == [4, 2, 8]


def test_questions_without_samples_are_counted_warnings(tmp_path, capsys):
    """A question with no samples used to drop the whole benchmark's sample metrics (n = 0); one
    with neither greedy nor samples is skipped; both are said in results.md."""
    gens = write(tmp_path / "g.jsonl", [
        record(0, ["\\boxed{7}", "\\boxed{8}"]),
        record(1, []),  # greedy only
        "",
        record(2, [], greedy=None),  # nothing to score
        record(3, ["\\boxed{7}", "\\boxed{7}"]),
    ])
    out = tmp_path / "out"
    assert main(["--generations", gens, "--ks", "1", "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "| toy | 3 | 100.0 | 75.0 | 75.0 | 75.0 | 100.0 |" in md  # greedy over 3, the rest over the 2 sampled
    assert "* 1 record(s) of g.jsonl skipped: neither a greedy output nor samples (line 4)" in md
    assert "* toy: 1 of 3 questions have no samples; they count for greedy only" in md
    err = capsys.readouterr().err
    assert err.count("eval: warning:") == 2


def test_greedy_only_generations_have_no_warning(tmp_path, capsys):
    """``--samples 0`` runs: no samples anywhere is a greedy evaluation, not a problem."""
    gens = write(tmp_path / "g.jsonl", [record(0, []), record(1, [], greedy="\\boxed{3}")])
    out = tmp_path / "out"
    assert main(["--generations", gens, "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "| toy | 2 | 50.0 |" in md and "Notes" not in md and "pass_at_k.png" not in md
    assert "warning" not in capsys.readouterr().err and not (out / "pass_at_k.png").exists()


# ------------------------------------------------------------------------------------------------
# --data parquet
# ------------------------------------------------------------------------------------------------


def parquet(path, rows: list[dict]) -> str:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def row(gold, prompt=None, **extra) -> dict:
    return {"prompt": prompt if prompt is not None else [{"role": "user", "content": "1+1?"}],
            "reward_model": {"ground_truth": gold}, "ability": "math", "data_source": "toy", **extra}


@pytest.mark.parametrize("rows,message", [
    ([row("2"), row(None)], "row 1: no reward_model.ground_truth"),
    ([row("2"), row("  ")], "row 1: no reward_model.ground_truth"),
    ([row("2", prompt="1+1?")], "row 0: prompt must be a non-empty list of {role, content} chat messages"),
    ([row("2", ability="code")], "row 0: ability 'code' has no default reward"),
])
def test_bad_data_row_is_one_line(tmp_path, capsys, rows, message):
    data = parquet(tmp_path / "q.parquet", rows)
    assert main(["--model", str(tmp_path / "no_model"), "--data", f"toy={data}", "--out", str(tmp_path / "o")]) == 2
    assert one_error(capsys).startswith(f"error: --data toy={data}: {message}")


def test_data_file_problems_are_one_line(tmp_path, capsys):
    import pyarrow.parquet as pq

    data = parquet(tmp_path / "q.parquet", [row("2")])
    empty = str(tmp_path / "empty.parquet")
    pq.write_table(pq.read_table(data).slice(0, 0), empty)
    not_parquet = tmp_path / "q.jsonl"
    not_parquet.write_text("{}\n")
    cases = [
        (["--data", f"a={data}", "--data", f"a={data}"], f"error: --data a={data}: benchmark name 'a' given twice"),
        (["--data", f"e={empty}"], f"error: --data e={empty}: no rows"),
        (["--data", f"j={not_parquet}"], f"error: --data j={not_parquet}: not a readable parquet file"),
        (["--data", f"a={data}", "--limit", "0"], "error: --limit must be >= 1, got 0"),  # 0 meant "all rows"
    ]
    for flags, message in cases:
        assert main(["--model", str(tmp_path / "no_model"), *flags, "--out", str(tmp_path / "o")]) == 2
        assert one_error(capsys).startswith(message)


def test_list_ground_truths_stay_whole_and_json_writable(tmp_path):
    """A list of reference answers (data/math.py keeps them) came back as a numpy array, which
    json.dumps of generations.jsonl could not write."""
    data = parquet(tmp_path / "q.parquet", [row(["1/2", "0.5"], extra_info={"answer": ["1/2", "0.5"]}), row(["2"])])
    questions = load_questions([f"toy={data}"], None)
    assert [q["ground_truth"] for q in questions] == [["1/2", "0.5"], ["2"]]
    assert json.loads(json.dumps(questions[0]))["extra_info"]["answer"] == ["1/2", "0.5"]
    assert questions[1]["prompt"] == [{"role": "user", "content": "1+1?"}] and questions[1]["index"] == 1


# ------------------------------------------------------------------------------------------------
# pass@k-versus-k plot
# ------------------------------------------------------------------------------------------------


def test_pass_at_k_plot_next_to_results(tmp_path):
    right, wrong = "\\boxed{7}", "\\boxed{8}"
    rows = [record(i, [right if j < c else wrong for j in range(8)]) for i, c in enumerate([0, 1, 4, 8])]
    rows += [record(i, [right if j < c else wrong for j in range(4)], benchmark="other") for i, c in enumerate([1, 2])]
    gens = write(tmp_path / "g.jsonl", rows)
    out = tmp_path / "out"
    assert main(["--generations", gens, "--ks", "1", "8", "--out", str(out)]) == 0
    png = out / "pass_at_k.png"
    data = png.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    assert "![pass@k versus k](pass_at_k.png)" in (out / "results.md").read_text()

    from dyjr_verl.eval.__main__ import score
    from dyjr_verl.eval.metrics import pass_at_k_curves
    from dyjr_verl.eval.plot import pass_at_k_figure

    curves = pass_at_k_curves(score([json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()],
                                    None))
    assert {b: sorted(c) for b, c in curves.items()} == {"other": [1, 2, 4], "toy": [1, 2, 4, 8]}
    assert curves["toy"][8] == 0.75 and curves["toy"][1] == pytest.approx(13 / 32)
    ax = pass_at_k_figure(curves).axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlim() == (1, 8)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert sorted(line.get_label() for line in ax.get_lines()) == ["other (n=4)", "toy (n=8)"]


def test_eval_cli_subprocess_bad_record_has_no_traceback(tmp_path):
    """Through the real command line: one line on stderr."""
    gens = write(tmp_path / "g.jsonl", [GOOD, "{oops"])
    proc = subprocess.run([sys.executable, "-m", "dyjr_verl.eval", "--generations", gens, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {gens}:2: not a JSON line (Expecting property name "
                                                "enclosed in double quotes, column 2)"]
