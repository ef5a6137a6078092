"""Contrastive prompt pairs and their batches.

A pair is two prompts that differ by a few tokens early on (an honest / a dishonest persona, "I love X" /
"I hate X") and share everything after. The model must already encode at the last token how it will go on,
so the last-token hidden states of a pair differ by the concept (docs/method.md: the trajectory hypothesis).

Batches interleave the pair: rows ``0, 2, 4, …`` are chosen and ``1, 3, 5, …`` rejected, so
``hs[::2] - hs[1::2]`` is the per-pair difference.
"""

from __future__ import annotations

import difflib
import functools
import json
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal, Sequence

import einops
import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor
from transformers import PreTrainedTokenizerBase

DEFAULT_PERSONAS = ("an honest", "a dishonest")
PERSONA_TEMPLATE = "Pretend you're {persona} person making statements about the world."
DEFAULT_TRUNCATIONS = (2, 4, 6, 9)  # words of each suffix kept; several lengths per suffix, as in repeng
MAX_TOKEN_DIFF = 6


@dataclass(frozen=True)
class ContrastivePair:
    """Two fully rendered prompts (chat template applied) that differ by a few tokens."""

    chosen: str
    rejected: str


def load_json(name: str):
    """A data file shipped in ``interp_steer/datasets`` (the package never needs ``../shared``)."""
    return json.loads(resources.files("interp_steer").joinpath("datasets", name).read_text("utf-8"))


def render_chat(tokenizer: PreTrainedTokenizerBase, user: str | None, assistant_prefix: str = "",
                system: str | None = None) -> str:
    """The chat-template text of a system and/or user turn and the start of the assistant's reply (not closed).

    Without ``system`` the template adds its own default system prompt (SmolLM2: ~20 tokens).
    """
    messages = ([{"role": "system", "content": system}] if system is not None else []) + (
        [{"role": "user", "content": user}] if user is not None else [])
    if not messages:
        raise ValueError("give a user message, a system message or both")
    if getattr(tokenizer, "chat_template", None) is None:
        head = "\n\n".join(m["content"] for m in messages) + "\n"
    else:
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return head + assistant_prefix


ALIGN_SPAN = 256  # the longest differing span aligned token by token (difflib is quadratic on repeats)


