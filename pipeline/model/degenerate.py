"""Degenerate generations: the model fell into a loop and repeated one phrase until the token budget ran out.

Greedy decoding of a vision-language model sometimes locks into a cycle ("the the the ...", a table row
or a line of text over and over) and only stops at `max_new_tokens`. The tell is in the token ids: the
output did not end by itself, and its tail is one unit (a token or a phrase of up to `max_period` tokens)
repeated back to back. Legitimate repetition (dotted leaders, a table of zeros) rarely runs until the
budget ends; when it does, the flag is a hint to look, not an error: the row stays ok.

Pure functions over any sequence (token ids, or the characters of a string); no model needed.
"""

from __future__ import annotations

from typing import Sequence

MAX_PERIOD = 64  # longest repeated phrase looked for, in tokens
MIN_REPEATS = 3  # whole repeats of the phrase at the end of the output
MIN_TAIL = 16  # tokens the repeated tail must cover, so a short output is never judged on a few tokens


def repeated_tail(tokens: Sequence, max_period: int = MAX_PERIOD) -> tuple[int, int]:
    """(period, length) of the longest tail of `tokens` that repeats one unit of `period` items:
    tokens[i] == tokens[i - period] for the last `length - period` items. (0, 0) if nothing repeats."""
    n = len(tokens)
    best_period, best_length = 0, 0
    for period in range(1, min(max_period, n // 2) + 1):
        length = period  # one unit is trivially periodic; extend backwards while the pattern holds
        while length < n and tokens[n - 1 - length] == tokens[n - 1 - length + period]:
            length += 1
        if length >= 2 * period and length > best_length:
            best_period, best_length = period, length
    return best_period, best_length


def is_degenerate(tokens: Sequence, finished: bool, *, min_repeats: int = MIN_REPEATS, min_tail: int = MIN_TAIL,
                  max_period: int = MAX_PERIOD) -> bool:
    """True when the generation did not end by itself and ends in one unit repeated at least
    `min_repeats` times over at least `min_tail` items."""
    if finished:
        return False
    period, length = repeated_tail(tokens, max_period)
    return period > 0 and length >= min_tail and length // period >= min_repeats
