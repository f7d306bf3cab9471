"""Write a tiny, deterministic llama-architecture GGUF that a real llama-server loads.

No registry ships a loadable GGUF and nothing may be downloaded at run time, so tests
and demos generate their own model. Its properties are chosen to make tests easy:

- one token per byte of text (byte-level vocabulary, no effective merges), so prompt
  token counts are predictable;
- ChatML special tokens and template, so chat requests work;
- an output head biased towards letters and space, so generated text is printable
  and the end token is never produced: every completion stops at ``max_tokens``.

Usage: ``python -m gateway.demo.tinymodel OUT.gguf [--seed N] [--context N]``.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import string
import tempfile
from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
# A head size of 32: llama.cpp's quantized KV caches (--cache-type-k q8_0, ...) store
# blocks of 32 values, so smaller heads make an engine with one refuse to start.
N_HEAD = 2
N_HEAD_KV = 1
N_FF = 128
HEAD_DIM = N_EMBD // N_HEAD
DEFAULT_SEED = 0
# Large enough that benchmarks can start engines with -c up to 32768 without the
# "n_ctx_seq > n_ctx_train" warning; the file size does not depend on it.
DEFAULT_CONTEXT = 32768

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
BOS_ID = 256  # <|endoftext|>; gpt2 vocabularies default to id 11 otherwise
EOS_ID = 258  # <|im_end|>
N_VOCAB = 256 + len(SPECIAL_TOKENS)

# The usual ChatML template. llama-server flattens list-of-parts content to a string
# before rendering and passes null content as "", so no guards are needed here.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llama.cpp refuses a gpt2 tokenizer without a merges array and gguf-py refuses an
# empty array, so we store one merge that can never fire: bytes 0xFE and 0xFF do not
# occur in UTF-8 text (and its result is not in the vocabulary anyway).
INERT_MERGES = ("þ ÿ",)

# Residual dimension that holds a constant; the output head reads it to bias logits.
# With these values allowed tokens lead every other token by 20+ logits (checked with
# a numpy forward pass), so even temperature 2 with top_k 0 stays letters and spaces.
BIAS_DIM = 0
BIAS_VALUE = 8.0
ALLOWED_BYTES = (string.ascii_letters + " ").encode("ascii")
ALLOWED_LOGIT_WEIGHT = 3.0
SPACE_EXTRA_WEIGHT = 0.15  # a little more space than letters, so text splits into words


def byte_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, indexed by byte value."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _add_hparams(writer: gguf.GGUFWriter, context_length: int) -> None:
    writer.add_name("tiny-llama-demo")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(N_VOCAB)


def _add_tokenizer(writer: gguf.GGUFWriter) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([*byte_to_unicode(), *SPECIAL_TOKENS])
    types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    writer.add_token_types(types)
    writer.add_token_merges(list(INERT_MERGES))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def _layer_tensors(rng: np.random.Generator, i: int) -> dict[str, np.ndarray]:
    """One transformer block; numpy shapes are (out, in), gguf reverses them."""
    s = 1.0 / np.sqrt(N_EMBD)
    kv = N_HEAD_KV * HEAD_DIM
    # Norm weights ignore the constant dimension, so it does not dominate the blocks' input.
    norm = np.ones(N_EMBD, dtype=np.float32)
    norm[BIAS_DIM] = 0.0
    t = {
        "attn_norm": norm.copy(),
        "attn_q": _normal(rng, (N_EMBD, N_EMBD), s),
        "attn_k": _normal(rng, (kv, N_EMBD), s),
        "attn_v": _normal(rng, (kv, N_EMBD), s),
        "attn_output": _normal(rng, (N_EMBD, N_EMBD), s),
        "ffn_norm": norm.copy(),
        "ffn_gate": _normal(rng, (N_FF, N_EMBD), s),
        "ffn_up": _normal(rng, (N_FF, N_EMBD), s),
        "ffn_down": _normal(rng, (N_EMBD, N_FF), 1.0 / np.sqrt(N_FF)),
    }
    # Blocks never write to the constant dimension, so it stays BIAS_VALUE to the end.
    t["attn_output"][BIAS_DIM, :] = 0.0
    t["ffn_down"][BIAS_DIM, :] = 0.0
    return {f"blk.{i}.{name}": value for name, value in t.items()}


def _output_head(rng: np.random.Generator) -> np.ndarray:
    """Random head plus a column on the constant dimension: + for allowed bytes, - else."""
    head = _normal(rng, (N_VOCAB, N_EMBD), 1.0 / np.sqrt(N_EMBD))
    bias = np.full(N_VOCAB, -ALLOWED_LOGIT_WEIGHT, dtype=np.float32)
    bias[list(ALLOWED_BYTES)] = ALLOWED_LOGIT_WEIGHT
    bias[ord(" ")] += SPACE_EXTRA_WEIGHT
    head[:, BIAS_DIM] = bias
    return head


def _tensors(seed: int) -> dict[str, np.ndarray]:
    """All weights, drawn in a fixed order from one generator so a seed fixes the bytes."""
    rng = np.random.default_rng(seed)
    embd = _normal(rng, (N_VOCAB, N_EMBD), 1.0)
    embd[:, BIAS_DIM] = BIAS_VALUE
    tensors = {"token_embd.weight": embd}
    for i in range(N_LAYER):
        tensors.update({f"{k}.weight": v for k, v in _layer_tensors(rng, i).items()})
    tensors["output_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    tensors["output.weight"] = _output_head(rng)
    return tensors


def _write_gguf(path: Path, seed: int, context_length: int) -> None:
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_hparams(writer, context_length)
        _add_tokenizer(writer)
        for name, tensor in _tensors(seed).items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def write_tiny_model(
    path: str | os.PathLike[str],
    seed: int = DEFAULT_SEED,
    context_length: int = DEFAULT_CONTEXT,
) -> Path:
    """Write the model to ``path`` unless an identical file is already there.

    The file is built next to ``path`` and renamed into place, so a concurrent reader
    (or an engine being started) never sees a half-written model.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be positive, got {context_length}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_gguf(tmp, seed, context_length)
        if target.is_file() and filecmp.cmp(tmp, target, shallow=False):
            return target  # unchanged: keep the old file (and its mtime)
        tmp.chmod(0o644)  # mkstemp makes 0600 files
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny llama GGUF for tests and demos.")
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="context_length")
    args = parser.parse_args(argv)
    print(write_tiny_model(args.out, seed=args.seed, context_length=args.context))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
