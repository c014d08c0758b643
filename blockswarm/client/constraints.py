"""Structured output: a grammar (JSON schema, any JSON object, a regex or an EBNF grammar) enforced by masking the
logits at every step with XGrammar, the engine vLLM and SGLang use.

XGrammar rather than Outlines' core: it compiles a nested schema for this tokenizer in milliseconds, masks a step in
about 0.1 ms, and handles what regexes cannot (any JSON object, recursive schemas, EBNF). Two things are corrected
around it. Special tokens other than EOS (`<s>`, `<pad>`...) have text in a Hugging Face vocabulary, so the engine
would let them into a string, and they vanish on decoding: they are never allowed here. And the JSON modes emit
compact JSON (`any_whitespace=False`), which never holds a raw control character, while XGrammar 0.2.9 lets control
characters and broken UTF-8 into strings with a `maxLength` (measured: 9 of 20 schema outputs failed to parse). In
JSON modes only tokens that are whole, printable UTF-8 are allowed: a character the tokenizer spells in byte pieces
is then written as a `\\u` escape, which JSON always permits.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import xgrammar as xgr

JSON_OBJECT_SCHEMA = {"type": "object", "additionalProperties": True}  # any object: XGrammar's strict mode allows none


class Grammars:
    """Compiles constraints for one tokenizer; XGrammar caches what it compiled."""

    def __init__(self, tokenizer, vocab_size: int):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("structured output needs a tokenizer with an EOS token: it ends every constrained answer")
        self.vocab_size = vocab_size
        self.eos_token_id = eos
        detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos])
        vocab = [bytes(token) for token in detected.decoded_vocab]
        self.token_bytes = vocab  # each token's bytes as it decodes (what logprobs report)
        never = set(tokenizer.all_special_ids) - {eos}
        text = [b"" if i in never else token for i, token in enumerate(vocab)]  # empty: never allowed
        compact = [token if _whole_printable_utf8(token) else b"" for token in text]
        self._text = xgr.GrammarCompiler(self._info(text, vocab_size, eos))
        self._json = xgr.GrammarCompiler(self._info(compact, vocab_size, eos))

    @staticmethod
    def _info(vocab: list[bytes], vocab_size: int, eos: int) -> xgr.TokenizerInfo:
        return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[eos])

    def compile(
        self,
        *,
        json_schema: dict[str, Any] | str | None = None,
        regex: str | None = None,
        grammar: str | None = None,
    ) -> xgr.CompiledGrammar:
        """Exactly one of: a JSON schema (dict or JSON text; `JSON_OBJECT_SCHEMA` for any object), a regex, an
        EBNF grammar (GBNF syntax, rule `root`). Raises ValueError explaining what is wrong with it."""
        if sum(option is not None for option in (json_schema, regex, grammar)) != 1:
            raise ValueError("give exactly one of json_schema, regex, grammar")
        try:
            if json_schema is not None:
                text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
                return self._json.compile_json_schema(text, any_whitespace=False)
            if regex is not None:
                return self._text.compile_regex(regex)
            return self._text.compile_grammar(grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            kind = "JSON schema" if json_schema is not None else "regex" if regex is not None else "grammar"
            raise ValueError(f"invalid {kind}: {e}") from None

    def constraint(self, compiled: xgr.CompiledGrammar, batch_size: int) -> GrammarConstraint:
        return GrammarConstraint(compiled, batch_size, self.vocab_size, self.eos_token_id)


def _whole_printable_utf8(token: bytes) -> bool:
    try:
        return not any(byte < 0x20 for byte in token) and bool(token.decode("utf-8"))
    except UnicodeDecodeError:
        return False


class GrammarConstraint:
    """A Hugging Face-style logits processor: allows only the tokens the grammar accepts next, one matcher per row.

    Each call after the first accepts the token each row took since the previous call (the last of `input_ids`).
    A row whose grammar is complete may only repeat EOS.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, batch_size: int, vocab_size: int, eos_token_id: int):
        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch_size)]
        self.bitmask = xgr.allocate_token_bitmask(batch_size, vocab_size)
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._seen: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._seen is not None and input_ids.shape[1] > self._seen:
            for row, matcher in enumerate(self.matchers):
                token = int(input_ids[row, -1])
                if not matcher.is_terminated() and not matcher.accept_token(token):
                    raise ValueError(f"token {token} of row {row} breaks the grammar: a processor let it through")
        self._seen = input_ids.shape[1]
        for row, matcher in enumerate(self.matchers):
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, row)
        scores = scores.float().contiguous()
        xgr.apply_token_bitmask_inplace(scores, self.bitmask, vocab_size=self.vocab_size)
        for row, matcher in enumerate(self.matchers):
            if matcher.is_terminated():
                scores[row] = -float("inf")
                scores[row, self.eos_token_id] = 0.0
        return scores


class KnownTokensOnly:
    """A logits processor that never picks an id the tokenizer has no token for: the padding rows many models add to
    their vocabulary decode to nothing. The API server always applies it (text out needs tokens)."""

    def __init__(self, tokenizer):
        self.known = len(tokenizer)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.known:
            scores = scores.clone()
            scores[:, self.known :] = -float("inf")
        return scores
