"""Text classification: a UTF-8 text in, top-k labels with probabilities out, as classification answers.

The archive packs the Hugging Face tokenizer the model was trained with (tokenizer.json, read with the `tokenizers`
library: no Python vocabulary, no pickles). A text longer than the model's token limit (card.input.shape[0]) is
truncated, and the answer says so ("truncated", "tokens"); a text over `max_chars` characters is refused (413).
Items are padded to the longest item of their batch, not to the limit: the model builds its attention mask from
the pad id, so an fp32 model's answer for a text does not depend on what shared its batch (an int8 one's can move
slightly: it quantizes activations over the whole batch; training.text_variants records by how much).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from handlers.contract import TOKENIZER_FILE
from handlers.errors import InputError
from handlers.tasks import Output
from handlers.tasks.classification import Classification

SEND = ('send UTF-8 text as text/plain, {"text": "..."} (or {"inputs": "..."}) in JSON, KServe v1 instances, '
        "or OIP BYTES")


@dataclass(frozen=True)
class Encoded:
    """One text as the model takes it: its token ids (truncated to the limit), and whether it was truncated."""

    ids: torch.Tensor  # int64 [tokens]
    truncated: bool

    @property
    def tokens(self) -> int:
        return len(self.ids)


def load_tokenizer(path: Path, max_tokens: int) -> tuple[Tokenizer, int]:
    """The tokenizer in `path` (tokenizer.json), truncating at `max_tokens` and not padding (batches pad), and its
    pad id (from the file's padding settings, which the model's attention mask was built from)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a text model is packed with the tokenizer it was trained with "
                                "(python -m training.text writes it)")
    tokenizer = Tokenizer.from_file(str(path))
    padding = tokenizer.padding
    if padding is None:
        raise ValueError(f"{path} sets no padding, so the pad id the model masks is unknown; bring the model with "
                         "python -m training.bring --hf-dir (which sets it), or train it with python -m training.text")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    return tokenizer, int(padding["pad_id"])


def encode(tokenizer: Tokenizer, text: str) -> Encoded:
    encoding = tokenizer.encode(text)
    return Encoded(torch.tensor(encoding.ids, dtype=torch.int64), bool(encoding.overflowing))


def pad(items: list[Encoded], pad_id: int) -> torch.Tensor:
    """Token ids [n, longest item]: each row padded with `pad_id` after its tokens."""
    batch = torch.full((len(items), max(i.tokens for i in items)), pad_id, dtype=torch.int64)
    for row, item in zip(batch, items, strict=True):
        row[:item.tokens] = item.ids
    return batch


class Text(Classification):
    accepts = f"UTF-8 text: {SEND}"
    oip_input = ("text", "BYTES")
    reads_text = True
    defaults = {"topk": 5, "max_chars": 10_000}

    def setup(self) -> None:
        super().setup()
        if self.model_dir is None:
            raise ValueError(f"a text model reads {TOKENIZER_FILE} beside its artifact; give the task its directory")
        self.max_tokens = self.card.input.shape[0]
        self.tokenizer, self.pad_id = load_tokenizer(self.model_dir / TOKENIZER_FILE, self.max_tokens)

    def input_shape(self) -> tuple[int, ...]:
        return (-1,)

    def decode(self, payload: Any) -> Encoded:
        """A text (str, or UTF-8 bytes) -> its token ids; the client's mistakes are 400, 413 or 422."""
        if isinstance(payload, (bytes, bytearray)):
            try:
                payload = bytes(payload).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError("invalid_utf8", f"the text is not valid UTF-8 ({e.reason} at byte {e.start}); "
                                 f"{SEND}") from e
        if not isinstance(payload, str):
            raise InputError("wrong_type", f"expected a text, got JSON {type(payload).__name__}; {SEND}", 422)
        if not payload.strip():
            raise InputError("empty_text", f"the text is empty; {SEND}")
        limit = int(self.settings["max_chars"])
        if len(payload) > limit:
            raise InputError("text_too_long", f"the text has {len(payload)} characters; the limit is {limit} "
                             f"(texts over {self.max_tokens} tokens are truncated)", 413)
        return encode(self.tokenizer, payload)

    def batch(self, items: list[Encoded]) -> torch.Tensor:
        return pad(items, self.pad_id).to(self.device)

    def respond(self, output: torch.Tensor, item: Encoded, options: dict[str, Any]) -> dict[str, Any]:
        """Classification's answer, and how many tokens the model read and whether the text was cut to them."""
        return {**super().respond(output, item, options), "tokens": item.tokens, "truncated": item.truncated}

    def outputs(self) -> tuple[Output, ...]:
        return (*super().outputs(), Output("tokens", "INT32", ()), Output("truncated", "BOOL", ()))

    def tensors(self, answer: dict[str, Any]) -> dict[str, Any]:
        return {**super().tensors(answer), "tokens": answer["tokens"], "truncated": answer["truncated"]}

    def example(self) -> Encoded:
        return encode(self.tokenizer, "warm up")


TASK = Text
