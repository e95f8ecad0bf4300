"""Tokenizer and chat template of the demo models.

A byte-level BPE with the GPT-2 pre-tokenizer, trained on the shapes world's own text: the
vocabulary stays tiny (so do the embeddings), yet any string round-trips, and llama.cpp's
"gpt2" tokenizer model can carry it into GGUF later.

The chat template is Zephyr-like with one `<image>` placeholder per image item; the processor
expands it into the vision tower's patch count:

    <s><|user|>
    <image>
    What color is the circle?</s>
    <|assistant|>
    red</s>
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from edgelmm.demo import shapes

PAD, BOS, EOS, IMAGE, USER, ASSISTANT = "<pad>", "<s>", "</s>", "<image>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, USER, ASSISTANT)
VOCAB_SIZE = 512  # an upper bound: the trainer stops once every word of the world is one token

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('user', 'assistant') %}"
    "{{ raise_exception('only user and assistant roles are supported') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def prompt_text(question: str) -> str:
    """What `CHAT_TEMPLATE` renders for one image and one question, with the generation prompt.

    Training builds its inputs from this string instead of running the template per sample;
    a test checks that the two agree.
    """
    return f"{BOS}{USER}\n{IMAGE}\n{question}{EOS}\n{ASSISTANT}\n"


def _corpus(n: int = 4000) -> list[str]:
    """Every kind of text the models read or write; the template's special tokens are never
    split by BPE, so only their glue (newlines) matters."""
    texts = [t for s in shapes.generate(n, seed=shapes.TRAIN_SEED_BASE) for t in (s.question, s.answer)]
    return texts + [s.answer for s in shapes.generate(n // 4, seed=shapes.TRAIN_SEED_BASE + 1, task="caption")] + ["\n"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the BPE (deterministic: same corpus, same merges) and wrap it for transformers."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left", chat_template=CHAT_TEMPLATE, model_max_length=512,
    )
