"""Small tokenizers built locally (no network) for tiny test models.

Each function builds a fast tokenizer over one fixed vocabulary of ~200 lowercase English words,
digits and punctuation, saves it with ``save_pretrained`` into ``directory`` and returns it, so a
model saved beside it loads with ``AutoTokenizer`` like a downloaded one. Unknown words map to the
unknown token. Token ids are stable: special tokens first, then ``WORDS`` in order.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

_WORD_TEXT = """
    the a an and or but not no yes of to in on at by for with from about over under into out
    up down is are was were be been am do does did have has had will would can could should may
    i you he she it we they me him her us them my your his its our their this that these those
    what which who whom whose when where why how all any some many much more most few less one
    two three four five six seven eight nine ten first last next new old good bad big small long
    short high low great little same other own right left hello world quick brown fox jumps lazy
    dog cat bird fish tree sea sky sun moon star water fire earth air time day night year week
    man woman child people city country capital france paris london river mountain house home
    book word text story poem haiku song music art food bread apple tea coffee love life work
    play write read say tell ask go come see look make take give find think know want like feel
    run walk sleep eat drink open close begin end help keep let put seem turn show try call
    blue red green white black happy sad fast slow warm cold light dark very too also just only
    then now here there again once always never often today tomorrow yesterday please thank
    thanks sorry model export test token sentence
"""
WORDS = tuple(_WORD_TEXT.split())
PUNCTUATION = tuple(".,!?;:'\"()-")
DIGITS = tuple("0123456789")

BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # fairseq order: <pad> is 1
DECODER_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>")

DECODER_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} </s> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# a template that renders tools and earlier calls itself, as tool-trained models' templates do
TOOLS_CHAT_TEMPLATE = (
    "{% if tools %}<|system|> tools: {% for tool in tools %}{{ tool.function.name }} "
    "{{ tool.function.parameters | tojson }}; {% endfor %}</s> {% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }}"
    "{% for call in message.tool_calls or [] %}<call> {{ call.function.name }} "
    "{{ call.function.arguments | tojson }}{% endfor %} </s> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def vocabulary(special: tuple[str, ...], continuations: tuple[str, ...] = ()) -> dict[str, int]:
    """Special tokens, then words, punctuation and digits, with consecutive ids."""
    tokens = [*special, *dict.fromkeys(WORDS), *PUNCTUATION, *DIGITS, *continuations]
    return {token: i for i, token in enumerate(tokens)}


def bert_tokenizer(directory: str | os.PathLike[str], *,
                   token_types: bool = True) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer: lowercase, ``[CLS] a [SEP] b [SEP]``, with token types
    (``token_types=False`` for DistilBERT, which has none)."""
    vocab = vocabulary(BERT_SPECIAL, continuations=tuple(f"##{d}" for d in DIGITS))
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"] if token_types
        else ["input_ids", "attention_mask"],
    )
    return _save(fast, directory)


def roberta_tokenizer(directory: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """A RoBERTa-style tokenizer: ``<s> a </s></s> b </s>``, pad id 1, no token types."""
    vocab = vocabulary(ROBERTA_SPECIAL)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), add_prefix_space=False
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
        model_input_names=["input_ids", "attention_mask"],
    )
    return _save(fast, directory)


def decoder_tokenizer(directory: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """A decoder-style tokenizer: no special tokens added, ``</s>`` as eos, a chat template."""
    vocab = vocabulary(DECODER_SPECIAL)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.chat_template = DECODER_CHAT_TEMPLATE
    return _save(fast, directory)


def byte_level_tokenizer(directory: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE over all 256 bytes (after ``<unk> <s> </s>``), so any text,
    JSON included, has tokens: what grammar-constrained decoding needs (llguidance reads the
    bytes of each token through the byte-level decoder). Chat template as ``decoder_tokenizer``."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *sorted(alphabet)])}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = DECODER_CHAT_TEMPLATE
    return _save(fast, directory)


def _save(tokenizer: PreTrainedTokenizerFast,
          directory: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    Path(directory).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer
