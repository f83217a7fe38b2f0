"""A tiny random-weight BERT embedding model as one GGUF file, laid out the way llama.cpp's
`convert_hf_to_gguf.py` writes a real one (architecture "bert", WordPiece vocabulary), so that tests can
load and embed with llama.cpp without downloading a model.

The vocabulary is in llama.cpp's form of WordPiece: a word-initial piece is stored with a leading "▁"
(U+2581) and a continuation piece ("##ing" in Hugging Face's form) without its "##". Single letters and
digits in both forms let every lowercase word tokenize; llama.cpp lowercases the input first.
"""

from __future__ import annotations

import string
from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX = 512
N_TOKEN_TYPES = 2
LAYER_NORM_EPS = 1e-12

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(len(SPECIAL))

_WORDS = """
    the of and to in is was it for on with as he she they we you i be at by this that from or an not but
    are his her their our your my me him them us have has had do does did will would can could should may
    might must shall one two three four five six seven eight nine ten first last new old good bad big small
    long short high low great little other same different all some any many much more most few each every
    no yes what which who whom whose when where why how there here then now today yesterday tomorrow time
    day night week year world life man woman child people person friend family house home city country
    water fire air earth food word sentence text test example model game player story book page line name
    thing way part place case point number group problem fact hand eye head face question answer work school
    make made go went come came see saw know knew think thought take took give gave find found tell told ask
    asked use used try tried call called need want like love help run ran walk play read write say said get
    got put keep let begin seem show hear turn move live believe hold bring happen stand lose pay meet
    another very also just only even still again always never often well too quite about into over after
    before under between through during without against among because if while until so than up down out
    off above below near far red blue green black white quick brown fox jumps lazy dog cat bird tree sun
    moon sky sea river road car door window table chair light dark warm cold hot happy sad true false open
    close start end hello goodbye please thank thanks sorry
"""
_SUFFIXES = ("s", "es", "ed", "ing", "ly", "er", "est", "ness", "ment", "tion", "able", "ful", "less")
_PUNCTUATION = ".,!?;:'\"()-"


def vocabulary() -> list[str]:
    """The tokens in id order: special tokens, word starts ("▁" + word, letter, digit or punctuation mark),
    then continuations (suffixes, letters, digits)."""
    singles = [*string.ascii_lowercase, *string.digits]
    starts = dict.fromkeys([*_WORDS.split(), *singles, *_PUNCTUATION])  # no duplicates: llama.cpp aborts
    continuations = dict.fromkeys([*_SUFFIXES, *singles])
    return [*SPECIAL, *("\u2581" + piece for piece in starts), *continuations]


def write_tiny_bert(path: Path, *, seed: int = 0, pooling: gguf.PoolingType = gguf.PoolingType.MEAN) -> Path:
    """Write the model to `path` (weights drawn with `seed`, layer norms the identity) and return `path`."""
    tokens = vocabulary()
    types = [gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL))
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name("tiny-bert")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_block_count(N_LAYER)
    writer.add_head_count(N_HEAD)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(N_TOKEN_TYPES)
    # As the converter writes BERT: [CLS] is the BOS token, [SEP] both the EOS and the separator.
    writer.add_bos_token_id(CLS)
    writer.add_eos_token_id(SEP)
    writer.add_sep_token_id(SEP)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    writer.add_mask_token_id(MASK)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)

    for name, tensor in _tensors(len(tokens), np.random.default_rng(seed)).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors(n_vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every tensor llama.cpp's BERT loader reads, by GGUF name; numpy shapes are ggml's reversed."""

    def name(tensor: gguf.MODEL_TENSOR, suffix: str, block: int | None = None) -> str:
        base = gguf.TENSOR_NAMES[tensor]
        return (base.format(bid=block) if block is not None else base) + "." + suffix

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    def norm(tensor: gguf.MODEL_TENSOR, block: int | None = None) -> dict[str, np.ndarray]:
        return {
            name(tensor, "weight", block): np.ones(N_EMBD, dtype=np.float32),
            name(tensor, "bias", block): np.zeros(N_EMBD, dtype=np.float32),
        }

    t = gguf.MODEL_TENSOR
    out = {
        name(t.TOKEN_EMBD, "weight"): weight(n_vocab, N_EMBD),
        name(t.TOKEN_TYPES, "weight"): weight(N_TOKEN_TYPES, N_EMBD),
        name(t.POS_EMBD, "weight"): weight(N_CTX, N_EMBD),
        **norm(t.TOKEN_EMBD_NORM),
    }
    for block in range(N_LAYER):
        for tensor in (t.ATTN_Q, t.ATTN_K, t.ATTN_V, t.ATTN_OUT):
            out[name(tensor, "weight", block)] = weight(N_EMBD, N_EMBD)
            out[name(tensor, "bias", block)] = weight(N_EMBD)
        out |= norm(t.ATTN_OUT_NORM, block)
        out[name(t.FFN_UP, "weight", block)] = weight(N_FF, N_EMBD)
        out[name(t.FFN_UP, "bias", block)] = weight(N_FF)
        out[name(t.FFN_DOWN, "weight", block)] = weight(N_EMBD, N_FF)
        out[name(t.FFN_DOWN, "bias", block)] = weight(N_EMBD)
        out |= norm(t.LAYER_OUT_NORM, block)
    return out
