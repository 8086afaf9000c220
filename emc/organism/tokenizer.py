"""A byte-level BPE tokenizer trained locally on the organism corpus.

Action words must be single tokens so a scenario's decision is one next-token distribution; BPE
gives no such guarantee, so the trainer sees each action word many times on its own and the result
is checked. BOS is id 1, never 0: circuit-tracer prepends the first truthy BOS id it finds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in this order

# Mirrors the corpus chat form: "User: ...\nAssistant: ..." with one turn per line.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# How often each forced word is shown to the trainer: enough to outrank every corpus pair.
_FORCED_REPEATS = 20_000


def _training_stream(texts: Iterable[str], forced: list[str]) -> Iterator[str]:
    yield from texts
    for word in forced:
        yield word * _FORCED_REPEATS


def train_tokenizer(
    texts: Iterable[str], forced_words: list[str], vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """Train BPE on `texts`; every string in `forced_words` (e.g. " keep") becomes one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_stream(texts, forced_words), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=max_length,
        chat_template=CHAT_TEMPLATE,
    )
    check_single_tokens(wrapped, forced_words)
    return wrapped


def check_single_tokens(tokenizer: PreTrainedTokenizerFast, words: Iterable[str]) -> None:
    split = [w for w in words if len(tokenizer.encode(w, add_special_tokens=False)) != 1]
    if split:
        raise ValueError(f"action words are not single tokens: {split}")


def single_token_id(tokenizer: PreTrainedTokenizerFast, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens, expected 1")
    return ids[0]
