"""``saferlhf chat``: talk to a model in the terminal, or to two models side by side.

Each user line is one turn. The conversation so far (an optional system message, then alternating
user and assistant messages) is rendered with the model's chat template every turn, so the model
sees the whole history; the answer is streamed as it is generated (transformers
``TextIteratorStreamer``: ``generate`` runs in a thread and the main thread prints the text as it
arrives) and then appended to the history. With two models every user line is answered by both,
one after the other, labelled ``[A]`` and ``[B]``; each model keeps its own history (its own
answers), so the two conversations stay independent.

Commands: ``/reset`` starts a new conversation (the system message is kept), ``/exit`` (or
``/quit``, or end of input) ends the chat. Input is read line by line from any text stream, so the
loop (`chat_loop`) runs the same on a terminal, a pipe or an ``io.StringIO``.

Template: as in ``saferlhf eval`` (``template="auto"``), a model saved by a saferlhf run is prompted
the way the run was trained; a model whose tokenizer has no chat template (or that was trained on
the paper's template) gets the paper's format extended to several turns:
``BEGINNING OF CONVERSATION: USER: {u1} ASSISTANT: {a1}</s> USER: {u2} ASSISTANT:``.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TextIO

import torch

from saferlhf.data.collate import encode_prompts, truncate_left

COMMANDS = "/reset starts over, /exit quits"


class Responder(Protocol):
    def respond(self, messages: list[dict], on_text: Callable[[str], None]) -> str:
        """The answer to the conversation ``messages``, passing each piece of text to ``on_text`` as it comes."""


def render_paper(messages: Sequence[dict], eos_token: str) -> str:
    """The paper's prompt format for a whole conversation, ending with the generation prompt."""
    parts = ["BEGINNING OF CONVERSATION:"]
    for m in messages:
        if m["role"] == "system":
            parts.append(f" {m['content']}")
        elif m["role"] == "user":
            parts.append(f" USER: {m['content']}")
        elif m["role"] == "assistant":
            parts.append(f" ASSISTANT: {m['content']}{eos_token}")
        else:
            raise ValueError(f"unknown role {m['role']!r}")
    return "".join(parts) + " ASSISTANT:"


class ChatModel:
    """A causal LM and its tokenizer that answer a conversation, streaming."""

    def __init__(self, model, tokenizer, *, chat_template: bool = True, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 1.0, max_length: int = 2048):
        self.model, self.tokenizer = model, tokenizer
        self.chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.max_length = max_length  # prompt tokens kept: the oldest turns are cut first

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: str = "float32",
             template: str = "auto", **kwargs) -> ChatModel:
        from saferlhf.evaluate.evaluate import use_chat_template
        from saferlhf.models.hf import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(str(path), padding_side="left")
        model = load_causal_lm(str(path), dtype=dtype, tokenizer=tokenizer).to(device).eval()
        return cls(model, tokenizer, chat_template=use_chat_template(path, tokenizer, template), **kwargs)

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text of a conversation, ending where the assistant's next answer begins."""
        if self.chat_template:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return render_paper(messages, self.tokenizer.eos_token or "")

    @torch.no_grad()
    def respond(self, messages: list[dict], on_text: Callable[[str], None]) -> str:
        from transformers import TextIteratorStreamer

        tok = self.tokenizer
        ids = truncate_left(encode_prompts(tok, [self.render(messages)])[0], self.max_length, tok.bos_token_id)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)  # (1, P)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                      max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                      do_sample=self.temperature > 0)
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.model.generate(**kwargs)
            except BaseException as e:  # re-raised in the main thread; end the stream so it is not left waiting
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces = []
        for text in streamer:
            if not pieces:
                text = text.lstrip()
                if not text:
                    continue
            pieces.append(text)
            on_text(text)
        thread.join()
        if failure:
            raise failure[0]
        return "".join(pieces).strip()


def chat_loop(models: Sequence[Responder], input_stream: TextIO, output_stream: TextIO, *,
              system: str | None = None, labels: Sequence[str] | None = None) -> int:
    """Read user lines from ``input_stream`` until ``/exit`` or end of input; stream every model's
    answer to ``output_stream``. Returns the number of user turns answered."""
    if not 1 <= len(models) <= 2:
        raise ValueError(f"chat takes one or two models, got {len(models)}")
    if labels is None:
        labels = ["assistant:"] if len(models) == 1 else ["[A]", "[B]"]

    def fresh() -> list[list[dict]]:
        return [[{"role": "system", "content": system}] if system else [] for _ in models]

    def write(text: str) -> None:
        output_stream.write(text)
        output_stream.flush()

    histories = fresh()
    interactive = getattr(input_stream, "isatty", lambda: False)()
    turns = 0
    while True:
        if interactive:
            write("you> ")
        line = input_stream.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            histories = fresh()
            write("(conversation reset)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text}: {COMMANDS}\n")
            continue
        for model, label, history in zip(models, labels, histories):
            history.append({"role": "user", "content": text})
            write(f"{label} ")
            answer = model.respond(history, write)
            write("\n")
            history.append({"role": "assistant", "content": answer})
        turns += 1
    return turns


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="saferlhf chat", description=(
        "Chat with a model, or with two side by side ([A] and [B] answer every line). Reads lines from "
        f"standard input; {COMMANDS}."))
    parser.add_argument("model", help="a Hugging Face checkpoint directory (or hub id)")
    parser.add_argument("model_b", nargs="?", default=None, help="a second model: both answer every turn")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default: 256")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    parser.add_argument("--top-p", type=float, default=1.0, help="default: 1")
    parser.add_argument("--system", default=None, help="a system message at the start of every conversation")
    parser.add_argument("--template", choices=("auto", "chat", "paper"), default="auto",
                        help="auto: as the model's run was trained, else its chat template if it has one")
    parser.add_argument("--max-length", type=int, default=2048, help="prompt tokens kept (oldest cut first)")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    parser.add_argument("--dtype", default="float32", help="float32, bf16 or fp16 (default: float32)")
    args = parser.parse_args(argv)
    from saferlhf.evaluate.evaluate import EvalError, pick_device

    paths = [p for p in (args.model, args.model_b) if p is not None]
    for path in paths:
        if not Path(path).is_dir():
            print(f"saferlhf chat: error: {path}: no such directory", file=sys.stderr)
            return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    options = dict(device=pick_device(args.device), dtype=args.dtype, template=args.template,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   max_length=args.max_length)
    try:
        models = [ChatModel.load(path, **options) for path in paths]
    except (EvalError, OSError, ValueError) as e:
        print(f"saferlhf chat: error: {e}", file=sys.stderr)
        return 2
    if len(models) == 2:
        print(f"[A] {paths[0]}\n[B] {paths[1]}")
    print(f"({COMMANDS})", flush=True)
    try:
        chat_loop(models, sys.stdin, sys.stdout, system=args.system)
    except KeyboardInterrupt:
        print()
    return 0
