"""Environment turns as token ids: a reply is tokenized once, with the chat template's turn
markers, and appended to the exact ids the engine saw and sampled (no turn is ever
re-tokenized from text)."""

from __future__ import annotations

from ..envs import Message

_PROBE = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


class TurnFormat:
    """How an environment's reply becomes ids after a model turn that ended with EOS.

    With a chat template: the text the template puts between the end of an assistant turn
    (after its EOS token, e.g. ChatML's newline after ``<|im_end|>``) and the start of the
    next assistant turn, with the reply as the message in between, found by rendering a probe
    conversation with and without the reply. Without one (the tiny model's word tokenizer):
    the reply's content alone (the environment writes its own markers).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        if self.chat:
            head = self._render(_PROBE, add_generation_prompt=False)
            eos = tokenizer.eos_token
            if eos is None or eos not in head:
                raise ValueError("the chat template does not end an assistant turn with the "
                                 f"tokenizer's EOS token {eos!r}: multi-turn needs it to")
            self.head = head
            self.after_eos = head[head.rindex(eos) + len(eos):]

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def reply_ids(self, message: Message, max_tokens: int) -> tuple[list[int], bool]:
        """Token ids of the environment's turn ``message`` ({"role", "content"}), ready to
        append after the model's EOS (with a chat template they end where the next assistant
        turn begins, its generation prompt), and whether the content was cut to its first
        ``max_tokens`` tokens (a flood; the turn markers are kept)."""
        content = message["content"][: max_tokens * 64]  # no tokenizer call on a huge flood
        ids = self.tokenizer(content, add_special_tokens=False)["input_ids"]
        cut = len(ids) > max_tokens or len(content) < len(message["content"])
        if cut:
            content = self.tokenizer.decode(ids[:max_tokens])
        return self._ids({**message, "content": content}), cut

    def _ids(self, message: Message) -> list[int]:
        if not self.chat:
            return self.tokenizer(message["content"], add_special_tokens=False)["input_ids"]
        full = self._render(_PROBE + [message], add_generation_prompt=True)
        if not full.startswith(self.head):
            raise ValueError("the chat template renders earlier turns differently once a "
                             "reply follows them: it cannot be extended turn by turn")
        text = self.after_eos + full[len(self.head):]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, ids: list[int]) -> str:
        """A model turn's text, as the environment reads it (special tokens skipped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)
