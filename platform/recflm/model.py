"""The model: a Hugging Face T5 encoder-decoder built from a config, plus P5's whole-word embedding.

``RecT5`` adds an embedding of each token's whole-word index to the encoder's token embeddings, in
training and in generation alike (P5's released evaluation dropped it at test time; we do not).
Presets go from ``tiny`` (tests) to ``base`` (T5-base geometry). No pretrained weights are loaded.

Item features (``TrainConfig.item_features``): each item token's embedding, wherever the model reads or scores
it (encoder and decoder inputs, the output layer), is its own vector plus the mean embedding of the item's
attribute values (Toys attribute ids, MovieLens genres), as SASRec-with-features and the two-tower's item tower
do: an item with few interactions borrows what its attributes learnt from the others.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from .tokenizer import MAX_WHOLE_WORD

PRESETS = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4),
    # sequence-dense recipe (one token per item, every position supervised): TIGER-like width, 2+2 layers
    # (SASRec-like scale: small initial embeddings and unscaled output logits, so item embeddings learn
    # their scores in a few epochs instead of creeping from N(0, 1) through a d_model^-0.5 output scale;
    # inputs times 1/embed_std, so an item enters the pre-norm residual stream at unit scale, as SASRec's
    # layer-normed input does, instead of 2% of the attention outputs: 2x SASRec's per-epoch learning)
    "seq": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4,
                scale_outputs=False, embed_std=0.02, input_scale=50.0),
    "mini": dict(d_model=288, d_kv=48, d_ff=1152, num_layers=4, num_decoder_layers=4, num_heads=6),
    "small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8),
    "base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12),
}


class RecT5(T5ForConditionalGeneration):
    def __init__(self, config: T5Config):
        super().__init__(config)
        self.whole_word_embed = nn.Embedding(getattr(config, "max_whole_word", MAX_WHOLE_WORD), config.d_model)
        nn.init.normal_(self.whole_word_embed.weight, std=0.02)
        n_attrs = int(getattr(config, "item_feature_attrs", 0) or 0)
        if n_attrs:
            # attribute value 0 is padding; item_feature_index[token] lists the token's attribute values
            self.item_feature_embed = nn.Embedding(n_attrs + 1, config.d_model, padding_idx=0)
            nn.init.normal_(self.item_feature_embed.weight, std=0.02)
            with torch.no_grad():
                self.item_feature_embed.weight[0].zero_()
            self.register_buffer("item_feature_index", torch.zeros(config.vocab_size, int(config.item_feature_slots),
                                                                   dtype=torch.long))
            # before the input scale hook below: the features enter at the token's scale (the stacks' embed_tokens
            # may be modules of their own, sharing the weights)
            for emb in {id(m): m for m in (self.shared, self.encoder.embed_tokens, self.decoder.embed_tokens)}.values():
                emb.register_forward_hook(lambda _m, inp, out: out + self._features(inp[0]).to(out.dtype))
            self.lm_head.register_forward_hook(
                lambda _m, inp, out: out + nn.functional.linear(inp[0], self._features().to(inp[0].dtype)))
        scale = float(getattr(config, "input_scale", 1.0))
        if scale != 1.0:
            # token embeddings enter both stacks times ``input_scale`` (the output logits use them unscaled):
            # small tied embeddings then still carry the item's identity into a pre-norm residual stream
            for emb in {id(m): m for m in (self.shared, self.encoder.embed_tokens, self.decoder.embed_tokens)}.values():
                emb.register_forward_hook(lambda _m, _i, out, s=scale: out * s)
            self.whole_word_embed.register_forward_hook(lambda _m, _i, out, s=scale: out * s)

    def _features(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The attribute part of the embeddings of ``ids`` (any shape, + (d,)), or of every token (V, d)."""
        if ids is None:
            return self._all_features()
        out = nn.functional.embedding_bag(self.item_feature_index[ids.reshape(-1)], self.item_feature_embed.weight,
                                          mode="mean", padding_idx=0)
        return out.view(*ids.shape, -1)

    def _all_features(self) -> torch.Tensor:
        """Every token's attribute part (V, d), for the output layer. Without gradients (evaluation, serving,
        each decoding step) it is computed once per state of the weights and the index: any in-place change
        (an optimizer step, a load, ``set_item_features``) bumps their version and so recomputes it."""
        w, index = self.item_feature_embed.weight, self.item_feature_index
        if torch.is_grad_enabled():
            return nn.functional.embedding_bag(index, w, mode="mean", padding_idx=0)
        key = (w.data_ptr(), w._version, w.dtype, index.data_ptr(), index._version, tuple(index.shape))
        cached = self.__dict__.get("_all_features_cache")
        if cached is None or cached[0] != key:
            cached = (key, nn.functional.embedding_bag(index, w, mode="mean", padding_idx=0))
            self.__dict__["_all_features_cache"] = cached
        return cached[1]

    def set_item_features(self, tokens: list[int], attrs: list[list[int]]) -> None:
        """Item ``tokens[i]`` has the attribute values ``attrs[i]`` (1..item_feature_attrs; at most
        item_feature_slots of them kept); every other token has none."""
        K = self.item_feature_index.shape[1]
        index = torch.zeros_like(self.item_feature_index)
        for t, a in zip(tokens, attrs):
            a = list(a)[:K]
            index[int(t), :len(a)] = torch.as_tensor(a, dtype=torch.long)
        self.item_feature_index.copy_(index)

    def _embed(self, input_ids, whole_word_ids):
        emb = self.shared(input_ids)
        if whole_word_ids is not None:
            emb = emb + self.whole_word_embed(whole_word_ids)
        return emb

    def encode(self, input_ids, attention_mask, whole_word_ids=None) -> BaseModelOutput:
        """Run the encoder once (decoding code then calls ``forward(encoder_outputs=...)``)."""
        return self.encoder(inputs_embeds=self._embed(input_ids, whole_word_ids), attention_mask=attention_mask,
                            return_dict=True)

    def forward(self, input_ids=None, attention_mask=None, whole_word_ids=None, encoder_outputs=None,
                inputs_embeds=None, token_losses=False, **kwargs):
        if token_losses:
            return self.token_losses(input_ids, attention_mask, kwargs["labels"], whole_word_ids,
                                     kwargs.get("label_smoothing", 0.0), kwargs.get("decoder_input_ids"))
        if encoder_outputs is None and inputs_embeds is None and input_ids is not None:
            inputs_embeds, input_ids = self._embed(input_ids, whole_word_ids), None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, encoder_outputs=encoder_outputs,
                               inputs_embeds=inputs_embeds, **kwargs)

    def _encode_unique(self, input_ids, attention_mask, whole_word_ids=None) -> torch.Tensor:
        """Encoder states (B, S, d) computed once per distinct source row: dense sequence examples share a
        few constant prompts, so most of a batch's encoder work would repeat (identical token ids imply
        identical masks and whole-word ids)."""
        uniq, inv = torch.unique(input_ids, dim=0, return_inverse=True)
        if len(uniq) == len(input_ids):
            return self.encode(input_ids, attention_mask, whole_word_ids).last_hidden_state
        B = len(input_ids)
        first = torch.full((len(uniq),), B, dtype=torch.long, device=input_ids.device).scatter_reduce_(
            0, inv, torch.arange(B, device=input_ids.device), "amin")
        ww = None if whole_word_ids is None else whole_word_ids[first]
        return self.encode(input_ids[first], attention_mask[first], ww).last_hidden_state[inv]

    def token_losses(self, input_ids, attention_mask, labels, whole_word_ids=None, label_smoothing: float = 0.0,
                     decoder_input_ids=None):
        """Cross-entropy of every supervised target token (``labels != -100``), computing output logits
        only there: a dense sequence target (one next-item label per position of a user's history) costs
        one decoder pass, and padded positions cost no catalog-wide logits. Returns (losses (N,), row (N,)).
        ``decoder_input_ids``: what the decoder reads, when it is not the labels shifted right (a dense
        rating row reads its items but is supervised at its ratings only).
        DDP wraps ``forward``, so ``forward(..., token_losses=True)`` routes here."""
        import torch.nn.functional as F

        enc = self._encode_unique(input_ids, attention_mask, whole_word_ids)
        dec_in = self._shift_right(labels) if decoder_input_ids is None else decoder_input_ids
        dec = self.decoder(input_ids=dec_in, encoder_hidden_states=enc,
                           encoder_attention_mask=attention_mask, return_dict=True, use_cache=False)
        h = dec.last_hidden_state
        if getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings):
            h = h * self.model_dim ** -0.5
        keep = labels != -100
        logits = self.lm_head(h[keep])
        loss = F.cross_entropy(logits.float(), labels[keep], reduction="none", label_smoothing=label_smoothing)
        return loss, keep.nonzero()[:, 0]

    @torch.no_grad()
    def next_token_logprobs(self, input_ids, attention_mask, prefixes: list, whole_word_ids=None) -> torch.Tensor:
        """Log-probabilities (B, V) of the token after each row's decoder prefix (token ids after the
        start token; rows may differ in length: right-padded, and the causal decoder never looks ahead)."""
        enc = self._encode_unique(input_ids, attention_mask, whole_word_ids)
        B, T = len(prefixes), max(len(p) for p in prefixes) + 1
        dec_in = torch.full((B, T), self.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        for r, p in enumerate(prefixes):
            if len(p):
                dec_in[r, 1:len(p) + 1] = torch.as_tensor(p, dtype=torch.long)
        dec = self.decoder(input_ids=dec_in, encoder_hidden_states=enc,
                           encoder_attention_mask=attention_mask, return_dict=True, use_cache=False)
        last = torch.as_tensor([len(p) for p in prefixes], device=input_ids.device)
        h = dec.last_hidden_state[torch.arange(B, device=input_ids.device), last]
        if getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings):
            h = h * self.model_dim ** -0.5
        return torch.log_softmax(self.lm_head(h).float(), -1)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, whole_word_ids=None, **kwargs):
        """``generate`` with the whole-word embedding: the encoder runs here, once."""
        if "encoder_outputs" not in kwargs and input_ids is not None:
            kwargs["encoder_outputs"] = self.encode(input_ids, attention_mask, whole_word_ids)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def build_model(preset: str, vocab_size: int, pad_id: int = 0, eos_id: int = 1, **overrides) -> RecT5:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (known: {', '.join(PRESETS)})")
    geometry = {"dropout_rate": 0.1, "feed_forward_proj": "relu", **PRESETS[preset], **overrides}
    embed_std = geometry.pop("embed_std", None)
    # T5's tie_word_embeddings=False is its switch for *unscaled* output logits (T5 v1.1); the weights
    # stay tied either way (transformers forces tying), and config.json keeps scale_decoder_outputs
    scale = geometry.pop("scale_outputs", True)
    cfg = T5Config(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id,
                   tie_word_embeddings=scale, max_whole_word=MAX_WHOLE_WORD, **geometry)
    model = RecT5(cfg)
    if embed_std:
        with torch.no_grad():
            model.shared.weight.normal_(0.0, embed_std)
            model.whole_word_embed.weight.normal_(0.0, embed_std)
            if hasattr(model, "item_feature_embed"):
                model.item_feature_embed.weight.normal_(0.0, embed_std)
                model.item_feature_embed.weight[0].zero_()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def adapt_embeddings(model: RecT5, vocab_size: int, fresh: list, seed: int = 0) -> None:
    """A bundle's model for a catalog it was not trained on: grow the token embeddings (and an untied output
    layer) to ``vocab_size`` in place (the modules, and the hooks on them, stay), and give the new rows and the
    rows of ``fresh`` (token ids: items the model never saw, whatever their ID text meant before) new vectors
    drawn with the spread of the existing rows."""
    g = torch.Generator().manual_seed(int(seed))

    def grow(module: nn.Module, attr: str = "weight") -> None:
        old = getattr(module, attr).data
        n, d = old.shape
        std = float(old.std()) or 0.02
        new = torch.empty(max(vocab_size, n), d, dtype=old.dtype)
        new[:n] = old
        rows = sorted(set(range(n, new.shape[0])) | {int(i) for i in fresh if 0 <= int(i) < new.shape[0]})
        if rows:
            new[rows] = (torch.randn(len(rows), d, generator=g) * std).to(old.dtype)
        setattr(module, attr, nn.Parameter(new))
        if isinstance(module, nn.Embedding):
            module.num_embeddings = new.shape[0]
        elif isinstance(module, nn.Linear):
            module.out_features = new.shape[0]

    grow(model.shared)  # the encoder's and decoder's embed_tokens are this module
    for emb in (model.encoder.embed_tokens, model.decoder.embed_tokens):
        if emb is not model.shared:
            emb.weight = model.shared.weight
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.shared.weight
    else:
        grow(model.lm_head)
    model.config.vocab_size = model.shared.weight.shape[0]
    if hasattr(model, "item_feature_index"):  # new and fresh tokens have no attributes (their meaning is new)
        old = model.item_feature_index
        index = torch.zeros(model.config.vocab_size, old.shape[1], dtype=old.dtype)
        index[:len(old)] = old
        fresh_rows = [int(i) for i in fresh if 0 <= int(i) < len(index)]
        index[fresh_rows] = 0
        model.item_feature_index = index
