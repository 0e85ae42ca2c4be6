"""The token sequence of a result: prompt and generated tokens, their text (a base of
:class:`~llama_attrib.scores.Scores`)."""

from __future__ import annotations

import numpy as np


class TokenText:
    """Read-only views of a result's tokens; the fields live on the dataclass."""

    tokens: list[str]
    token_ids: list[int]
    prompt_length: int
    token_scores: np.ndarray

    @property
    def n_generated(self) -> int:
        return int(self.token_scores.shape[0])

    @property
    def prompt_tokens(self) -> list[str]:
        return self.tokens[: self.prompt_length]

    @property
    def generated_tokens(self) -> list[str]:
        return self.tokens[self.prompt_length :]

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_length :]

    @property
    def source_tokens(self) -> list[str]:
        """The text piece of every token-level source column (all but the last token)."""
        return self.tokens[: self.token_scores.shape[1]]

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def generation(self) -> str:
        return "".join(self.generated_tokens)
