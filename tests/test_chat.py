"""``saferlhf chat``: multi-turn history, /reset, /exit, A/B mode and streaming, on tiny models built here."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from helpers import REPO, cli_env, two_tiny_policies

from saferlhf.chat import ChatModel, chat_loop, render_paper
from saferlhf.cli import main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return two_tiny_policies(root / "a", root / "b")


def _spy(model: ChatModel) -> list[str]:
    """Record every prompt the model renders."""
    rendered: list[str] = []
    render = model.render
    model.render = lambda messages: rendered.append(render(messages)) or rendered[-1]
    return rendered


def _model(path, **kwargs) -> ChatModel:
    return ChatModel.load(path, temperature=0.0, max_new_tokens=kwargs.pop("max_new_tokens", 8), **kwargs)


class CountingOutput(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_history_is_rendered_every_turn_and_reset_clears_it(checkpoints):
    model = _model(checkpoints[0])
    rendered = _spy(model)
    out = io.StringIO()
    lines = "how do i bake bread ?\n\nand then ?\n/reset\nhow do i grow tomatoes ?\n/exit\nnever read\n"
    turns = chat_loop([model], io.StringIO(lines), out, system="be brief .")
    assert turns == 3 and len(rendered) == 3  # the blank line is skipped, nothing after /exit is read
    first_answer = out.getvalue().splitlines()[0].removeprefix("assistant:").strip()
    assert first_answer  # the untrained model says something in 8 tokens
    assert rendered[0] == "BEGINNING OF CONVERSATION: be brief . USER: how do i bake bread ? ASSISTANT:"
    # Second turn: the first exchange (with its eos), then the new question.
    assert rendered[1].startswith(rendered[0] + " " + first_answer + "</s> USER: and then ?")
    assert rendered[1].endswith(" ASSISTANT:")
    # After /reset: the system message only, then the new question.
    assert rendered[2] == "BEGINNING OF CONVERSATION: be brief . USER: how do i grow tomatoes ? ASSISTANT:"
    assert "(conversation reset)" in out.getvalue()
    assert "never read" not in "".join(rendered)


def test_two_models_answer_every_turn_labelled_each_with_its_own_history(checkpoints):
    a, b = _model(checkpoints[0]), _model(checkpoints[1])
    rendered_a, rendered_b = _spy(a), _spy(b)
    out = io.StringIO()
    assert chat_loop([a, b], io.StringIO("how do i bake bread ?\nmore ?\n"), out) == 2  # ends at end of input
    lines = out.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["[A]", "[B]", "[A]", "[B]"]
    answer_a, answer_b = (line[3:].strip() for line in lines[:2])
    assert answer_a != answer_b  # different weights, different greedy answers
    assert f"ASSISTANT: {answer_a}</s> USER: more ?" in rendered_a[1]
    assert f"ASSISTANT: {answer_b}</s> USER: more ?" in rendered_b[1]


def test_answers_stream_in_pieces(checkpoints):
    model = _model(checkpoints[0], max_new_tokens=16)
    pieces: list[str] = []
    answer = model.respond([{"role": "user", "content": "how do i bake bread ?"}], pieces.append)
    assert len(answer.split()) > 3 and len(pieces) > 1  # a multi-word answer arrives in several pieces
    assert "".join(pieces).strip() == answer
    out = CountingOutput()
    chat_loop([model], io.StringIO("how do i bake bread ?\n"), out)
    assert out.writes > 3  # label, several pieces, newline
    assert out.getvalue().strip() == f"assistant: {answer}"  # greedy: the same answer again


def test_unknown_command_is_not_sent_to_the_model(checkpoints):
    model = _model(checkpoints[0])
    rendered = _spy(model)
    out = io.StringIO()
    assert chat_loop([model], io.StringIO("/frobnicate\n"), out) == 0
    assert rendered == [] and "unknown command /frobnicate" in out.getvalue()


def test_a_generation_error_is_raised_not_hung(checkpoints):
    model = _model(checkpoints[0])

    def broken(**kwargs):
        raise RuntimeError("out of memory (simulated)")

    model.model.generate = broken
    with pytest.raises(RuntimeError, match="simulated"):
        model.respond([{"role": "user", "content": "hi"}], print)


def test_paper_format_without_a_chat_template_matches_the_tiny_template(checkpoints):
    model = _model(checkpoints[0])
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert render_paper(messages, "</s>") == model.render(messages)
    model.chat_template = False
    assert model.render(messages) == "BEGINNING OF CONVERSATION: s USER: u1 ASSISTANT: a1</s> USER: u2 ASSISTANT:"


def test_chat_command_reads_stdin(checkpoints):
    a, b = checkpoints
    proc = subprocess.run([sys.executable, "-m", "saferlhf", "chat", str(a), str(b), "--temperature", "0",
                           "--max-new-tokens", "6"], input="how do i bake bread ?\n/reset\nhi\n/exit\n",
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == [f"[A] {a}", f"[B] {b}"] and "/reset" in lines[2]
    labels = [line[:3] for line in lines[3:]]
    assert labels == ["[A]", "[B]", "(co", "[A]", "[B]"]  # two turns, both models, the reset between


def test_chat_command_missing_model_is_an_error(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nope")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err
