"""A byte-level tokenizer with a ChatML chat template, saved as plain Hugging Face files.

Ids 0..255 are the bytes (GPT-2's byte-to-unicode alphabet, so `ByteLevel` pre-tokenising and
decoding are exact); special tokens follow. Any UTF-8 text round-trips; no merges, so a token is
one byte. `AutoTokenizer.from_pretrained` loads the result with no loramill code.
"""

from __future__ import annotations

from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible byte -> printable unicode map, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer_vocab_size() -> int:
    return 256 + len(SPECIAL_TOKENS)


def save_byte_tokenizer(out_dir: Path, model_max_length: int):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    Returns the loaded `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(model_dir: Path):
    """`AutoTokenizer.from_pretrained(model_dir)`, or `InputError` in one line when the directory holds none.

    transformers answers a directory without tokenizer files with a long traceback (or, for some
    configs, by trying the hub); a base model for loramill must carry its tokenizer.
    """
    from transformers import AutoTokenizer

    from adapters.errors import InputError

    model_dir = Path(model_dir)
    if model_dir.is_dir() and not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); a base model "
                         "directory must include its tokenizer files", code="no_tokenizer")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{model_dir}: the tokenizer cannot be loaded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})", code="no_tokenizer") from exc
