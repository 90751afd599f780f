"""The tokenizer: a byte-pair model trained from the prepared dataset's prompt text (no download).

Text is split on whitespace (T5-style "▁" word marks) and digit runs are split from letters, so an
item ID such as ``1234`` becomes sub-word pieces learned from the data (P5 style). With
``item_token_mode="token"`` every catalog ID is instead one token (P5-I style). Collaborative IDs
(``<a3><b12>``) always use one token per cluster symbol.

Whole-word ids (P5): every token gets the index of the whitespace-separated word it belongs to,
counting from 1; padding and ``</s>`` get 0. All pieces of one item ID, and punctuation glued to it
(``1234,``), share one index, so the model can tell where an ID starts and ends.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, EOS, UNK, MASK = "<pad>", "</s>", "<unk>", "<mask>"
SPECIALS = [PAD, EOS, UNK, MASK]
# byte fallback: a character the merges never saw is written as its UTF-8 bytes, one token each, so every
# text encodes without <unk> (a tokenizer trained on one stage's texts reads what any later stage sends)
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
MAX_WHOLE_WORD = 512
_CLUSTER_TOKEN = re.compile(r"<[a-z]\d+>")


class RecTokenizer:
    def __init__(self, tok: Tokenizer):
        self.hf = tok
        self.pad_id = tok.token_to_id(PAD)
        self.eos_id = tok.token_to_id(EOS)
        self.mask_id = tok.token_to_id(MASK)
        self.vocab_size = tok.get_vocab_size()
        # the added tokens that are words of their own (a byte token is a piece of a character)
        self.added = {t.content for t in tok.get_added_tokens_decoder().values() if not _BYTE_TOKEN.fullmatch(t.content)}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "RecTokenizer":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: tokenizer file not found")
        return cls(Tokenizer.from_file(str(p)))

    def to_str(self) -> str:
        """The tokenizer as JSON text (what ``save`` writes): it travels in a config to workers on any node."""
        return self.hf.to_str()

    @classmethod
    def from_str(cls, text: str) -> "RecTokenizer":
        return cls(Tokenizer.from_str(text))

    # ------------------------------------------------------------------ encoding
    def _ids_and_words(self, texts: list[str], max_length: int, whole_word: bool):
        encs = self.hf.encode_batch(texts, add_special_tokens=False)
        ids, words = [], []
        for text, enc in zip(texts, encs):
            toks = enc.ids[: max_length - 1]
            ids.append(toks + [self.eos_id])
            if whole_word:
                words.append(whole_word_ids(text, enc.tokens[: len(toks)], enc.offsets[: len(toks)],
                                            self.added) + [0])
        return ids, words

    def encode_batch(self, texts: list[str], max_length: int = 512, with_whole_word: bool = True) -> dict:
        """Padded tensors: input_ids, attention_mask and (optionally) whole_word_ids; ``</s>`` appended."""
        ids, words = self._ids_and_words(list(texts), max_length, with_whole_word)
        width = max(len(x) for x in ids)
        out = {"input_ids": torch.full((len(ids), width), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(ids), width), dtype=torch.long)}
        if with_whole_word:
            out["whole_word_ids"] = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            out["input_ids"][i, : len(row)] = torch.tensor(row)
            out["attention_mask"][i, : len(row)] = 1
            if with_whole_word:
                out["whole_word_ids"][i, : len(row)] = torch.tensor(words[i])
        return out

    def target_ids(self, texts: list[str], max_length: int = 64) -> list[list[int]]:
        """Decoder label ids of each text: token ids + ``</s>``, unpadded."""
        return self._ids_and_words(list(texts), max_length, False)[0] if texts else []

    def encode_targets(self, texts: list[str], max_length: int = 64) -> torch.Tensor:
        """Labels for the decoder: token ids + ``</s>``, padded with -100 (ignored by the loss)."""
        return pad_labels(self.target_ids(texts, max_length))

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of one string + ``</s>`` (e.g. an item ID, for the decoding trie)."""
        return self.hf.encode(text, add_special_tokens=False).ids + [self.eos_id]

    def item_token_ids(self, id_texts) -> list[int]:
        """The one token of each item ID (a tokenizer trained with ``item_tokens``); an ID that is not
        one token raises, naming it."""
        out = []
        for t in id_texts:
            i = self.hf.token_to_id(str(t))
            if i is None:
                raise ValueError(f"item ID {t!r} is not one token of this tokenizer (the dense sequential style "
                                 "needs item_token_mode=token)")
            out.append(i)
        return out

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id) and int(i) >= 0]
        return self.hf.decode(ids, skip_special_tokens=False).strip()


def pad_labels(rows: list[list[int]]) -> torch.Tensor:
    """Rows of label ids as one tensor, padded with -100 (ignored by the loss)."""
    width = max(1, max(len(x) for x in rows))
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            labels[i, : len(row)] = torch.tensor(row)
    return labels


def whole_word_ids(text: str, tokens: list[str], offsets: list[tuple[int, int]], added: set) -> list[int]:
    """Word index (from 1) per token. A "▁" piece opens a new word; an added token (``<mask>``, a
    cluster symbol, a one-token item ID) opens one when whitespace or the text start precedes it and
    no bare "▁" piece already opened the word; every other piece continues the current word."""
    out, word, prev = [], 0, None
    for tok, (start, _) in zip(tokens, offsets):
        if tok.startswith("▁"):
            word += 1
        elif tok in added and (start == 0 or text[start - 1].isspace()) and prev != "▁":
            word += 1
        out.append(min(max(word, 1), MAX_WHOLE_WORD - 1))
        prev = tok
    return out


def train_tokenizer(texts, vocab_size: int = 8000, item_tokens: list[str] | None = None,
                    extra_special: tuple = ()) -> RecTokenizer:
    """Train a byte-pair tokenizer on ``texts`` (an iterable of strings). ``vocab_size`` counts the learnt
    pieces; the 256 byte tokens of the byte fallback come on top (and the item tokens after them)."""
    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    texts = list(texts)
    cluster = sorted({m for t in texts for m in _CLUSTER_TOKEN.findall(t)} |
                     {m for t in (item_tokens or []) for m in _CLUSTER_TOKEN.findall(t)})
    special = SPECIALS + list(extra_special) + cluster + BYTE_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(BYTE_TOKENS), special_tokens=special, min_frequency=2,
                                  show_progress=False, initial_alphabet=list("0123456789▁"))
    tok.train_from_iterator(texts, trainer=trainer)
    if item_tokens:  # one token per item ID (collaborative IDs already are cluster-symbol tokens)
        plain = [t for t in item_tokens if not _CLUSTER_TOKEN.search(t)]
        tok.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in plain])
    return RecTokenizer(tok)
