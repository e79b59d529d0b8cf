"""What a generated sequence says: how many of its tokens are its own, whether it ended by itself, and its
text. Both engines read their tokens through `generated_output`, so their rows mean the same."""

from __future__ import annotations


def generated_output(tokens: list[int], eos_ids: set[int], stop_strings, decode) -> tuple[int, bool, str]:
    """(tokens the sequence produced, whether it ended by itself, its text) for one generated sequence.

    After a sequence ends (at an end-of-sequence token or a stop string) `generate` pads it while the
    rest of the batch goes on, so only what it produced is counted and decoded. The text ends before a
    stop string (which is not part of the answer).
    """
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return position + 1, True, decode(tokens[: position + 1]).strip()
    text = decode(tokens)
    hits = [(text.find(stop), stop) for stop in stop_strings if stop in text]
    if not hits:
        return len(tokens), False, text.strip()
    # Generation stopped at the first token whose text completes a stop string: the shortest prefix
    # that contains one (found by bisection: containing a stop string only becomes true, never false).
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if any(stop in decode(tokens[:middle]) for stop in stop_strings):
            high = middle
        else:
            low = middle + 1
    return low, True, text[: min(hits)[0]].strip()
