"""Judging (swap, re-ask, resume after a kill), verdict/annotation parsing, answers, curation, meta-eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmstack.client import Completion, Conversation, GenParams
from lmstack.errors import LmstackError
from lmstack.evals.arena_hard.answer import generate_answers
from lmstack.evals.arena_hard.files import Question, load_answers, read_jsonl
from lmstack.evals.arena_hard.judge import JudgeConfig, game_prompt, judge_models
from lmstack.evals.arena_hard.templates import CRITERIA, JUDGE_REASK, parse_annotation, parse_verdict

QUESTIONS = [Question(f"q{i}", f"question {i}?") for i in range(5)]
ANSWERS = {"base": {q.question_id: {"content": f"baseline answer {i}"} for i, q in enumerate(QUESTIONS)},
           "m1": {q.question_id: {"content": f"m1 answer {i}"} for i, q in enumerate(QUESTIONS)},
           "m2": {q.question_id: {"content": f"m2 answer {i}"} for i, q in enumerate(QUESTIONS)}}


class ScriptedJudge:
    """Prefers m1's answers, decisively; forgets the label on q3 game 1 unless re-asked; never labels q4.

    `fail_after` raises KeyboardInterrupt on that call, like a Ctrl-C in the middle of a run.
    """

    model = "scripted-judge"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.games_seen: list[str] = []
        self.fail_after = fail_after

    def chat(self, conversations: list[Conversation], params: GenParams | None = None) -> list[Completion]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return [Completion(text=self._verdict(conv), finish_reason="stop") for conv in conversations]

    def _verdict(self, conv: Conversation) -> str:
        user = conv[1]["content"]
        if conv[-1]["content"] == JUDGE_REASK:
            return "I forgot the label." if "question 4?" in user else "My final verdict is [[A=B]]."
        self.games_seen.append(user)
        a_part = user.split("<|The Start of Assistant B's Answer|>")[0]
        if "question 4?" in user or ("question 3?" in user and "baseline answer" in a_part):
            return "Both are fine, hard to say."
        if "m1 answer" in user:
            return "Mine first... [[A>>B]]" if "m1 answer" in a_part else "[[B>>A]]"
        return "[[A>B]]" if "baseline answer" in a_part else "[[B>A]]"

    def complete(self, prompts: list[str], params: GenParams | None = None) -> list[Completion]:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise NotImplementedError


def test_verdict_parsing() -> None:
    assert parse_verdict("blah\nMy final verdict is [[B>>A]].") == "B>>A"
    assert parse_verdict("[[ A > B ]]") == "A>B"
    assert parse_verdict("[[A<B]]") == "B>A"
    assert parse_verdict("e.g. [[A>B]] ... final: [[A>B]]") == "A>B"
    assert parse_verdict("first [[A>B]] then [[B>A]]") is None
    assert parse_verdict("A is better") is None


def test_annotation_parsing() -> None:
    full = dict.fromkeys(CRITERIA, True)
    assert parse_annotation("```json\n" + json.dumps(full) + "\n```") == full
    assert parse_annotation(json.dumps(dict.fromkeys(CRITERIA, "no"))) == dict.fromkeys(CRITERIA, False)
    assert parse_annotation('{"title": "x"}') is None
    assert parse_annotation(json.dumps({**full, "extra": True})) is None
    assert parse_annotation("no json here") is None


@pytest.mark.parametrize("template", ["arena-hard", "compact"])
def test_every_judge_template_shows_both_answers_in_order(template: str) -> None:
    conv, _ = game_prompt("THE QUESTION", "BASE", "MODEL", 1, None, template)
    user = conv[1]["content"]
    assert user.index("THE QUESTION") < user.index("MODEL") < user.index("BASE")
    assert all(label in conv[0]["content"] + user for label in ("[[A>>B]]", "[[A=B]]", "[[B>>A]]"))
    with pytest.raises(LmstackError, match="unknown judge template"):
        JudgeConfig("j", "base", template="nope")


def test_game_prompt_swaps_positions_once() -> None:
    conv0, _ = game_prompt("Q", "BASE", "MODEL", 0, None)
    conv1, _ = game_prompt("Q", "BASE", "MODEL", 1, None)
    assert conv0[1]["content"].index("BASE") < conv0[1]["content"].index("MODEL")
    assert conv1[1]["content"].index("MODEL") < conv1[1]["content"].index("BASE")
    clipped, cut = game_prompt("Q", "x" * 500, "y", 0, 100)
    assert cut and "truncated for judging: 100 of 500" in clipped[1]["content"]


def test_judge_reasks_records_nulls_and_layout(tmp_path: Path) -> None:
    client = ScriptedJudge()
    stats = judge_models(client, QUESTIONS, ANSWERS, ["m1", "m2"], tmp_path, JudgeConfig("j", "base", batch_size=4),
                         progress=False)
    assert stats.judged == 20 and stats.unparsed == 4 and stats.reasks == 6  # q3 game 1 of both models, q4 all 4
    rec = {r["question_id"]: r for r in read_jsonl(tmp_path / "j" / "m1.jsonl")}
    assert set(rec) == {q.question_id for q in QUESTIONS}
    assert [g["score"] for g in rec["q0"]["games"]] == ["B>>A", "A>>B"]
    assert rec["q3"]["games"][0]["score"] == "A=B" and rec["q3"]["games"][0]["attempts"] == 2
    assert [g["score"] for g in rec["q4"]["games"]] == [None, None]
    assert rec["q0"]["model"] == "m1" and rec["q0"]["judge"] == "j" and "user_prompt" in rec["q0"]["games"][0]


def test_killed_judge_run_resumes_without_rejudging_or_losing(tmp_path: Path) -> None:
    cfg = JudgeConfig("j", "base", batch_size=3, max_reasks=0)
    with pytest.raises(KeyboardInterrupt):
        judge_models(ScriptedJudge(fail_after=2), QUESTIONS, ANSWERS, ["m1", "m2"], tmp_path, cfg, progress=False)
    journaled = sum(len(read_jsonl(p)) for p in (tmp_path / "j" / ".games").glob("*.jsonl"))
    assert journaled == 6  # two finished batches of 3 games; the third batch was in flight
    resumed = ScriptedJudge()
    stats = judge_models(resumed, QUESTIONS, ANSWERS, ["m1", "m2"], tmp_path, cfg, progress=False)
    assert stats.resumed == 6 and stats.judged == 14 and len(resumed.games_seen) == 14
    fresh = ScriptedJudge()
    judge_models(fresh, QUESTIONS, ANSWERS, ["m1", "m2"], tmp_path / "fresh", cfg, progress=False)
    for m in ("m1", "m2"):
        got = {r["question_id"]: [g["score"] for g in r["games"]] for r in read_jsonl(tmp_path / "j" / f"{m}.jsonl")}
        want = {r["question_id"]: [g["score"] for g in r["games"]]
                for r in read_jsonl(tmp_path / "fresh" / "j" / f"{m}.jsonl")}
        assert got == want and len(got) == len(QUESTIONS)
    again = ScriptedJudge()
    assert judge_models(again, QUESTIONS, ANSWERS, ["m1", "m2"], tmp_path, cfg, progress=False).judged == 0
    assert again.calls == 0


def test_torn_last_line_is_redone(tmp_path: Path) -> None:
    cfg = JudgeConfig("j", "base", batch_size=4)
    judge_models(ScriptedJudge(), QUESTIONS[:2], ANSWERS, ["m1"], tmp_path, cfg, progress=False)
    journal = tmp_path / "j" / ".games" / "m1.jsonl"
    final = tmp_path / "j" / "m1.jsonl"
    lines = final.read_text().splitlines()
    final.write_text(lines[0] + "\n" + lines[1][:20])  # the process died while writing q1's record
    journal.write_text("\n".join(journal.read_text().splitlines()[:3]) + "\n")  # and q1 game 1 was lost
    client = ScriptedJudge()
    judge_models(client, QUESTIONS[:2], ANSWERS, ["m1"], tmp_path, cfg, progress=False)
    assert len(client.games_seen) == 1
    assert [r["question_id"] for r in read_jsonl(final)] == ["q0", "q1"]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    rows = [{"prompt": "one\u2028two\x85three\x1cfour"}, {"prompt": "five"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_jsonl(path, allow_torn_tail=False) == rows


def test_answers_with_a_real_tiny_model_resume(tmp_path: Path) -> None:
    from lmstack import LLM
    from lmstack.client import LocalClient

    client = LocalClient(LLM("dummy:tiny-llama", device="cpu"), name="tiny")
    params = GenParams(max_tokens=4, temperature=0.0, extra={"ignore_eos": True})
    assert generate_answers(client, "tiny", QUESTIONS[:3], tmp_path, params, batch_size=2, progress=False) == 3
    assert generate_answers(client, "tiny", QUESTIONS, tmp_path, params, batch_size=2, progress=False) == 2
    answers = load_answers(tmp_path / "tiny.jsonl")
    assert set(answers) == {q.question_id for q in QUESTIONS}
    assert all(a["token_len"] == 4 for a in answers.values())
    assert client.num_requests == 5


def test_metaeval_definitions() -> None:
    from lmstack.evals.arena_hard.metaeval import Scores, pair_metrics, prob_beats

    a, b = np.sort(np.array([1.0, 2.0, 3.0])), np.sort(np.array([2.0, 4.0]))
    assert prob_beats(a, b) == pytest.approx((0 + 0.5 + 1) / 6)

    def s(score: float, lo: float, hi: float) -> Scores:
        return Scores(score, lo, hi, np.array([lo, score, hi]))

    ref = {"x": s(30, 29, 31), "y": s(20, 19, 21), "z": s(10, 9, 11)}
    bench = {"x": s(5, 4, 6), "y": s(6, 5.5, 7), "z": s(1, 0, 2)}  # x/y overlap; z separated, right order
    out = pair_metrics(bench, ref, ["x", "y", "z"])
    assert out["separability"] == pytest.approx(2 / 3)
    assert out["agreement"] == pytest.approx(2 / 3)
    assert out["spearman"] == pytest.approx(0.5)
    wrong = {"x": s(1, 0, 2), "y": s(5, 4, 6), "z": s(9, 8, 10)}  # confidently reversed everywhere
    assert pair_metrics(wrong, ref, ["x", "y", "z"])["agreement"] == pytest.approx(-1.0)
    assert pair_metrics(wrong, ref, ["x", "y", "z"])["brier"] == pytest.approx(1.0)


def test_score_command_on_v01_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Arena-Hard v0.1 judgment files (no `baseline` field) → leaderboard JSON, CI plot, parse failures."""
    from lmstack.cli import main

    judge_models(ScriptedJudge(), QUESTIONS, ANSWERS, ["m1", "m2"], tmp_path / "mj", JudgeConfig("j", "base"),
                 progress=False)
    v01 = tmp_path / "v01"
    v01.mkdir()
    for m in ("m1", "m2"):  # strip our extra fields, as in upstream files
        rows = [{k: r[k] for k in ("question_id", "model", "judge", "games")}
                for r in read_jsonl(tmp_path / "mj" / "j" / f"{m}.jsonl")]
        (v01 / f"{m}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, plot = tmp_path / "lb.json", tmp_path / "lb.png"
    assert main(["arena-hard", "score", "--judgments", str(v01), "--baseline", "base", "--rounds", "20",
                 "--output", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    board = {r["model"]: r for r in result["metrics"]["leaderboard"]}
    assert board["m1"]["score"] > 90 > 50 > board["m2"]["score"]
    assert result["metrics"]["unparsed_games"] == 4 and result["metrics"]["parse_failure_rate"] == 0.2
    assert plot.stat().st_size > 0 and "parse failures: 4 of 20" in capsys.readouterr().out
    assert main(["arena-hard", "score", "--judgments", str(tmp_path / "nope")]) == 2


def test_score_skips_the_judge_run_log(tmp_path: Path) -> None:
    """`arena-hard judge` logs its runs beside the judgments; scoring that folder must not read it as a model."""
    from lmstack.cli import main
    from lmstack.evals.arena_hard.files import JUDGE_RUN_LOG

    judge_models(ScriptedJudge(), QUESTIONS, ANSWERS, ["m1", "m2"], tmp_path, JudgeConfig("j", "base"),
                 progress=False)
    (tmp_path / "j" / JUDGE_RUN_LOG).write_text(json.dumps({"command": "lmstack arena-hard judge", "judged_now": 20})
                                                + "\n")
    out = tmp_path / "lb.json"
    assert main(["arena-hard", "score", "--judgments", str(tmp_path / "j"), "--baseline", "base", "--rounds", "5",
                 "--output", str(out), "--plot", str(tmp_path / "lb.png")]) == 0
    assert {r["model"] for r in json.loads(out.read_text())["metrics"]["leaderboard"]} >= {"m1", "m2"}
    assert "judge_runs" not in {r["model"] for r in json.loads(out.read_text())["metrics"]["leaderboard"]}


def test_position_bias_of_a_judge_that_always_picks_a() -> None:
    from lmstack.evals.arena_hard.battles import battles_from_judgments, position_bias

    def rec(qid: str, g1: str, g2: str) -> dict[str, object]:
        return {"question_id": qid, "model": "m", "games": [{"score": g1}, {"score": g2}]}

    always_a = battles_from_judgments([rec("q0", "A>B", "A>B"), rec("q1", "A>>B", "A>B")], "base")
    assert position_bias(always_a) == {"position_a_win_share": 1.0, "position_consistency": 0.0, "paired_games": 2}
    fair = battles_from_judgments([rec("q0", "A>B", "B>A"), rec("q1", "A=B", "A=B"), rec("q2", "B>A", None)],
                                  "base")
    assert position_bias(fair) == {"position_a_win_share": 0.4, "position_consistency": 1.0, "paired_games": 2}