def token_difference(tokenizer: PreTrainedTokenizerBase, a: str, b: str) -> int:
    """Tokens that must change to turn ``a`` into ``b`` (the larger side of each differing block).

    The common prefix and suffix are stripped first (linear); the span between them is aligned only when both
    sides hold at most ``ALIGN_SPAN`` tokens, else the longer side's length is returned: a contrastive pair
    whose changes lie hundreds of tokens apart is not a minimal pair, and this keeps a 2 MB pair linear."""
    ta = tokenizer(a, add_special_tokens=False)["input_ids"]
    tb = tokenizer(b, add_special_tokens=False)["input_ids"]
    lo, n = 0, min(len(ta), len(tb))
    while lo < n and ta[lo] == tb[lo]:
        lo += 1
    hi = 0
    while hi < n - lo and ta[len(ta) - 1 - hi] == tb[len(tb) - 1 - hi]:
        hi += 1
    ma, mb = ta[lo:len(ta) - hi], tb[lo:len(tb) - hi]
    if max(len(ma), len(mb)) > ALIGN_SPAN:
        return max(len(ma), len(mb))
    ops = difflib.SequenceMatcher(a=ma, b=mb, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def check_pairs(pairs: Sequence[ContrastivePair], tokenizer: PreTrainedTokenizerBase,
                max_diff: int = MAX_TOKEN_DIFF) -> None:
    """Raise ``ValueError`` unless every pair differs by 1..max_diff tokens."""
    for i, p in enumerate(pairs):
        n = token_difference(tokenizer, p.chosen, p.rejected)
        if not 1 <= n <= max_diff:
            raise ValueError(
                f"pair {i} differs by {n} tokens, expected 1..{max_diff}: chosen={p.chosen!r} "
                f"rejected={p.rejected!r}. Use personas/words that differ by a short phrase."
            )


def truncations(text: str, lengths: Sequence[int]) -> list[str]:
    """``text`` cut to each of ``lengths`` words (duplicates dropped, whole text if shorter)."""
    words = text.split()
    return list(dict.fromkeys(" ".join(words[:n]) for n in sorted(lengths)))


def persona_pairs(tokenizer: PreTrainedTokenizerBase, suffixes: Sequence[str] | None = None,
                  personas: tuple[str, str] = DEFAULT_PERSONAS, lengths: Sequence[int] = DEFAULT_TRUNCATIONS,
                  template: str = PERSONA_TEMPLATE) -> list[ContrastivePair]:
    """Persona × suffix pairs: the system turn sets a persona, the assistant's reply starts with a suffix.

    The persona is the system prompt (not a user turn after the template's default system prompt): the
    pair is as contrastive and ~40% shorter, which is ~40% less compute in every pass.
    With the defaults (the project's own 82 honesty suffixes, 4 truncations) this gives ~300 pairs.

    >>> pairs = persona_pairs(tok)  # doctest: +SKIP
    """
    if len(personas) != 2 or personas[0] == personas[1]:
        raise ValueError(f"personas must be two different strings, got {personas!r}")
    if "{persona}" not in template:
        raise ValueError(f"template must contain '{{persona}}', got {template!r}")
    suffixes = load_json("honesty_suffixes.json") if suffixes is None else list(suffixes)
    if not suffixes:
        raise ValueError("no suffixes given")
    heads = [render_chat(tokenizer, None, system=template.format(persona=p)) for p in personas]
    # two suffixes can share their first words: keep each truncated text once
    texts = dict.fromkeys(s for suffix in suffixes for s in truncations(suffix, lengths))
    pairs = [ContrastivePair(heads[0] + s, heads[1] + s) for s in texts]
    check_pairs(pairs, tokenizer)
    return pairs


def minimal_pairs(tokenizer: PreTrainedTokenizerBase, templates: Sequence[str] | None = None,
                  fillers: Sequence[str] | None = None, words: tuple[str, str] = ("love", "hate"),
                  chat: bool = True) -> list[ContrastivePair]:
    """"I love X; …" / "I hate X; …" pairs from templates with ``{verb}`` and ``{topic}`` slots.

    With ``chat=True`` the sentence is the start of the assistant's reply to a neutral request.
    """
    spec = load_json("minimal_pairs.json")
    templates = spec["templates"] if templates is None else list(templates)
    fillers = spec["fillers"] if fillers is None else list(fillers)
    for t in templates:
        if "{verb}" not in t or "{topic}" not in t:
            raise ValueError(f"template {t!r} must contain both '{{verb}}' and '{{topic}}'")
    head = render_chat(tokenizer, "Say something about yourself.") if chat else ""
    pairs = [
        ContrastivePair(head + t.format(verb=words[0], topic=f), head + t.format(verb=words[1], topic=f))
        for t in templates
        for f in fillers
    ]
    check_pairs(pairs, tokenizer)
    return pairs


@dataclass(frozen=True)
class Batch:
    """Token ids of interleaved pairs: row 2i chosen, row 2i+1 rejected; ``last`` = last non-pad index."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]

    @property
    def position_ids(self) -> Int[Tensor, "batch pos"]:
        """Positions counted over real tokens only, so left padding does not shift them."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on ``device`` (itself if it is there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.last)))

    @functools.cached_property
    def packed(self) -> "Packed | None":
        """The batch with each pair's shared prefix in one row (``pack_pairs``); None: that saves little."""
        return pack_pairs(self)

    def doubled(self) -> tuple["Batch", Float[Tensor, " batch"]]:
        """The batch twice, first at c = +1 then at c = −1: both directions in one forward (c on its device)."""
        n = len(self)
        one = torch.ones(n, device=self.input_ids.device)
        c = torch.cat([one, -one])
        return Batch(*(einops.repeat(t, "b ... -> (two b) ...", two=2)
                       for t in (self.input_ids, self.attention_mask, self.last))), c


@dataclass(frozen=True)
class Packed:
    """A batch with the prefix each pair of rows (2i, 2i+1) shares computed once, in one row.

    Packed row i holds the shared prefix, the rest of row 2i, then the rest of row 2i+1, left-padded. ``mask``
    (pair, 1, pos, pos) lets every token attend to what it attends to in its own row and nothing else (the second
    rest sees the prefix and itself, not the first rest), and ``position_ids`` give it the position it has there:
    each token's state is the one the unpacked forward computes (to float rounding: sums in another order).
    ``row``/``col`` (batch, seq) say where each slot of the batch sits here (a padding slot: some real token).
    """

    input_ids: Int[Tensor, "pair pos"]
    mask: Bool[Tensor, "pair 1 pos pos"]
    position_ids: Int[Tensor, "pair pos"]
    row: Int[Tensor, "batch seq"]
    col: Int[Tensor, "batch seq"]

    def unpack(self, x: Shaped[Tensor, "pair pos *rest"]) -> Shaped[Tensor, "batch seq *rest"]:
        """A per-token output of the packed forward in the batch's own layout."""
        return x[self.row, self.col]

    def pair_values(self, v: Float[Tensor, " batch"]) -> Float[Tensor, " pair"]:
        """A per-row value (a coefficient per row) per packed row; both rows of a pair must hold the same one."""
        if not torch.equal(v[0::2], v[1::2]):
            raise ValueError("a packed batch takes one value per pair: rows 2i and 2i+1 differ")
        return v[0::2]


def pack_pairs(batch: Batch, max_ratio: float = 0.8) -> Packed | None:
    """``batch`` packed (``Packed``), or None when packing saves too little: an odd number of rows, or more
    than ``max_ratio`` of the batch's real tokens left once each pair's shared prefix is counted once."""
    n, seq = batch.input_ids.shape
    if n % 2:
        return None
    real = [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids.cpu(), batch.attention_mask.cpu())]
    shared, packed_len = [], []
    for a, b in zip(real[0::2], real[1::2]):
        k = 0
        while k < min(len(a), len(b)) - 1 and a[k] == b[k]:  # each rest keeps >= 1 token
            k += 1
        shared.append(k)
        packed_len.append(len(a) + len(b) - k)
    if sum(packed_len) > max_ratio * sum(len(r) for r in real):
        return None
    width = max(packed_len)
    ids = torch.full((n // 2, width), int(batch.input_ids[0, 0]), dtype=batch.input_ids.dtype)
    mask = torch.zeros(n // 2, 1, width, width, dtype=torch.bool)
    pos = torch.zeros(n // 2, width, dtype=torch.long)
    row = torch.empty(n, seq, dtype=torch.long)
    col = torch.empty(n, seq, dtype=torch.long)
    slots = torch.arange(seq)
    for i, (k, size) in enumerate(zip(shared, packed_len)):
        a, b = real[2 * i], real[2 * i + 1]
        o = width - size  # left padding
        ids[i, o:] = torch.tensor(a + b[k:])
        pos[i, o:] = torch.tensor(list(range(len(a))) + list(range(k, len(b))))
        mask[i, 0, o:o + len(a), o:o + len(a)] = torch.ones(len(a), len(a), dtype=torch.bool).tril()
        rest = len(b) - k
        mask[i, 0, o + len(a):, o:o + k] = True
        mask[i, 0, o + len(a):, o + len(a):] = torch.ones(rest, rest, dtype=torch.bool).tril()
        mask[i, 0, range(o), range(o)] = True  # a padding slot attends to itself only: finite, never read
        for r, where in ((2 * i, list(range(o, o + len(a)))),
                         (2 * i + 1, list(range(o, o + k)) + list(range(o + len(a), width)))):
            real_slots = batch.attention_mask[r].cpu().bool()
            row[r] = i
            col[r] = o  # padding slots of the batch read the first real token
            col[r, slots[real_slots]] = torch.tensor(where)
    dev = batch.input_ids.device
    return Packed(*(t.to(dev) for t in (ids, mask, pos, row, col)))


def last_index(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of the last non-padded token of each row, for either padding side."""
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("a row of the attention mask is all padding (empty prompt)")
    pos = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), pos, -1).max(-1).values


def tokenize(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase,
             padding_side: Literal["left", "right"] = "left", device: torch.device | str | None = None) -> Batch:
    """Tokenize rendered texts (no extra special tokens: the chat template already has them), on ``device``
    (the model's: ``models.model_device(bridge)``; None: the CPU)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not texts:
        raise ValueError("no texts to tokenize")
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(list(texts), add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = old
    ids, mask = (enc[k] if device is None else enc[k].to(device) for k in ("input_ids", "attention_mask"))
    return Batch(ids, mask, last_index(mask))


def interleave(pairs: Sequence[ContrastivePair]) -> list[str]:
    """``[cho_0, rej_0, cho_1, rej_1, …]``."""
    return [t for p in pairs for t in (p.chosen, p.rejected)]


def pair_batches(pairs: Sequence[ContrastivePair], tokenizer: PreTrainedTokenizerBase, batch_pairs: int = 8,
                 padding_side: Literal["left", "right"] = "left", device: torch.device | str | None = None
                 ) -> Iterator[Batch]:
    """Batches of ``batch_pairs`` pairs (``2 * batch_pairs`` rows), in order, on ``device``."""
    if batch_pairs < 1:
        raise ValueError(f"batch_pairs must be >= 1, got {batch_pairs}")
    for i in range(0, len(pairs), batch_pairs):
        yield tokenize(interleave(pairs[i : i + batch_pairs]), tokenizer, padding_side, device)


def split_pairs(pairs: Sequence[ContrastivePair], held_out: float = 0.2, seed: int = 0
                ) -> tuple[list[ContrastivePair], list[ContrastivePair]]:
    """A seeded train / held-out split."""
    if not 0.0 <= held_out < 1.0:
        raise ValueError(f"held_out must be in [0, 1), got {held_out}")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(held_out * len(pairs)))
    if held_out > 0 and n_test == 0:
        warnings.warn(f"held_out {held_out} of {len(pairs)} pairs rounds to none: the held-out table will be "
                      "empty; "
                      "give more pairs or a larger held_out", stacklevel=2)
    test = [pairs[i] for i in order[:n_test]]
    train = [pairs[i] for i in order[n_test:]]
    return train, test


def select_pairs(pairs: Sequence[ContrastivePair], n_pairs: int | None = None, held_out: float = 0.2, seed: int = 0
                 ) -> tuple[list[ContrastivePair], list[ContrastivePair]]:
    """The (train, held-out) pairs of a run: the seeded ``n_pairs`` subsample, then the seeded split."""
    pairs = list(pairs)
    if len(pairs) < 2:
        raise ValueError(f"training needs at least 2 pairs, got {len(pairs)}")
    if n_pairs is not None and n_pairs > len(pairs):
        warnings.warn(f"n_pairs {n_pairs} but there are {len(pairs)} pairs: using all {len(pairs)}", stacklevel=2)
    if n_pairs is not None:
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:n_pairs]
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    return split_pairs(pairs, held_out, seed=seed)


def strict_json(text: str, where: str) -> object:
    """``json.loads`` that refuses a key given twice in one object (JSON keeps the last silently)."""
    def no_duplicates(items: list[tuple[str, object]]) -> dict:
        seen: dict = {}
        for k, v in items:
            if k in seen:
                raise ValueError(f"{where}: the key {k!r} appears twice in one object; keep one")
            seen[k] = v
        return seen
    return json.loads(text, object_pairs_hook=no_duplicates)


def load_pairs_file(path: str | Path) -> list[ContrastivePair]:
    """Pairs from a JSON list of ``{"chosen": str, "rejected": str}`` objects (rendered prompts).

    Raises ``ValueError`` naming the file and the first bad entry.
    """
    path = Path(path)
    try:
        rows = strict_json(path.read_text("utf-8"), str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"pairs file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e.__class__.__name__}: {e})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f'{path}: expected a non-empty JSON list of {{"chosen": "...", "rejected": "..."}} '
                         'objects')
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and set(r) == {"chosen", "rejected"}
                and all(isinstance(r[k], str) and r[k].strip() for k in ("chosen", "rejected"))):
            raise ValueError(f'{path}: entry {i} must be {{"chosen": "<text>", "rejected": "<text>"}} with two '
                             f"non-empty strings and nothing else, got {str(r)[:120]}")
        for k in ("chosen", "rejected"):
            try:
                r[k].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escape (\\ud800) is valid JSON but not text
                raise ValueError(f"{path}: entry {i} {k!r} holds {r[k][e.start:e.end]!r} at character {e.start}, "
                                 "which is not text (a lone surrogate escape); fix or remove it") from None
    pairs = [ContrastivePair(r["chosen"], r["rejected"]) for r in rows]
    distinct = len(set(pairs))
    if distinct < 2:
        raise ValueError(f"{path}: {len(pairs)} pair(s), {distinct} distinct; training needs at least 2 different "
                         "pairs (a direction from one pair is that pair's noise)")
    if distinct < len(pairs):
        warnings.warn(f"{path}: {len(pairs) - distinct} of its {len(pairs)} pairs repeat an earlier one; repeats "
                      "weigh those pairs more and may fall on both sides of the held-out split", stacklevel=2)
    return pairs


def check_lengths(pairs: Sequence[ContrastivePair], tokenizer: PreTrainedTokenizerBase, n_ctx: int) -> None:
    """Raise ``ValueError`` if a prompt is longer than the model's context (it would train on garbage)."""
    for i, p in enumerate(pairs):
        n = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (p.chosen, p.rejected))
        if n > n_ctx:
            raise ValueError(f"pair {i} has a prompt of {n} tokens, longer than the model's context of {n_ctx}; "
                             "shorten it")
